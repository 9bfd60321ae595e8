"""Load training / evaluation problems as `Sample`s from a built-in task or a data file.

Sources (see `guidedrl.core.config.DataSource`):

- `task`: a built-in task family (`arith`, `reasoning_gym:<name>`), see `guidedrl.data.tasks`.
- `path`: a `.jsonl` file (one JSON object a line), a `.parquet` file, or a folder written by
  `datasets.Dataset.save_to_disk` / `DatasetDict.save_to_disk` (pick the split with `split`).

Columns are mapped to Sample fields by `DataSource.fields`; every other column is passed through
to reward functions in `Sample.extra`. A bad row raises `DataError` naming `file:line` (1-based
line for JSONL) or `file:row N` (0-based row index, as in `dataset[N]`, for Parquet and datasets
folders) and the reason; the user never sees a raw traceback for a bad file.
"""

from __future__ import annotations

import difflib
import inspect
import json
import math
import numbers
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

from guidedrl.core.config import DataSource, FieldMap
from guidedrl.core.errors import ConfigError, DataError
from guidedrl.core.types import Sample

Row = tuple[str, str, Any]
"""(where, default id, raw row): `where` names file:line for error messages."""


def load_samples(src: DataSource, key: str = "data.train") -> list[Sample]:
    """Load the Samples a data source describes.

    Args:
        src: the data source (a built-in `task` or a `path`).
        key: the dotted config key of `src`, used in error messages (e.g. `data.eval`).

    Raises:
        DataError: a missing, unreadable, empty or malformed file (message names file:line).
        ConfigError: an unknown task, bad `task_args`, or a bad `split`.
    """
    if src.limit is not None and src.limit < 0:
        raise ConfigError(f"`{key}.limit` must be >= 0 (or null for no limit), got {src.limit}")
    if src.path is not None:
        samples = _load_path(Path(src.path).expanduser(), src, key)
    else:
        assert src.task is not None, "DataSource validation guarantees task or path"
        samples = _load_task(src.task, src.task_args, key)
    return samples if src.limit is None else balanced_head(samples, src.limit)


def balanced_head(samples: list[Sample], n: int) -> list[Sample]:
    """The first `n` samples taken round-robin over difficulty levels (in level order).

    Built-in tasks list problems level by level, so a plain `samples[:n]` would keep only the
    easiest levels; this keeps every level represented. Samples without levels: `samples[:n]`.

    >>> s = [Sample(id=f"{lv}{i}", prompt="", level=lv) for lv in (1, 2) for i in range(3)]
    >>> [x.id for x in balanced_head(s, 4)]
    ['10', '20', '11', '21']
    """
    if n >= len(samples) or all(s.level is None for s in samples):
        return samples[:n]
    by_level: dict[Any, list[Sample]] = {}
    for s in samples:
        by_level.setdefault(s.level if s.level is not None else -1, []).append(s)
    queues = [by_level[k] for k in sorted(by_level)]
    out: list[Sample] = []
    for i in range(max(len(q) for q in queues)):
        out.extend(q[i] for q in queues if i < len(q))
    return out[:n]


def _load_task(task: str, task_args: dict[str, Any], key: str) -> list[Sample]:
    """Call the task generator after checking `task_args` against its signature."""
    from guidedrl.data.tasks import resolve_task

    fn = resolve_task(task, key=f"{key}.task")
    try:
        inspect.signature(fn).bind(**task_args)
    except TypeError as e:
        raise ConfigError(f"`{key}.task_args` for task `{task}`: {e}") from None
    return fn(**task_args)


# ----------------------------------------------------------------------------- files


