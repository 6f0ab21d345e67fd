"""Reading a dialogue source: the file's text (UTF-8), and its records as JSON texts in an Arrow
table, from a JSON array or JSON Lines, with the rows that are not JSON. Records never exist as
Python objects all at once (docs/DATA.md, "Import memory")."""

from __future__ import annotations

import json
import re

import pyarrow as pa

from ..storage import StorageConfig


def check_source(source: str, storage: StorageConfig) -> None:
    """Before Ray starts: a source that is not there is a one-line error, not a traceback 20 s later."""
    fs, path = storage.filesystem(source)
    if not fs.isfile(path):
        raise FileNotFoundError(f"source {source} does not exist (or is a folder): give a JSON or JSONL file")


def read_text(source: str, storage: StorageConfig) -> str:
    """The source as text: UTF-8, a byte-order mark (as some editors write) dropped."""
    check_source(source, storage)
    fs, path = storage.filesystem(source)
    with fs.open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"source {source} is not UTF-8 text (byte {e.start}: {e.reason}); "
                         "JSON and JSONL files are UTF-8, so convert it first") from None


RECORDS = pa.schema([("row", pa.int64()), ("text", pa.string())])
CHUNK = 8192
"""Records per Arrow chunk while reading: Python strings for at most this many at once."""


def read_records(source: str, storage: StorageConfig) -> tuple[pa.Table, list[dict]]:
    """(row, text) of each record, as JSON text in an Arrow table, and the rows that are not JSON.
    A file starting with ``[`` is a JSON array, anything else JSONL (blank lines skipped); rows
    count from 1.

    JSONL lines end at "\\n" only: str.splitlines() would also split at U+2028, U+0085 and other
    separators that JSON strings may hold unescaped."""
    text = read_text(source, storage)
    if text.lstrip().startswith("["):
        try:
            return _table(enumerate(array_items(text), start=1)), []
        except json.JSONDecodeError as e:
            raise ValueError(f"{source} starts with '[' but is not a valid JSON array: {e}") from None
    bad: list[dict] = []
    return _table(_json_lines(text, bad)), bad


def _json_lines(text: str, bad: list[dict]):
    """(row, line) of each JSON line; blank lines are skipped, the rest go to ``bad`` with their reason."""
    for i, line in enumerate(_lines(text), start=1):
        if not line.strip():
            continue
        try:
            json.loads(line)
            yield i, line
        except json.JSONDecodeError as e:
            bad.append({"row": i, "stage": "parse", "reason": f"not JSON: {e}"})


def _lines(text: str):
    """``text.split("\\n")``, one line at a time."""
    at = 0
    while at <= len(text):
        end = text.find("\n", at)
        end = len(text) if end < 0 else end
        yield text[at:end]
        at = end + 1


def _table(pairs) -> pa.Table:
    """(row, text) pairs as one Arrow table, converted a chunk at a time."""
    chunks, rows, texts = [], [], []
    for row, text in pairs:
        rows.append(row)
        texts.append(text)
        if len(rows) == CHUNK:
            chunks.append(pa.table({"row": rows, "text": texts}, schema=RECORDS))
            rows, texts = [], []
    chunks.append(pa.table({"row": rows, "text": texts}, schema=RECORDS))
    return pa.concat_tables(chunks)


def array_items(text: str):
    """Each item of a JSON array, as its own JSON text, decoded one at a time: ``json.loads`` of the
    whole array holds every record as Python objects at once, ~5x the file in memory
    (docs/DATA.md, "Import memory")."""
    decoder, space = json.JSONDecoder(), re.compile(r"\s*")
    at = space.match(text, text.index("[") + 1).end()
    if text.startswith("]", at):
        at += 1
    else:
        while True:
            _, end = decoder.raw_decode(text, at)
            yield text[at:end]
            at = space.match(text, end).end()
            if not text.startswith(",", at):
                if not text.startswith("]", at):
                    raise json.JSONDecodeError("expected ',' or ']' after an item", text, at)
                at += 1
                break
            at = space.match(text, at + 1).end()
    if space.match(text, at).end() != len(text):
        raise json.JSONDecodeError("extra data after the array", text, at)
