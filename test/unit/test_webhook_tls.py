"""TLS: the self-made CA and serving certificate, rotation without restart over real sockets, the TLS
floor, the caBundle patch, and the whole app answering over TLS only."""

from __future__ import annotations

import asyncio
import base64
import datetime
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
from aiohttp import ClientSession, TCPConnector, web
from cryptography import x509

from common.tls import (
    CertKeyPair,
    ReloadingServerContext,
    client_context,
    issue_serving_cert,
    make_ca,
    server_context,
    service_dns_names,
    serving_cert_fits,
)
from webhook.certs import CA_FILE, CERT_FILE, KEY_FILE, ca_bundle_patch, ensure_self_signed
from webhook.server import create_app

LIMIT_SECONDS = 30.0
NAMES = ["127.0.0.1", "localhost"]


def run(body: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        await asyncio.wait_for(body(), LIMIT_SECONDS)

    asyncio.run(main())


async def peer_serial(port: int, ca_pem: bytes, *, tls_max: ssl.TLSVersion | None = None) -> int:
    """Handshake with the server and return the serial number of the certificate it presented."""
    context = client_context(ca_pem)
    if tls_max is not None:
        context.maximum_version = tls_max
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="127.0.0.1")
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der).serial_number
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ssl.SSLError, ConnectionError):
            pass


async def start_tls_server(context: ssl.SSLContext) -> tuple[asyncio.Server, int]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    return server, server.sockets[0].getsockname()[1]


def test_serving_certificate_names_and_chain() -> None:
    ca = make_ca("test-ca")
    names = [*service_dns_names("lora-autoscaler-webhook", "lora-system"), "127.0.0.1"]
    pair = issue_serving_cert(ca, names)
    cert = pair.certificate
    cert.verify_directly_issued_by(ca.certificate)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "lora-autoscaler-webhook.lora-system.svc" in san.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert serving_cert_fits(pair, ca.cert_pem, names)
    assert not serving_cert_fits(pair, make_ca("other").cert_pem, names)
    assert not serving_cert_fits(pair, ca.cert_pem, [*names, "extra.example"])
    late = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=340)
    assert not serving_cert_fits(pair, ca.cert_pem, names, now=late)  # within 30 days of its end


def test_server_context_has_a_tls12_floor_and_serves_tls12_and_13(tmp_path: Path) -> None:
    ca = make_ca("test-ca")
    issue_serving_cert(ca, NAMES).write(tmp_path / "tls.crt", tmp_path / "tls.key")
    context = server_context(tmp_path / "tls.crt", tmp_path / "tls.key")
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2

    async def body() -> None:
        server, port = await start_tls_server(context)
        async with server:
            await peer_serial(port, ca.cert_pem, tls_max=ssl.TLSVersion.TLSv1_2)
            await peer_serial(port, ca.cert_pem)

    run(body)


def test_a_rotated_certificate_is_served_to_new_handshakes_without_restart(tmp_path: Path) -> None:
    ca = make_ca("test-ca")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    first = issue_serving_cert(ca, NAMES)
    first.write(cert, key)
    reloading = ReloadingServerContext(cert, key)

    async def body() -> None:
        server, port = await start_tls_server(reloading.context)
        async with server:
            assert await peer_serial(port, ca.cert_pem) == first.certificate.serial_number
            assert reloading.maybe_reload() is False  # nothing changed
            second = issue_serving_cert(ca, NAMES)
            second.write(cert, key)
            assert reloading.maybe_reload() is True
            assert await peer_serial(port, ca.cert_pem) == second.certificate.serial_number
            # A half-written pair (new certificate, old key) keeps the last good one in service.
            third = issue_serving_cert(ca, NAMES)
            cert.write_bytes(third.cert_pem)
            assert reloading.maybe_reload() is False
            assert reloading.last_error and "cannot load certificate" in reloading.last_error
            assert await peer_serial(port, ca.cert_pem) == second.certificate.serial_number
            key.write_bytes(third.key_pem)
            assert reloading.maybe_reload() is True and reloading.last_error is None
            assert await peer_serial(port, ca.cert_pem) == third.certificate.serial_number
            assert reloading.reloads == 2

    run(body)


