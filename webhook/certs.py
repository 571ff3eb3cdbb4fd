"""The webhook's own certificates: a self-made CA and serving certificate, and the caBundle it publishes.

Self-signed mode (the default) needs nothing installed besides the webhook: the CA lives in a Secret
that the first replica creates and every replica reads (so replicas and restarts agree on one caBundle);
each replica issues its own serving certificate from it, reusing the one in its cert dir while it still
fits (same Service names, not near expiry). It then writes the CA into its Mutating- and
ValidatingWebhookConfiguration, patching only a caBundle that differs, and keeps checking (someone
re-applying the manifests blanks the caBundle).
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

from common.kube import SECRETS, ApiError, KubeClient, Resource
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
    cert_dir: Path, names: Sequence[str], *, ca: CertKeyPair | None = None, now: datetime.datetime | None = None
) -> tuple[CertKeyPair, bool]:
    """The CA and serving certificate in ``cert_dir``, made or renewed as needed: (CA, whether tls.* changed).

    ``ca``, when given (the CA shared by all replicas), replaces the one in ``cert_dir``; otherwise the
    one there is kept while usable. Idempotent: a second call changes nothing until renewal is due.
    """
    now = now or datetime.datetime.now(datetime.UTC)
    if ca is not None:
        if _read_pair(cert_dir / CA_FILE, cert_dir / CA_KEY_FILE) != ca:
            ca.write(cert_dir / CA_FILE, cert_dir / CA_KEY_FILE)
    else:
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


CA_SECRET_CERT = "ca.crt"
CA_SECRET_KEY = "ca.key"
_CA_ATTEMPTS = 5


def _ca_from_secret(secret: dict[str, Any]) -> CertKeyPair | None:
    data = secret.get("data") or {}
    try:
        return CertKeyPair(base64.b64decode(data[CA_SECRET_CERT]), base64.b64decode(data[CA_SECRET_KEY]))
    except (KeyError, TypeError, ValueError):
        return None


def _ca_secret(name: str, namespace: str, ca: CertKeyPair, resource_version: str | None = None) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name, "namespace": namespace, "labels": {
        "app.kubernetes.io/name": "lora-autoscaler", "app.kubernetes.io/component": "webhook"}}
    if resource_version:
        metadata["resourceVersion"] = resource_version
    return {"apiVersion": "v1", "kind": "Secret", "metadata": metadata, "type": "Opaque", "data": {
        CA_SECRET_CERT: base64.b64encode(ca.cert_pem).decode(), CA_SECRET_KEY: base64.b64encode(ca.key_pem).decode()}}


def shared_ca(client: KubeClient, namespace: str, name: str, *, now: datetime.datetime | None = None) -> CertKeyPair:
    """The CA all replicas share, kept in a Secret: read it, or make it and store it if none is usable.

    Why: replicas that each made their own CA would overwrite each other's caBundle, and the API server
    would reject every replica but the last. The first replica to create the Secret wins (AlreadyExists
    and Conflict send the others back to read it), and restarts keep the CA, so the caBundle is stable.
    """
    now = now or datetime.datetime.now(datetime.UTC)
    for _ in range(_CA_ATTEMPTS):
        try:
            secret: dict[str, Any] | None = client.get(SECRETS, name, namespace, timeout=(3.0, 5.0))
        except ApiError as exc:
            if not exc.not_found:
                raise
            secret = None
        if secret is not None:
            found = _ca_from_secret(secret)
            if found is not None and _ca_usable(found, now):
                return found
        fresh = make_ca("lora-autoscaler-webhook-ca", validity=CA_VALIDITY, now=now)
        try:
            if secret is None:
                client.create(SECRETS, _ca_secret(name, namespace, fresh), namespace, timeout=(3.0, 5.0))
            else:  # unusable (edited by hand, or near its end): replaced, unless someone else just did
                version = (secret.get("metadata") or {}).get("resourceVersion")
                client.replace(SECRETS, _ca_secret(name, namespace, fresh, version), namespace, timeout=(3.0, 5.0))
            log.info("stored a new webhook CA in Secret %s/%s", namespace, name)
            return fresh
        except ApiError as exc:
            if not (exc.already_exists or exc.conflict):
                raise
    raise ApiError(409, "Conflict", f"Secret {namespace}/{name} kept changing; no CA settled after "
                   f"{_CA_ATTEMPTS} attempts")


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
