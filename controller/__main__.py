"""``lora-controller``: the controller process.

Informers run on every replica (a warm standby); only the holder of the Lease reconciles and writes.
SIGTERM or SIGINT stops the workers, releases the Lease so a standby takes over at once, and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from types import FrameType

from common.kube import KubeClient, load_api_client
from controller.manager import Controller, Options

log = logging.getLogger("controller")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lora-controller", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: in-cluster, then KUBECONFIG)")
    p.add_argument("--namespace", default=None,
                   help="watch only this namespace (default: every namespace)")
    p.add_argument("--leader-elect", dest="leader_elect", action=argparse.BooleanOptionalAction, default=True,
                   help="campaign for the Lease before acting (default: on)")
    p.add_argument("--lease-name", default="lora-autoscaler-controller")
    p.add_argument("--lease-namespace", default=None,
                   help="namespace of the Lease (default: POD_NAMESPACE, else --namespace, else default)")
    p.add_argument("--identity", default=None, help="this replica's identity on the Lease (default: POD_NAME "
                   "or host name plus a random suffix)")
    p.add_argument("--lease-duration", type=float, default=15.0)
    p.add_argument("--renew-deadline", type=float, default=10.0)
    p.add_argument("--retry-period", type=float, default=2.0)
    p.add_argument("--metrics-port", type=int, default=8080, help="Prometheus /metrics, /healthz, /readyz "
                   "(0 picks a free port, -1 turns it off)")
    p.add_argument("--metrics-host", default="0.0.0.0")
    p.add_argument("--workers", type=int, default=8, help="placement workers (loads may take seconds)")
    p.add_argument("--audit-period", type=float, default=3.0, help="seconds between checks of each pod's "
                   "/v1/models")
    p.add_argument("--log-level", default=os.environ.get("LOG_LEVEL", "INFO"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(threadName)s: %(message)s")
    if args.workers < 1:
        print("lora-controller: --workers must be at least 1", file=sys.stderr)
        return 2
    if args.lease_duration <= args.renew_deadline or args.renew_deadline <= args.retry_period:
        print("lora-controller: need --lease-duration > --renew-deadline > --retry-period", file=sys.stderr)
        return 2
    try:
        api = load_api_client(args.kubeconfig)
    except Exception as exc:
        print(f"lora-controller: cannot load the Kubernetes configuration: {exc}", file=sys.stderr)
        return 2
    kube = KubeClient(api, field_manager="lora-autoscaler-controller")
    lease_ns = args.lease_namespace or os.environ.get("POD_NAMESPACE") or args.namespace or "default"
    options = Options(
        namespace=args.namespace, workers=args.workers, leader_election=args.leader_elect,
        lease_name=args.lease_name, lease_namespace=lease_ns, identity=args.identity or os.environ.get("POD_NAME"),
        lease_duration=args.lease_duration, renew_deadline=args.renew_deadline, retry_period=args.retry_period,
        audit_period=args.audit_period,
    )
    from common.events import EventRecorder

    recorder = EventRecorder(kube, "lora-autoscaler-controller")
    controller = Controller(kube, options, recorder=recorder)
    server = None
    if args.metrics_port >= 0:
        from common.metrics import MetricsServer

        server = MetricsServer(args.metrics_port, args.metrics_host)
        server.add_ready_check("informers", lambda: all(i.has_synced() for i in controller.informers))
        server.start()
        log.info("metrics on port %d", server.port)

    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal %d: shutting down", signum)
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        controller.start()
    except Exception as exc:
        log.error("start failed: %s", exc)
        controller.stop()
        if server is not None:
            server.stop()
        return 1
    log.info("started (namespace %s, leader election %s)", args.namespace or "<all>",
             "on" if args.leader_elect else "off")
    done.wait()
    controller.stop(release=True)
    if server is not None:
        server.stop()
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
