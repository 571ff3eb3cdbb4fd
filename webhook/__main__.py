"""``lora-webhook``: the admission webhook for LoRAAutoscaler and LoRAPlacement.

Serves ``/mutate`` and ``/validate`` over TLS only, ``/metrics`` on a separate plain-HTTP port. By
default it makes its own CA and serving certificate for its Service's DNS names and writes the CA into
its webhook configurations; ``--cert-source=files`` serves certificate files provided by someone else
(cert-manager), reloaded when they change.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from api.validation import prepare_validators
from common.heap import freeze_startup_heap
from common.kube import ApiError, KubeClient, load_api_client
from common.tls import CertificateError, CertKeyPair, ReloadingServerContext, service_dns_names
from webhook.certs import (
    CA_FILE,
    CERT_FILE,
    KEY_FILE,
    BundleState,
    ensure_self_signed,
    keep_ca_bundle,
    shared_ca,
)
from webhook.server import MAX_BODY_BYTES, WebhookMetrics, create_app, create_metrics_app
from webhook.targets import NoScaleLookup, ScaleLookup, ScaleReader

log = logging.getLogger("webhook")

DEFAULT_CERT_DIR = "/tmp/k8s-webhook-server/serving-certs"
DEFAULT_CONFIGURATION = "lora-autoscaler-webhook"
DEFAULT_SERVICE = "lora-autoscaler-webhook"
DEFAULT_NAMESPACE = "lora-system"
DEFAULT_CA_SECRET = "lora-autoscaler-webhook-ca"
#: How long start-up waits for the API to settle the shared CA before giving up (the pod is restarted).
CA_SECRET_DEADLINE_SECONDS = 60.0
#: How often a self-made certificate is checked for renewal.
RENEW_CHECK_SECONDS = 3600.0
SHUTDOWN_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True)
class Options:
    """Everything the flags say, checked."""

    host: str
    port: int
    metrics_host: str
    metrics_port: int
    cert_source: str
    cert_dir: Path
    cert_file: Path
    key_file: Path
    service_name: str
    service_namespace: str
    extra_sans: tuple[str, ...]
    mutating_configuration: str
    validating_configuration: str
    ca_secret: str
    kubeconfig: str | None
    capacity_check: bool
    scale_timeout: float
    reload_interval: float
    max_body_bytes: int


def parse_args(argv: Sequence[str] | None = None) -> Options:
    """Read the flags; exit 2 with a message naming the flag when one is wrong."""
    parser = argparse.ArgumentParser(prog="lora-webhook", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="0.0.0.0", help="address to serve admission on (TLS)")
    parser.add_argument("--port", type=int, default=9443, help="TLS port for /mutate, /validate, /healthz, /readyz")
    parser.add_argument("--metrics-host", default="0.0.0.0", help="address of the plain-HTTP metrics endpoint")
    parser.add_argument("--metrics-port", type=int, default=8080, help="port of /metrics; 0 turns it off")
    parser.add_argument("--cert-source", choices=("self-signed", "files"), default="self-signed",
                        help="self-signed: make a CA and certificate and publish the CA into the webhook "
                        "configurations; files: serve --cert-file/--key-file (e.g. from cert-manager)")
    parser.add_argument("--cert-dir", default=DEFAULT_CERT_DIR,
                        help="where certificates are made (self-signed) or found (files: tls.crt, tls.key)")
    parser.add_argument("--cert-file", default=None, help="serving certificate (files mode; default "
                        "<cert-dir>/tls.crt)")
    parser.add_argument("--key-file", default=None, help="its key (files mode; default <cert-dir>/tls.key)")
    parser.add_argument("--service-name", default=DEFAULT_SERVICE, help="the webhook's Service (certificate names)")
    parser.add_argument("--service-namespace", default=os.environ.get("POD_NAMESPACE") or DEFAULT_NAMESPACE,
                        help="the Service's namespace (default: $POD_NAMESPACE, else lora-system)")
    parser.add_argument("--extra-san", action="append", default=[], metavar="NAME_OR_IP",
                        help="another DNS name or IP address for the self-made certificate (repeatable)")
    parser.add_argument("--mutating-configuration", default=DEFAULT_CONFIGURATION,
                        help="MutatingWebhookConfiguration to write the CA into ('' for none)")
    parser.add_argument("--validating-configuration", default=DEFAULT_CONFIGURATION,
                        help="ValidatingWebhookConfiguration to write the CA into ('' for none)")
    parser.add_argument("--ca-secret", default=DEFAULT_CA_SECRET,
                        help="self-signed mode: Secret (in --service-namespace) holding the CA all replicas share; "
                        "'' keeps the CA in --cert-dir only (one replica)")
    parser.add_argument("--kubeconfig", default=None,
                        help="kubeconfig file (default: in-cluster service account, else $KUBECONFIG)")
    parser.add_argument("--capacity-check", choices=("on", "off"), default="on",
                        help="read the scale target's replicas to warn when adapters cannot fit")
    parser.add_argument("--scale-timeout", type=float, default=1.0,
                        help="seconds to wait for the scale target's replicas before warning 'not checked'")
    parser.add_argument("--reload-interval", type=float, default=1.0,
                        help="seconds between checks of the certificate files for rotation")
    parser.add_argument("--max-body-bytes", type=int, default=MAX_BODY_BYTES, help="largest request accepted")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for flag, value, low, high in (("--port", args.port, 1, 65535), ("--metrics-port", args.metrics_port, 0, 65535)):
        if not low <= value <= high:
            parser.error(f"{flag} must be between {low} and {high}, got {value}")
    if args.metrics_port and args.metrics_port == args.port and args.metrics_host == args.host:
        parser.error("--metrics-port must differ from --port: metrics are served on their own plain-HTTP port")
    for flag, value in (("--scale-timeout", args.scale_timeout), ("--reload-interval", args.reload_interval)):
        if not 0 < value <= 60:
            parser.error(f"{flag} must be above 0 and at most 60 seconds, got {value}")
    if args.max_body_bytes < 1024:
        parser.error(f"--max-body-bytes must be at least 1024, got {args.max_body_bytes}")
    if args.cert_source == "self-signed" and (args.cert_file or args.key_file):
        parser.error("--cert-file and --key-file need --cert-source=files")
    cert_dir = Path(args.cert_dir)
    return Options(
        host=args.host,
        port=args.port,
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
        cert_source=args.cert_source,
        cert_dir=cert_dir,
        cert_file=Path(args.cert_file) if args.cert_file else cert_dir / CERT_FILE,
        key_file=Path(args.key_file) if args.key_file else cert_dir / KEY_FILE,
        service_name=args.service_name,
        service_namespace=args.service_namespace,
        extra_sans=tuple(args.extra_san),
        mutating_configuration=args.mutating_configuration,
        validating_configuration=args.validating_configuration,
        ca_secret=args.ca_secret,
        kubeconfig=args.kubeconfig,
        capacity_check=args.capacity_check == "on",
        scale_timeout=args.scale_timeout,
        reload_interval=args.reload_interval,
        max_body_bytes=args.max_body_bytes,
    )


async def _renew_forever(opts: Options, names: list[str]) -> None:
    while True:
        await asyncio.sleep(RENEW_CHECK_SECONDS)
        try:
            await asyncio.to_thread(ensure_self_signed, opts.cert_dir, names)
        except OSError as exc:
            log.warning("cannot renew the serving certificate in %s: %s", opts.cert_dir, exc)


async def _shared_ca(client: KubeClient, opts: Options) -> CertKeyPair:
    """The replicas' shared CA from its Secret, retrying while the API is unreachable (bounded)."""
    deadline = time.monotonic() + CA_SECRET_DEADLINE_SECONDS
    delay = 0.5
    while True:
        try:
            return await asyncio.to_thread(shared_ca, client, opts.service_namespace, opts.ca_secret)
        except ApiError as exc:
            if not exc.retriable or time.monotonic() + delay > deadline:
                raise SystemExit(f"lora-webhook: cannot read or create the CA Secret "
                                 f"{opts.service_namespace}/{opts.ca_secret}: {exc}") from exc
            log.warning("the CA Secret is not reachable yet (%s); retrying", exc)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 5.0)


