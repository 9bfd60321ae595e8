"""Data loaders (JSONL, Parquet, datasets folders), field mapping, errors, and the task registry."""

from __future__ import annotations

import doctest
import json
import sys
import types
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from guidedrl.core.config import DataSource, FieldMap
from guidedrl.data import TASKS, default_reward, load_samples, resolve_task
from guidedrl.data import loaders
from guidedrl.data.tasks import reasoning_gym as rg_task
from guidedrl.core.errors import ConfigError, DataError
from guidedrl.core.types import Sample


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def load(path: Path, **kw: Any) -> list[Sample]:
    return load_samples(DataSource(path=str(path), **kw))


# ----------------------------------------------------------------------------- JSONL


def test_jsonl_fields_extra_and_conversions(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "probs.jsonl",
        [
            {"id": "p1", "prompt": "2+2?", "answer": 4, "reference": "2+2=4", "hints": "add", "level": 1, "src": "x"},
            {"prompt": "3*3?", "answer": "9", "hints": ["mul", "3 times 3"], "topic": {"k": [1]}},
        ],
    )
    s1, s2 = load(path)
    assert s1 == Sample(
        id="p1", prompt="2+2?", answer="4", reference="2+2=4", hints=["add"], level=1, extra={"src": "x"}
    )
    # no id -> "<file stem>:<line>"; hints list kept in order; every other column goes to extra
    assert s2 == Sample(id="probs:2", prompt="3*3?", answer="9", hints=["mul", "3 times 3"], extra={"topic": {"k": [1]}})


def test_jsonl_field_mapping(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "m.jsonl",
        [{"uid": 7, "question": "q?", "solution": "1/2", "worked": "w", "tips": "t", "difficulty": 3, "prompt": "p"}],
    )
    fields = FieldMap(id="uid", prompt="question", answer="solution", reference="worked", hints="tips", level="difficulty")
    (s,) = load(path, fields=fields)
    # the unmapped `prompt` column is just another extra column now
    assert s == Sample(id="7", prompt="q?", answer="1/2", reference="w", hints=["t"], level=3, extra={"prompt": "p"})


def test_jsonl_blank_lines_keep_line_numbers_and_limit(tmp_path: Path) -> None:
    path = tmp_path / "b.jsonl"
    path.write_text('{"prompt": "a"}\n\n   \n{"prompt": "b"}\n{"prompt": "c"}\n')
    assert [s.id for s in load(path)] == ["b:1", "b:4", "b:5"]
    assert [s.prompt for s in load(path, limit=2)] == ["a", "b"]
    assert load(path, limit=0) == []


def test_jsonl_limit_stops_before_a_later_bad_row(tmp_path: Path) -> None:
    path = tmp_path / "l.jsonl"
    path.write_text('{"prompt": "a"}\nnot json\n')
    assert [s.prompt for s in load(path, limit=1)] == ["a"]


def test_jsonl_utf8_bom_and_crlf(tmp_path: Path) -> None:
    path = tmp_path / "w.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "caf\xc3\xa9"}\r\n{"prompt": "b"}\r\n')
    assert [s.prompt for s in load(path)] == ["café", "b"]


