"""Bearer tokens: JWTs signed with HMAC-SHA256 (HS256), claims ``sub`` and ``exp``.

An app's backend mints tokens with any JWT library using the node's secret; chatd checks
them on ``hello``. Only ``HS256`` is accepted (``none`` and every other algorithm are
refused), the signature is compared in constant time, and ``exp`` is required.

The secret is the text of a file (``<data-dir>/secret`` unless configured), used as the
HMAC key exactly as written, without its trailing newline. On first start the daemon
generates 32 random bytes, hex-encoded, into that file with mode 0600
(:func:`new_secret_file`, which ``chatd secret new`` also uses).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import secrets
import time
from pathlib import Path
from typing import Any

import attrs

__all__ = ["Claims", "TokenError", "ensure_secret", "load_or_create_secret", "mint_token",
           "new_secret_file", "read_secret", "verify_token"]

_HEADER = {"alg": "HS256", "typ": "JWT"}
_MAX_USER = 64


@attrs.frozen
class Claims:
    """The claims chatd uses from a verified token."""

    sub: str
    exp: float


class TokenError(Exception):
    """A token was refused.

    Attributes:
        code: ``token_expired`` for an expired token, ``auth_failed`` for anything else.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    """Decode unpadded base64url, refusing any text that is not the canonical encoding
    (so a token has exactly one spelling and cannot be altered without breaking it)."""
    if not text or len(text) % 4 == 1 or not text.isascii():
        raise ValueError("bad base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64encode(data) != text:
        raise ValueError("non-canonical base64url")
    return data


def _sign(secret: bytes, signing_input: bytes) -> bytes:
    return hmac.new(secret, signing_input, hashlib.sha256).digest()


def mint_token(secret: bytes, user: str, ttl: float, *, now: float | None = None) -> str:
    """Return an HS256 JWT for ``user`` that expires ``ttl`` seconds from ``now``."""
    issued = time.time() if now is None else now
    claims = {"sub": user, "exp": int(issued + ttl), "iat": int(issued)}
    head = _b64encode(json.dumps(_HEADER, separators=(",", ":")).encode())
    body = _b64encode(json.dumps(claims, separators=(",", ":")).encode())
    signing_input = f"{head}.{body}".encode("ascii")
    return f"{head}.{body}.{_b64encode(_sign(secret, signing_input))}"


def verify_token(secret: bytes, token: str, *, now: float | None = None,
                 leeway: float = 0.0) -> Claims:
    """Check a token's form, algorithm, signature and expiry.

    Args:
        secret: The HMAC key.
        token: The compact JWT.
        now: The time to check expiry against (defaults to the wall clock).
        leeway: Seconds of clock skew tolerated on ``exp``.

    Returns:
        The verified claims.

    Raises:
        TokenError: ``auth_failed`` if malformed, of another algorithm or wrongly signed;
            ``token_expired`` if past ``exp``.
    """
    parts = token.split(".")
    if len(parts) != 3 or not token.isascii():
        raise TokenError("auth_failed", "token is not a JWT (three dot-separated parts)")
    try:
        header = json.loads(_b64decode(parts[0]))
        signature = _b64decode(parts[2])
    except (ValueError, binascii.Error, RecursionError):
        raise TokenError("auth_failed", "token is malformed") from None
    if not isinstance(header, dict) or header.get("alg") != "HS256":
        raise TokenError("auth_failed", "token algorithm must be HS256")
    expected = _sign(secret, f"{parts[0]}.{parts[1]}".encode("ascii"))
    if not hmac.compare_digest(expected, signature):
        raise TokenError("auth_failed", "token signature does not match")
    try:
        claims: Any = json.loads(_b64decode(parts[1]))
    except (ValueError, binascii.Error, RecursionError):
        raise TokenError("auth_failed", "token claims are malformed") from None
    if not isinstance(claims, dict):
        raise TokenError("auth_failed", "token claims are malformed")
    sub, exp = claims.get("sub"), claims.get("exp")
    if not isinstance(sub, str) or not 0 < len(sub) <= _MAX_USER or not all(
            "\x21" <= ch <= "\x7e" for ch in sub):
        raise TokenError("auth_failed", "token 'sub' must be 1-64 printable ASCII characters")
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        raise TokenError("auth_failed", "token has no numeric 'exp' claim")
    if (time.time() if now is None else now) > exp + leeway:
        raise TokenError("token_expired", "token has expired")
    return Claims(sub=sub, exp=float(exp))


def read_secret(path: Path) -> bytes:
    """Read a secret file: its text without the trailing newline, as the HMAC key.

    Raises:
        ValueError: The file is empty.
        OSError: The file cannot be read.
    """
    secret = path.read_bytes().rstrip(b"\r\n")
    if not secret:
        raise ValueError(f"secret file {path} is empty")
    return secret


def new_secret_file(path: Path) -> None:
    """Create a secret file: 32 random bytes as hex and a newline, mode 0600.

    Missing parent directories are created. Creation is atomic: the file is written under a
    temporary name beside it, fsync'd, and linked into place (never over an existing file),
    then the directory is fsync'd; so two processes creating it at once agree on one secret.

    Raises:
        FileExistsError: ``path`` exists already (it is left as it is), or a file has the
            name of one of its parent directories (``filename`` says which).
        OSError: The file or its directory cannot be written.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, (secrets.token_hex(32) + "\n").encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    finally:
        tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def ensure_secret(path: Path) -> bool:
    """Create the secret file at ``path`` unless it exists (:func:`new_secret_file`).

    Returns:
        True if this call created it.
    """
    if path.exists():
        return False
    try:
        new_secret_file(path)
    except FileExistsError:
        if not path.exists():
            raise  # not the file but a parent directory's name, taken by a file
        return False  # another process created it meanwhile
    return True


def load_or_create_secret(path: Path) -> bytes:
    """Read the secret at ``path``, creating it first if absent (:func:`ensure_secret`).

    Raises:
        ValueError: The file is empty.
        OSError: The file cannot be created or read.
    """
    ensure_secret(path)
    return read_secret(path)
