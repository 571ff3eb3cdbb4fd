"""Where the control-plane binaries come from.

They are built from the Kubernetes Go modules at a pinned release by `hack/build-control-plane.sh`,
which caches them by version outside the clone (seconds when cached, minutes on a clean machine). Tests
never skip for a missing binary: they build it. `LORA_AUTOSCALER_KUBE_BIN` points at a folder that
already holds them and skips the script.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ENV_BIN_DIR = "LORA_AUTOSCALER_KUBE_BIN"
REQUIRED = ("etcd", "kube-apiserver", "kube-controller-manager", "kubectl")
BUILD_SCRIPT = Path(__file__).resolve().parent.parent / "hack" / "build-control-plane.sh"
BUILD_TIMEOUT_SECONDS = 3600.0


class BinariesError(RuntimeError):
    """The control-plane binaries cannot be found or built."""


def _check(folder: Path, origin: str) -> Path:
    missing = [name for name in REQUIRED if not os.access(folder / name, os.X_OK)]
    if missing:
        raise BinariesError(f"{origin} {folder} lacks executable {', '.join(missing)}")
    return folder


def find_binaries(build: bool = True) -> Path:
    """The folder holding etcd, kube-apiserver, kube-controller-manager and kubectl.

    Order: `$LORA_AUTOSCALER_KUBE_BIN`, else the build script (which answers from its cache at once).
    """
    from_env = os.environ.get(ENV_BIN_DIR)
    if from_env:
        return _check(Path(from_env).expanduser(), f"${ENV_BIN_DIR}")
    if not build:
        raise BinariesError(f"${ENV_BIN_DIR} is not set and building was not allowed")
    if not BUILD_SCRIPT.is_file():
        raise BinariesError(
            f"build script {BUILD_SCRIPT} not found (is this a source checkout?); set ${ENV_BIN_DIR} instead"
        )
    try:
        # stderr passes through: a first build takes minutes and shows its progress there.
        result = subprocess.run(
            ["bash", str(BUILD_SCRIPT)],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            timeout=BUILD_TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise BinariesError(f"{BUILD_SCRIPT} did not finish in {BUILD_TIMEOUT_SECONDS:.0f}s") from exc
    lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    if result.returncode != 0 or not lines:
        raise BinariesError(
            f"{BUILD_SCRIPT} failed with exit code {result.returncode}; its messages are on stderr above"
        )
    return _check(Path(lines[-1]), f"{BUILD_SCRIPT.name} printed")
