"""Every recipe runs 2 steps end to end on the tiny model: loss finite, parameters changed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from guidedrl.core.config import RECIPES_DIR, load_config
from guidedrl.trainer.build import build
from guidedrl.trainer.loop import seed_everything
from guidedrl.trainer.step import StepState, train_step

RECIPES = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
TEACHER_OVERRIDES = {
    "ampo": ["guidance.teachers=[{path: tiny}, {path: tiny, temperature: 0.7}]"],
    "rlgf_ppo_pp": ["guidance.teachers=[{path: tiny}]"],
    "rlgf_aggrevated": ["guidance.teachers=[{path: tiny}]"],
    "rlgf_d2lols": ["guidance.teachers=[{path: tiny}]", "guidance.switch.step=1", "guidance.switch.to.teachers=[{path: tiny}]"],
}


@pytest.fixture(scope="module")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rows = [
        {"id": f"q{i}", "prompt": f"What is {i} plus {i % 3}?", "answer": str(i + i % 3),
         "reference": f"{i} + {i % 3} = {i + i % 3}. The answer is {i + i % 3}.",
         "hints": [f"Add {i % 3} to {i}.", f"The sum is {i + i % 3}."]}
        for i in range(16)
    ]
    p = tmp_path_factory.mktemp("data") / "train.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def tiny_overrides(data: Path) -> list[str]:
    # reward: does the text contain the letter "e"? Random text gives a mix of 0 and 1 in a group.
    return [
        "model.path=tiny", f"data.train.path={data}", "data.eval=null", "eval.enabled=false",
        "reward.terms=[{name: regex_format, args: {pattern: e}}]", "rollout.max_new_tokens=12",
        "rollout.group_size=4", "train.prompts_per_step=4", "train.micro_batch_size=8", "train.lr=1e-3",
        "run.progress=false", "train.steps=2", "reward.overlong=null",
    ]


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_two_steps(name: str, data_file: Path) -> None:
    cfg = load_config(name, tiny_overrides(data_file) + TEACHER_OVERRIDES.get(name, []))
    seed_everything(0)
    parts = build(cfg)
    before = {n: p.detach().clone() for n, p in parts.policy.model.named_parameters() if p.requires_grad}
    st = StepState()
    if cfg.guidance is not None and cfg.guidance.sft_stage is not None:
        from guidedrl.trainer.sft import run_sft_stage

        assert run_sft_stage(parts, cfg.guidance.sft_stage)["sft/traces"] > 0
    for _ in range(2):
        metrics, flat = train_step(parts, st)
        st.step += 1
        assert flat and all(math.isfinite(metrics[k]) for k in metrics if k.startswith("loss/"))
        assert "loss/policy" in metrics
    changed = [n for n, p in parts.policy.model.named_parameters() if p.requires_grad and not torch.equal(before[n], p)]
    assert len(changed) >= 0.9 * len(before), f"only {len(changed)}/{len(before)} parameters changed"
