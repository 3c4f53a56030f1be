"""Random and malformed requests to every RPC of queen, hive and worker.

Each message is built from the proto descriptor with random values of the right
wire type (unicode and huge strings, negative and huge numbers, unknown enum
values, missing fields), and raw random bytes go in as request bodies. No process
may die, every answer must be a deliberate gRPC status (never UNKNOWN, which is
what an unhandled exception becomes), and memory must stay bounded.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import psutil
import pytest
import pytest_asyncio
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness import Cluster, Proc
from protos.v1 import hive_pb2, queen_pb2, worker_pb2

# One cluster (and one event loop) for the whole module: hypothesis sends many requests.
pytestmark = pytest.mark.asyncio(loop_scope="module")
# Destructive on purpose (they stop what they name); tested with targeted inputs elsewhere.
SKIP = {
    "apiary.v1.Worker.Shutdown",
    "apiary.v1.Hive.KillProcess",
    "apiary.v1.Hive.SpawnWorker",
    "apiary.v1.Hive.PullModel",
    "apiary.v1.QueenAdmin.SpawnWorker",
}
INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}
texts = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        ["", "demo", "h1", "echo", "w-", "..", "/etc/passwd", "a" * 129, "\x00", "🐝" * 50]
    ),
    st.integers(10_000, 300_000).map(lambda n: "x" * n),
)


def scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    if field.type == FieldDescriptor.TYPE_STRING:
        return texts
    if field.type == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=64)
    if field.type == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type == FieldDescriptor.TYPE_ENUM:
        return st.integers(-3, 40)  # known and unknown values
    if field.type == FieldDescriptor.TYPE_FLOAT:
        return st.floats(width=32)
    if field.type == FieldDescriptor.TYPE_DOUBLE:
        return st.floats()
    low, high = INT_RANGES[field.type]
    return st.one_of(st.integers(low, high), st.integers(-3, 3).filter(lambda v: low <= v <= high))


def message(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    cls = GetMessageClass(descriptor)
    if depth > 2:
        return st.just(cls())
    fields: dict[str, st.SearchStrategy[Any]] = {}
    for field in descriptor.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key, value = field.message_type.fields
            fields[field.name] = st.dictionaries(scalar(key), scalar(value), max_size=4)
        elif field.message_type is not None:
            inner = message(field.message_type, depth + 1)
            fields[field.name] = st.lists(inner, max_size=3) if field.is_repeated else inner
        elif field.is_repeated:
            fields[field.name] = st.lists(scalar(field), max_size=5)
        else:
            fields[field.name] = scalar(field)

    def build(values: dict[str, Any]) -> Message:
        out = cls()
        for name, value in values.items():
            target = getattr(out, name)
            if isinstance(value, dict):
                target.update(value)
            elif isinstance(value, list):
                target.extend(value)
            elif isinstance(value, Message):
                target.CopyFrom(value)
            else:
                setattr(out, name, value)
        return out

    return st.fixed_dictionaries({}, optional=fields).map(build)


def methods(*files: Any) -> list[MethodDescriptor]:
    found = []
    for module in files:
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                if method.full_name not in SKIP:
                    found.append(method)
    return found


ALL = methods(queen_pb2, hive_pb2, worker_pb2)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fuzz_cluster() -> AsyncIterator[tuple[Cluster, dict[str, Proc], str]]:
    cluster = Cluster()
    try:
        queen = cluster.start_queen()
        hive = cluster.start_hive(queen, "h1", "model=demo,slots=4")
        (worker,) = await cluster.wait_workers(queen, "demo", 1)
        yield cluster, {"queen": queen, "hive": hive}, worker.address
    finally:
        await cluster.close()


def target(method: MethodDescriptor, procs: dict[str, Proc], worker: str) -> str:
    service = method.containing_service.name
    if service.startswith("Queen"):
        return procs["queen"].address
    return procs["hive"].address if service == "Hive" else worker


async def call(channel: grpc.aio.Channel, method: MethodDescriptor, body: bytes) -> grpc.StatusCode:
    path = f"/{method.containing_service.full_name}/{method.name}"
    out = GetMessageClass(method.output_type)
    timeout = 0.3 if method.name == "WatchEvents" else 3.0
    try:
        if method.server_streaming:
            stream = channel.unary_stream(
                path, request_serializer=None, response_deserializer=out.FromString
            )
            async for _ in stream(body, timeout=timeout):
                pass
        else:
            unary = channel.unary_unary(
                path, request_serializer=None, response_deserializer=out.FromString
            )
            await unary(body, timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def fuzz_typed(
    method: MethodDescriptor,
    channel: grpc.aio.Channel,
    loop: asyncio.AbstractEventLoop,
    seen: dict[str, set[str]],
) -> None:
    """Hypothesis drives this thread; the calls run on the test's event loop."""

    @settings(
        max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(request=message(method.input_type))
    def one(request: Message) -> None:
        body = request.SerializeToString()
        code = asyncio.run_coroutine_threadsafe(call(channel, method, body), loop).result(30)
        seen.setdefault(method.full_name, set()).add(code.name)
        assert code != grpc.StatusCode.UNKNOWN, f"{method.full_name}: unhandled error for {request}"
        assert code != grpc.StatusCode.INTERNAL or method.name == "Infer", method.full_name

    one()


def fuzz_raw(
    method: MethodDescriptor,
    channel: grpc.aio.Channel,
    loop: asyncio.AbstractEventLoop,
    codes: set[str],
) -> None:
    @settings(
        max_examples=10, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(body=st.binary(max_size=200))
    def one(body: bytes) -> None:
        code = asyncio.run_coroutine_threadsafe(call(channel, method, body), loop).result(30)
        codes.add(code.name)
        assert code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), method.full_name

    one()


def rss(procs: list[psutil.Process]) -> int:
    return sum(p.memory_info().rss for p in procs)


@pytest.mark.timeout(240)
async def test_random_typed_requests_get_a_deliberate_status(
    fuzz_cluster: tuple[Cluster, dict[str, Proc], str],
) -> None:
    cluster, procs, worker = fuzz_cluster
    watched = [psutil.Process(p.pid) for p in procs.values()]
    watched += [c for c in watched[1].children() if "worker" in " ".join(c.cmdline())]
    before = rss(watched)
    loop = asyncio.get_running_loop()
    seen: dict[str, set[str]] = {}
    for method in ALL:
        channel = cluster.channel(target(method, procs, worker))
        await asyncio.to_thread(fuzz_typed, method, channel, loop, seen)
    for proc in procs.values():
        assert proc.popen.poll() is None, f"{proc.name} died:\n{proc.log()[-3000:]}"
    assert len(seen) == len(ALL)
    growth = rss(watched) - before
    assert growth < 150 * 2**20, f"memory grew by {growth / 2**20:.0f} MiB"


@pytest.mark.timeout(120)
async def test_raw_random_bytes_as_request_bodies(
    fuzz_cluster: tuple[Cluster, dict[str, Proc], str],
) -> None:
    cluster, procs, worker = fuzz_cluster
    loop = asyncio.get_running_loop()
    codes: set[str] = set()
    for method in ALL:
        channel = cluster.channel(target(method, procs, worker))
        await asyncio.to_thread(fuzz_raw, method, channel, loop, codes)
    for proc in procs.values():
        assert proc.popen.poll() is None, f"{proc.name} died"
    # Unparseable bodies are refused as such, before any handler runs.
    assert "INVALID_ARGUMENT" in codes


async def test_oversized_messages_are_refused(
    fuzz_cluster: tuple[Cluster, dict[str, Proc], str],
) -> None:
    cluster, procs, _ = fuzz_cluster
    channel = cluster.channel(procs["queen"].address)
    method = queen_pb2.DESCRIPTOR.services_by_name["Queen"].methods_by_name["Infer"]
    code = await call(channel, method, b"\x12" + b"\xff\xff\xff\x01" + b"x" * (3 << 20))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert procs["queen"].popen.poll() is None
