"""TLS for the product's servers: a self-made CA and serving certificate, and rotation without restart.

Why it lives here: the webhook must serve TLS (the API server calls it only over HTTPS), and any other
component that serves TLS (the router, a metrics endpoint behind TLS) needs the same three things: make
a certificate when nobody provides one, build a server context with a sane floor (TLS 1.2), and pick up
a rotated certificate (cert-manager, a kubelet-projected Secret) without dropping the process.

Keys are EC P-256: generated in microseconds where RSA costs hundreds of milliseconds on a busy node,
and accepted by every Kubernetes API server and Go TLS client.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import logging
import os
import ssl
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger(__name__)

CA_VALIDITY = datetime.timedelta(days=3650)
SERVING_VALIDITY = datetime.timedelta(days=365)
#: Renew a serving certificate when less than this is left (what cert-manager does by default: 1/3).
RENEW_BEFORE = datetime.timedelta(days=30)
_CLOCK_SKEW = datetime.timedelta(minutes=5)
#: How often the files of a reloading context are looked at.
DEFAULT_RELOAD_INTERVAL_SECONDS = 1.0


class CertificateError(ValueError):
    """A certificate or key cannot be read, does not match, or does not fit its purpose."""


@dataclass(frozen=True)
class CertKeyPair:
    """A PEM certificate (possibly a chain) and its PEM private key."""

    cert_pem: bytes
    key_pem: bytes

    def write(self, cert_path: Path, key_path: Path) -> None:
        """Write both files, each atomically (rename), the key readable by the owner only.

        The pair cannot be swapped as one: a reader may see the new certificate with the old key for a
        moment. `ReloadingServerContext` treats such a mismatch as "not ready yet" and keeps the old pair.
        """
        _atomic_write(key_path, self.key_pem, mode=0o600)
        _atomic_write(cert_path, self.cert_pem, mode=0o644)

    @property
    def certificate(self) -> x509.Certificate:
        """The first (leaf) certificate of the chain."""
        return x509.load_pem_x509_certificate(self.cert_pem)


def _atomic_write(path: Path, data: bytes, *, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign, encipher_only=False,
        decipher_only=False,
    )  # fmt: skip


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def make_ca(
    common_name: str, *, validity: datetime.timedelta = CA_VALIDITY, now: datetime.datetime | None = None
) -> CertKeyPair:
    """A self-signed CA: what a webhook puts in its configurations' caBundle."""
    now = now or _now()
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertKeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def _split_sans(names: Iterable[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for name in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


def issue_serving_cert(
    ca: CertKeyPair,
    names: Sequence[str],
    *,
    validity: datetime.timedelta = SERVING_VALIDITY,
    now: datetime.datetime | None = None,
) -> CertKeyPair:
    """A serving certificate signed by `ca` for `names` (DNS names or IP addresses, the first is the CN).

    The returned certificate file holds the leaf only: the API server verifies it against the caBundle.
    """
    if not names:
        raise CertificateError("a serving certificate needs at least one DNS name or IP address")
    now = now or _now()
    try:
        ca_cert = x509.load_pem_x509_certificate(ca.cert_pem)
        ca_key = serialization.load_pem_private_key(ca.key_pem, password=None)
    except ValueError as exc:
        raise CertificateError(f"the CA certificate or key cannot be read: {exc}") from exc
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise CertificateError("the CA key must be an EC key")
    key = _new_key()
    not_after = min(now + validity, ca_cert.not_valid_after_utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(_split_sans(names)), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return CertKeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def service_dns_names(service: str, namespace: str, cluster_domain: str = "cluster.local") -> list[str]:
    """Every name a Service is called by in-cluster; the API server uses `<svc>.<ns>.svc`."""
    return [
        service,
        f"{service}.{namespace}",
        f"{service}.{namespace}.svc",
        f"{service}.{namespace}.svc.{cluster_domain}",
    ]


def serving_cert_fits(
    pair: CertKeyPair,
    ca_pem: bytes,
    names: Sequence[str],
    *,
    now: datetime.datetime | None = None,
    renew_before: datetime.timedelta = RENEW_BEFORE,
) -> bool:
    """Whether a stored serving certificate can be kept: signed by this CA, covers `names`, not expiring."""
    now = now or _now()
    try:
        cert = pair.certificate
        ca_cert = x509.load_pem_x509_certificate(ca_pem)
        cert.verify_directly_issued_by(ca_cert)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, TypeError, x509.ExtensionNotFound, InvalidSignature):
        return False
    covered = {str(n) for n in san.get_values_for_type(x509.DNSName)}
    covered |= {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    if not {str(_normalise_name(n)) for n in names} <= covered:
        return False
    return cert.not_valid_before_utc <= now and now + renew_before < cert.not_valid_after_utc


def _normalise_name(name: str) -> str:
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name


def server_context(cert_file: Path | str, key_file: Path | str) -> ssl.SSLContext:
    """A server-side context with TLS 1.2 as the floor, loaded from PEM files.

    Raises `CertificateError` (with the file names) when the files are missing or do not match.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    try:
        context.load_cert_chain(str(cert_file), str(key_file))
    except (OSError, ssl.SSLError) as exc:
        raise CertificateError(f"cannot load certificate {cert_file} with key {key_file}: {exc}") from exc
    return context


def _file_stamp(path: Path) -> tuple[int, int, int]:
    """What changes when a file is rewritten or a projected-volume symlink is swapped (stat follows links)."""
    st = os.stat(path)
    return (st.st_mtime_ns, st.st_ino, st.st_size)


class ReloadingServerContext:
    """A server context whose certificate follows the files: new handshakes use the newest good pair.

    Hand `context` to the server once. Each handshake's SNI callback (OpenSSL calls it for every
    ClientHello, with or without a server name) switches the connection to the current context, so a
    reload never touches the listening socket and never drops established connections. A pair that fails
    to load (half-written, mismatched) is logged and the previous one keeps serving.
    """

    def __init__(self, cert_file: Path | str, key_file: Path | str) -> None:
        self.cert_file = Path(cert_file)
        self.key_file = Path(key_file)
        self._current = server_context(self.cert_file, self.key_file)
        self._stamp = self._stamps()
        self.reloads = 0
        self.last_error: str | None = None
        # The outer context holds the first pair too, so a client whose handshake skips the callback
        # (none known) still gets a valid certificate.
        self.context = server_context(self.cert_file, self.key_file)
        self.context.sni_callback = self._on_client_hello

    def _stamps(self) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        return _file_stamp(self.cert_file), _file_stamp(self.key_file)

    def _on_client_hello(self, conn: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
                         _ctx: ssl.SSLContext) -> None:
        conn.context = self._current

    @property
    def current(self) -> ssl.SSLContext:
        """The context new handshakes use."""
        return self._current

    def maybe_reload(self) -> bool:
        """Load the files again if they changed since the last good load; True when a new pair took effect."""
        try:
            stamp = self._stamps()
        except OSError as exc:
            self._note_error(f"cannot stat {self.cert_file} / {self.key_file}: {exc}")
            return False
        if stamp == self._stamp:
            return False
        try:
            fresh = server_context(self.cert_file, self.key_file)
        except CertificateError as exc:
            self._note_error(str(exc))
            return False
        self._current = fresh
        self._stamp = stamp
        self.reloads += 1
        self.last_error = None
        log.info("loaded a new serving certificate from %s", self.cert_file)
        return True

    def _note_error(self, message: str) -> None:
        if message != self.last_error:
            log.warning("keeping the previous serving certificate: %s", message)
        self.last_error = message

    async def watch(self, interval: float = DEFAULT_RELOAD_INTERVAL_SECONDS) -> None:
        """Poll the files' stamps every `interval` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            self.maybe_reload()


def client_context(ca_pem: bytes) -> ssl.SSLContext:
    """A client context that trusts exactly `ca_pem` (tests, benchmarks, probes of our own servers)."""
    context = ssl.create_default_context(cadata=ca_pem.decode())
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context
