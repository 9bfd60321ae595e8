"""Config tree: round trip, extends/overrides, and the error messages users see."""

from __future__ import annotations

import re

from pathlib import Path

import pytest

from guidedrl.app.cli import main
from guidedrl.core.config import Config, RECIPES_DIR, dump_config, load_config, load_yaml, validate
from guidedrl.core.errors import ConfigError


def test_defaults_round_trip(tmp_path: Path) -> None:
    cfg = Config()
    p = tmp_path / "c.yaml"
    p.write_text(dump_config(cfg))
    assert load_config(str(p)) == cfg


@pytest.mark.parametrize("name", sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
def test_every_recipe_validates_and_round_trips(name: str, tmp_path: Path) -> None:
    cfg = load_config(name)
    assert cfg.name == name
    assert load_yaml(RECIPES_DIR / f"{name}.yaml").get("description"), "each recipe has a one-line description"
    p = tmp_path / "r.yaml"
    p.write_text(dump_config(cfg))
    assert load_config(str(p)) == cfg


def test_extends_and_overrides(tmp_path: Path) -> None:
    child = tmp_path / "child.yaml"
    child.write_text("extends: dapo\nname: mine\ntrain: {lr: 3.0e-6}\n")
    cfg = load_config(str(child), ["algo.loss.eps_high=0.3", "rollout.stop=[\"\\n\\n\"]", "train.steps=5"])
    assert cfg.name == "mine"
    assert cfg.algo.loss.name == "ppo_clip" and cfg.algo.loss.eps_high == 0.3  # from dapo, overridden
    assert cfg.algo.dynamic_sampling.enabled  # inherited from dapo
    assert cfg.train.lr == 3e-6 and cfg.train.steps == 5
    assert cfg.rollout.stop == ["\n\n"]


def test_switching_a_union_member_replaces_it() -> None:
    cfg = load_config("grpo", ["algo.loss={name: nft}"])
    assert cfg.algo.loss.name == "nft" and cfg.algo.loss.neg_weight == 1.0


def test_unknown_key_names_full_path_and_suggests() -> None:
    with pytest.raises(ConfigError) as e:
        load_config("grpo", ["train.lrr=1e-5"])
    assert "`train.lrr`" in str(e.value) and "train.lr" in str(e.value)


def test_unknown_nested_key_in_yaml(tmp_path: Path) -> None:
    p = tmp_path / "bad.yaml"
    p.write_text("rollout:\n  group_sise: 4\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(p))
    msg = str(e.value)
    assert str(p) in msg and "`rollout.group_sise`" in msg and "rollout.group_size" in msg


def test_wrong_type_names_key_and_type() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, ["rollout.group_size=many"])
    assert "`rollout.group_size`" in str(e.value) and "integer" in str(e.value)


def test_bad_union_name() -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, ["algo.advantage.name=grpoo"])
    assert "algo.advantage" in str(e.value)


def test_invalid_combinations_are_unrepresentable() -> None:
    with pytest.raises(ConfigError, match="needs `algo.value`"):
        validate({"algo": {"advantage": {"name": "gae"}}})
    with pytest.raises(ConfigError, match="teacher"):
        validate({"guidance": {"injection": "prompt_hint", "source": "teacher"}})
    with pytest.raises(ConfigError, match="divisible"):
        validate({"train": {"prompts_per_step": 3}, "rollout": {"group_size": 3}, "algo": {"minibatches": 2}})


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "broken.yaml"
    p.write_text("train:\n  lr: [1e-5\n")
    with pytest.raises(ConfigError) as e:
        load_config(str(p))
    assert f"{p}:" in str(e.value)


def test_unknown_recipe_suggests() -> None:
    with pytest.raises(ConfigError, match="dapo"):
        load_config("dap")


