"""The self-built arith base model: cache, determinism, atomic build, CLI, and the builtin: model path.

Builds here use a shrunken recipe (a few SFT steps of a 2-layer model) so each takes seconds; the
real recipe's properties are measured by `guidedrl base build` and recorded in docs/results.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from guidedrl.nn import base
from guidedrl.nn.base import base_info, base_path, build_base, ensure_base, make_tokenizer
from guidedrl.core.errors import ConfigError

SMALL = {
    "hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64,
    "steps": 4, "batch_size": 8, "warmup": 1, "problems_per_level": 40, "measure_problems": 0,
}


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("GUIDEDRL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_tokenizer_round_trip_is_character_level() -> None:
    tok = make_tokenizer()
    text = "k=7. q=x-3. p=k+5. x=p*2. q=?\np=7+5=12 #### 12"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text)  # one token per character
    assert tok.decode(ids) == text
    assert tok.padding_side == "left" and tok.eos_token_id == 2 and tok.pad_token_id == 0


def test_build_is_cached_deterministic_and_loadable(cache: Path) -> None:
    from transformers import AutoModelForCausalLM

    path = build_base(progress=False, overrides=SMALL)
    assert path == base_path(overrides=SMALL) and path.parent == cache / "base"
    info = json.loads((path / base.INFO_FILE).read_text())
    assert info["recipe"]["steps"] == 4 and info["properties"] is None
    stamp = (path / base.INFO_FILE).stat().st_mtime_ns
    assert ensure_base(progress=False, overrides=SMALL) == path  # cached: not rebuilt
    assert (path / base.INFO_FILE).stat().st_mtime_ns == stamp
    first = AutoModelForCausalLM.from_pretrained(str(path)).state_dict()
    build_base(progress=False, overrides=SMALL, force=True)  # same seed -> same weights
    second = AutoModelForCausalLM.from_pretrained(str(path)).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first)
    other = build_base(progress=False, overrides={**SMALL, "seed": 1})
    assert other != path  # the recipe hash names the folder
    third = AutoModelForCausalLM.from_pretrained(str(other)).state_dict()
    assert not all(torch.equal(first[k], third[k]) for k in first)


def test_failed_build_leaves_nothing_that_looks_built(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*a, **k):
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(base, "measure_properties", boom)
    with pytest.raises(RuntimeError, match="mid-build"):
        build_base(progress=False, overrides={**SMALL, "measure_problems": 2})
    assert not base_path(overrides={**SMALL, "measure_problems": 2}).exists()
    assert not [p for p in (cache / "base").iterdir()]  # the hidden temp folder is gone too


def test_unknown_recipe_key_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="hiden_size"):
        base_path(overrides={"hiden_size": 3})
    with pytest.raises(ConfigError, match="does not exist"):
        base_path("nope")


def test_info_before_build_reports_size_without_building(cache: Path) -> None:
    info = base_info(overrides=SMALL)
    assert info["built"] is False and info["params"] > 0
    assert not Path(info["path"]).exists()


def test_builtin_model_path_loads_the_cached_base(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import dataclasses

    from guidedrl.core.config import ModelConfig
    from guidedrl.nn.models import load_policy

    monkeypatch.setattr(base, "BASE_RECIPE", dataclasses.replace(base.BASE_RECIPE, **SMALL))
    model, tok = load_policy(ModelConfig(path="builtin:arith"))
    assert model.config.hidden_size == 32 and model.config.vocab_size == len(tok)
    assert base_path().exists()


def test_measure_properties_reports_every_level(cache: Path) -> None:
    from guidedrl.data.tasks.arith import LEVELS

    path = build_base(progress=False, overrides=SMALL)
    props = base.measure_properties(path, n_per_level=2, samples=2)
    assert set(props["levels"]) == set(range(1, LEVELS + 1))
    for row in [*props["levels"].values(), props["half_prefix"], props["hint"]]:
        assert 0.0 <= row["pass@1"] <= row["pass@2"] <= 1.0


def test_teacher_variant_is_trained_on_every_level(cache: Path) -> None:
    from guidedrl.data.tasks.arith import LEVELS

    path = build_base("arith-teacher", progress=False, overrides=SMALL)
    info = base_info("arith-teacher", overrides=SMALL)
    assert info["built"] and path.name.startswith("arith-teacher-") and path != base_path(overrides=SMALL)
    assert info["recipe"]["sft_levels"] == list(range(1, LEVELS + 1)) and info["recipe"]["steps"] == 4
    assert base_info(overrides=SMALL)["recipe"]["sft_levels"] == [1, 2, 3, 4]


def test_length_sorted_micro_batches_keep_the_whole_batch_objective() -> None:
    # 3 examples with 2, 3 and 1 response tokens: the batch loss is the mean over all 6 tokens, so
    # micro-batch losses normalized by the batch's 6 tokens must add up to the one-batch loss
    assert base._split(list(range(7)), 3) == [[0, 1], [2, 3, 4], [5, 6]]
    assert base._split([1, 2], 4) == [[1], [2]], "never an empty micro-batch"
    tok = make_tokenizer()
    recipe = base._recipe(SMALL)
    model = base.make_model(recipe, len(tok))
    examples = [([5, 6, 7], [8, 9]), ([5], [8, 9, 10]), ([5, 6], [2])]
    whole = model(**dict(zip(("input_ids", "attention_mask", "labels"), base.collate_sft(examples, 0)))).loss
    parts = 0.0
    for part in base._split(sorted(examples, key=lambda e: len(e[0]) + len(e[1])), 2):
        ids, attn, labels = base.collate_sft(part, 0)
        parts += model(input_ids=ids, attention_mask=attn, labels=labels, num_items_in_batch=6).loss
    assert torch.allclose(whole, parts, atol=1e-6)