@pytest.mark.parametrize(
    ("content", "where", "reason"),
    [
        ('{"prompt": "a"}\n{"prompt": "b",}\n', ":2:", "invalid JSON"),
        ('{"prompt": "a"}\n\n[1, 2]\n', ":3:", "expected an object"),
        ('"just a string"\n', ":1:", "expected an object"),
        ('{"question": "a", "answer": 1}\n', ":1:", "missing prompt field `prompt`"),
        ('{"prompt": 5}\n', ":1:", "prompt field `prompt` must be a string, got a number (5)"),
        ('{"prompt": null}\n', ":1:", "prompt field `prompt` must be a string, got null"),
        ('{"prompt": "  "}\n', ":1:", "prompt field `prompt` is empty"),
        ('{"prompt": "a", "level": "hard"}\n', ":1:", "level field `level` must be an integer, got a string"),
        ('{"prompt": "a", "level": 1.5}\n', ":1:", "level field `level` must be an integer"),
        ('{"prompt": "a", "level": true}\n', ":1:", "level field `level` must be an integer, got a boolean"),
        ('{"prompt": "a", "answer": [1]}\n', ":1:", "answer field `answer` must be a string or number, got a list"),
        ('{"prompt": "a", "hints": ["x", 2]}\n', ":1:", "hints field `hints`[1] must be a string"),
        ('{"prompt": "a", "hints": {"x": 1}}\n', ":1:", "hints field `hints` must be a string or a list of strings"),
        ('{"prompt": "a", "reference": 3}\n', ":1:", "reference field `reference` must be a string"),
        ('{"prompt": "a", "id": [1]}\n', ":1:", "id field `id` must be a string or integer"),
        ('{"prompt": "a", "id": 1}\n{"prompt": "b", "id": "1"}\n', ":2:", "duplicate id '1' (first seen at"),
        ('{"prompt": "\\ud800"}\n', ":1:", "lone surrogate"),
        ('{"prompt": "a"}\n' + "[" * 100000 + "\n", ":2:", "invalid JSON"),
    ],
)
def test_jsonl_bad_rows_name_file_line_and_reason(tmp_path: Path, content: str, where: str, reason: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as err:
        load(path)
    assert f"{path}{where}" in str(err.value)
    assert reason in str(err.value)


def test_missing_prompt_lists_columns_and_names_the_mapped_column(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [{"question": "q", "answer": 1}])
    with pytest.raises(DataError) as err:
        load(path, fields=FieldMap(prompt="problem"))
    msg = str(err.value)
    assert f"{path}:1: missing prompt field `problem`" in msg
    assert "`data.train.fields.prompt`" in msg and "columns present: question, answer" in msg  # the real key
    with pytest.raises(DataError, match=r"set `data.eval.fields.prompt`"):
        load_samples(DataSource(path=str(path), fields=FieldMap(prompt="problem")), key="data.eval")


def test_invalid_utf8_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "u.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=r"u\.jsonl:2: not valid UTF-8"):
        load(path)


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file(tmp_path: Path, content: str) -> None:
    path = tmp_path / "e.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=r"e\.jsonl: empty file"):
        load(path)


def test_unknown_extension_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("prompt\na\n")
    with pytest.raises(DataError, match=r"d\.csv: unknown data format `\.csv`"):
        load(path)
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        load(tmp_path / "nope.jsonl")


def test_negative_limit_is_a_config_error(tmp_path: Path) -> None:
    from guidedrl.core.config import load_config

    path = write_jsonl(tmp_path / "n.jsonl", [{"prompt": "a"}])
    with pytest.raises(ConfigError, match=r"`data.train.limit`"):  # at load time, before any data is read
        load_config(None, [f"data.train.path={path}", "data.train.limit=-1"])


# ----------------------------------------------------------------------------- Parquet


def test_parquet_rows_with_mapping_and_nulls(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    table = pa.table(
        {
            "q": ["a?", "b?"],
            "answer": [1.5, None],
            "level": [2.0, float("nan")],  # pandas stores a nullable int column like this
            "hints": [["h1", "h2"], None],
            "meta": ["x", "y"],
        }
    )
    pq.write_table(table, path)
    s1, s2 = load(path, fields=FieldMap(prompt="q"))
    assert s1 == Sample(id="p:0", prompt="a?", answer="1.5", hints=["h1", "h2"], level=2, extra={"meta": "x"})
    assert s2 == Sample(id="p:1", prompt="b?", answer=None, hints=[], level=None, extra={"meta": "y"})


def test_parquet_bad_row_names_row_index(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b", "c"], "level": ["1", "2", "x"]}), path)
    with pytest.raises(DataError) as err:
        load(path)
    assert f"{path}:row 0: level field `level` must be an integer, got a string" in str(err.value)
    pq.write_table(pa.table({"prompt": ["a", None]}), path)
    with pytest.raises(DataError, match=r"p\.parquet:row 1: prompt field `prompt` must be a string, got null"):
        load(path)


def test_parquet_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "g.parquet"
    path.write_bytes(b"this is not parquet at all")
    with pytest.raises(DataError, match=r"g\.parquet: not a readable Parquet file"):
        load(path)


# ----------------------------------------------------------------------------- datasets folders


def test_datasets_folder_and_dataset_dict_split(tmp_path: Path) -> None:
    import datasets

    rows = [{"prompt": "a", "answer": "1", "level": 1}, {"prompt": "b", "answer": "2", "level": 2}]
    ds = datasets.Dataset.from_list(rows)
    ds.save_to_disk(str(tmp_path / "one"))
    assert [(s.id, s.prompt, s.level) for s in load(tmp_path / "one")] == [("one:0", "a", 1), ("one:1", "b", 2)]

    dd = datasets.DatasetDict({"train": ds, "test": datasets.Dataset.from_list([{"prompt": "t", "answer": 3}])})
    dd.save_to_disk(str(tmp_path / "two"))
    (t,) = load(tmp_path / "two", split="test")
    assert (t.prompt, t.answer) == ("t", "3")
    with pytest.raises(ConfigError, match=r"`data.train.split`: .* holds splits \['train', 'test'\]"):
        load(tmp_path / "two")
    with pytest.raises(ConfigError, match=r"no split `tset`.*Did you mean `test`\?"):
        load(tmp_path / "two", split="tset")
    with pytest.raises(ConfigError, match=r"holds a single Dataset"):
        load(tmp_path / "one", split="train")

    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "single"))
    assert len(load(tmp_path / "single")) == 2  # the only split is used without naming it


def test_datasets_folder_bad_row_and_not_a_dataset(tmp_path: Path) -> None:
    import datasets

    datasets.Dataset.from_list([{"prompt": "a"}, {"prompt": ""}]).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(DataError) as err:
        load(tmp_path / "d")
    assert f"{tmp_path / 'd'}:row 1: prompt field `prompt` is empty" in str(err.value)
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match=r"not one written by datasets' save_to_disk"):
        load(tmp_path / "plain")


