"""Command line: `python -m localkube up` runs a local control plane until Ctrl-C or SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from localkube.binaries import BinariesError, find_binaries
from localkube.controlplane import ControlPlane, ControlPlaneError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m localkube",
        description=(
            "A real Kubernetes control plane on loopback (etcd, kube-apiserver, kube-controller-manager) "
            "for development and tests, with an optional test kubelet that runs a vLLM simulator per pod."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the control plane and keep it running until Ctrl-C or SIGTERM")
    up.add_argument("--work-dir", type=Path, help="folder for certificates, etcd data and logs (default: a temp dir)")
    up.add_argument("--keep-work-dir", action="store_true", help="do not delete the work dir on exit")
    up.add_argument("--start-timeout", type=float, default=120.0, help="seconds to wait for readiness")
    up.add_argument(
        "--kubelet",
        action="store_true",
        help="also run a test kubelet that binds pods and runs a vLLM simulator for each on a pod network of its "
        "own (a network namespace; needs root, else pods fall back to 127.0.0.x)",
    )
    sub.add_parser("binaries", help="build (or find in the cache) the control-plane binaries; print their folder")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return parser


def _up(args: argparse.Namespace) -> int:
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    cp = ControlPlane(
        work_dir=args.work_dir,
        keep_work_dir=args.keep_work_dir or args.work_dir is not None,
        start_timeout=args.start_timeout,
    )
    cp.start()
    kubelet = None
    try:
        if args.kubelet:
            from localkube.kubelet import TestKubelet

            # Pods get addresses on the kubelet's own pod network (a network namespace joined to the host
            # by a veth pair), so they can be in EndpointSlices; without root it falls back to 127.0.0.x.
            kubelet = TestKubelet(cp.api_client(), node_name="localkube-node").start()
            network = kubelet.network
            if network is not None:
                print(
                    f"test kubelet: pods on {network.subnet} (host side {network.host_address}, network "
                    f"namespace {network.namespace})",
                    file=sys.stderr,
                )
            else:
                print(
                    "test kubelet: no pod network, pods on 127.0.0.x (not allowed in EndpointSlices)", file=sys.stderr
                )
        print(f"control plane ready in {cp.startup_seconds:.1f}s; logs in {cp.work_dir / 'logs'}", file=sys.stderr)
        print(cp.kubeconfig)
        print(f"export KUBECONFIG={cp.kubeconfig}", flush=True)
        while not stop.wait(1.0):
            pass
    finally:
        if kubelet is not None:
            kubelet.stop()  # its simulators, then its pod network
        cp.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m localkube` and the `localkube` script."""
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if args.command == "binaries":
            print(find_binaries())
            return 0
        return _up(args)
    except (BinariesError, ControlPlaneError, RuntimeError) as exc:
        print(f"localkube: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