def _load_path(path: Path, src: DataSource, key: str) -> list[Sample]:
    if not path.exists():
        raise DataError(f"{path}: no such file or folder (`{key}.path`)")
    if path.is_dir():
        rows = _datasets_rows(path, src.split, key)
    elif path.suffix.lower() == ".jsonl":
        rows = _jsonl_rows(path)
    elif path.suffix.lower() == ".parquet":
        rows = _parquet_rows(path)
    else:
        raise DataError(
            f"{path}: unknown data format `{path.suffix or '(no extension)'}`; "
            "use a .jsonl file, a .parquet file, or a folder written by datasets' save_to_disk"
        )
    if src.limit == 0:
        return []
    samples: list[Sample] = []
    first_seen: dict[str, str] = {}
    for where, default_id, row in rows:
        sample = row_to_sample(row, where, src.fields, default_id, key)
        if sample.id in first_seen:
            raise DataError(f"{where}: duplicate id {sample.id!r} (first seen at {first_seen[sample.id]})")
        first_seen[sample.id] = where
        samples.append(sample)
        if src.limit is not None and len(samples) >= src.limit:
            break  # before reading the next row, so rows past the limit are never parsed
    if not samples:
        raise DataError(f"{path}: empty file (no rows)")
    return samples


def _jsonl_rows(path: Path) -> Iterator[Row]:
    """One JSON value per non-blank line. Lines split on b"\\n" only, so numbers match editors."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from None
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        where = f"{path}:{lineno}"
        try:
            text = line.decode("utf-8-sig" if lineno == 1 else "utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not valid UTF-8 (byte {e.start + 1} of the line)") from None
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
        except (ValueError, RecursionError) as e:
            # e.g. an integer beyond Python's digit limit, or nesting too deep to parse
            raise DataError(f"{where}: invalid JSON: {type(e).__name__}: {e}") from None
        yield where, f"{path.stem}:{lineno}", value


def _parquet_rows(path: Path) -> Iterator[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pfile = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file: {e}") from None
    index = 0
    try:
        for batch in pfile.iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                yield f"{path}:row {index}", f"{path.stem}:{index}", row
                index += 1
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path}:row {index}: cannot read Parquet data: {e}") from None


def _datasets_rows(path: Path, split: str | None, key: str) -> Iterator[Row]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise DataError(
            f"{path}: a folder, but not one written by datasets' save_to_disk "
            "(no dataset_info.json / dataset_dict.json)"
        ) from None
    except Exception as e:  # a damaged folder can fail in arrow, json or fsspec: all are the file's fault
        raise DataError(f"{path}: cannot load the saved dataset: {type(e).__name__}: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        names = list(ds)
        if split is None and len(names) == 1:
            split = names[0]
        if split is None:
            raise ConfigError(f"`{key}.split`: {path} holds splits {names}; set `{key}.split` to one")
        if split not in ds:
            close = difflib.get_close_matches(split, names, n=1)
            hint = f" Did you mean `{close[0]}`?" if close else ""
            raise ConfigError(f"`{key}.split`: {path} has no split `{split}` (it has {names}).{hint}")
        ds = ds[split]
    elif split is not None:
        raise ConfigError(f"`{key}.split` is `{split}`, but {path} holds a single Dataset, not a DatasetDict")
    index = 0
    try:
        for row in ds:
            yield f"{path}:row {index}", f"{path.stem}:{index}", row
            index += 1
    except (OSError, ValueError) as e:  # pyarrow errors derive from these
        raise DataError(f"{path}:row {index}: cannot read the saved dataset: {e}") from None


# ----------------------------------------------------------------------------- rows


def row_to_sample(row: Any, where: str, fields: FieldMap, default_id: str, key: str = "data.train") -> Sample:
    """Map one raw row to a Sample; `where` (file:line) prefixes every error, `key` is the source's config key.

    >>> row_to_sample({"q": "1+1?", "a": 2, "src": "x"}, "f.jsonl:1", FieldMap(prompt="q", answer="a"), "f:1")
    Sample(id='f:1', prompt='1+1?', answer='2', reference=None, hints=[], level=None, extra={'src': 'x'})
    """
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object (a mapping of column to value), got {_kind(row)}")
    if fields.prompt not in row:
        present = ", ".join(map(str, row)) or "(none)"
        raise DataError(
            f"{where}: missing prompt field `{fields.prompt}` (set `{key}.fields.prompt` to the right column); "
            f"columns present: {present}"
        )
    mapped = {fields.id, fields.prompt, fields.answer, fields.reference, fields.hints, fields.level}
    return Sample(
        id=_id(row.get(fields.id), where, fields.id, default_id),
        prompt=_prompt(row[fields.prompt], where, fields.prompt),
        answer=_answer(row.get(fields.answer), where, fields.answer),
        reference=_opt_text(row.get(fields.reference), where, fields.reference, "reference"),
        hints=_hints(row.get(fields.hints), where, fields.hints),
        level=_level(row.get(fields.level), where, fields.level),
        extra={k: v for k, v in row.items() if k not in mapped},
    )


def _kind(value: Any) -> str:
    """A JSON-ish name for a value's type, for messages."""
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    if type(value) in names:
        return names[type(value)]
    if isinstance(value, (int, float)):
        return f"a number ({value!r})"
    return type(value).__name__


