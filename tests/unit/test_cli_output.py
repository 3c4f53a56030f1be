"""What people see: tables cut to the terminal (whole when piped), progress that redraws only on
a terminal, connection errors that name the flag to check, and `apiary up`'s banner."""

from __future__ import annotations

import argparse

import grpc
import pytest

from cli.emit import inert
from cli.errors import connection_problem, rpc_error_text
from cli.output import (
    PullProgressLines,
    fit_widths,
    table,
    terminal_width,
    worker_details,
    worker_rows,
)
from cli.up import banner, daemon_flags, metrics_ports
from protos.v1 import common_pb2, hive_pb2

REASON = "exited with code 3; not restarting (restart policy never) " * 3


def failed_worker() -> common_pb2.WorkerRecord:
    return common_pb2.WorkerRecord(
        id="w-1", hive_id="h1", model="demo", backend="echo",
        state=common_pb2.WORKER_STATE_FAILED, address="127.0.0.1:40001",
        tags=["gpu", "region=eu", "a-very-long-tag-name"], failure_reason=REASON,
    )  # fmt: skip


def test_long_columns_are_cut_to_the_width() -> None:
    text = worker_rows([failed_worker()], width=140)
    lines = text.splitlines()
    assert all(len(line) <= 140 for line in lines), lines
    assert lines[1].endswith("…") and "exited with" in lines[1]
    assert "127.0.0.1:40001" in lines[1]  # cut last: the widest column goes first
    assert lines[0].split()[-1] == "REASON"  # headers are never cut


def test_whole_rows_without_a_limit() -> None:
    assert REASON.strip() in worker_rows([failed_worker()], width=0)


def test_a_narrow_terminal_cuts_every_long_column_to_its_floor() -> None:
    text = worker_rows([failed_worker()], width=40)  # cannot fit: cut what may be cut
    row = text.splitlines()[1]
    assert "127.0.0…" in row and REASON[:7] in row and REASON[:9] not in row


def test_fit_widths() -> None:
    assert fit_widths([5, 30, 30], [None, 6, 6], 100) == [5, 30, 30]
    assert fit_widths([5, 30, 10], [None, 6, 6], 35) == [5, 16, 10]
    assert fit_widths([5, 30, 30], [None, 6, 6], 37) == [5, 14, 14]
    assert fit_widths([5, 30, 30], [None, 6, 6], 10) == [5, 6, 6]
    assert table(("A", "B"), [("x", "y" * 20)], cut=("B",), width=12) == "A  B\nx  yyyyyyyy…"


def test_piped_tables_are_whole_unless_columns_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("COLUMNS", raising=False)
    assert terminal_width() == 0  # pytest captures stdout: not a terminal
    monkeypatch.setenv("COLUMNS", "90")
    assert terminal_width() == 90


def pull(done: int, total: int, stage: str = "downloading") -> hive_pb2.PullProgress:
    return hive_pb2.PullProgress(bytes_done=done, bytes_total=total, stage=stage)


def test_progress_redraws_on_a_terminal() -> None:
    progress = PullProgressLines(live=True)
    shown = [progress.update(pull(n, 100)) for n in (1, 2, 3)]
    assert all(s is not None and s[0].startswith("\r") and s[1] == "" for s in shown)
    assert progress.finish() == ("", "\n")


def test_progress_prints_plain_lines_elsewhere() -> None:
    progress = PullProgressLines(live=False)
    shown = [progress.update(pull(n, 1000)) for n in range(0, 1001, 25)]
    lines = [s[0] for s in shown if s is not None]
    assert len(lines) == 11  # 0 %, 10 %, ... 100 %
    assert all("\r" not in line and line == line.rstrip() for line in lines)
    assert " 100% " in lines[-1]
    assert progress.update(pull(1000, 1000, "verifying")) is not None  # a new stage: a line
    assert progress.finish() is None


def test_progress_of_unknown_size_prints_every_few_seconds() -> None:
    now = [0.0]
    progress = PullProgressLines(live=False, every_seconds=5, clock=lambda: now[0])
    printed = 0
    for _ in range(100):
        printed += progress.update(pull(1, 0)) is not None
        now[0] += 0.5
    assert printed == 10


ADDRESS = "127.0.0.1:7070"
CONNECT = "failed to connect to all addresses; last error: "


@pytest.mark.parametrize(
    ("details", "tls_ca", "tls_cert", "expected"),
    [
        (CONNECT + "UNAVAILABLE: ipv4:127.0.0.1:7070: Socket closed", "", "",
         "closed the connection while it was set up: it probably requires TLS; pass --tls-ca"),
        (CONNECT + "UNAVAILABLE: ipv4:127.0.0.1:7070: Socket closed", "ca.pem", "",
         "TLS handshake with the queen at 127.0.0.1:7070 failed: it closed the connection, most "
         "likely because it requires a client certificate: pass --tls-cert and --tls-key"),
        (CONNECT + "UNAVAILABLE: ipv4:127.0.0.1:7070: Socket closed", "ca.pem", "c.pem",
         "refusing the client certificate"),
        (CONNECT + "UNKNOWN: ipv4:127.0.0.1:7070: Tls handshake failed (TSI_PROTOCOL_FAILURE): "
         "SSL_ERROR_SSL: error:1a000064:ECDSA routines:OPENSSL_internal:BAD_SIGNATURE: "
         "certificate signature failure: OK", "other-ca.pem", "",
         "TLS handshake with the queen at 127.0.0.1:7070 failed: BAD_SIGNATURE: certificate "
         "signature failure; check --tls-ca (and --tls-cert/--tls-key if the queen requires "
         "client certificates)"),
        (CONNECT + "UNKNOWN: ipv4:127.0.0.1:7070: Tls handshake failed (TSI_PROTOCOL_FAILURE): "
         "SSL_ERROR_SSL: error:100000f7:SSL routines:OPENSSL_internal:WRONG_VERSION_NUMBER: "
         "Invalid certificate verification context: OK", "ca.pem", "",
         "it does not speak TLS there (WRONG_VERSION_NUMBER: Invalid certificate verification "
         "context); drop --tls-ca"),
        (CONNECT + "UNKNOWN: ipv4:127.0.0.1:7070: Failed to connect to remote host: Connection "
         "refused", "ca.pem", "",
         "cannot reach the queen at 127.0.0.1:7070; is it running?"),
        ("errors resolving queen.invalid:7070: [field:hostname lookup error:Domain name not "
         "found]", "", "", "cannot resolve the queen's address 127.0.0.1:7070"),
        ("worker w-1 went away", "", "", ""),
    ],
)  # fmt: skip
def test_connection_errors_say_what_is_wrong(
    details: str, tls_ca: str, tls_cert: str, expected: str
) -> None:
    problem = connection_problem(details, ADDRESS, tls_ca, tls_cert)
    assert expected in problem if expected else problem == ""
    if "closed the connection" in expected and not tls_ca:
        assert "cannot reach" not in problem


