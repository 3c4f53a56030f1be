"""Host headers, read: which name a request was sent to. Pure.

A queen without tokens answers only to an IP address or `localhost` in the Host header, on
the dashboard and the API alike: a hostile name resolved to 127.0.0.1 (DNS rebinding) would
otherwise let another site's page read what the queen answers.
"""

from __future__ import annotations

import ipaddress


def host_name(host: str) -> str:
    """'::1' for '[::1]:8080', '127.0.0.1' for '127.0.0.1:8080', 'example.org' for 'example.org'."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def is_address_or_localhost(host: str) -> bool:
    name = host_name(host)
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True
