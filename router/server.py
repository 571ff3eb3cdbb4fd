"""Assembly: the proxy, its metrics server, the scraper, the rate ticker and a route source, started and
stopped together. Used by the command line and by tests that need a whole router on real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from router.accounting import Accounting
from router.metrics import RouterMetrics, load_report
from router.proxy import Router, RouterConfig
from router.routes import RouteError, RouteTable, load_static_routes
from router.scrape import PodMetrics, Scraper
from router.strategies import Strategy

log = logging.getLogger("router")

SNAPSHOT_INTERVAL = 1.0
FORGET_EVERY = 60  # snapshots between two clean-ups of pods that left the table


class StaticRouteSource:
    """Routes from a JSON/YAML file, re-read when the file changes (for local use without Kubernetes)."""

    def __init__(self, table: RouteTable, path: str | Path, poll_interval: float = 1.0) -> None:
        self.table = table
        self.path = Path(path)
        self.poll_interval = poll_interval
        self._mtime: float | None = None
        self._task: asyncio.Task[None] | None = None

    def load(self) -> None:
        """Read the file now; raises RouteError (or OSError) with the reason when it cannot be used."""
        mtime = self.path.stat().st_mtime
        self.table.replace(load_static_routes(self.path))
        self._mtime = mtime
        self.table.mark_synced()

    async def start(self) -> None:
        self.load()
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="static-routes")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                if self.path.stat().st_mtime != self._mtime:
                    self.load()
                    log.info("static routes reloaded from %s: %d models", self.path, len(self.table.models()))
            except (OSError, RouteError) as exc:
                log.error("static routes %s not reloaded (the previous table stays): %s", self.path, exc)


class RouterService:
    """A running router: client port, metrics port, scraper, rate ticker, and whatever feeds the table."""

    def __init__(
        self,
        table: RouteTable,
        strategy: Strategy,
        config: RouterConfig | None = None,
        *,
        host: str = "0.0.0.0",
        port: int = 8000,
        metrics_host: str | None = None,
        metrics_port: int | None = 9090,
        scrape_interval: float = 0.3,
        scrape: bool = True,
        rate_window: float = 10.0,
    ) -> None:
        self.table = table
        self.accounting = Accounting(rate_window=rate_window)
        self.metrics = RouterMetrics(self.accounting)
        self.router = Router(table, strategy, config, self.accounting, self.metrics)
        self.host = host
        self.port = port
        self.metrics_host = metrics_host or host
        self.metrics_port = metrics_port
        self.scrape_interval = scrape_interval
        self.scrape_enabled = scrape
        self._runners: list[web.AppRunner] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._scraper: Scraper | None = None
        self._on_stop: list[Callable[[], Awaitable[None]]] = []
        self.bound_port: int | None = None
        self.bound_metrics_port: int | None = None

    def on_stop(self, fn: Callable[[], Awaitable[None]]) -> None:
        """Run ``fn`` when the service stops (used to stop a route source)."""
        self._on_stop.append(fn)

    def make_metrics_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self._handle_metrics)
        app.router.add_get("/router/load", self._handle_load)
        app.router.add_get("/healthz", self._handle_healthz)
        app.router.add_get("/readyz", self._handle_readyz)
        return app

    async def _handle_metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _handle_load(self, request: web.Request) -> web.Response:
        now = asyncio.get_running_loop().time()
        doc = load_report(self.table, self.accounting, now, time.time(), self.router.strategy.describe())
        return web.Response(body=orjson.dumps(doc), headers={"Content-Type": "application/json"})

    async def _handle_healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _handle_readyz(self, request: web.Request) -> web.Response:
        if self.table.synced:
            return web.Response(text="ok\n")
        return web.Response(status=503, text="route table not loaded yet\n")

    async def start(self) -> None:
        runner = web.AppRunner(self.router.make_app(), handler_cancellation=True, access_log=None)
        await runner.setup()
        self._runners.append(runner)
        site = web.TCPSite(runner, self.host, self.port, backlog=1024, reuse_address=True)
        await site.start()
        self.bound_port = _bound_port(runner)
        if self.metrics_port is not None:
            mrunner = web.AppRunner(self.make_metrics_app(), access_log=None)
            await mrunner.setup()
            self._runners.append(mrunner)
            await web.TCPSite(mrunner, self.metrics_host, self.metrics_port, reuse_address=True).start()
            self.bound_metrics_port = _bound_port(mrunner)
        loop = asyncio.get_running_loop()
        if self.scrape_enabled:
            headers = {"Authorization": f"Bearer {self.router.config.api_key}"} if self.router.config.api_key else {}
            self._scraper = Scraper(
                self.router.session,
                self.table.addresses,
                self._store_metrics,
                interval=self.scrape_interval,
                headers=headers,
            )
            self._scraper.start()
        self._tasks.append(loop.create_task(self._tick(), name="router-rates"))

    def _store_metrics(self, address: str, metrics: PodMetrics | None) -> None:
        self.accounting.store_metrics(address, metrics)
        self.router.grant_slots()  # the pod's queue, and what others send it, say where held requests may go

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        n = 0
        while True:
            self.accounting.snapshot(loop.time())
            n += 1
            if n % FORGET_EVERY == 0:
                self.metrics.forget(self.accounting.forget_pods(self.table.addresses()))
            await asyncio.sleep(SNAPSHOT_INTERVAL)

    async def stop(self) -> None:
        for fn in self._on_stop:
            try:
                await fn()
            except Exception:
                log.exception("stopping a route source failed")
        if self._scraper is not None:
            await self._scraper.stop()
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        for runner in reversed(self._runners):
            await runner.cleanup()
        self._runners.clear()
        await self.router.close()


def _bound_port(runner: web.AppRunner) -> int | None:
    """The port actually bound (tests pass port 0)."""
    for site in runner.sites:
        server = getattr(site, "_server", None)
        sockets = getattr(server, "sockets", None) or []
        for sock in sockets:
            return int(sock.getsockname()[1])
    return None
