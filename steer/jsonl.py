"""JSONL data files read row by row, with every problem reported as `file:line: message`."""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import SteerError
from .files import atomic_write_text


class DataError(SteerError):
    """A data file is missing, empty or has a bad row; the message names the file, line and field."""

    cli_prefix = ""


MAX_LINE_BYTES = 4 << 20  # a row longer than this is refused before anything parses or tokenises it


def _lines(f, path: Path) -> Iterator[str]:
    """The lines of a binary file as text; a line that is not UTF-8, longer than MAX_LINE_BYTES, or a
    cut-off gzip stream is the data's fault, reported with its line number."""
    number = 0
    while True:
        try:
            raw = f.readline(MAX_LINE_BYTES + 1)
        except (EOFError, OSError, zlib.error) as e:
            raise DataError(f"{path}:{number + 1}: the compressed file is cut off or damaged ({e})") from None
        if not raw:
            return
        number += 1
        if len(raw) > MAX_LINE_BYTES:
            raise DataError(f"{path}:{number}: the line is longer than {MAX_LINE_BYTES >> 20} MiB; "
                            "no training row or document needs that much")
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}:{number}: not UTF-8 text (byte {e.start + 1} of the line)") from None


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) for every non-blank line of a .jsonl or .jsonl.gz file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    opener = gzip.open if path.suffix == ".gz" else open
    seen = False
    with opener(path, "rb") as f:
        for number, line in enumerate(_lines(f, path), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not a JSON line ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
            seen = True
            yield number, row
    if not seen:
        raise DataError(f"{path}: the file has no rows")


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> Path:
    """One JSON object per line, written whole or not at all (see `steer.files`)."""

    atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    return Path(path)
