"""Reading and writing records: JSONL (and JSON arrays), parquet, and Hugging Face `datasets` objects.

Every reader validates each row into a typed record and reports the first bad one as
`DataError("<file>:<line>: field '<name>': <reason>")`, never a traceback.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, TypeVar

from selfalign.errors import DataError

T = TypeVar("T")


def iter_json_rows(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for a .jsonl file, or for a .json file holding an array (a RecordLine: the line
    the object starts on, and its record number)."""
    path = Path(path)
    _check_file(path)
    if path.suffix.lower() == ".json":
        try:
            text = path.read_text(encoding="utf-8")
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"malformed JSON: {e.msg} (column {e.colno})", path=str(path), line=e.lineno) from None
        except UnicodeDecodeError as e:
            raise DataError(f"not UTF-8 text (byte {e.start})", path=str(path)) from None
        if not isinstance(data, list):
            raise DataError("expected a JSON array of objects", path=str(path))
        for (i, row), line in zip(enumerate(data, start=1), _array_element_lines(text), strict=True):
            line = RecordLine(line, i)
            if not isinstance(row, dict):
                raise DataError(f"expected an object, got {type(row).__name__}", path=str(path), line=line)
            yield line, row
        return
    with open(path, "rb") as f:  # bytes, decoded per line: a bad byte is then placed on its line
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"not UTF-8 text (byte {e.start} of the line)", path=str(path), line=lineno) from None
            if not line.strip():
                continue
            try:  # without its newline: an error at the line's end would otherwise be reported as column 1
                row = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as e:
                # a CSV or text file read as JSONL: say which formats are read, not only that its JSON is bad
                formats = ("" if path.suffix.lower() == ".jsonl" else
                           "; selfalign reads JSONL (.jsonl), a JSON array (.json) or parquet (.parquet)")
                raise DataError(f"malformed JSON: {e.msg} (column {e.colno}){formats}", path=str(path),
                                line=lineno) from None
            if not isinstance(row, dict):
                raise DataError(f"expected a JSON object, got {type(row).__name__}", path=str(path), line=lineno)
            yield lineno, row


class RecordLine(int):
    """The line a JSON array's element starts on, with its record number: errors say both ("file:20 (record 3)"),
    since several elements of a compact array share a line."""

    def __new__(cls, line: int, record: int):
        self = super().__new__(cls, line)
        self.record = record
        return self

    def __str__(self) -> str:
        return f"{int(self)} (record {self.record})"

    def __getnewargs__(self):  # pickle and deepcopy: records carry it in their _source
        return int(self), self.record


def _array_element_lines(text: str) -> Iterator[int]:
    """The line each element of the JSON array `text` starts on (`text` is known to parse), so an error names the
    line an editor jumps to, as for JSONL (alpaca_eval's files put one key per line: record 3 starts near line 20).
    The json module reports no positions for what it parses, hence this walk over the array with raw_decode."""
    decoder = json.JSONDecoder()
    ws = re.compile(r"[ \t\n\r]*")
    pos = ws.match(text, text.index("[") + 1).end()
    line, counted = 1, 0
    while pos < len(text) and text[pos] != "]":
        line += text.count("\n", counted, pos)
        counted = pos
        yield line
        _, pos = decoder.raw_decode(text, pos)
        pos = ws.match(text, pos).end()
        if text.startswith(",", pos):
            pos = ws.match(text, pos + 1).end()


def _check_file(path: Path) -> None:
    if not path.exists():
        raise DataError("file not found", path=str(path))
    if not path.is_file():
        raise DataError("not a file (a folder?)", path=str(path))


def _parse(cls, row: dict, path: str, line: int):
    try:
        record = cls.from_dict(row)
    except DataError as e:
        raise DataError(e.reason, path=path, line=line, field=e.field) from None
    record._source = (path, line)  # not a field: lets later checks (e.g. prompt length) name file and line
    return record


def source_of(record: Any) -> tuple[str, int] | tuple[None, None]:
    """(file, line) a record was read from, if it was read from a file."""
    return getattr(record, "_source", (None, None))


def check_limit(limit: int | None, path) -> None:
    """A record limit must be at least 1: 0 would read as "no limit" in some callers and as one record in others."""
    if limit is not None and limit < 1:
        raise DataError(f"limit must be at least 1, not {limit}", path=str(path))


def read_records(source: Any, cls: type[T], limit: int | None = None,
                 missing_id: Literal["index", "line"] | None = None) -> list[T]:
    """Read typed records from a .jsonl/.json/.parquet path or a `datasets.Dataset`. `missing_id`, the id of a row
    without one: "index", its record number - 1 (alpaca_eval's own instruction files have no ids); "line",
    "<file stem>:<line>" (a JSON array's or parquet file's: "<file stem>:<record>"), for a user's prompt or pair file
    in the common prompt/chosen/rejected shape; None, none (the `id` is required)."""
    rows: Iterable[tuple[int, dict]]
    name = str(source)
    if hasattr(source, "column_names") and hasattr(source, "__iter__"):  # a datasets.Dataset
        name = f"<dataset {getattr(source, 'info', None) and source.info.dataset_name or 'in memory'}>"
        rows = ((i, dict(r)) for i, r in enumerate(source, start=1))
    elif str(source).lower().endswith(".parquet"):
        import pandas as pd

        _check_file(Path(source))
        try:
            frame = pd.read_parquet(source)
        except Exception as e:  # pyarrow raises its own types (ArrowInvalid, OSError, ...) for a file it cannot read
            raise DataError(f"not a readable parquet file ({type(e).__name__}: {str(e).splitlines()[0][:200]})",
                            path=name) from None
        rows = ((i, {k: _unnumpy(v) for k, v in r.items()}) for i, r in enumerate(frame.to_dict("records"), start=1))
    else:
        rows = iter_json_rows(source)
    check_limit(limit, name)
    out = []
    for n, (line, row) in enumerate(rows):
        if missing_id and isinstance(row, dict) and row.get("id") is None:
            # a JSON array's elements may share a line: by line, they are numbered by record
            number = n if missing_id == "index" else f"{Path(name).stem}:{getattr(line, 'record', line)}"
            row = {**row, "id": str(number)}
        out.append(_parse(cls, row, name, line))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise DataError("no records", path=name)
    return out


def _unnumpy(v: Any) -> Any:
    """parquet gives numpy arrays for list columns and NaN for nulls; records want plain lists, dicts and None."""
    if hasattr(v, "tolist"):
        v = v.tolist()
    if isinstance(v, list):
        return [_unnumpy(x) for x in v]
    if isinstance(v, dict):
        return {k: _unnumpy(x) for k, x in v.items()}
    if isinstance(v, float) and v != v:  # pandas reads a null cell of a text column as NaN: it is a missing value
        return None
    return v


def to_dict(record: Any) -> dict:
    return record.to_dict() if hasattr(record, "to_dict") else dict(record)


def write_jsonl(path: str | Path, records: Iterable[Any]) -> Path:
    """Write records atomically: a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(to_dict(r), ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    """Write one JSON document atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def to_dataset(records: Iterable[Any]):
    """Records as a `datasets.Dataset` (for trainers that want one)."""
    from datasets import Dataset

    return Dataset.from_list([to_dict(r) for r in records])
