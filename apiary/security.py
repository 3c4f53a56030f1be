"""Who may call what: bearer tokens per identity, TLS (and mTLS), and the channels that carry them.

A credential is good for its own hop only:
  client  an application (several, each named): Queen.Infer, Lease, ReleaseLease, ListModels
  admin   operators, to the queen only: everything a client may, and QueenAdmin
  hive    a hive, to the queen: QueenRegistry (heartbeats). Each hive has its own token
          (`hives` in the tokens file), or all share one (`hive`: any holder may join as any hive)
  queen   the queen, to one hive: the Hive calls it makes for operators and autospawn, with a
          credential derived from that hive's token (worth nothing at any other hive)
  worker  one worker's own credential, derived from its hive's token and its id: the queen and
          its hive call that worker with it, and it calls its hive with it; it is worth
          nothing at any other worker

Every server installs one AuthInterceptor with a table of method -> roles. With no tokens
configured nothing is checked, and servers refuse to listen beyond loopback unless told
--insecure. Token values are never logged (TokenSet's repr hides them).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import ipaddress
import json
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import grpc
import structlog

log = structlog.get_logger("apiary.security")

ROLES = ("client", "admin", "hive", "queen", "worker")
# Method table values: who may call.
OPEN: frozenset[str] = frozenset({"*open*"})  # no token needed (health checks)
ANY_ROLE: frozenset[str] = frozenset(ROLES)
# The name of the identity behind a hive token shared by every hive.
SHARED_HIVE = "*"


class SecurityError(Exception):
    """A configuration that must not run; the message says how to fix it."""


@dataclass(frozen=True)
class Identity:
    """Who a token names: a role, and within it a name (the client application, the hive id)."""

    role: str
    name: str


def _derive(hive_token: str, purpose: str) -> str:
    return hmac.new(hive_token.encode(), f"apiary/{purpose}".encode(), hashlib.sha256).hexdigest()


def derive_worker_token(hive_token: str, worker_id: str) -> str:
    """One worker's credential: only its hive (and the queen, which knows every hive's token)
    can make it, and it opens no other worker."""
    return _derive(hive_token, f"worker/{worker_id}")


def derive_queen_token(hive_token: str) -> str:
    """The queen's credential toward one hive: a hive (or whoever pretends to be one) that
    receives it can use it nowhere else."""
    return _derive(hive_token, "queen")


@dataclass(frozen=True)
class TokenSet:
    # One client token (named "client"); `clients` names one per application.
    client: str = ""
    admin: str = ""
    # Shared by every hive (small clusters): its holder may heartbeat as any hive id.
    hive: str = ""
    queen: str = ""
    # This process's own worker credential (set only in a worker process).
    worker: str = ""
    clients: Mapping[str, str] = field(default_factory=dict, hash=False)
    hives: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{r}={'set' if getattr(self, r) else 'unset'}"
            for r in ("client", "admin", "hive", "queen", "worker")
        )
        return f"TokenSet({shown}, clients={len(self.clients)}, hives={len(self.hives)})"

    @property
    def enabled(self) -> bool:
        return bool(
            self.client or self.admin or self.hive or self.queen or self.worker
            or self.clients or self.hives
        )  # fmt: skip

    def _named(self) -> list[tuple[Identity, str]]:
        pairs = [
            (Identity("client", "client"), self.client),
            (Identity("admin", "admin"), self.admin),
            (Identity("hive", SHARED_HIVE), self.hive),
            (Identity("queen", "queen"), self.queen),
            (Identity("worker", "worker"), self.worker),
        ]
        pairs += [(Identity("client", name), token) for name, token in self.clients.items()]
        pairs += [(Identity("hive", name), token) for name, token in self.hives.items()]
        return [(identity, token) for identity, token in pairs if token]

    def identities(self, token: str) -> frozenset[Identity]:
        """Every identity this token names, compared in constant time."""
        if not token:
            return frozenset()
        given = token.encode()
        return frozenset(
            identity
            for identity, known in self._named()
            if hmac.compare_digest(known.encode(), given)
        )

    def roles_of(self, token: str) -> frozenset[str]:
        return frozenset(identity.role for identity in self.identities(token))

    def hive_token(self, hive_id: str) -> str:
        """The token hive `hive_id` authenticates with: its own, else the shared one."""
        return self.hives.get(hive_id) or self.hive

    def worker_token(self, hive_id: str, worker_id: str) -> str:
        """The credential of worker `worker_id` of hive `hive_id` ('' without tokens)."""
        hive_token = self.hive_token(hive_id)
        return derive_worker_token(hive_token, worker_id) if hive_token else ""

    def queen_token(self, hive_id: str) -> str:
        """What the queen presents to hive `hive_id` ('' without tokens)."""
        hive_token = self.hive_token(hive_id)
        return derive_queen_token(hive_token) if hive_token else ""

    def as_hive(self, hive_id: str) -> TokenSet:
        """The tokens a hive process keeps: its own, and its queen's credential toward it
        (a hive given the whole tokens file keeps nothing of anyone else's)."""
        own = self.hive_token(hive_id)
        if not own:
            return TokenSet()
        if self.hives.get(hive_id):
            return TokenSet(hives={hive_id: own}, queen=derive_queen_token(own))
        return TokenSet(hive=own, queen=derive_queen_token(own))

    def is_worker(self, hive_id: str, worker_id: str, token: str) -> bool:
        """`token` is that worker's own credential (constant-time)."""
        expected = self.worker_token(hive_id, worker_id)
        return bool(expected) and hmac.compare_digest(expected.encode(), token.encode())


@dataclass(frozen=True)
class TlsFiles:
    """PEM file paths. cert/key: this process's identity (as server, and as client for mTLS);
    ca: the roots it trusts when dialing; client_ca: set on a server to require client certs."""

    cert: str = ""
    key: str = ""
    ca: str = ""
    client_ca: str = ""

    def read(self, path: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except OSError as exc:
            raise SecurityError(f"cannot read TLS file {path}: {exc.strerror}") from None

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if not (self.cert and self.key):
            return None
        client_ca = self.read(self.client_ca) if self.client_ca else None
        return grpc.ssl_server_credentials(
            [(self.read(self.key), self.read(self.cert))],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        if not self.ca:
            return None
        own = (
            (self.read(self.key), self.read(self.cert)) if self.cert and self.key else (None, None)
        )
        return grpc.ssl_channel_credentials(
            root_certificates=self.read(self.ca), private_key=own[0], certificate_chain=own[1]
        )


@dataclass(frozen=True)
class Security:
    tokens: TokenSet = field(default_factory=TokenSet)
    tls: TlsFiles = field(default_factory=TlsFiles)
    insecure: bool = False

    def check_listen(self, listen: str, flag: str = "--listen") -> None:
        """Refuse to serve beyond loopback without tokens (unless --insecure, said loudly)."""
        host = listen.rsplit(":", 1)[0].strip("[]") or "0.0.0.0"
        if self.tokens.enabled or is_loopback(host):
            return
        if self.insecure:
            log.warning(
                "INSECURE: serving without tokens beyond loopback; anyone who can reach "
                f"{listen} can use this server",
                listen=listen,
            )
            return
        raise SecurityError(
            f"refusing to listen on {listen} ({flag}) without tokens: anyone who can reach it "
            "could use it. Set tokens (--tokens-file FILE, or --client-token/--admin-token/"
            "--hive-token/--queen-token, or APIARY_*_TOKEN; `apiary certs init` writes a tokens "
            "file), listen on 127.0.0.1, or pass --insecure if you really mean it"
        )

    def interceptor(self, table: Mapping[str, frozenset[str]]) -> AuthInterceptor:
        return AuthInterceptor(self.tokens, table)

    def aio_channel(
        self, address: str, token: str, options: Sequence[tuple[str, Any]] = ()
    ) -> grpc.aio.Channel:
        interceptors: Any = aio_bearer(token) if token else None
        credentials = self.tls.channel_credentials()
        if credentials is not None:
            return grpc.aio.secure_channel(
                address, credentials, options=list(options), interceptors=interceptors
            )
        return grpc.aio.insecure_channel(address, options=list(options), interceptors=interceptors)

    def sync_channel(self, address: str, token: str) -> grpc.Channel:
        credentials = self.tls.channel_credentials()
        channel = (
            grpc.secure_channel(address, credentials)
            if credentials is not None
            else grpc.insecure_channel(address)
        )
        return grpc.intercept_channel(channel, SyncBearer(token)) if token else channel


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---- configuration ----------------------------------------------------------


def add_security_args(p: argparse.ArgumentParser, tls_server: bool = True) -> None:
    g = p.add_argument_group("security (tokens are never logged)")
    g.add_argument(
        "--tokens-file",
        default=os.environ.get("APIARY_TOKENS_FILE", ""),
        help="JSON tokens: client/admin/hive/queen, and `clients`/`hives` maps of name to token"
        " (env APIARY_TOKENS_FILE)",
    )
    for role in FLAG_ROLES:
        g.add_argument(
            f"--{role}-token",
            default="",
            help=f"the {role} role's token (env APIARY_{role.upper()}_TOKEN)",
        )
    g.add_argument(
        "--tls-ca", default="", help="CA bundle to verify the servers this process dials"
    )
    g.add_argument(
        "--tls-cert", default="", help="this process's certificate (server, and mTLS client)"
    )
    g.add_argument("--tls-key", default="", help="its private key")
    if tls_server:
        g.add_argument(
            "--tls-client-ca",
            default="",
            help="require client certificates signed by this CA (mTLS)",
        )
        g.add_argument(
            "--insecure",
            action="store_true",
            help="allow listening beyond loopback without tokens (not advised)",
        )


# Roles whose token a server process may be given by flag or environment.
FLAG_ROLES = ("client", "admin", "hive")
NAMED_SECTIONS = {"clients": "client", "hives": "hive"}


def load_tokens_file(path: str) -> dict[str, Any]:
    """The tokens file as TokenSet fields, checked: it is input like any other."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SecurityError(f"cannot read tokens file {path}: {exc}") from None
    known = (*FLAG_ROLES, "worker", *NAMED_SECTIONS)
    if not isinstance(data, dict) or set(data) - set(known):
        raise SecurityError(
            f"tokens file {path} must be a JSON object whose keys are among {', '.join(known)}"
        )
    values: dict[str, Any] = {}
    for key, value in data.items():
        if key == "worker":
            continue  # older files: worker credentials are derived per worker now
        if key in NAMED_SECTIONS:
            if not isinstance(value, dict) or not all(
                isinstance(k, str) and k and isinstance(v, str) and v for k, v in value.items()
            ):
                raise SecurityError(f"tokens file {path}: {key!r} must map names to tokens")
            values[key] = dict(value)
        elif not isinstance(value, str):
            raise SecurityError(f"tokens file {path}: {key!r} must be a string")
        elif value:
            values[key] = value
    return values


def check_distinct(tokens: TokenSet) -> None:
    """One token, one identity: a token shared by two would make either able to act as both."""
    seen: dict[str, Identity] = {}
    for identity, token in tokens._named():
        other = seen.setdefault(token, identity)
        if other != identity:
            raise SecurityError(
                f"the same token is configured for {other.role} {other.name!r} and "
                f"{identity.role} {identity.name!r}; give each its own (apiary certs init)"
            )


def check_queen_tokens(tokens: TokenSet) -> None:
    """With tokens on, the queen needs the hives' (to know them, and to derive its own
    credential toward each hive and each worker)."""
    if tokens.enabled and not (tokens.hive or tokens.hives):
        raise SecurityError(
            "tokens are configured but no hive token: no hive could join; add one per hive "
            "(`apiary certs add-hive DIR ID`)"
        )


def check_hive_tokens(tokens: TokenSet, hive_id: str) -> None:
    """With tokens on, a hive needs its own token (everything else derives from it)."""
    if tokens.enabled and not tokens.hive_token(hive_id):
        raise SecurityError(
            f"tokens are configured but none is this hive's ({hive_id!r}): give it its "
            "ID.tokens.json from `apiary certs add-hive DIR ID` (or --hive-token)"
        )


def security_from_args(args: argparse.Namespace) -> Security:
    values: dict[str, Any] = load_tokens_file(args.tokens_file) if args.tokens_file else {}
    for role in FLAG_ROLES:
        explicit = getattr(args, f"{role}_token", "") or os.environ.get(
            f"APIARY_{role.upper()}_TOKEN", ""
        )
        if explicit:
            values[role] = explicit
    tokens = TokenSet(**values)
    check_distinct(tokens)
    return Security(
        tokens=tokens,
        tls=TlsFiles(
            cert=args.tls_cert,
            key=args.tls_key,
            ca=args.tls_ca,
            client_ca=getattr(args, "tls_client_ca", ""),
        ),
        insecure=getattr(args, "insecure", False),
    )


def tls_args(tls: TlsFiles) -> list[str]:
    """Command-line flags that hand the same TLS files to a child process (a worker)."""
    out: list[str] = []
    for flag, value in (
        ("--tls-cert", tls.cert),
        ("--tls-key", tls.key),
        ("--tls-ca", tls.ca),
        ("--tls-client-ca", tls.client_ca),
    ):
        if value:
            out += [flag, value]
    return out


# ---- the server side --------------------------------------------------------

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """One per server: maps each method to the roles that may call it."""

    def __init__(self, tokens: TokenSet, table: Mapping[str, frozenset[str]]) -> None:
        self.tokens = tokens
        self.table = table

    def allowed(self, method: str) -> frozenset[str]:
        if method in self.table:
            return self.table[method]
        service = method.rsplit("/", 1)[0] + "/"
        # A method not in the table is refused to every role: nothing is open by omission.
        return self.table.get(service, frozenset())

    def verdict(
        self, method: str, metadata: Sequence[tuple[str, Any]] | None
    ) -> tuple[grpc.StatusCode, str] | None:
        """None if the call may go on, else the status to refuse it with."""
        if not self.tokens.enabled:
            return None
        allowed = self.allowed(method)
        if allowed is OPEN:
            return None
        token = bearer(metadata)
        if not token:
            return (
                grpc.StatusCode.UNAUTHENTICATED,
                "missing credentials: send 'authorization: Bearer TOKEN' metadata",
            )
        roles = self.tokens.roles_of(token)
        if not roles:
            return grpc.StatusCode.UNAUTHENTICATED, "invalid token"
        if roles & allowed:
            return None
        return (
            grpc.StatusCode.PERMISSION_DENIED,
            f"a {'/'.join(sorted(roles))} token may not call {method}; "
            f"it takes a {' or '.join(sorted(allowed)) or 'no'} token",
        )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(details)
        refused = self.verdict(details.method, details.invocation_metadata)
        if refused is None or handler is None:
            return handler
        return refusing(handler, *refused)


def bearer(metadata: Any) -> str:
    """The bearer token in call metadata (pairs of key, value), or ''."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str) and value.startswith("Bearer "):
            return value.removeprefix("Bearer ").strip()
    return ""


def refusing(handler: Handler, code: grpc.StatusCode, message: str) -> Handler:
    """A handler of the same kind that answers every call with (code, message)."""

    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, message)

    async def streaming(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    deserialize, serialize = handler.request_deserializer, handler.response_serializer
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, deserialize, serialize)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming, deserialize, serialize)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, deserialize, serialize)
    return grpc.stream_stream_rpc_method_handler(streaming, deserialize, serialize)