def test_the_watch_task_picks_up_a_rotation(tmp_path: Path) -> None:
    ca = make_ca("test-ca")
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    issue_serving_cert(ca, NAMES).write(cert, key)
    reloading = ReloadingServerContext(cert, key)

    async def body() -> None:
        watcher = asyncio.create_task(reloading.watch(0.02))
        try:
            issue_serving_cert(ca, NAMES).write(cert, key)
            while reloading.reloads == 0:  # noqa: ASYNC110 - a counter, not an event; bounded by the deadline
                await asyncio.sleep(0.01)
        finally:
            watcher.cancel()

    run(body)


def test_self_signed_files_are_made_once_and_reused(tmp_path: Path) -> None:
    ca, changed = ensure_self_signed(tmp_path, NAMES)
    assert changed
    files = {name: (tmp_path / name).read_bytes() for name in (CA_FILE, CERT_FILE, KEY_FILE)}
    assert (tmp_path / KEY_FILE).stat().st_mode & 0o777 == 0o600
    again, changed = ensure_self_signed(tmp_path, NAMES)
    assert not changed and again == ca
    assert {name: (tmp_path / name).read_bytes() for name in files} == files
    # New names: a new serving certificate from the same CA.
    _, changed = ensure_self_signed(tmp_path, [*NAMES, "webhook.example"])
    assert changed and (tmp_path / CA_FILE).read_bytes() == files[CA_FILE]
    # Near the end of its validity: renewed, same CA.
    later = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=340)
    _, changed = ensure_self_signed(tmp_path, [*NAMES, "webhook.example"], now=later)
    assert changed and (tmp_path / CA_FILE).read_bytes() == files[CA_FILE]
    # A broken CA on disk is replaced rather than trusted.
    (tmp_path / CA_FILE).write_bytes(b"garbage")
    fresh, changed = ensure_self_signed(tmp_path, NAMES)
    assert changed and fresh.cert_pem != files[CA_FILE]
    served = CertKeyPair((tmp_path / CERT_FILE).read_bytes(), (tmp_path / KEY_FILE).read_bytes())
    assert serving_cert_fits(served, fresh.cert_pem, NAMES)


def test_ca_bundle_patch_touches_only_what_differs() -> None:
    ca = make_ca("test-ca").cert_pem
    want = base64.b64encode(ca).decode()
    config: dict[str, Any] = {"webhooks": [
        {"name": "mutate.loraautoscaler.io", "clientConfig": {"service": {"name": "s"}}},
        {"name": "other.loraautoscaler.io", "clientConfig": {"caBundle": want}},
        {"name": "broken.loraautoscaler.io"},
    ]}  # fmt: skip
    assert ca_bundle_patch(config, ca) == [
        {"op": "test", "path": "/webhooks/0/name", "value": "mutate.loraautoscaler.io"},
        {"op": "add", "path": "/webhooks/0/clientConfig/caBundle", "value": want},
    ]
    config["webhooks"][0]["clientConfig"]["caBundle"] = want
    assert ca_bundle_patch(config, ca) == []


def test_the_app_answers_over_tls_and_never_in_plain_text(tmp_path: Path) -> None:
    ca, _ = ensure_self_signed(tmp_path, NAMES)
    reloading = ReloadingServerContext(tmp_path / CERT_FILE, tmp_path / KEY_FILE)

    async def body() -> None:
        runner = web.AppRunner(create_app(), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=reloading.context)
        await site.start()
        port = runner.addresses[0][1]
        try:
            review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
                "uid": "u-1", "kind": {"group": "loraautoscaler.io", "version": "v1alpha1", "kind": "LoRAAutoscaler"},
                "operation": "CREATE", "namespace": "ns", "object": {"spec": {}}}}  # fmt: skip
            connector = TCPConnector(ssl=client_context(ca.cert_pem))
            async with ClientSession(connector=connector) as session, session.post(
                f"https://127.0.0.1:{port}/validate", data=orjson.dumps(review),
                headers={"Content-Type": "application/json"},
            ) as resp:
                assert resp.status == 200
                doc = await resp.json()
                assert doc["response"]["uid"] == "u-1" and doc["response"]["allowed"] is False
            # Plain HTTP to the same port never gets an HTTP answer.
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            answer = await reader.read(100)
            writer.close()
            assert not answer.startswith(b"HTTP/")
        finally:
            await runner.cleanup()

    run(body)
