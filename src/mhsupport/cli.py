"""The `mhs` command. Typed flags become config overrides; any KEY=VALUE after them is a
Hydra override (e.g. `data.max_context_turns=5`); --print-config shows the resolved config."""

from __future__ import annotations

import argparse
import logging
import sys

from omegaconf import OmegaConf

from mhsupport.config import load_config
from mhsupport.errors import MhsError


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--force", action="store_true", help="rebuild even if an up-to-date run exists")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="Hydra config overrides")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mhs", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    prepare = commands.add_parser("prepare-data", help="raw ESConv + EPITOME -> unified, leak-free examples",
                                  description="Read (or download) the raw corpora, map strategies to the four "
                                              "categories, split without leakage, write examples and counts.")
    prepare.add_argument("--raw-dir", help="raw data root holding esconv/ and epitome/ (default: $MHS_RAW_DIR)")
    _add_common(prepare)
    prepare.set_defaults(stage="prepare_data", flag_overrides=lambda a: [f"paths.raw_dir={a.raw_dir}"] if a.raw_dir else [])
    return parser


def _run_stage(stage: str, cfg):
    if stage == "prepare_data":
        from mhsupport.stages import prepare_data

        result = prepare_data.run(cfg)
        state = "up to date" if result.skipped else "written"
        print(f"prepare-data run ({state}): {result.run.path}")
        print(f"  examples: {result.run.path / 'examples'}  counts: {result.run.path / 'stats.md'}")
        return result
    raise MhsError(f"unknown stage {stage}")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    args = build_parser().parse_args(argv)
    try:
        overrides = args.flag_overrides(args) + (["force=true"] if args.force else []) + list(args.overrides)
        cfg = load_config(args.stage, overrides)
        if args.print_config:
            print(OmegaConf.to_yaml(cfg), end="")
            return 0
        _run_stage(args.stage, cfg)
    except MhsError as err:
        print(f"mhs {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