async def serve(opts: Options, stop: asyncio.Event) -> None:
    """Run until ``stop`` is set: certificates, both servers, reload and caBundle tasks."""
    names = [*service_dns_names(opts.service_name, opts.service_namespace), *opts.extra_sans]
    self_signed = opts.cert_source == "self-signed"
    publish = self_signed and bool(opts.mutating_configuration or opts.validating_configuration)
    share = self_signed and bool(opts.ca_secret)
    client: KubeClient | None = None
    if publish or share or opts.capacity_check:
        try:
            client = KubeClient(load_api_client(opts.kubeconfig))
        except Exception as exc:
            if publish or share:
                raise SystemExit(f"lora-webhook: cannot reach the Kubernetes API to share and publish the CA: {exc}; "
                                 f"pass --kubeconfig, run in a pod, or use --cert-source=files") from exc
            log.warning("no Kubernetes API (%s): capacity warnings say 'not checked'", exc)
    if self_signed:
        ca = await _shared_ca(client, opts) if share and client is not None else None
        ensure_self_signed(opts.cert_dir, names, ca=ca)
    tls = ReloadingServerContext(opts.cert_file, opts.key_file)
    lookup: ScaleLookup = (
        ScaleReader(client, timeout=opts.scale_timeout) if client is not None and opts.capacity_check
        else NoScaleLookup()
    )  # fmt: skip
    bundle = BundleState()

    def readiness() -> list[str]:
        if publish and not bundle.published:
            return [bundle.last_error or "the CA bundle is not published yet"]
        return []

    metrics = WebhookMetrics()
    app = create_app(lookup=lookup, metrics=metrics, readiness=readiness, max_body_bytes=opts.max_body_bytes)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_SECONDS)
    await runner.setup()
    prepare_validators()  # the first admission would otherwise pay for compiling them
    freeze_startup_heap()  # full GC passes over start-up objects would stall admissions (see common.heap)
    runners = [runner]
    tasks: list[asyncio.Task[None]] = []
    try:
        await web.TCPSite(runner, opts.host, opts.port, ssl_context=tls.context, backlog=1024).start()
        log.info("serving admission over TLS on %s:%d (%s certificates)", opts.host, opts.port, opts.cert_source)
        if opts.metrics_port:
            metrics_runner = web.AppRunner(create_metrics_app(metrics.registry), access_log=None)
            await metrics_runner.setup()
            runners.append(metrics_runner)
            await web.TCPSite(metrics_runner, opts.metrics_host, opts.metrics_port).start()
            log.info("serving /metrics over plain HTTP on %s:%d", opts.metrics_host, opts.metrics_port)
        tasks.append(asyncio.create_task(tls.watch(opts.reload_interval)))
        if self_signed:
            tasks.append(asyncio.create_task(_renew_forever(opts, names)))
        if publish and client is not None:
            ca_file = opts.cert_dir / CA_FILE
            tasks.append(asyncio.create_task(keep_ca_bundle(
                client, ca_file.read_bytes, opts.mutating_configuration or None,
                opts.validating_configuration or None, bundle,
            )))  # fmt: skip
        await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for each in reversed(runners):
            await each.cleanup()
        log.info("stopped")


async def _main(opts: Options) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await serve(opts, stop)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (``lora-webhook``)."""
    opts = parse_args(argv)
    try:
        try:
            import uvloop
        except ImportError:
            asyncio.run(_main(opts))
        else:
            uvloop.run(_main(opts))
    except CertificateError as exc:
        print(f"lora-webhook: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. the port is taken
        print(f"lora-webhook: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
