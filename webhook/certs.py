"""The webhook's own certificates: a self-made CA and serving certificate, and the caBundle it publishes.

Self-signed mode (the default) needs nothing installed besides the webhook: on start it reuses the CA
and certificate in its cert dir when they still fit (same Service names, not near expiry), otherwise it
makes them; it then writes the CA into its Mutating- and ValidatingWebhookConfiguration, patching only a
caBundle that differs, and keeps checking (someone re-applying the manifests blanks the caBundle).
In files mode (cert-manager) the certificate files and the caBundle belong to someone else.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.kube import ApiError, KubeClient, Resource
from common.tls import CA_VALIDITY, RENEW_BEFORE, CertificateError, CertKeyPair, issue_serving_cert, make_ca
from common.tls import serving_cert_fits as _fits

log = logging.getLogger(__name__)

CERT_FILE = "tls.crt"
KEY_FILE = "tls.key"
CA_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"

MUTATING_CONFIGURATIONS = Resource(
    "admissionregistration.k8s.io", "v1", "mutatingwebhookconfigurations", False, "MutatingWebhookConfiguration"
)
VALIDATING_CONFIGURATIONS = Resource(
    "admissionregistration.k8s.io", "v1", "validatingwebhookconfigurations", False,
    "ValidatingWebhookConfiguration",
)  # fmt: skip
#: How often the caBundle is checked once it is right, and the certificate for renewal.
RECHECK_SECONDS = 30.0
_RETRY_FIRST_SECONDS = 0.5


def _read_pair(cert: Path, key: Path) -> CertKeyPair | None:
    try:
        return CertKeyPair(cert.read_bytes(), key.read_bytes())
    except OSError:
        return None


def _ca_usable(ca: CertKeyPair, now: datetime.datetime) -> bool:
    try:
        cert = ca.certificate
    except ValueError:
        return False
    # A CA close to its end is replaced together with the serving certificate.
    return cert.not_valid_after_utc - now > RENEW_BEFORE * 2


def ensure_self_signed(
    cert_dir: Path, names: Sequence[str], *, now: datetime.datetime | None = None
) -> tuple[CertKeyPair, bool]:
    """The CA and serving certificate in ``cert_dir``, made or renewed as needed: (CA, whether tls.* changed).

    Idempotent: a second call with the same names changes nothing until renewal is due.
    """
    now = now or datetime.datetime.now(datetime.UTC)
    ca = _read_pair(cert_dir / CA_FILE, cert_dir / CA_KEY_FILE)
    if ca is None or not _ca_usable(ca, now):
        log.info("making a new webhook CA in %s", cert_dir)
        ca = make_ca("lora-autoscaler-webhook-ca", validity=CA_VALIDITY, now=now)
        ca.write(cert_dir / CA_FILE, cert_dir / CA_KEY_FILE)
    serving = _read_pair(cert_dir / CERT_FILE, cert_dir / KEY_FILE)
    if serving is not None and _fits(serving, ca.cert_pem, names, now=now):
        return ca, False
    try:
        fresh = issue_serving_cert(ca, list(names), now=now)
    except CertificateError:  # an unreadable CA on disk: start over
        ca = make_ca("lora-autoscaler-webhook-ca", validity=CA_VALIDITY, now=now)
        ca.write(cert_dir / CA_FILE, cert_dir / CA_KEY_FILE)
        fresh = issue_serving_cert(ca, list(names), now=now)
    fresh.write(cert_dir / CERT_FILE, cert_dir / KEY_FILE)
    log.info("wrote a serving certificate for %s to %s", ", ".join(names), cert_dir)
    return ca, True


def ca_bundle_patch(configuration: dict[str, Any], ca_pem: bytes) -> list[dict[str, Any]]:
    """The JSONPatch that sets ``ca_pem`` on every webhook of a configuration whose caBundle differs (pure).

    Each change is guarded by a ``test`` of the webhook's name at that index, so a configuration edited
    in between fails the patch (422) instead of getting the bundle on the wrong webhook.
    """
    want = base64.b64encode(ca_pem).decode("ascii")
    ops: list[dict[str, Any]] = []
    for index, hook in enumerate(configuration.get("webhooks") or []):
        if not isinstance(hook, dict) or not isinstance(hook.get("clientConfig"), dict):
            continue
        if hook["clientConfig"].get("caBundle") == want:
            continue
        ops.append({"op": "test", "path": f"/webhooks/{index}/name", "value": hook.get("name")})
        ops.append({"op": "add", "path": f"/webhooks/{index}/clientConfig/caBundle", "value": want})
    return ops


def inject_ca_bundle(client: KubeClient, resource: Resource, name: str, ca_pem: bytes) -> bool:
    """Write the CA into one configuration if it differs; True when a patch was sent. Raises `ApiError`."""
    configuration = client.get(resource, name, timeout=(3.0, 5.0))
    ops = ca_bundle_patch(configuration, ca_pem)
    if not ops:
        return False
    client.patch(resource, name, ops, patch_type="json", timeout=(3.0, 5.0))
    log.info("wrote the CA bundle into %s %s", resource.kind, name)
    return True


@dataclass
class BundleState:
    """How far publishing the CA got: readiness waits for it (the API server cannot call us before)."""

    published: bool = False
    last_error: str | None = None
    patches: int = 0


async def keep_ca_bundle(
    client: KubeClient,
    ca_source: Callable[[], bytes],
    mutating: str | None,
    validating: str | None,
    state: BundleState,
    *,
    recheck_seconds: float = RECHECK_SECONDS,
) -> None:
    """Publish the CA into both configurations, retrying with backoff, then re-check until cancelled.

    ``ca_source`` is asked each round, so a CA replaced on disk (renewal) is published without a restart.
    """
    targets = [(r, n) for r, n in ((MUTATING_CONFIGURATIONS, mutating), (VALIDATING_CONFIGURATIONS, validating)) if n]
    delay = _RETRY_FIRST_SECONDS
    while True:
        try:
            ca_pem = ca_source()
            for resource, name in targets:
                if await asyncio.to_thread(inject_ca_bundle, client, resource, name, ca_pem):
                    state.patches += 1
            state.published = True
            state.last_error = None
            delay = recheck_seconds
        except (ApiError, OSError, ValueError) as exc:
            message = f"cannot write the CA bundle: {exc}"
            if message != state.last_error:
                log.warning("%s (retrying)", message)
            state.last_error = message
            delay = min(max(delay * 2, _RETRY_FIRST_SECONDS), recheck_seconds)
        await asyncio.sleep(delay)
