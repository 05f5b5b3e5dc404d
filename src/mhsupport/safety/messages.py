"""The input of `mhs screen`: plain text, one message per line, or JSON lines with a `text` field
(and, optionally, `context`: the seeker's earlier turns, or the seeker message a reply answers)."""

from __future__ import annotations

import json
from dataclasses import dataclass

from mhsupport.errors import MhsError


@dataclass
class Message:
    line: int
    text: str
    context: str | list[str] | None = None


def parse_messages(data: bytes, name: str) -> list[Message]:
    """The messages of a file's bytes, blank lines skipped. A file whose first non-blank line opens
    with "{" is JSON lines, each an object with a string `text`."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        raise MhsError(f"{name}, line {line}: not UTF-8 (byte 0x{data[err.start]:02x}); save the file as "
                       "UTF-8") from None
    lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise MhsError(f"{name}: no messages (expected one message per line, or JSON lines with a \"text\" field)")
    if not lines[0][1].lstrip().startswith("{"):
        return [Message(number, line.strip()) for number, line in lines]
    messages = []
    for number, line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise MhsError(f"{name}, line {number}: not valid JSON ({err.msg}); every line of a JSON-lines file is "
                           "an object such as {\"text\": \"...\"}") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise MhsError(f"{name}, line {number}: expected an object with a string \"text\" field, "
                           "e.g. {\"text\": \"I feel low\"}")
        context = row.get("context")
        if context is not None and not (isinstance(context, str) or
                                        (isinstance(context, list) and all(isinstance(t, str) for t in context))):
            raise MhsError(f"{name}, line {number}: \"context\" must be a string or a list of strings")
        messages.append(Message(number, row["text"], context))
    return messages
