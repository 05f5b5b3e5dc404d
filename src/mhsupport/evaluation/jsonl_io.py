"""Reading a run's JSON-lines file (a generation pass's replies, a likelihood file): every line checked,
so a missing or damaged file is one message naming it, the line and the command that rebuilds it."""

from __future__ import annotations

import json
from pathlib import Path

from mhsupport.errors import MhsError


def read_checked_lines(path: Path, keys: tuple[str, ...], fix: str) -> list[dict]:
    """The JSON objects of `path`, one per line, each holding `keys`; else one line ending in `fix`."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as err:
        raise MhsError(f"{path}: unreadable ({err.strerror or err}); {fix}") from None
    except UnicodeDecodeError as err:
        raise MhsError(f"{path}: byte {err.start} is not UTF-8 (the file is damaged); {fix}") from None
    lines = []
    for number, raw in enumerate(text.splitlines(), start=1):
        try:
            line = json.loads(raw)
        except json.JSONDecodeError as err:
            raise MhsError(f"{path}, line {number}: not a JSON object ({err.msg}); {fix}") from None
        missing = [key for key in keys if not isinstance(line, dict) or key not in line]
        if missing:
            raise MhsError(f"{path}, line {number}: expected an object with {', '.join(missing)}; {fix}")
        lines.append(line)
    return lines
