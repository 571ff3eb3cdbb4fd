"""Run a Simulator on its own event loop in a background thread, for synchronous tests and tools."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from .config import SimConfig
from .server import Simulator

T = TypeVar("T")


class BackgroundSimulator:
    """A Simulator in a daemon thread; ``with BackgroundSimulator(cfg) as sim: sim.url`` starts and stops it."""

    def __init__(self, config: SimConfig, start_timeout: float = 10.0) -> None:
        self.config = config
        self.start_timeout = start_timeout
        self.loop = asyncio.new_event_loop()
        self.sim = Simulator(config, exit_on_crash=False)
        self._thread = threading.Thread(target=self._run, name=f"vllmsim-{config.port}", daemon=True)
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.sim.start())
        except BaseException as exc:  # reported to the starting thread
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.sim.stop())
        self.loop.close()

    @property
    def url(self) -> str:
        """Base URL of the running simulator."""
        return self.sim.url

    def start(self) -> BackgroundSimulator:
        """Start the thread and wait (bounded) until the port is bound."""
        self._thread.start()
        if not self._ready.wait(self.start_timeout):
            raise TimeoutError("simulator did not start in time")
        if self._error is not None:
            raise RuntimeError(f"simulator failed to start: {self._error}") from self._error
        return self

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        """Run a coroutine on the simulator's loop (e.g. ``sim.restart()``) and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def restart(self, timeout: float = 10.0) -> None:
        """Stop (if running) and start again with fresh state, as a supervisor restarts a crashed pod."""

        async def _restart() -> None:
            await self.sim.stop()
            await self.sim.start()

        self.call(_restart(), timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving and join the thread (bounded)."""
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)

    def __enter__(self) -> BackgroundSimulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
