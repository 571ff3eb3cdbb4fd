"""``lora-webhook``'s flags and its serve loop in process: files mode (cert-manager) with rotation,
self-signed mode without an API, and readiness held back while the CA bundle cannot be published."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from common.tls import issue_serving_cert, make_ca
from webhook.__main__ import Options, parse_args, serve

LIMIT_SECONDS = 30.0


def run(body: Callable[[], Awaitable[None]]) -> None:
    async def main() -> None:
        await asyncio.wait_for(body(), LIMIT_SECONDS)

    asyncio.run(main())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def https_get(port: int, path: str, ca_pem: bytes) -> tuple[int, str, int]:
    """(status, body, serial of the served certificate) of one GET over TLS."""
    context = ssl.create_default_context(cadata=ca_pem.decode())
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="127.0.0.1")
    try:
        serial = x509.load_der_x509_certificate(
            writer.get_extra_info("ssl_object").getpeercert(binary_form=True)).serial_number
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        raw = await reader.read()
    finally:
        writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body, serial


async def until(check: Callable[[], Awaitable[bool]]) -> None:
    """Poll ``check`` until it holds; the test's deadline bounds it."""
    while not await check():  # noqa: ASYNC110 - polling an HTTP endpoint, not an in-process event
        await asyncio.sleep(0.05)


def options(tmp_path: Path, *extra: str) -> Options:
    return parse_args(["--host", "127.0.0.1", "--port", str(free_port()), "--metrics-port", "0",
                       "--cert-dir", str(tmp_path), "--capacity-check", "off", "--reload-interval", "0.05", *extra])


@pytest.mark.parametrize(
    ("argv", "text"),
    [
        (["--port", "0"], "--port must be between 1 and 65535"),
        (["--port", "9443", "--metrics-port", "9443"], "--metrics-port must differ from --port"),
        (["--cert-file", "/x"], "--cert-file and --key-file need --cert-source=files"),
        (["--scale-timeout", "0"], "--scale-timeout must be above 0"),
        (["--cert-source", "vault"], "invalid choice: 'vault'"),
    ],
)
def test_bad_flags_exit_with_a_message_naming_the_flag(argv: list[str], text: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    assert text in capsys.readouterr().err


def test_files_mode_serves_given_certificates_and_follows_their_rotation(tmp_path: Path) -> None:
    first_ca, second_ca = make_ca("first"), make_ca("second")
    issued = issue_serving_cert(first_ca, ["127.0.0.1"])
    issued.write(tmp_path / "tls.crt", tmp_path / "tls.key")
    opts = options(tmp_path, "--cert-source", "files")

    async def body() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(serve(opts, stop))
        try:
            async def up() -> bool:
                with contextlib.suppress(OSError):
                    return (await https_get(opts.port, "/readyz", first_ca.cert_pem))[0] == 200
                return False

            await until(up)  # ready at once: nothing to publish in files mode
            assert not (tmp_path / "ca.crt").exists()  # and nothing made
            rotated = issue_serving_cert(second_ca, ["127.0.0.1"])
            rotated.write(tmp_path / "tls.crt", tmp_path / "tls.key")

            async def rotated_in() -> bool:
                with contextlib.suppress(OSError, ssl.SSLError):
                    return (await https_get(opts.port, "/healthz", second_ca.cert_pem))[2] == (
                        rotated.certificate.serial_number)
                return False

            await until(rotated_in)
        finally:
            stop.set()
            await task

    run(body)


def test_self_signed_mode_makes_its_certificates_and_needs_no_api_without_configurations(tmp_path: Path) -> None:
    opts = options(tmp_path, "--extra-san", "127.0.0.1", "--mutating-configuration", "",
                   "--validating-configuration", "", "--ca-secret", "")

    async def body() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(serve(opts, stop))
        try:
            async def up() -> bool:
                if not (tmp_path / "ca.crt").exists():
                    return False
                with contextlib.suppress(OSError, ssl.SSLError):
                    return (await https_get(opts.port, "/readyz", (tmp_path / "ca.crt").read_bytes()))[0] == 200
                return False

            await until(up)
        finally:
            stop.set()
            await task

    run(body)


def unreachable_kubeconfig(tmp_path: Path) -> Path:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "c",
        "clusters": [{"name": "c", "cluster": {"server": f"https://127.0.0.1:{free_port()}",
                                               "insecure-skip-tls-verify": True}}],
        "users": [{"name": "u", "user": {"token": "t"}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "u"}}],
    }))  # fmt: skip
    return kubeconfig


def test_not_ready_while_the_ca_bundle_cannot_be_published(tmp_path: Path) -> None:
    kubeconfig = unreachable_kubeconfig(tmp_path)
    certs = tmp_path / "certs"
    opts = options(certs, "--extra-san", "127.0.0.1", "--kubeconfig", str(kubeconfig), "--ca-secret", "")

    async def body() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(serve(opts, stop))
        try:
            async def reports_why() -> bool:
                if not (certs / "ca.crt").exists():
                    return False
                with contextlib.suppress(OSError, ssl.SSLError):
                    status, text, _ = await https_get(opts.port, "/readyz", (certs / "ca.crt").read_bytes())
                    return status == 503 and "cannot write the CA bundle" in text
                return False

            await until(reports_why)
            status, _, _ = await https_get(opts.port, "/healthz", (certs / "ca.crt").read_bytes())
            assert status == 200  # alive, only not ready
        finally:
            stop.set()
            await task

    run(body)
