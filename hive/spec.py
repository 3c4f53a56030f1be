"""What a worker is asked to be: its model, backend, slots, options, restart policy and tags."""

from __future__ import annotations

from dataclasses import dataclass, field

from protos.v1 import common_pb2


@dataclass
class WorkerSpec:
    model: str
    backend: str
    slots: int = 1
    device: str = "cpu"
    backend_options: dict[str, str] = field(default_factory=dict)
    restart_policy: common_pb2.RestartPolicy.ValueType = common_pb2.RESTART_POLICY_UNSPECIFIED
    tags: list[str] = field(default_factory=list)
    # A boot (--spawn) worker opted into idle retirement; others from boot are kept.
    idle_retire: bool = False

    def same_as(self, other: WorkerSpec) -> bool:
        def key(spec: WorkerSpec) -> tuple[object, ...]:
            options = sorted(spec.backend_options.items())
            return (spec.model, spec.backend, spec.slots, spec.device, options, sorted(spec.tags))

        return key(self) == key(other)