def test_a_failure_the_queen_answered_is_said_as_the_queen_said_it() -> None:
    """Its words may quote a worker's connection error: no TLS hint for those (every worker of
    a model dead of SIGILL once read as 'the queen probably requires TLS')."""
    said = ("no worker of model 'm' could serve: worker w-1 failed (UNAVAILABLE: Socket closed) "
            "after 3 attempt(s)")  # fmt: skip
    error = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(),
        grpc.aio.Metadata(("apiary-answered", "1")), said, None,
    )  # fmt: skip
    assert rpc_error_text(error, ADDRESS) == f"UNAVAILABLE: {said}"
    unanswered = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), said, None
    )
    assert "probably requires TLS" in rpc_error_text(unanswered, ADDRESS)


def test_the_clients_errors_read_as_one_line_naming_every_queen() -> None:
    """apiary.client raises grpc.aio.AioRpcError (not a grpc.Call): read the same way."""
    refused = CONNECT + "UNKNOWN: ipv4:127.0.0.1:7071: Failed to connect to remote host: refused"
    error = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), refused, None
    )
    assert rpc_error_text(error, ADDRESS) == (
        "UNAVAILABLE: cannot reach the queen at 127.0.0.1:7070; is it running? "
        "(--queen, or APIARY_QUEEN)"
    )
    assert rpc_error_text(error, "127.0.0.1:7070,127.0.0.1:7071").startswith(
        "UNAVAILABLE: cannot reach any queen at 127.0.0.1:7070,127.0.0.1:7071; are they running?"
    )
    missing = grpc.aio.AioRpcError(
        grpc.StatusCode.NOT_FOUND, grpc.aio.Metadata(), grpc.aio.Metadata(), "unknown model", None
    )
    assert rpc_error_text(missing, ADDRESS) == "NOT_FOUND: unknown model"


def up_args(**overrides: object) -> argparse.Namespace:
    values: dict[str, object] = {
        "hive_id": "local", "workers": 2, "model": "demo", "state_dir": "",
        "metrics_port": -1, "log_format": None,
    }  # fmt: skip
    return argparse.Namespace(**{**values, **overrides})


def test_up_banner_commands_reach_the_queen_it_started() -> None:
    text = banner(up_args(), "127.0.0.1:7070", "echo")
    assert " status\n" in text and "--queen" not in text
    text = banner(up_args(state_dir="/s", metrics_port=9100), "127.0.0.1:7171", "echo")
    assert " status --queen 127.0.0.1:7171\n" in text
    assert " infer demo 'Tell me about bees.' --max-tokens 64 --queen 127.0.0.1:7171\n" in text
    assert "/s/queen and /s/hive-local" in text and "port 9100, hive on port 9101" in text
    assert "Dashboard" not in text  # no HTTP front, no page
    served = banner(up_args(), "127.0.0.1:7070", "echo", "http://127.0.0.1:8080")
    assert "Dashboard: http://127.0.0.1:8080/ " in served


def test_up_passes_state_and_metrics_on() -> None:
    args = up_args(state_dir="/s", metrics_port=9100, log_format="json")
    assert metrics_ports(9100) == (9100, 9101) and metrics_ports(0) == (0, 0)
    assert daemon_flags(args, "hive-local", 9101) == [
        "--log-format", "json", "--state-dir", "/s/hive-local", "--metrics-port", "9101",
    ]  # fmt: skip
    assert daemon_flags(up_args(), "queen", 0) == []


def test_what_a_hive_says_is_shown_never_obeyed() -> None:
    """ESC, OSC, CR, BEL and C1 from a hive (failure_reason, status_detail) are written out,
    in tables and `get` alike: no window title set, no line rewritten or added."""
    evil = "boom\x1b]0;owned\x07\rOK\x1b[2K\nfake line\x9b31m"
    worker = common_pb2.WorkerRecord(id="w1", hive_id="h1", model="m",
                                     failure_reason=evil, status_detail=evil)  # fmt: skip
    for shown in (worker_details(worker), worker_rows([worker], width=0)):
        assert not any((ord(c) < 32 and c != "\n") or 0x7F <= ord(c) <= 0x9F for c in shown)
        assert "\\x1b]0;owned\\x07\\x0dOK" in shown
        assert "\\x0afake line" in shown  # the hive's newline did not make a line
    assert inert("answer\n\tline\x1b[31m") == "answer\n\tline\\x1b[31m"  # a model's lines stay
