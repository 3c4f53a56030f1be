"""The QueenRegistry service: hives heartbeat their worker tables into the registry.

A heartbeat is untrusted input. Before anything is applied: the caller must be the hive it
says it is (its own token, or its certificate), within its heartbeat budget, and the beat
well-formed (queen/beats.py). Then the registry takes only what changed, and refuses records
a hive may not claim (another hive's worker ids, addresses off the hive's host).
"""

from __future__ import annotations

from functools import partial

import grpc
import structlog

from apiary.security import SHARED_HIVE, Security, bearer
from apiary.serving import Context
from protos.v1 import queen_pb2, queen_pb2_grpc
from queen.beats import BeatBudget, BeatLimits, beat_problem, changed_records, host_of
from queen.cluster import Cluster
from queen.registry import HiveTaken

log = structlog.get_logger("queen.rpc.heartbeats")


def certificate_names(context: Context) -> set[str]:
    """DNS names, IP addresses and the common name of the peer's TLS client certificate."""
    auth = context.auth_context() or {}
    names = {
        value.decode(errors="replace") for value in auth.get("x509_subject_alternative_name", [])
    }
    names |= {value.decode(errors="replace") for value in auth.get("x509_common_name", [])}
    return names


class QueenRegistryService(queen_pb2_grpc.QueenRegistryServicer):
    def __init__(
        self, cluster: Cluster, security: Security | None = None, limits: BeatLimits | None = None
    ) -> None:
        self.cluster = cluster
        self.security = security or Security()
        self.limits = limits or BeatLimits()
        self.budget = BeatBudget(
            cluster.registry.interval, per_interval=self.limits.beats_per_interval
        )

    def identity_problem(self, beat: queen_pb2.HiveHeartbeat, context: Context) -> str | None:
        """Why the caller may not speak for `beat.hive_id` (None: it may)."""
        tokens = self.security.tokens
        if tokens.enabled:
            names = {
                i.name
                for i in tokens.identities(bearer(context.invocation_metadata()))
                if i.role == "hive"
            }
            if SHARED_HIVE not in names and beat.hive_id not in names:
                owner = ", ".join(sorted(names)) or "no hive"
                return (
                    f"this hive token belongs to hive {owner}, not {beat.hive_id!r}: each hive "
                    "heartbeats with its own token (apiary certs add-hive ID)"
                )
        if self.cluster.hive_identity_from_cert:
            return self.certificate_problem(beat, certificate_names(context))
        return None

    @staticmethod
    def certificate_problem(beat: queen_pb2.HiveHeartbeat, names: set[str]) -> str | None:
        shown = ", ".join(sorted(names)) or "no certificate"
        if beat.hive_id not in names:
            return (
                f"hive id {beat.hive_id!r} is not a name in this hive's client certificate "
                f"({shown}); give each hive a certificate for its id "
                "(apiary certs init --host ID=ADDRESS)"
            )
        if not beat.leaving and host_of(beat.address) not in names:
            return (
                f"hive {beat.hive_id} advertises {beat.address}, whose host is not a name in its "
                f"certificate ({shown}); issue the certificate for that host"
            )
        return None

    async def Heartbeat(
        self, request: queen_pb2.HiveHeartbeat, context: Context
    ) -> queen_pb2.HeartbeatReply:
        refused = self.identity_problem(request, context)
        if refused:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, refused)
        if not self.budget.allow(request.hive_id, self.cluster.clock.monotonic()):
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"hive {request.hive_id} heartbeats too often; send at most "
                f"{self.limits.beats_per_interval:g} per interval "
                f"({self.cluster.registry.interval:g}s); try again in "
                f"{self.budget.wait_hint(request.hive_id):.1f}s",
            )
        problem = beat_problem(request, self.limits)
        known = partial(self.cluster.registry.known_record, request.hive_id)
        changed, record_problem = changed_records(request, known, self.limits)
        if problem or record_problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem or record_problem or "")
        names = (
            frozenset(certificate_names(context))
            if self.cluster.hive_identity_from_cert
            else frozenset()
        )
        try:
            self.cluster.apply_heartbeat(request, changed, names)
        except HiveTaken as exc:
            await context.abort(grpc.StatusCode.ALREADY_EXISTS, str(exc))
        self.cluster.metrics.heartbeats.inc()
        return queen_pb2.HeartbeatReply(interval_seconds=self.cluster.registry.interval)
