"""Starts real Apiary clusters for tests and benchmarks, and waits on them.

`cluster` (processes with a shared marker, torn down without leftovers), `wait` (the one
polling helper and its observation-window twin), `lines` (a child's output, read as it comes),
`gguf` (a tiny llama model written on the spot), `echo` (what an echo worker streams).
Imports `apiary` and `protos` only: the tiers run as processes.
"""

from harness.cluster import MARKER_ENV, ROOT, Cluster, Proc
from harness.wait import NotMet, stays_true, wait_until

__all__ = ["MARKER_ENV", "ROOT", "Cluster", "NotMet", "Proc", "stays_true", "wait_until"]