def method_table(**services: frozenset[str]) -> dict[str, frozenset[str]]:
    """Keys like 'apiary.v1.Queen' (whole service) or 'apiary.v1.Hive/ReportReady'."""
    table = {
        "/grpc.health.v1.Health/": OPEN,
        "/grpc.reflection.v1alpha.ServerReflection/": ANY_ROLE,
        "/grpc.reflection.v1.ServerReflection/": ANY_ROLE,
    }
    for name, roles in services.items():
        table[f"/{name}" if "/" in name else f"/{name}/"] = roles
    return table


# ---- the client side --------------------------------------------------------


def _with_token(metadata: Any, token: str) -> list[tuple[str, str]]:
    return [*(metadata or ()), ("authorization", f"Bearer {token}")]


class _AioBearerBase:
    def __init__(self, token: str) -> None:
        self.token = token

    def _details(self, details: Any) -> Any:
        return details._replace(metadata=_with_token(details.metadata, self.token))


class _AioUnaryUnary(_AioBearerBase, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _AioUnaryStream(_AioBearerBase, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _AioStreamUnary(_AioBearerBase, grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[type-arg]
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


class _AioStreamStream(_AioBearerBase, grpc.aio.StreamStreamClientInterceptor):  # type: ignore[type-arg]
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


def aio_bearer(token: str) -> list[Any]:
    """Interceptors adding 'authorization: Bearer <token>' to every call on an aio channel.
    One per call kind: grpc.aio files each interceptor under the first kind it matches."""
    return [
        cls(token) for cls in (_AioUnaryUnary, _AioUnaryStream, _AioStreamUnary, _AioStreamStream)
    ]


class SyncBearer(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.StreamStreamClientInterceptor,  # type: ignore[type-arg]
):
    def __init__(self, token: str) -> None:
        self.token = token

    def _details(self, details: Any) -> Any:
        return _SyncDetails(
            details.method,
            details.timeout,
            _with_token(details.metadata, self.token),
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


@dataclass(frozen=True)
class _SyncDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: Any
    credentials: Any
    wait_for_ready: Any
    compression: Any
