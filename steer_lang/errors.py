"""Errors in `.steer` programs, reported as `file:line:col: message` with the line and a caret under it."""

from __future__ import annotations

from dataclasses import dataclass

from steer.errors import SteerError


@dataclass(frozen=True)
class Diagnostic:
    filename: str
    line: int  # 1-based
    col: int  # 1-based
    message: str

    def format(self, source: str | None = None) -> str:
        head = f"{self.filename}:{self.line}:{self.col}: {self.message}"
        lines = source.splitlines() if source is not None else []
        if not 1 <= self.line <= len(lines):
            return head
        text = lines[self.line - 1]
        # Keep tabs in the caret line so the caret sits under the right character.
        pad = "".join(ch if ch == "\t" else " " for ch in text[: max(self.col - 1, 0)])
        return f"{head}\n    {text}\n    {pad}^"


class LangError(SteerError):
    """One or more errors in a `.steer` program (syntax, checks, or a run-time error with its place)."""

    cli_prefix = ""  # each line already starts with file:line:col

    def __init__(self, diagnostics: list[Diagnostic], source: str | None = None):
        self.diagnostics = sorted(diagnostics, key=lambda d: (d.line, d.col))
        self.source = source
        super().__init__(self.format())

    def format(self) -> str:
        return "\n".join(d.format(self.source) for d in self.diagnostics)

    @property
    def first(self) -> Diagnostic:
        return self.diagnostics[0]


class ProgramError(Exception):
    """Raised while a program runs, at a node; the interpreter adds the file name and source."""

    def __init__(self, node, message: str):
        self.node = node
        self.message = message
        super().__init__(message)
