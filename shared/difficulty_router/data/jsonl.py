"""JSON Lines, read and written one way for the whole package.

Outcomes files, prompt files, grades, labelling journals and decision logs are all JSON Lines: one
JSON value a line, blank lines ignored, optionally gzip-compressed (a name ending in ``.gz``). Every
reader goes through :func:`read_jsonl`, so a malformed line is reported the same way everywhere, as
``FILE, line N: ...`` (the decision log as ``FILE:N: ...``, the form its readers have always matched):
in a 10,000-line file the line number is what makes the error usable. Writers
go through :func:`write_jsonl`, which replaces the file only once every row is written, so a crash
never leaves a half-written training file behind.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any


def open_text(path: str | os.PathLike) -> IO[str]:
    """``path`` opened for reading as UTF-8 text, decompressed when its name ends in ``.gz``."""
    path = Path(path)
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def parse_json_line(line: str, where: str) -> Any:
    """One line's JSON value; ``where`` (e.g. ``"FILE, line N"``) names the line if it is not valid JSON."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: not valid JSON ({exc.msg})") from None


def read_jsonl(
    path: str | os.PathLike,
    *,
    objects_only: bool = True,
    skip_malformed: bool = False,
    line_name: str = "{path}, line {number}",
) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` for every non-blank line of ``path`` (1-based, as an editor counts).

    ``objects_only``: a line that holds anything but a JSON object is an error naming it (callers that
    also take bare strings, such as prompt files, pass False and check the value themselves).
    ``skip_malformed``: pass over lines that are not valid JSON (or not objects) instead of raising: for
    append-only journals, whose last line a crash may have cut mid-write.
    ``line_name``: how errors name a line (``{path}`` and ``{number}``); the decision log keeps the
    ``FILE:N`` form its readers have always matched.
    """
    path = Path(path)
    with open_text(path) as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = line_name.format(path=path, number=number)
            try:
                value = parse_json_line(line, where)
                if objects_only and not isinstance(value, dict):
                    raise ValueError(f"{where}: expected a JSON object, got {type(value).__name__}")
            except ValueError:
                if skip_malformed:
                    continue
                raise
            yield number, value


def write_jsonl(path: str | os.PathLike, rows: Iterable[Any]) -> int:
    """Write ``rows`` to ``path``, one JSON value a line (UTF-8 kept as is; gzip when the name ends in ``.gz``).

    The rows go to ``PATH.tmp`` first, which then replaces ``path``: readers see the old file or the whole
    new one. Returns the number of rows written.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    written = 0
    opener: Any = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(tmp, "wt", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                written += 1
    except BaseException:
        tmp.unlink(missing_ok=True)  # the old file stays as it was
        raise
    os.replace(tmp, path)
    return written
