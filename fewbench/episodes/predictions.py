"""An outside method's predictions on a manifest's episodes, read and checked.

Two forms (docs/episodes.md):

- CSV with a header naming ``episode``, ``query`` and ``label`` (other columns are
  ignored): one row per query example;
- JSON: a list of ``{"episode": e, "query": q, "label": l}`` records, or a list whose
  element ``e`` lists episode ``e``'s predicted labels in query order.

Episode ``e`` and query ``q`` are positions in the manifest (``episodes[e]["query"][q]``);
a label is one of the episode's labels, ``0 .. ways-1``. Every query of every episode must
be predicted exactly once: a missing or repeated one is refused, not scored as wrong.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fewbench.errors import FewbenchError

COLUMNS = ("episode", "query", "label")


def read_predictions(path: Path, episodes: int, queries: int, ways: int) -> np.ndarray:
    """Predicted labels ``[episodes, queries]`` from ``path``, every one checked."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a spreadsheet's byte-order mark
    except FileNotFoundError:
        raise FewbenchError(f"{path}: no such predictions file") from None
    except IsADirectoryError:
        raise FewbenchError(f"{path}: is a folder; give the predictions file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise FewbenchError(f"{path}: cannot read it as text ({exc})") from None
    as_json = path.suffix.lower() == ".json" or (
        path.suffix.lower() != ".csv" and text.lstrip()[:1] in ("[", "{")
    )
    rows = _json_rows(path, text) if as_json else _csv_rows(path, text)
    predicted = np.full((episodes, queries), -1, dtype=np.int64)
    for where, episode, query, label in rows:
        for name, value, bound in (
            ("episode", episode, episodes),
            ("query", query, queries),
            ("label", label, ways),
        ):
            if not 0 <= value < bound:
                raise FewbenchError(
                    f"{path}: {where}: {name} {value} is out of range (0 to {bound - 1}: the "
                    f"manifest has {episodes} episodes of {queries} queries, {ways} ways)"
                )
        if predicted[episode, query] >= 0:
            raise FewbenchError(
                f"{path}: {where}: episode {episode} query {query} is predicted a second time"
            )
        predicted[episode, query] = label
    missing = np.argwhere(predicted < 0)
    if len(missing):
        episode, query = missing[0]
        raise FewbenchError(
            f"{path}: no prediction for episode {episode} query {query} ({len(missing)} of "
            f"{episodes * queries} missing); every query of every episode needs one"
        )
    return predicted


def _whole(path: Path, where: str, name: str, value: Any) -> int:
    """``value`` as a whole number (text of digits, or a JSON number without a fraction)."""
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    elif not isinstance(value, bool) and (
        isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    ):
        return int(value)
    raise FewbenchError(f"{path}: {where}: {name} {value!r:.40} is not a whole number")


def _csv_rows(path: Path, text: str) -> Iterator[tuple[str, int, int, int]]:
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    columns = [c.strip().lower() for c in header or []]
    if not all(c in columns for c in COLUMNS):
        raise FewbenchError(
            f"{path}: a CSV of predictions needs a header naming {', '.join(COLUMNS)}; "
            f"found {', '.join(columns) or 'nothing'}"
        )
    at = [columns.index(c) for c in COLUMNS]
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue
        where = f"line {reader.line_num}"
        if len(row) != len(columns):
            raise FewbenchError(
                f"{path}: {where}: {len(row)} fields, the header names {len(columns)}"
            )
        yield (where, *(_whole(path, where, c, row[i]) for c, i in zip(COLUMNS, at, strict=True)))


def _json_rows(path: Path, text: str) -> Iterator[tuple[str, int, int, int]]:
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise FewbenchError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, list):
        raise FewbenchError(
            f"{path}: expected a JSON list (of records, or of each episode's labels), "
            f"got {type(data).__name__}"
        )
    for index, item in enumerate(data):
        if isinstance(item, dict):
            where = f"record {index}"
            missing = [c for c in COLUMNS if c not in item]
            if missing:
                raise FewbenchError(f"{path}: {where} has no {missing[0]!r}")
            yield (where, *(_whole(path, where, c, item[c]) for c in COLUMNS))
        elif isinstance(item, list):
            for query, label in enumerate(item):
                where = f"episode {index} item {query}"
                yield where, index, query, _whole(path, where, "label", label)
        else:
            raise FewbenchError(
                f"{path}: element {index} is {type(item).__name__}; expected a record "
                "{episode, query, label} or a list of one episode's labels"
            )
