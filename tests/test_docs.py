"""Docs that cannot drift: every `mhs ...` command shown in README.md and docs/ parses with the real
parser, every relative link resolves, every flag's help states its config's default, and the
ablation table is what scripts/ablation_table.py renders from the committed rows."""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from mhsupport.cli import build_parser
from mhsupport.settings import flags
from mhsupport.settings.config import default_choice, load_config

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
FENCE = re.compile(r"^```.*?^```", re.M | re.S)
INLINE = re.compile(r"`([^`\n]+)`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def shown_commands(text: str) -> list[str]:
    """Every `mhs ...` command of a page: each line of its code blocks and each inline code span,
    from the word `mhs` on (a `torchrun ... mhs train ...` launch included), comments cut off."""
    lines = []
    for block in FENCE.findall(text):
        lines += block.replace("\\\n", " ").splitlines()[1:-1]
    lines += INLINE.findall(FENCE.sub("", text))
    commands = []
    for line in lines:
        match = re.search(r"(?:^|\s)(mhs \S.*)$", line)
        if match:
            commands.append(match.group(1).split(" #")[0].strip())
    return commands


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


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_command_shown_parses_with_the_real_parser(page):
    parser = build_parser()
    shown = shown_commands(page.read_text())
    for command in shown:
        words = shlex.split(command)[1:]
        try:
            args, extra = parser.parse_known_args(words)
        except SystemExit as exit_:  # --help exits 0 after printing; a bad command exits 2
            assert exit_.code == 0, f"{page.name}: {command}"
            continue
        # `mhs judge RUN_A RUN_B --backend ... key=value` leaves the overrides after its flags over
        assert not extra or getattr(args, "runs_in_overrides", False), f"{page.name}: {command}: {extra}"
    if page.name in ("README.md", "training.md", "evaluation.md", "data.md"):
        assert shown, f"{page.name} shows no mhs command"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page):
    for target in LINK.findall(page.read_text()):
        if re.match(r"^[a-z]+:", target) or target.startswith("#"):
            continue
        path = target.split("#")[0]
        assert (page.parent / path).exists(), f"{page.name}: {target}"


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


def test_every_ablation_table_is_rendered_from_its_committed_rows():
    page = (REPO / "docs" / "ablations.md").read_text()
    tables = re.findall(r"<!-- ablation table: scripts/ablation_table.py (\S+) -->\n(.*?)<!-- end of ablation table -->",
                        page, flags=re.S)
    assert "results/ablation/generator_valid.jsonl" in dict(tables)
    for rows, shown in tables:
        rendered = subprocess.run([sys.executable, str(REPO / "scripts" / "ablation_table.py"), str(REPO / rows)],
                                  capture_output=True, text=True, check=True).stdout
        assert shown == rendered, rows


def test_no_page_carries_changelog_wording():
    for page in PAGES:
        text = page.read_text().lower()
        for phrase in ("this round", "the issue's", "issue 1", "issue 2"):
            assert phrase not in text, f"{page.name}: {phrase!r}"