def _is_missing(value: Any) -> bool:
    """None, or a float NaN (how pandas-written Parquet stores a null in a numeric column)."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _check_text(text: str, where: str, what: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"{where}: {what} contains an invalid unicode character (a lone surrogate)") from None
    return text


def _id(value: Any, where: str, column: str, default: str) -> str:
    if _is_missing(value):
        return default
    if isinstance(value, bool) or not isinstance(value, (str, numbers.Integral)):
        raise DataError(f"{where}: id field `{column}` must be a string or integer, got {_kind(value)}")
    return _check_text(str(value), where, f"id field `{column}`")


def _prompt(value: Any, where: str, column: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: prompt field `{column}` must be a string, got {_kind(value)}")
    if not value.strip():
        raise DataError(f"{where}: prompt field `{column}` is empty")
    return _check_text(value, where, f"prompt field `{column}`")


def _answer(value: Any, where: str, column: str) -> str | None:
    """Answers are compared as text: numbers are converted with str()."""
    if _is_missing(value):
        return None
    # numbers.Real covers int, float, Fraction and numpy scalars; Decimal comes from Parquet decimals
    if isinstance(value, bool) or not isinstance(value, (str, numbers.Real, Decimal)):
        raise DataError(f"{where}: answer field `{column}` must be a string or number, got {_kind(value)}")
    if not isinstance(value, str) and math.isinf(value):
        raise DataError(f"{where}: answer field `{column}` is infinite")
    return _check_text(str(value), where, f"answer field `{column}`")


def _opt_text(value: Any, where: str, column: str, what: str) -> str | None:
    if _is_missing(value):
        return None
    if not isinstance(value, str):
        raise DataError(f"{where}: {what} field `{column}` must be a string, got {_kind(value)}")
    return _check_text(value, where, f"{what} field `{column}`")


def _hints(value: Any, where: str, column: str) -> list[str]:
    """A single string is one hint; a list holds hints weakest first."""
    if _is_missing(value):
        return []
    if isinstance(value, str):
        return [_check_text(value, where, f"hints field `{column}`")] if value.strip() else []
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{where}: hints field `{column}` must be a string or a list of strings, got {_kind(value)}")
    for i, hint in enumerate(value):
        if not isinstance(hint, str):
            raise DataError(f"{where}: hints field `{column}`[{i}] must be a string, got {_kind(hint)}")
        _check_text(hint, where, f"hints field `{column}`[{i}]")
    return list(value)


def _level(value: Any, where: str, column: str) -> int | None:
    """An integer; an integral float (3.0, from a nullable numeric column) is accepted as int."""
    if _is_missing(value):
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise DataError(f"{where}: level field `{column}` must be an integer, got {_kind(value)}")
    return int(value)
