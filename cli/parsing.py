"""How every `apiary` parser behaves: help shows defaults, a group alone prints its help, a
mistyped verb or choice suggests the closest one. Used by the command tree (`cli.parser`) and by
the verbs that build their own part of it (`cli.up`, `cli.certs`)."""

from __future__ import annotations

import argparse
import copy
import difflib
import re
from collections.abc import Callable
from typing import Any

from cli.emit import Emitter

Command = Callable[[argparse.Namespace, Emitter], int]
# argparse's subparsers action is a private class (_SubParsersAction).
Subparsers = Any

# Types that turn a default given as text into the value: a default of any other type next to
# a custom `type=` is already converted (an enum's number) and would read wrong.
PLAIN_TYPES = (None, int, float, str)


def shows_default(action: argparse.Action) -> bool:
    """Whether "(default: X)" says something: not for empty, false or suppressed defaults, a
    converted enum, nor where the help already says what the default is."""
    default = action.default
    if default is None or default is False or default is argparse.SUPPRESS:
        return False
    if isinstance(default, str | list | tuple) and not default:
        return False
    if action.type not in PLAIN_TYPES and not isinstance(default, str):
        return False
    if not action.option_strings and action.nargs not in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
        return False
    return re.search(r"\bdefault\b", action.help or "", re.IGNORECASE) is None


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written (line breaks kept); each option's default after its help, as
    ArgumentDefaultsHelpFormatter does, where it tells something (see shows_default)."""

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and shows_default(action):
            action = copy.copy(action)  # an option with no help still shows its default
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    # The hook ArgumentDefaultsHelpFormatter overrides too.
    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help
        if text and shows_default(action):
            text += " (default: %(default)s)"
        return text


class CliParser(argparse.ArgumentParser):
    """An ArgumentParser with the CLI's help format, suggesting the closest valid choice."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    # argparse checks verbs (subparser names) and `choices` here; Python 3.14's
    # suggest_on_error does the same.
    def _check_value(self, action: argparse.Action, value: Any) -> None:
        if action.choices is None or value in action.choices:
            return
        names = [str(choice) for choice in action.choices]
        close = difflib.get_close_matches(str(value), names, n=1)
        hint = f"did you mean {close[0]!r}?" if close else "choose from " + ", ".join(names)
        raise argparse.ArgumentError(action, f"invalid choice: {value!r} ({hint})")


def show_help(parser: argparse.ArgumentParser) -> Command:
    """What a group run without a verb does: print its help (on stdout, exit status 0)."""

    def run(args: argparse.Namespace, out: Emitter) -> int:
        parser.print_help()
        return 0

    return run


def subcommands(parser: argparse.ArgumentParser, dest: str) -> Subparsers:
    """The verbs of `parser`; the parser alone prints its help."""
    parser.set_defaults(func=show_help(parser))
    return parser.add_subparsers(dest=dest, metavar="VERB", title="verbs")


def add_group(parent: Subparsers, name: str, help_text: str, dest: str = "") -> Subparsers:
    """A command group (`apiary model`): its verbs; alone, its help."""
    parser = parent.add_parser(name, help=help_text, description=help_text)
    return subcommands(parser, dest or f"{name}_verb")
