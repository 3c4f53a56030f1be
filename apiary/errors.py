"""One exception that carries a gRPC status, raised deep and answered once at the RPC edge."""

from __future__ import annotations

import grpc


class StatusError(Exception):
    """Ends a call with `code` and a message a person can act on."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return self.message
