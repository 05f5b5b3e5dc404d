"""The one error type a user sees: what is wrong, where, and what was expected."""

from __future__ import annotations


class MhsError(Exception):
    """A failure the user can fix; the CLI prints it without a traceback and exits 2."""


class RawDataError(MhsError):
    """Bad raw input, located by file, line or row, and field."""

    def __init__(self, file, problem: str, *, line: int | None = None, row: int | None = None,
                 field: str | None = None, expected: str | None = None):
        self.file, self.line, self.row, self.field = str(file), line, row, field
        where = self.file
        if line is not None:
            where += f", line {line}"
        if row is not None:
            where += f", row {row}"
        if field is not None:
            where += f", field '{field}'"
        message = f"{where}: {problem}"
        if expected:
            message += f" (expected {expected})"
        super().__init__(message)