# ----------------------------------------------------------------------------- tasks


def test_reasoning_gym_task_samples_and_splits() -> None:
    train = load_samples(DataSource(task="reasoning_gym:leg_counting", task_args={"size": 5, "seed": 3}))
    test = load_samples(
        DataSource(task="reasoning_gym:leg_counting", task_args={"size": 5, "seed": 3, "split": "test"})
    )
    assert len(train) == len(test) == 5
    s = train[0]
    assert s.id == "reasoning_gym:leg_counting:train:0"
    assert s.prompt == s.extra["rg_entry"]["question"] and s.answer == s.extra["rg_entry"]["answer"]
    assert s.extra["rg_dataset"] == "leg_counting" and s.extra["rg_config"] == {"size": 5, "seed": 3}
    assert test[0].extra["rg_config"]["seed"] == 3 + rg_task.TEST_SEED_OFFSET
    assert {x.prompt for x in train}.isdisjoint({x.prompt for x in test})
    again = load_samples(DataSource(task="reasoning_gym:leg_counting", task_args={"size": 5, "seed": 3}, limit=2))
    assert [x.prompt for x in again] == [x.prompt for x in train[:2]]  # seeded, and limit truncates


def test_reasoning_gym_config_args_reach_the_dataset() -> None:
    (s,) = rg_task.make_samples("leg_counting", size=1, seed=0, min_animals=1, max_animals=1)
    assert len(s.extra["rg_entry"]["metadata"]["animals"]) == 1


def test_reasoning_gym_errors() -> None:
    with pytest.raises(ConfigError, match=r"`data.train.task`: reasoning-gym has no dataset `leg_count`.*leg_counting"):
        load_samples(DataSource(task="reasoning_gym:leg_count"))
    with pytest.raises(ConfigError, match=r"unknown task_args \['legs'\]; LegCountingConfig takes"):
        load_samples(DataSource(task="reasoning_gym:leg_counting", task_args={"legs": 3}))
    with pytest.raises(ConfigError, match=r"invalid task_args .*min_animals must be positive"):
        load_samples(DataSource(task="reasoning_gym:leg_counting", task_args={"min_animals": 0}))
    with pytest.raises(ConfigError, match=r"`split` must be `train` or `test`"):
        load_samples(DataSource(task="reasoning_gym:leg_counting", task_args={"split": "dev"}))
    with pytest.raises(ConfigError, match=r"names no dataset"):
        load_samples(DataSource(task="reasoning_gym:"))


def test_unknown_task_suggests() -> None:
    with pytest.raises(ConfigError, match=r"`data.eval.task`: unknown task `arithm`. Did you mean `arith`\?"):
        load_samples(DataSource(task="arithm"), key="data.eval")


def test_arith_is_imported_lazily_and_gets_task_args(monkeypatch: pytest.MonkeyPatch) -> None:
    """The registry hook for the embedded task: a stand-in module records how it is called."""
    calls: list[dict[str, Any]] = []

    def make_samples(split: str = "train", size: int = 4, levels: list[int] | None = None, seed: int = 0) -> list[Sample]:
        calls.append({"split": split, "size": size, "levels": levels, "seed": seed})
        return [Sample(id=f"arith:{i}", prompt=f"{i}+1=") for i in range(size)]

    fake = types.ModuleType("guidedrl.data.tasks.arith")
    fake.make_samples = make_samples  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "guidedrl.data.tasks.arith", fake)
    import guidedrl.data.tasks as tasks_pkg

    monkeypatch.setattr(tasks_pkg, "arith", fake, raising=False)
    out = load_samples(DataSource(task="arith", task_args={"split": "test", "size": 3, "levels": [2]}, limit=2))
    assert [s.id for s in out] == ["arith:0", "arith:1"]
    assert calls == [{"split": "test", "size": 3, "levels": [2], "seed": 0}]
    assert len(TASKS["arith"](size=2)) == 2
    with pytest.raises(ConfigError, match=r"`data.train.task_args` for task `arith`: .*'level'"):
        load_samples(DataSource(task="arith", task_args={"level": 3}))
    assert resolve_task("arith") is make_samples


def test_default_reward() -> None:
    assert [t.name for t in default_reward("arith")] == ["arith"]
    assert [t.name for t in default_reward("reasoning_gym:gcd")] == ["reasoning_gym"]
    assert [t.name for t in default_reward(None)] == ["math"]
    with pytest.raises(ConfigError, match="set `reward.terms`"):
        default_reward("mystery")


@pytest.mark.parametrize("module", [loaders, rg_task, sys.modules["guidedrl.data.tasks"]])
def test_doctests(module: types.ModuleType) -> None:
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_parquet_decimal_answer(tmp_path: Path) -> None:
    from decimal import Decimal

    path = tmp_path / "dec.parquet"
    pq.write_table(pa.table({"prompt": ["a"], "answer": pa.array([Decimal("1.50")], pa.decimal128(5, 2))}), path)
    (s,) = load(path)
    assert s.answer == "1.50"
