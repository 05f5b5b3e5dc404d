"""Docs that cannot drift: every flag's help states its config's default."""

from __future__ import annotations

import argparse
import re

from mhsupport.cli import build_parser
from mhsupport.settings import flags
from mhsupport.settings.config import default_choice, load_config


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command words, parser) for every command and sub-command of `mhs`."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*path, name), sub
                yield from commands(sub, (*path, name))


def config_value(stage: str, key: str) -> str:
    if key in flags.GROUPS:
        return default_choice(stage, key)
    value = load_config(stage)
    for part in key.split("."):
        value = value[part]
    return str(value).lower() if isinstance(value, bool) else str(value)


def test_every_flag_help_default_is_the_config_value():
    checked = 0
    for words, parser in commands(build_parser()):
        command = " ".join(words)
        if command not in flags.STAGE_OF:
            continue
        stage = flags.STAGE_OF[command]
        formatter = parser._get_formatter()
        for flag in flags.flags_of(command):
            if "{default}" not in flag.helps[command]:
                continue
            action = next(a for a in parser._actions if flag.name in a.option_strings)
            shown = re.search(r"\(default: ([^)]*)\)", formatter._expand_help(action)).group(1)
            value = config_value(stage, flag.key)  # the help may explain the value after a colon or comma
            assert shown == value or shown.startswith((f"{value}:", f"{value},")), (command, flag.name, shown)
            checked += 1
    assert checked > 20


def test_context_turns_help_says_the_classifier_default():
    parser = dict(commands(build_parser()))[("train", "classifier")]
    assert f"(default: {load_config('train_classifier').context_turns})" in " ".join(parser.format_help().split())
