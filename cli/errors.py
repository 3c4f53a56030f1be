"""What goes wrong, in one line: usage mistakes (CliError, exit status 2) and failed calls, where
a connection failure says whether the queen is unreachable or TLS failed, and which flag to
check."""

from __future__ import annotations

import re

import grpc

from apiary.errors import answered

TLS_FLAGS = "check --tls-ca (and --tls-cert/--tls-key if the queen requires client certificates)"


class CliError(Exception):
    pass


def last_error(details: str) -> str:
    """The end of grpc's connect error: 'BAD_SIGNATURE: certificate signature failure' out of
    'failed to connect to all addresses; last error: UNKNOWN: ipv4:1.2.3.4:7070: Tls handshake
    failed (...): SSL_ERROR_SSL: error:1a000064:...:OPENSSL_internal:BAD_SIGNATURE: ...: OK'."""
    text = details.split("last error:", 1)[-1]
    text = text.split("OPENSSL_internal:", 1)[-1]
    text = re.sub(r"^\s*[A-Z_]+: (ipv[46]:)?\S+:\d+: ", "", text)
    return text.removesuffix(": OK").strip()


def closed_while_connecting(queen: str, tls_ca: str, tls_cert: str) -> str:
    """The queen accepted the connection, then closed it: what TLS setting is likely wrong."""
    if not tls_ca:
        return (
            f"the queen at {queen} closed the connection while it was set up: it probably "
            "requires TLS; pass --tls-ca (and --tls-cert/--tls-key if it requires client "
            "certificates)"
        )
    if not tls_cert:
        return (
            f"TLS handshake with the queen at {queen} failed: it closed the connection, most "
            "likely because it requires a client certificate: pass --tls-cert and --tls-key"
        )
    return (
        f"TLS handshake with the queen at {queen} failed: it closed the connection, most likely "
        "refusing the client certificate: check that --tls-cert is signed by the CA the queen "
        "trusts (its --tls-client-ca) and --tls-key is its key"
    )


def connection_problem(details: str, queen: str, tls_ca: str = "", tls_cert: str = "") -> str:
    """What an UNAVAILABLE call's details mean for someone dialling `queen` with these TLS
    flags; '' when it is not a failure to connect."""
    lower = details.lower()
    reason = last_error(details)
    if "wrong_version_number" in lower:
        return (
            f"TLS handshake with the queen at {queen} failed: it does not speak TLS there "
            f"({reason}); drop --tls-ca to connect without TLS, or check the address"
        )
    if any(word in lower for word in ("handshake", "ssl", "certificate")):
        return f"TLS handshake with the queen at {queen} failed: {reason}; {TLS_FLAGS}"
    if "socket closed" in lower or "connection reset" in lower:
        return closed_while_connecting(queen, tls_ca, tls_cert)
    if "resolving" in lower or "dns" in lower:
        return f"cannot resolve the queen's address {queen} ({reason}); check --queen"
    if "failed to connect" in lower or "connection refused" in lower:
        if "," in queen:
            return f"cannot reach any queen at {queen}; are they running? (--queen, APIARY_QUEEN)"
        return f"cannot reach the queen at {queen}; is it running? (--queen, or APIARY_QUEEN)"
    return ""


def rpc_error_text(exc: grpc.RpcError, queen: str, tls_ca: str = "", tls_cert: str = "") -> str:
    """'UNAVAILABLE: cannot reach the queen at ...', 'NOT_FOUND: unknown model ...'. `queen`:
    the --queen given (one address, or a comma list when every one of them failed)."""
    if not isinstance(exc, grpc.aio.AioRpcError | grpc.Call):
        return f"ERROR: {exc}"
    code, details = exc.code(), exc.details() or ""
    # A status the queen itself gave (its words may quote a worker's connection error) is
    # said as it is; only a failure to reach the queen is read for TLS and address hints.
    if code == grpc.StatusCode.UNAVAILABLE and not answered(exc):
        details = connection_problem(details, queen, tls_ca, tls_cert) or details
    return f"{code.name}: {details}"
