"""Random-access record sources: JSONL, Parquet, ArrayRecord files and the seeded synthetic tasks.

Every source yields *records*, either ``{"text": str}`` (plain LM text, loss on every token) or
``{"prompt": str, "answer": str}`` (a task example). File rows become text records from a configurable
field, or task records when they lack that field but have ``prompt`` and ``answer``. Sources are
random access so grain can shuffle them globally and checkpoint an iterator as a mere index.

A source *spec* is a synthetic task name (``"knowledge"``, ``"reasoning"``, ``"code"``) or
``"KIND:PATH[#FIELD]"`` with KIND in jsonl/parquet/arrayrecord; PATH may be a glob. A bare PATH whose
extension is ``.jsonl``, ``.parquet`` or ``.array_record`` works too.
"""

from __future__ import annotations

import glob
import json
import sys
from collections.abc import Mapping
from typing import Any

import grain
import numpy as np

from k25.data.synthetic import TASKS, TextTask, make_task

Record = dict[str, str]


def to_record(row: Any, field: str = "text") -> Record:
    """Normalizes a decoded row (str or dict) into a text or prompt/answer record."""
    if isinstance(row, str):
        return {"text": row}
    if isinstance(row, Mapping):
        if row.get(field) is not None:
            return {"text": str(row[field])}
        if "prompt" in row and "answer" in row:
            return {"prompt": str(row["prompt"]), "answer": str(row["answer"])}
    raise KeyError(f"row has neither {field!r} nor prompt/answer: {str(row)[:200]}")


class JsonlSource:
    """One JSON object per line; a byte-offset index makes it random access without loading the file."""

    def __init__(self, path: str, field: str = "text") -> None:
        self.path, self.field = path, field
        starts, ends, pos = [], [], 0
        with open(path, "rb") as f:
            for line in f:
                if line.strip():
                    starts.append(pos)
                    ends.append(pos + len(line))
                pos += len(line)
        self._starts = np.asarray(starts, np.int64)
        self._ends = np.asarray(ends, np.int64)

    def __len__(self) -> int:
        return len(self._starts)

    def __getitem__(self, index: int) -> Record:
        with open(self.path, "rb") as f:
            f.seek(int(self._starts[index]))
            line = f.read(int(self._ends[index] - self._starts[index]))
        return to_record(json.loads(line), self.field)

    def __repr__(self) -> str:
        return f"JsonlSource({self.path!r}, field={self.field!r})"


class ParquetSource:
    """Reads only the needed column(s) of a Parquet file into Arrow memory (no per-row Python objects)."""

    def __init__(self, path: str, field: str = "text") -> None:
        import pyarrow.parquet as pq

        self.path, self.field = path, field
        names = pq.read_schema(path).names
        cols = [field] if field in names else ["prompt", "answer"]
        self._table = pq.read_table(path, columns=cols)

    def __len__(self) -> int:
        return self._table.num_rows

    def __getitem__(self, index: int) -> Record:
        row = {name: self._table.column(name)[int(index)].as_py() for name in self._table.column_names}
        return to_record(row, self.field)

    def __repr__(self) -> str:
        return f"ParquetSource({self.path!r}, field={self.field!r})"


class ArrayRecordSource:
    """ArrayRecord files whose records are UTF-8 JSON objects (starting with ``{``) or raw UTF-8 text."""

    def __init__(self, paths: str | list[str], field: str = "text") -> None:
        self.paths, self.field = paths, field
        self._source = grain.sources.ArrayRecordDataSource(paths)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Record:
        raw: bytes = self._source[index]
        return to_record(json.loads(raw) if raw.lstrip().startswith(b"{") else raw.decode("utf-8"), self.field)

    def __repr__(self) -> str:
        return f"ArrayRecordSource({self.paths!r}, field={self.field!r})"


class SyntheticSource:
    """An endless random-access view of one split of a synthetic task; ``stream`` picks the sample order."""

    def __init__(self, task: TextTask, split: str = "train", stream: int = 0, length: int = sys.maxsize) -> None:
        self.task, self.split, self.stream, self._length = task, split, stream, length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> Record:
        return self.task.example(self.split, int(index), self.stream)

    def __repr__(self) -> str:
        return f"SyntheticSource({self.task.name!r}, split={self.split!r}, stream={self.stream})"


_EXTENSIONS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".array_record": "arrayrecord"}


def parse_file_spec(spec: str, default_field: str = "text") -> tuple[str, list[str], str]:
    """``"KIND:PATH[#FIELD]"`` or a bare path -> (kind, sorted matching paths, field)."""
    kind, sep, rest = spec.partition(":")
    if not (sep and kind in ("jsonl", "parquet", "arrayrecord")):
        rest = spec
        kind = next((k for ext, k in _EXTENSIONS.items() if spec.split("#")[0].endswith(ext)), "")
        if not kind:
            raise ValueError(f"unknown source {spec!r}: not a synthetic task ({sorted(TASKS)}) nor KIND:PATH")
    path, _, field = rest.partition("#")
    paths = sorted(glob.glob(path)) or [path]
    return kind, paths, field or default_field


def open_source(
    spec: str,
    *,
    stream: int = 0,
    text_field: str = "text",
    synthetic_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
) -> grain.MapDataset:
    """A source spec as a ``MapDataset`` of records: endless for synthetic tasks, finite for files.

    ``synthetic_kwargs[name]`` configures that task (e.g. ``seed``, ``num_entities``); ``stream`` only
    changes the order in which synthetic train examples are drawn, never the task's world or splits.
    """
    if spec in TASKS:
        task = make_task(spec, **dict((synthetic_kwargs or {}).get(spec, {})))
        return grain.MapDataset.source(SyntheticSource(task, "train", stream))
    kind, paths, field = parse_file_spec(spec, text_field)
    if kind == "arrayrecord":
        return grain.MapDataset.source(ArrayRecordSource(paths, field))
    cls = JsonlSource if kind == "jsonl" else ParquetSource
    parts = [grain.MapDataset.source(cls(p, field)) for p in paths]
    return parts[0] if len(parts) == 1 else grain.MapDataset.concatenate(parts)
