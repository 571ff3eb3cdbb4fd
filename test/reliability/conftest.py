"""The reliability suite's helpers (`invariants`, `harness`, `scenarios`) are plain modules beside the tests.

Tests run with `--import-mode=importlib`, which puts no test directory on `sys.path`, and the name `test`
belongs to the standard library's package; so this directory is added to `sys.path` here, once, and the
helpers are imported by their own names (as `hack/reliability_figures.py` does).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = str(Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from scenarios import Env  # noqa: E402

from localkube.controlplane import ControlPlane  # noqa: E402
from localkube.kubelet import TestKubelet  # noqa: E402


@pytest.fixture
def env(control_plane: ControlPlane, namespace: str, kubelet: TestKubelet, crds: None, tmp_path: Path) -> Iterator[Env]:
    """A scenario's surroundings: the session's control plane, a fresh namespace with its kubelet, a log dir."""
    yield Env(control_plane, namespace, kubelet, tmp_path)
