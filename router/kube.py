"""The live route table: the controller's EndpointSlices, watched by the shared informer.

The informer runs on its own thread; every event is handed to the router's event loop with
``call_soon_threadsafe``, so the table is only ever touched from the loop and the request path needs no
lock. Events keep their order, and the table is marked synced only after the first listing's events.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from api.labels import AUTOSCALER_LABEL, ROLE_LABEL
from common.informer import Informer
from common.kube import ENDPOINT_SLICES, KubeClient
from router.routes import RouteError, RouteTable, slice_key

log = logging.getLogger("router.kube")


def route_selector(autoscaler: str | None) -> str:
    """The label selector of the route table's slices: one autoscaler's, or every autoscaler's."""
    return f"{AUTOSCALER_LABEL}={autoscaler}" if autoscaler else ROLE_LABEL


class KubeRouteSource:
    """Feeds a RouteTable from the route-table EndpointSlices of one namespace."""

    def __init__(
        self, table: RouteTable, client: KubeClient, namespace: str | None, autoscaler: str | None = None
    ) -> None:
        self.table = table
        self.informer = Informer(
            client,
            ENDPOINT_SLICES,
            namespace=namespace,
            label_selector=route_selector(autoscaler),
            name=f"router-routes/{namespace or '*'}",
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rejected: dict[str, str] = {}
        self._later: asyncio.Task[None] | None = None

    async def start(self, sync_timeout: float = 60.0) -> bool:
        """Start watching; returns whether the first listing arrived within ``sync_timeout``.

        When it did not, the router keeps running (requests for known models wait, the readiness probe
        stays red) and the table fills in as soon as the API server answers.
        """
        loop = self._loop = asyncio.get_running_loop()

        def on_add(obj: dict[str, Any]) -> None:
            loop.call_soon_threadsafe(self._apply, obj)

        def on_update(_old: dict[str, Any], new: dict[str, Any]) -> None:
            loop.call_soon_threadsafe(self._apply, new)

        def on_delete(obj: dict[str, Any]) -> None:
            loop.call_soon_threadsafe(self._delete, obj)

        self.informer.add_handler(on_add, on_update, on_delete)
        self.informer.start()
        synced = await loop.run_in_executor(None, self.informer.wait_for_sync, sync_timeout)
        if synced:
            # Queued after the listing's events (call_soon_threadsafe keeps order), so it runs after them.
            loop.call_soon_threadsafe(self.table.mark_synced)
        else:
            log.warning("route table not listed within %.0fs; waiting for the API server", sync_timeout)
            self._later = loop.create_task(self._mark_synced_later(), name="route-sync")
        return synced

    async def _mark_synced_later(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.informer.stopped:
            if await loop.run_in_executor(None, self.informer.wait_for_sync, 5.0):
                loop.call_soon_threadsafe(self.table.mark_synced)
                return

    async def stop(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.informer.stop)
        if self._later is not None:
            self._later.cancel()

    def _apply(self, obj: dict[str, Any]) -> None:
        key = slice_key(obj)
        try:
            self.table.apply_slice(obj)
        except RouteError as exc:
            # Skipped (an old view of the slice would be wrong too), reported once per distinct reason.
            self.table.remove(key)
            if self._rejected.get(key) != str(exc):
                self._rejected[key] = str(exc)
                log.warning("route-table slice ignored: %s", exc)
            return
        self._rejected.pop(key, None)

    def _delete(self, obj: dict[str, Any]) -> None:
        self._rejected.pop(slice_key(obj), None)
        self.table.delete_slice(obj)
