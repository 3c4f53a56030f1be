"""The `apiary` command tree: groups alone print their help, each group's help lists its verbs,
mistyped verbs get a suggestion, help shows defaults, daemons start by an explicit verb."""

from __future__ import annotations

import argparse
from importlib.metadata import version

import pytest

from cli.main import missing_start, run_client, run_daemon
from cli.parser import build_parser

GROUPS = {
    (): ["queen", "hive", "up", "certs", "infer", "status", "model", "worker", "events",
         "requests", "completion"],
    ("queen",): ["start"],
    ("hive",): ["start", "list", "get", "drain", "undrain"],
    ("model",): ["list", "get", "pull", "rm"],
    ("worker",): ["list", "get", "spawn", "retire", "drain", "undrain", "process", "backend"],
    ("worker", "process"): ["list", "get", "kill"],
    ("worker", "backend"): ["list", "get"],
    ("requests",): ["list"],
    ("certs",): ["init", "add-hive", "add-client", "add-host"],
}  # fmt: skip


@pytest.mark.parametrize("group", list(GROUPS), ids=lambda g: " ".join(g) or "apiary")
def test_a_group_alone_prints_its_help_listing_every_verb(
    group: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    assert run_client(list(group)) == 0
    alone = capsys.readouterr()
    assert alone.out.startswith(f"usage: {' '.join(('apiary', *group))} ")
    assert alone.err == ""
    for verb in GROUPS[group]:
        assert f"\n    {verb} " in alone.out or f"\n    {verb}\n" in alone.out, verb
    with pytest.raises(SystemExit) as asked:
        run_client([*group, "--help"])
    assert asked.value.code == 0
    assert capsys.readouterr().out == alone.out


def test_every_verb_runs_a_command() -> None:
    """No leaf of the tree falls through to a group's help by mistake."""

    def leaves(parser: argparse.ArgumentParser, path: tuple[str, ...]) -> list[tuple[str, ...]]:
        found = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    found += leaves(sub, (*path, name))
        return found or [path]

    tree = build_parser()
    for path in leaves(tree, ()):
        if path[-1] == "start":
            continue  # run by the daemon's own parser (cli.main)
        parser = tree
        for name in path:
            parser = next(
                a for a in parser._actions if isinstance(a, argparse._SubParsersAction)
            ).choices[name]
        assert parser.get_default("func").__name__.startswith("cmd_"), path


@pytest.mark.parametrize(
    ("argv", "suggestion"),
    [
        (["wroker"], "'worker'"),
        (["hive", "ls"], "'list'"),
        (["worker", "spwan"], "'spawn'"),
        (["worker", "process", "kil"], "'kill'"),
        (["model", "pul"], "'pull'"),
        (["queen", "strat"], "'start'"),
        (["completion", "bsh"], "'bash'"),
    ],
)
def test_a_mistyped_verb_suggests_the_closest(
    argv: list[str], suggestion: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as failed:
        run_client(argv)
    assert failed.value.code == 2
    assert f"invalid choice: {argv[-1]!r} (did you mean {suggestion}?)" in capsys.readouterr().err


def test_nothing_close_lists_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        run_client(["hive", "zzzzzz"])
    assert "choose from start, list, get, drain, undrain" in capsys.readouterr().err


def test_version_is_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as asked:
        run_client(["--version"])
    assert asked.value.code == 0
    assert capsys.readouterr().out == f"apiary {version('apiary')}\n"


def test_help_shows_defaults_but_never_the_token(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("APIARY_TOKEN", "s3cret-token")
    with pytest.raises(SystemExit):
        run_client(["worker", "spawn", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # help wraps lines
    assert "(default: the one the model's catalog entry names" in text
    assert "(default: 180.0)" in text
    assert "(default: 127.0.0.1:7070)" in text
    assert "s3cret-token" not in text
    assert "(default: the hive's)" in text  # said by the help itself: not twice
    assert "the hive's) (default" not in text


@pytest.mark.parametrize(("daemon", "expected"), [("queen", "(default: 1.0)"),
                                                  ("hive", "(default: 5.0)")])  # fmt: skip
def test_daemon_help_goes_through_the_daemons_parser_with_defaults(
    daemon: str, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as asked:
        run_daemon(daemon, ["--help"])
    assert asked.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert out.startswith(f"usage: apiary {daemon} start ")
    assert "--heartbeat-interval" in out and expected in out


def test_completion_prints_the_shell_hook(capsys: pytest.CaptureFixture[str]) -> None:
    for shell in ("bash", "zsh", "fish"):
        assert run_client(["completion", shell]) == 0
        assert "apiary" in capsys.readouterr().out


def test_completing_knows_the_daemons_flags() -> None:
    """Tab completion sees `hive start`'s flags; the plain parser leaves them to the daemon."""
    args = build_parser(completing=True).parse_args(["hive", "start", "--hive-id", "x"])
    assert args.hive_id == "x"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["hive", "start", "--hive-id", "x"])


def test_enum_flags_take_labels() -> None:
    args = build_parser().parse_args(["infer", "m", "p", "--policy", "shortest-queue"])
    assert args.policy == 5
    args = build_parser().parse_args(["events", "--kind", "request-completed"])
    assert args.kind == [15]


def test_daemon_flags_without_start_say_what_to_type() -> None:
    assert missing_start(["hive", "--queen", "q:1"]) == (
        "to run the hive, say `start`: apiary hive start --queen q:1"
    )
    assert missing_start(["queen", "--listen", "0:1"]).endswith("apiary queen start --listen 0:1")
    assert missing_start(["hive", "--help"]) == missing_start(["hive", "list"]) == ""
