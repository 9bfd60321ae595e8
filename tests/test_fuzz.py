"""Fuzzing the user-input boundaries: whatever the user writes, the answer is a result or a user error.

(a) the JSONL loader: random bytes, random lines, random JSON values -> list[Sample] or DataError.
(b) the config loader: random nested trees and `--set` strings -> Config or ConfigError.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

from guidedrl.core.config import Config, DataSource, FieldMap, apply_overrides, validate
from guidedrl.data import load_samples
from guidedrl.core.errors import ConfigError, DataError
from guidedrl.core.types import Sample

FUZZ = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# Shrinking a large failing config tree takes minutes on 2 cores; report the raw failing input instead.
FUZZ_NO_SHRINK = settings(FUZZ, phases=[Phase.explicit, Phase.reuse, Phase.generate])

# ----------------------------------------------------------------------------- (a) JSONL

COLUMNS = ["id", "prompt", "answer", "reference", "hints", "level", "q", "extra_col", ""]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(COLUMNS), st.text(max_size=5)), inner, max_size=5),
    ),
    max_leaves=12,
)
# rows that often get past the "is it an object with a prompt" checks, to reach the field checks
rowish = st.dictionaries(st.sampled_from(COLUMNS), json_values, max_size=7)
lines = st.one_of(
    rowish.map(lambda d: json.dumps(d).encode()),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=40),
    st.sampled_from([b"", b"   ", b"\r", b"{", b"[" * 5000, b'{"prompt": "\\ud800"}', b"1" * 5000, b"\xef\xbb\xbf{}"]),
)
files = st.one_of(st.binary(max_size=200), st.lists(lines, max_size=8).map(b"\n".join))
field_maps = st.one_of(
    st.just(FieldMap()),
    st.builds(FieldMap, prompt=st.sampled_from(["q", "prompt"]), answer=st.sampled_from(["answer", "q", "id"])),
)


@FUZZ
@given(content=files, fields=field_maps, limit=st.one_of(st.none(), st.integers(0, 3)))
def test_jsonl_loader_returns_samples_or_data_error(content: bytes, fields: FieldMap, limit: int | None) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "fuzz.jsonl"
        path.write_bytes(content)
        try:
            samples = load_samples(DataSource(path=str(path), fields=fields, limit=limit))
        except DataError as e:
            assert str(path) in str(e)  # every data error names the file
            return
    assert isinstance(samples, list) and all(isinstance(s, Sample) for s in samples)
    assert limit is None or len(samples) <= limit
    for s in samples:
        assert isinstance(s.prompt, str) and s.prompt.strip()
        assert s.answer is None or isinstance(s.answer, str)
        assert all(isinstance(h, str) for h in s.hints)
        assert s.level is None or (isinstance(s.level, int) and not isinstance(s.level, bool))
    assert len({s.id for s in samples}) == len(samples)


# ----------------------------------------------------------------------------- (b) config


def _field_names(model: Any, seen: set[str]) -> None:
    """Every field name in the config tree (keys the fuzzer should use to get deep)."""
    from pydantic import BaseModel

    for name, field in model.model_fields.items():
        seen.add(name)
        for arg in getattr(field.annotation, "__args__", (field.annotation,)):
            for sub in getattr(arg, "__args__", (arg,)):
                if isinstance(sub, type) and issubclass(sub, BaseModel) and sub.__name__ not in seen:
                    seen.add(sub.__name__)
                    _field_names(sub, seen)


_names: set[str] = set()
_field_names(Config, _names)
KEYS = sorted(n for n in _names if n[:1].islower()) + [
    "grpo", "ppo_clip", "rloo", "gae", "nft", "arith", "name", "x", "",
]
config_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**6), max_value=10**6),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(KEYS),
    st.text(max_size=8),
)
config_values = st.recursive(
    config_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.integers(0, 3)), inner, max_size=4),
    ),
    max_leaves=15,
)
trees = st.dictionaries(st.sampled_from(KEYS), config_values, max_size=5)
yaml_values = st.one_of(
    st.sampled_from(
        [
            "1e-5", "true", "null", "~", "[1, 2]", "{a: 1}", "{name: rloo}", "2001-13-45", "2024-01-01",
            "'unterminated", "[", "{", ": :", "!!python/object:os.system x", "&a [*a]", "*nope", "0x1F",
            ".inf", "-.nan", "|", "- a\n- b", "%TAG", "\t", "é", "[" * 600 + "]" * 600,
        ]
    ),
    st.text(max_size=12),
)
overrides = st.builds(
    lambda keys, sep, value: ".".join(keys) + sep + value,
    st.lists(st.sampled_from(KEYS), min_size=1, max_size=4),
    st.sampled_from(["=", "=", "=", "", "==", " = "]),
    yaml_values,
)


@FUZZ_NO_SHRINK
@given(tree=trees)
def test_validate_returns_config_or_config_error(tree: dict[str, Any]) -> None:
    try:
        cfg = validate(tree)
    except ConfigError as e:
        assert str(e)  # a message, never empty
        return
    assert isinstance(cfg, Config)


@FUZZ_NO_SHRINK
@given(tree=trees, items=st.lists(overrides, max_size=4))
@example(tree={}, items=["train.lr=2001-13-45"])  # found by this fuzzer: yaml's date constructor raises ValueError
@example(tree={}, items=["train.steps=" + "[" * 600 + "]" * 600])  # found: RecursionError in yaml
def test_apply_overrides_returns_config_or_config_error(tree: dict[str, Any], items: list[str]) -> None:
    try:
        cfg = validate(apply_overrides(tree, items))
    except ConfigError as e:
        assert str(e)
        return
    assert isinstance(cfg, Config)


def _paths(tree: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every key path in a nested dict."""
    out = [prefix] if prefix else []
    if isinstance(tree, dict):
        for k, v in tree.items():
            out += _paths(v, prefix + (str(k),))
    return out


DEFAULT_TREE = Config().model_dump(mode="json")
DEFAULT_PATHS = _paths(DEFAULT_TREE)


@st.composite
def mutated_defaults(draw: st.DrawFn) -> dict[str, Any]:
    """The default config with a few leaves or sections replaced / removed: reaches deep validators."""
    tree = json.loads(json.dumps(DEFAULT_TREE))
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(DEFAULT_PATHS))
        node = tree
        for k in path[:-1]:
            node = node.get(k) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue
        if draw(st.booleans()):
            node[path[-1]] = draw(config_values)
        else:
            node.pop(path[-1], None)
    return tree


@FUZZ_NO_SHRINK
@given(tree=mutated_defaults(), items=st.lists(overrides, max_size=2))
def test_validate_mutated_defaults_returns_config_or_config_error(tree: dict[str, Any], items: list[str]) -> None:
    try:
        cfg = validate(apply_overrides(tree, items))
    except ConfigError as e:
        assert str(e)
        return
    assert isinstance(cfg, Config)
