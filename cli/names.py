"""What an enum value is called wherever the CLI shows it, in tables and in JSON alike.

States and health read as the proto names without their prefix (`IDLE`, `HEALTHY`); the
values people type as flags read as those flags' labels (`least-loaded`, `on-failure`,
`request-completed`). A value this build does not know (a newer server) is `UNKNOWN(n)`.
"""

from __future__ import annotations

import re

from google.protobuf.descriptor import EnumDescriptor

from protos.v1 import common_pb2, hive_pb2, queen_pb2

# Enums whose values are also typed as flag values: shown as those labels.
LABELLED = frozenset(
    enum.full_name
    for enum in (
        common_pb2.RoutingPolicy.DESCRIPTOR,
        common_pb2.RestartPolicy.DESCRIPTOR,
        common_pb2.FinishReason.DESCRIPTOR,
        queen_pb2.EventKind.DESCRIPTOR,
        queen_pb2.RequestStatus.DESCRIPTOR,
        hive_pb2.ProcessOwner.DESCRIPTOR,
    )
)


def enum_prefix(enum: EnumDescriptor) -> str:
    """'WORKER_STATE_' for WorkerState: the prefix every value of a proto enum carries."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"


def enum_text(enum: EnumDescriptor, number: int) -> str:
    """'IDLE', 'least-loaded', 'UNSPECIFIED' / 'unspecified' for 0, 'UNKNOWN(9)'."""
    value = enum.values_by_number.get(number)
    if value is None:
        return f"UNKNOWN({number})"
    short = value.name.removeprefix(enum_prefix(enum))
    return short.lower().replace("_", "-") if enum.full_name in LABELLED else short
