"""Supervision of the processes the harness starts, so that none outlives it.

Every process starts in its own session (so Ctrl-C in a terminal reaches only the harness, which then
stops its children in order) and is stopped by process group: SIGTERM, then SIGKILL after a grace.
Three nets catch a harness that does not get to stop its children itself:

- an `atexit` hook stops whatever is still registered when the interpreter exits;
- SIGTERM and SIGHUP (when nobody else handles them) stop everything, then raise KeyboardInterrupt so
  that pytest or the command line unwinds its own teardown;
- a tiny "reaper" process holds a pipe from the harness; when the harness dies for any reason, even
  SIGKILL, the pipe closes and the reaper kills every process group still registered with it.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import FrameType
from typing import IO

log = logging.getLogger(__name__)

DEFAULT_GRACE_SECONDS = 5.0
ENV_KEEP_WORK_DIR = "LOCALKUBE_KEEP_WORK_DIR"
"""Set (to anything) to keep work dirs and logs after a run, for a post-mortem."""

_REAPER_CODE = r"""
import os, signal, sys, time
groups = set()
for line in sys.stdin:
    line = line.strip()
    if line.startswith("+"):
        groups.add(int(line[1:]))
    elif line.startswith("-"):
        groups.discard(int(line[1:]))
def alive(g):
    try:
        os.killpg(g, 0)
        return True
    except OSError:
        return False
for g in list(groups):
    try:
        os.killpg(g, signal.SIGTERM)
    except OSError:
        groups.discard(g)
deadline = time.monotonic() + 3.0
while groups and time.monotonic() < deadline:
    groups = {g for g in groups if alive(g)}
    time.sleep(0.05)
for g in groups:
    try:
        os.killpg(g, signal.SIGKILL)
    except OSError:
        pass
"""


class _Reaper:
    """The out-of-process safety net: kills registered process groups when the harness vanishes."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._stdin: IO[bytes] | None = None
        self._groups: set[int] = set()
        self.pids: list[int] = []

    def _ensure(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        self._proc = subprocess.Popen(
            [sys.executable, "-S", "-c", _REAPER_CODE],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            close_fds=True,
        )
        self._stdin = self._proc.stdin
        self.pids.append(self._proc.pid)
        for group in self._groups:
            self._send(f"+{group}")

    def _send(self, line: str) -> None:
        if self._stdin is None:
            return
        try:
            self._stdin.write(f"{line}\n".encode())
            self._stdin.flush()
        except (BrokenPipeError, ValueError, OSError):
            log.warning("process reaper is gone; processes will be stopped only by this process")

    def add(self, group: int) -> None:
        self._groups.add(group)
        self._ensure()
        self._send(f"+{group}")

    def remove(self, group: int) -> None:
        self._groups.discard(group)
        self._send(f"-{group}")
        if not self._groups:
            self.close()

    def close(self) -> None:
        """Let the reaper exit (with nothing to kill) and wait for it."""
        proc, self._proc = self._proc, None
        stdin, self._stdin = self._stdin, None
        if proc is None:
            return
        with contextlib.suppress(OSError):
            if stdin is not None:
                stdin.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


_lock = threading.RLock()
_live: dict[int, ManagedProcess] = {}
_reaper = _Reaper()
_started_pids: list[int] = []
_handlers_installed = False


def started_pids() -> list[int]:
    """Every PID this module ever started in this interpreter (components, simulators, the reaper)."""
    with _lock:
        return [*_started_pids, *_reaper.pids]


def pid_alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie (a zombie runs nothing; its parent just has not reaped it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X")


def stop_all(grace: float = DEFAULT_GRACE_SECONDS) -> None:
    """Stop every live process in reverse start order (the last started depends on the earlier ones)."""
    with _lock:
        procs = list(_live.values())
    for proc in reversed(procs):
        proc.stop(grace)
    with _lock:
        _reaper.close()


def _on_signal(signum: int, frame: FrameType | None) -> None:
    stop_all(grace=2.0)
    signal.signal(signum, signal.SIG_DFL)
    raise KeyboardInterrupt(f"stopped by signal {signal.Signals(signum).name}")


def install_exit_handlers() -> None:
    """Register the atexit hook, and SIGTERM/SIGHUP handlers where nobody else handles those signals."""
    global _handlers_installed
    with _lock:
        if _handlers_installed:
            return
        _handlers_installed = True
    atexit.register(stop_all)
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) in (signal.SIG_DFL, None):
            signal.signal(signum, _on_signal)


class ManagedProcess:
    """One supervised child: started in its own process group, logged to a file, stopped by group."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self._popen: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        """PID of the current run, or None before the first start."""
        return self._popen.pid if self._popen is not None else None

    @property
    def returncode(self) -> int | None:
        """Exit code once the process has exited (negative: killed by that signal); None while it runs."""
        return self._popen.poll() if self._popen is not None else None

    def alive(self) -> bool:
        """True while the process runs."""
        return self._popen is not None and self._popen.poll() is None

    def start(self) -> None:
        """Start (or start again after an exit); output goes to the log file, appended across runs."""
        if self.alive():
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        install_exit_handlers()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log_file = self.log_path.open("ab")
        log_file.write(f"--- {time.strftime('%H:%M:%S')} starting: {' '.join(self.argv)}\n".encode())
        log_file.flush()
        try:
            popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            log_file.close()
            raise RuntimeError(f"cannot start {self.name} ({self.argv[0]}): {exc}") from exc
        self._popen, self._log_file = popen, log_file
        with _lock:
            _live[popen.pid] = self
            _started_pids.append(popen.pid)
            _reaper.add(popen.pid)
        log.debug("started %s pid %d", self.name, popen.pid)

    def signal_group(self, signum: int) -> None:
        """Send a signal to the whole process group (the child and anything it forked)."""
        if self._popen is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._popen.pid, signum)

    def stop(self, grace: float = DEFAULT_GRACE_SECONDS) -> int | None:
        """SIGTERM the group, SIGKILL it after `grace` seconds; idempotent. Returns the exit code."""
        popen = self._popen
        if popen is None:
            return None
        if popen.poll() is None:
            self.signal_group(signal.SIGTERM)
            try:
                popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log.info("%s (pid %d) still running %.1fs after SIGTERM; killing it", self.name, popen.pid, grace)
        # Always sweep the group: a child may have forked helpers that outlive it.
        self.signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            popen.wait(timeout=5)
        self._finish(popen)
        return popen.returncode

    def reap(self) -> int | None:
        """If the process has exited on its own, release its bookkeeping and return its exit code."""
        popen = self._popen
        if popen is None or popen.poll() is None:
            return None
        self.signal_group(signal.SIGKILL)
        self._finish(popen)
        return popen.returncode

    def _finish(self, popen: subprocess.Popen[bytes]) -> None:
        with _lock:
            if _live.pop(popen.pid, None) is not None:
                _reaper.remove(popen.pid)
        if self._log_file is not None:
            with contextlib.suppress(OSError):
                self._log_file.close()
            self._log_file = None

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the log (what a person needs to see when this component failed)."""
        try:
            data = self.log_path.read_bytes()[-64 * 1024 :]
        except OSError:
            return "(no log)"
        return "\n".join(data.decode(errors="replace").splitlines()[-lines:])
