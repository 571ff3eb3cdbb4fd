"""``lora-router``: the command line of the router."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from common.heap import freeze_startup_heap
from router.proxy import RouterConfig
from router.routes import RouteError, RouteTable
from router.server import RouterService, StaticRouteSource
from router.strategies import STRATEGIES, make_strategy

log = logging.getLogger("router")

API_KEY_ENV = "LORA_ROUTER_API_KEY"
_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lora-router",
        description="OpenAI-compatible router that sends each request to a vLLM replica holding its LoRA adapter.",
    )
    p.add_argument("--host", default="0.0.0.0", help="address to serve clients on")
    p.add_argument("--port", type=int, default=8000, help="port to serve clients on")
    p.add_argument("--metrics-host", default=None, help="address of the metrics port (default: --host)")
    p.add_argument("--metrics-port", type=int, default=9090, help="Prometheus /metrics and /router/load")
    src = p.add_argument_group("route table (Kubernetes EndpointSlices unless --routes-file)")
    src.add_argument("--namespace", default=None, help="namespace of the route table (default: the pod's own)")
    src.add_argument("--autoscaler", default=None, help="LoRAAutoscaler whose route table to follow (default: all)")
    src.add_argument("--kubeconfig", default=None, help="kubeconfig file (default: in-cluster, then KUBECONFIG)")
    src.add_argument("--routes-file", default=None, help="static JSON/YAML route file instead of Kubernetes")
    src.add_argument("--sync-timeout", type=float, default=60.0, help="seconds to wait for the first listing")
    st = p.add_argument_group("choice among an adapter's holders")
    st.add_argument("--strategy", choices=sorted(STRATEGIES), default="lora-aware")
    st.add_argument(
        "--max-loras", type=int, default=None, help="vLLM --max-loras of the pods until learned from their metrics"
    )
    st.add_argument("--lora-weight", type=float, default=1.0, help="gie: weight of the LoRA-affinity score")
    st.add_argument("--preferred-bonus", type=float, default=0.0, help="gie: score bonus of preferred holders")
    st.add_argument(
        "--queue-bound",
        type=float,
        default=8.0,
        help="lora-aware: waiting requests above which a pod counts as saturated",
    )
    st.add_argument(
        "--slot-cost", type=float, default=2.0, help="lora-aware: cost, in requests, of taking a new LoRA slot on a pod"
    )
    st.add_argument(
        "--move-deferred-after",
        type=float,
        default=0.0,
        help="seconds a request may wait, before any byte of its answer, on a pod where its adapter has no LoRA "
        "slot before it moves to a holder where the adapter runs or has room (0: never)",
    )
    st.add_argument(
        "--hold-for-slot",
        type=float,
        default=0.0,
        help="seconds a request for an adapter may wait in the router, while every holder is saturated for it "
        "(no LoRA slot, queue above --queue-bound, full KV cache), for the first that is not (oldest first) "
        "before it is sent anyway (0: never held)",
    )
    st.add_argument("--scrape-interval", type=float, default=0.3, help="seconds between scrapes of each pod")
    up = p.add_argument_group("upstream requests")
    up.add_argument("--connect-timeout", type=float, default=5.0)
    up.add_argument(
        "--first-byte-timeout",
        type=float,
        default=300.0,
        help="seconds to the first byte of the answer (also the longest gap inside a stream)",
    )
    up.add_argument("--total-timeout", type=float, default=1800.0)
    up.add_argument(
        "--queue-timeout",
        type=float,
        default=10.0,
        help="seconds a request for a known model waits in the router for a holder",
    )
    up.add_argument("--max-body-bytes", type=int, default=16 * 1024 * 1024)
    up.add_argument(
        "--api-key-file",
        default=None,
        help=f"file holding the bearer key sent to vLLM (else the {API_KEY_ENV} environment variable)",
    )
    p.add_argument("--log-level", default="info")
    return p


def _api_key(path: str | None) -> str | None:
    if path:
        key = Path(path).read_text().strip()
        if not key:
            raise ValueError(f"API key file {path} is empty")
        return key
    return os.environ.get(API_KEY_ENV) or None


def _namespace(arg: str | None) -> str | None:
    if arg:
        return arg
    if os.environ.get("POD_NAMESPACE"):
        return os.environ["POD_NAMESPACE"]
    with contextlib.suppress(OSError):
        return Path(_NAMESPACE_FILE).read_text().strip() or None
    return None


async def run(args: argparse.Namespace) -> int:
    """Run until SIGTERM/SIGINT; returns the exit code."""
    for name in ("connect_timeout", "first_byte_timeout", "total_timeout", "scrape_interval"):
        if getattr(args, name) <= 0:
            log.error("--%s must be positive", name.replace("_", "-"))
            return 2
    for name in ("move_deferred_after", "hold_for_slot"):
        if getattr(args, name) < 0:
            log.error("--%s must be 0 (off) or positive", name.replace("_", "-"))
            return 2
    try:
        api_key = _api_key(args.api_key_file)
    except (OSError, ValueError) as exc:
        log.error("cannot read the API key: %s", exc)
        return 2
    strategy = make_strategy(
        args.strategy,
        max_loras=args.max_loras,
        lora_weight=args.lora_weight,
        preferred_bonus=args.preferred_bonus,
        queue_bound=args.queue_bound,
        slot_cost=args.slot_cost,
    )
    config = RouterConfig(
        connect_timeout=args.connect_timeout,
        first_byte_timeout=args.first_byte_timeout,
        total_timeout=args.total_timeout,
        queue_timeout=args.queue_timeout,
        max_body_bytes=args.max_body_bytes,
        move_deferred_after=args.move_deferred_after,
        hold_for_slot=args.hold_for_slot,
        move_check_interval=max(0.05, min(args.scrape_interval, 1.0)),
        max_loras=args.max_loras,
        queue_bound=args.queue_bound,
        api_key=api_key,
    )
    table = RouteTable()
    service = RouterService(
        table,
        strategy,
        config,
        host=args.host,
        port=args.port,
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
        scrape_interval=args.scrape_interval,
    )
    if args.routes_file:
        static = StaticRouteSource(table, args.routes_file)
        try:
            await static.start()
        except (OSError, RouteError) as exc:
            log.error("cannot use the routes file: %s", exc)
            return 2
        service.on_stop(static.stop)
    else:
        from common.kube import KubeClient
        from router.kube import KubeRouteSource

        try:
            client = KubeClient.from_kubeconfig(args.kubeconfig)
        except Exception as exc:
            log.error("cannot configure the Kubernetes client: %s", exc)
            return 2
        source = KubeRouteSource(table, client, _namespace(args.namespace), args.autoscaler)
        service.on_stop(source.stop)
        await source.start(args.sync_timeout)
    await service.start()
    freeze_startup_heap()  # full GC passes over start-up objects would stall requests (see common.heap)
    log.info(
        "router on %s:%s (metrics on %s), strategy %s",
        args.host,
        service.bound_port,
        service.bound_metrics_port,
        strategy.name,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping: finishing requests in flight")
    await service.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        import uvloop
    except ImportError:
        sys.exit(asyncio.run(run(args)))
    sys.exit(uvloop.run(run(args)))


if __name__ == "__main__":
    main()