def test_cli_exit_code_2_and_no_traceback(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    rc = main(["train", "grpo", "--set", "train.stepz=3", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2
    assert "train.stepz" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists(), "a bad config must not leave a run folder behind"


def test_cli_help_for_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    for cmd in ["train", "recipes", "eval", "compare", "report", "demo", "base"]:
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert f"usage: guidedrl {cmd}" in out and len(out) > 120


def test_cli_recipes_lists_descriptions(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name in ["grpo", "dapo", "guide_grpo", "luffy", "pope"]:
        line = next(ln for ln in out.splitlines() if ln.startswith(name + " "))
        assert len(line.split(None, 1)[1]) > 10


# ----------------------------------------------------------------------------- guidance as a union


INJECTION_FIELDS = {
    # injection: (a field it uses, a field of another injection it must refuse)
    "prompt_hint": ("template", "count"),
    "response_prefix": ("prefix", "context"),
    "replace": ("count", "members"),
    "refine": ("bonus", "prefix"),
    "guide_completes": ("switch", "members"),
    "auxiliary": ("trigger", "offpolicy"),
    "none": ("sft_stage", "members"),
}


@pytest.mark.parametrize("injection", sorted(INJECTION_FIELDS))
def test_each_injection_rejects_fields_it_does_not_use(injection: str) -> None:
    used, unused = INJECTION_FIELDS[injection]
    base = {"injection": injection}
    if injection in ("guide_completes",):
        base["teachers"] = [{"path": "tiny"}]
    if injection == "none":
        base["sft_stage"] = {}
    extra = {"auxiliary": {"algo": {"calibration": {}}}}.get(injection, {})
    model = type(validate({"guidance": base, **extra}).guidance)
    assert used in model.model_fields and unused not in model.model_fields
    with pytest.raises(ConfigError, match=f"unknown key `guidance.{unused}`"):
        validate({"guidance": {**base, unused: {}}, **extra})


@pytest.mark.parametrize("tree, message", [
    # a critique is feedback on an attempt: it is never shown as a prompt hint
    ({"guidance": {"injection": "prompt_hint", "source": "critique"}}, "guidance.source"),
    # the calibration term reads the expert the auxiliary injection attaches, and only that
    ({"guidance": {"injection": "auxiliary"}}, "algo.calibration and guidance.injection `auxiliary`"),
    ({"algo": {"calibration": {}}}, "algo.calibration and guidance.injection `auxiliary`"),
    # only ppo_clip weights off-policy tokens; reinforce would train them as on-policy
    ({"guidance": {"injection": "prompt_hint", "offpolicy": True}, "algo": {"loss": {"name": "reinforce"}}},
     "does not weight off-policy tokens"),
    # `members: all` meant G for one injection and 1 for another: replace has `count` instead
    ({"guidance": {"injection": "replace", "members": "all"}}, "unknown key `guidance.members`"),
    # behaviour `one` is an off-policy weighting choice
    ({"guidance": {"injection": "prompt_hint", "behaviour": "one"}}, "set offpolicy true"),
    # nothing produces SFT rows without the replace injection
    ({"algo": {"ce_coef": 0.1}}, "algo.ce_coef"),
    # teachers are read only by the teacher source
    ({"guidance": {"injection": "prompt_hint", "teachers": [{"path": "tiny"}]}}, "teachers is set but source"),
    ({"guidance": {"injection": "none"}}, "sft_stage"),
])
def test_silent_combinations_fail_at_load_time(tree: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(tree)


@pytest.mark.parametrize(
    "override,key",
    [
        ("train.grad_clip=-1", "train.grad_clip"),  # clip_grad_norm_ with a negative max norm reverses the gradient
        ("train.grad_clip=0", "train.grad_clip"),
        ("train.lr=-1", "train.lr"),
        ("train.lr=0", "train.lr"),
        ("train.lr=nan", "train.lr"),
        ("train.lr=.inf", "train.lr"),
        ("train.betas=[2,2]", "train.betas[0]"),
        ("train.betas=[0.9,1.0]", "train.betas[1]"),
        ("train.betas=[-0.1,0.9]", "train.betas[0]"),
        ("train.weight_decay=-1", "train.weight_decay"),
        ("train.weight_decay=nan", "train.weight_decay"),
        ("train.warmup_steps=-1", "train.warmup_steps"),
        ("train.max_nonfinite=0", "train.max_nonfinite"),
        ("run.save_every=-1", "run.save_every"),
        ("run.keep_last=0", "run.keep_last"),  # trained the whole run, then crashed at the final save
        ("run.log_completions=-1", "run.log_completions"),
        ("eval.samples=0", "eval.samples"),
        ("eval.every=-1", "eval.every"),
        ("eval.limit=0", "eval.limit"),
        ("eval.temperature=0", "eval.temperature"),
        ("model.max_prompt_tokens=0", "model.max_prompt_tokens"),
        ("model.lora={r: 0}", "model.lora.r"),
        ("model.lora={dropout: 1.0}", "model.lora.dropout"),
        ("model.tiny.hidden_size=0", "model.tiny.hidden_size"),
        ("data.train.limit=-1", "data.train.limit"),
        ("reward.overlong={cache_len: 0}", "reward.overlong.cache_len"),
        ("reward.terms=[{name: exact, weight: .nan}]", "reward.terms[0].weight"),
    ],
)
def test_bad_numbers_fail_at_load_naming_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config("grpo", [override])
    assert f"`{key}`" in str(e.value), str(e.value)


def test_edge_values_that_are_fine() -> None:
    cfg = load_config("grpo", ["train.grad_clip=null", "train.betas=[0.0,0.0]", "train.weight_decay=0", "train.warmup_steps=0",
                               "run.save_every=0", "run.keep_last=1", "eval.samples=1", "eval.limit=null"])
    assert cfg.train.grad_clip is None and cfg.train.betas == (0.0, 0.0) and cfg.run.keep_last == 1
