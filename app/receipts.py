"""Deployment secrets and signed deletion receipts.

Two secrets live in the data directory, each created on first start (mode 0600) and kept for the
life of the deployment:

- ``id_secret``: 32 random bytes, the HMAC-SHA256 key of record ids. A forgotten id is kept only as
  its keyed digest (checkpoints, deletion log, finished job records), so that the service can still
  tell "forgotten" from "unknown" while nobody without the secret can test a guessed id.
- ``receipt_key.pem``: an Ed25519 private key (PKCS#8 PEM). It signs each deletion receipt; its
  public key is served at ``GET /v1/receipts/public-key``.

A receipt is ``{"payload": {...}, "algorithm": "Ed25519", "signature": base64}``; the signature
is over the payload's canonical JSON (``canonical``: sorted keys, no spaces, UTF-8). ``verify``
(and ``ntk-unlearn verify-receipt``) checks it offline with the public key alone;
``certificate_check`` reads from a verified payload whether the deletion's certificate was met.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path
from typing import Any, Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from service_core.state import id_digest

ID_SECRET_FILE = "id_secret"
SIGNING_KEY_FILE = "receipt_key.pem"
RECEIPT_TYPE = "ntk-unlearn deletion receipt"
RECEIPT_FORMAT = 1
NAMESPACE_MESSAGE = b"\0ntk-unlearn redis namespace"


class ReceiptError(Exception):
    """A receipt that does not verify: its message says which check failed."""


def _create_once(path: Path, make: Any) -> bytes:
    """The bytes of ``path``; created first with ``make()`` (mode 0600, fsync'd) if missing.

    Concurrent first starts agree on one value: each writes its own temporary file and links it
    to ``path``; a link fails if another process got there first, and the existing file is read.
    """
    if path.exists():
        return path.read_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(make())
            f.flush()
            os.fsync(f.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path.read_bytes()


@dataclasses.dataclass(frozen=True)
class DeploymentKeys:
    """The id secret and the receipt signing key of one deployment (its data directory)."""

    id_secret: bytes
    signing_key: Ed25519PrivateKey

    @classmethod
    def load_or_create(cls, data_dir: Path) -> DeploymentKeys:
        """Read both secrets from ``data_dir``, creating the missing ones (mode 0600).

        Raises:
          OSError: the data directory is not writable; ValueError: a key file is corrupt.
        """
        data_dir = Path(data_dir)
        secret = _create_once(data_dir / ID_SECRET_FILE, lambda: secrets.token_bytes(32))
        pem = _create_once(
            data_dir / SIGNING_KEY_FILE,
            lambda: Ed25519PrivateKey.generate().private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        key = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{data_dir / SIGNING_KEY_FILE} is not an Ed25519 private key")
        return cls(secret, key)

    def digest(self, record_id: str) -> str:
        """HMAC-SHA256 of a record id under the deployment's id secret (hex)."""
        return id_digest(self.id_secret, record_id)

    @property
    def namespace(self) -> str:
        """This data directory's name in Redis: 16 hex digits of an HMAC-SHA256 under its id
        secret (of a fixed message). Every process of the
        directory derives the same one, whatever its host or mount path; another data
        directory's differs, so two models given one ``--redis-prefix`` never share a key."""
        return hmac.new(self.id_secret, NAMESPACE_MESSAGE, hashlib.sha256).hexdigest()[:16]

    def public_key_pem(self) -> str:
        """The receipt verification key, SubjectPublicKeyInfo PEM."""
        return (
            self.signing_key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )

    def sign(self, payload: dict[str, Any]) -> dict[str, Any]:
        """The receipt of ``payload``: ``{"payload", "algorithm", "signature"}``."""
        signature = self.signing_key.sign(canonical(payload))
        return {
            "payload": payload,
            "algorithm": "Ed25519",
            "signature": base64.b64encode(signature).decode(),
        }


def canonical(payload: dict[str, Any]) -> bytes:
    """The signed bytes: JSON with sorted keys, no whitespace, UTF-8 (RFC 8785-like; the payload
    holds only strings, integers, finite floats, lists and objects)."""
    return json.dumps(
        payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def verify(receipt: dict[str, Any], public_key_pem: str | bytes) -> dict[str, Any]:
    """Check a receipt's signature with the deployment's public key; returns its payload.

    Raises:
      ReceiptError: malformed, another algorithm, or a signature that does not match (any
        changed field, or another key).
    """
    if not isinstance(receipt, dict) or not isinstance(receipt.get("payload"), dict):
        raise ReceiptError("not a receipt: expected an object with 'payload' and 'signature'")
    if receipt.get("algorithm") != "Ed25519":
        raise ReceiptError(f"unsupported algorithm {receipt.get('algorithm')!r} (expected Ed25519)")
    key = serialization.load_pem_public_key(
        public_key_pem.encode() if isinstance(public_key_pem, str) else public_key_pem
    )
    if not isinstance(key, Ed25519PublicKey):
        raise ReceiptError("the public key is not an Ed25519 key")
    try:
        signature = base64.b64decode(receipt.get("signature", ""), validate=True)
        key.verify(signature, canonical(receipt["payload"]))
    except (InvalidSignature, ValueError, TypeError) as e:
        raise ReceiptError(
            "the signature does not match: the receipt was altered or signed with another key"
        ) from e
    payload = receipt["payload"]
    if payload.get("type") != RECEIPT_TYPE:
        raise ReceiptError(f"payload type {payload.get('type')!r} is not {RECEIPT_TYPE!r}")
    return payload


def directory_sha256(directory: Path) -> str:
    """SHA-256 over a directory's files, in sorted relative-path order: for each file, its path
    (UTF-8), a NUL, its SHA-256 digest (32 bytes). Identifies a published checkpoint.
    """
    directory = Path(directory)
    h = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        h.update(path.relative_to(directory).as_posix().encode() + b"\0")
        with open(path, "rb") as f:
            h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()


def receipt_payload(
    job_id: str, id_digests: list[str], submitted_at: str | None, record: dict[str, Any]
) -> dict[str, Any]:
    """The statement signed for one job, from the deletion-log record of its version."""
    return {
        "type": RECEIPT_TYPE,
        "format": RECEIPT_FORMAT,
        "job_id": job_id,
        "id_digest": "HMAC-SHA256 under the deployment's id secret, hex",
        "id_digests": sorted(id_digests),
        "version_before": record.get("version_before"),
        "version_after": record["version"],
        "submitted_at": submitted_at,
        "applied_at": record["timestamp"],
        "certificate": record.get("certificate"),
        "checkpoint_sha256": record.get("checkpoint_sha256"),
    }


@dataclasses.dataclass(frozen=True)
class CertificateCheck:
    """Whether a receipt's certificate was met, from the numbers it carries.

    Attributes:
      status: ``met`` (value ≤ limit), ``not met``, or ``absent`` (no readable certificate).
      enforced: whether the service refuses to publish a version whose certificate is not met:
        always for the linearised model; for a nonlinear network only with refinement
        (``--nonlinear-refine``); ``None`` when absent.
      value: the certificate (dimensionless): the relative stationarity residual of α
        (linearised), or ‖∇L_R(θ)‖ at the published θ over its value at the previous θ
        (nonlinear).
      limit: the tolerance times the slack granted (``accept_floor``, 1 when not stated).
      kind: which of the two ``value`` is.
    """

    status: Literal["met", "not met", "absent"]
    enforced: bool | None
    value: float | None = None
    limit: float | None = None
    kind: str = ""

    def line(self) -> str:
        """One line for people: met / NOT MET, enforced or not, value against limit."""
        if self.status == "absent":
            return "certificate: none in this receipt (nothing says how exact the deletion was)"
        compare = "<=" if self.status == "met" else ">"
        numbers = f"{self.kind} {self.value:.2e} {compare} tolerance {self.limit:.1e}"
        if self.status == "met":
            return f"certificate met: {numbers}" + (
                "" if self.enforced else " (reported, not enforced by the service)"
            )
        if self.enforced:
            return f"certificate NOT MET: {numbers}"
        return (
            f"certificate NOT MET, not enforced: {numbers}; the service published this version "
            "without holding it to its tolerance (a nonlinear forget without --nonlinear-refine)"
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def certificate_check(payload: dict[str, Any]) -> CertificateCheck:
    """Read the certificate of a verified receipt payload (``verify``'s result): met when its
    value is at most tolerance × accept_floor, the rule the service publishes by
    (``TrainConfig.certified``; for a nonlinear network ``nonlinear.certificate``)."""
    cert = payload.get("certificate")
    try:
        nonlinear = cert.get("nonlinear") if isinstance(cert, dict) else None
        if isinstance(nonlinear, dict):
            value, limit = float(nonlinear["relative"]), float(nonlinear["tol"])
            enforced = bool(nonlinear.get("enforced", False))
            kind = "nonlinear ‖∇L_R‖ ratio"
        elif isinstance(cert, dict):
            value = float(cert["residual"])
            limit = float(cert["tolerance"]) * float(cert.get("accept_floor") or 1.0)
            enforced, kind = True, "relative stationarity residual of α"
        else:
            return CertificateCheck("absent", None)
    except (KeyError, TypeError, ValueError):
        return CertificateCheck("absent", None)
    return CertificateCheck("met" if value <= limit else "not met", enforced, value, limit, kind)
