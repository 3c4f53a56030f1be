"""Lease tokens: a direct lease the worker can check by itself, so Queen.Lease needs no call.

A lease token is `ID.EXPIRES.MAC`:
  ID       `l-` and 22 random url-safe characters: names the lease (reports, releases)
  EXPIRES  the lease's end, in milliseconds since the epoch on the queen's clock
  MAC      HMAC-SHA256 of `ID.EXPIRES` under the worker's lease key, cut to 128 bits

The lease key is HMAC-SHA256(the worker's own credential, "apiary/lease/WORKER_ID"). That
credential is derived from its hive's token and the worker id (apiary/security.py): the hive
hands it to the worker in its environment and the queen, which knows every hive's token,
derives the same. So the queen and that one worker share a key nobody else has; a token for
one worker is worth nothing at another, and a worker can mint leases for itself only. Without
tokens (loopback clusters) the credential is '' and the key is public: a made-up, expired or
reused lease is still refused, but anyone could mint one, as anyone may call a worker there.

The worker refuses a token whose MAC is wrong (forged, or another worker's), whose expiry has
passed on the queen's clock (it learns the offset from the queen's lease stream), or whose id
it has seen used or revoked before (replay); it remembers spent ids until they expire. Pure:
no clock, no randomness (the caller brings the id and the time).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass

PREFIX = "l-"
# A token is about 61 characters; anything much longer is not one.
MAX_TOKEN_LENGTH = 128
_MAC_BYTES = 16


def lease_key(worker_token: str, worker_id: str) -> bytes:
    """The key the queen and worker `worker_id` sign and check its leases with."""
    return hmac.new(
        worker_token.encode(), f"apiary/lease/{worker_id}".encode(), hashlib.sha256
    ).digest()


def _mac(key: bytes, body: str) -> str:
    digest = hmac.new(key, body.encode(), hashlib.sha256).digest()[:_MAC_BYTES]
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def mint(key: bytes, lease_id: str, expires_at: float) -> str:
    """The token for lease `lease_id`, good until `expires_at` (queen wall-clock seconds)."""
    body = f"{lease_id}.{int(expires_at * 1000)}"
    return f"{body}.{_mac(key, body)}"


@dataclass(frozen=True)
class LeaseToken:
    lease_id: str
    # Seconds since the epoch, on the queen's clock.
    expires_at: float


def lease_id_of(token: str) -> str:
    """The id a token names (unchecked: for looking a lease up, never for trusting it)."""
    return token.partition(".")[0]


def verify(key: bytes, token: str) -> LeaseToken | None:
    """The lease a token names if `key` signed it (expiry and reuse are the caller's to
    judge); None for anything else: malformed, forged, or signed for another worker."""
    if len(token) > MAX_TOKEN_LENGTH or not token.startswith(PREFIX):
        return None
    lease_id, _, rest = token.partition(".")
    expires, _, mac = rest.partition(".")
    if not (expires.isascii() and expires.isdigit() and len(expires) <= 15):
        return None
    if not (mac.isascii() and mac):
        return None
    if not hmac.compare_digest(_mac(key, f"{lease_id}.{expires}"), mac):
        return None
    return LeaseToken(lease_id, int(expires) / 1000)
