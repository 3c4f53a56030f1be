"""Who may use the dashboard's data and actions. Pure: headers in, an ApiError out.

Each endpoint is decided as the gRPC door decides the admin RPC it calls (the queen's own
method table: with tokens, an admin token; none or an unknown one is 401, another role's
403), so the page can do nothing the CLI could not with the same token. A browser adds two
risks the CLI has not: another site's page posting to the queen (a form needs no CORS
preflight, so actions take JSON only, and a foreign Origin is refused), and DNS rebinding
(a hostile name resolved to 127.0.0.1 reads a queen that has no tokens: such a queen
answers only to an IP address or `localhost` in the Host header).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grpc

from queen.http.errors import ApiError, from_status
from queen.http.hosts import is_address_or_localhost

# The gRPC door's decision for a method and the call's metadata: None, or (code, message).
Verdict = Callable[[str, Sequence[tuple[str, Any]] | None], tuple[grpc.StatusCode, str] | None]

ADMIN_SERVICE = "/apiary.v1.QueenAdmin/"


def method(name: str) -> str:
    """'/apiary.v1.QueenAdmin/ListHives' for 'ListHives'. A name the table does not list
    (the dashboard's own reads, e.g. its series) falls under the whole service's rule."""
    return ADMIN_SERVICE + name


def metadata(headers: Mapping[str, str]) -> list[tuple[str, str]]:
    """The HTTP Authorization header as the gRPC call metadata the door reads ('Bearer'
    is case-insensitive in HTTP)."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return []
    return [("authorization", f"Bearer {token.strip()}")]


class Gate:
    def __init__(self, verdict: Verdict, tokens_enabled: bool) -> None:
        self.verdict = verdict
        self.tokens_enabled = tokens_enabled

    def check(self, rpc: str, headers: Mapping[str, str], scheme: str, write: bool) -> None:
        """Raise the ApiError that refuses this call, if any. `rpc` is the admin method the
        endpoint calls; `write` for an action (POST)."""
        host = headers.get("host", "")
        if not self.tokens_enabled and not is_address_or_localhost(host):
            raise ApiError(403, "this queen has no tokens, so its dashboard answers only to an "
                           "IP address or localhost (it refuses other host names against DNS "
                           "rebinding); open it by address", "permission_error",
                           "host_not_allowed")  # fmt: skip
        if write:
            self.check_write(headers, scheme, host)
        sent = metadata(headers)
        refused = self.verdict(method(rpc), sent)
        if refused is not None:
            code, message = refused
            if not sent:  # the door's words are about gRPC metadata
                message = "this queen requires an admin token: send Authorization: Bearer TOKEN"
            error = from_status(code.name, message)
            error.code = "invalid_api_key" if error.status == 401 else "permission_denied"
            raise error

    @staticmethod
    def check_write(headers: Mapping[str, str], scheme: str, host: str) -> None:
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise ApiError(415, "actions take a JSON body (Content-Type: application/json)",
                           code="unsupported_media_type")  # fmt: skip
        origin = headers.get("origin")
        if origin is not None and origin.lower() != f"{scheme}://{host}".lower():
            raise ApiError(403, f"actions from another site's page ({origin[:100]}) are refused",
                           "permission_error", "foreign_origin")  # fmt: skip
