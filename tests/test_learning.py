"""A seeded learning test: on a trivially learnable reward, GRPO raises mean reward clearly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from guidedrl.core.config import load_config
from guidedrl.trainer.loop import run


@pytest.mark.slow
def test_grpo_learns_to_write_sevens(tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say something {i}."}) + "\n" for i in range(8)))
    cfg = load_config("grpo", [
        "model.path=tiny", f"data.train.path={data}", "data.eval=null", "eval.enabled=false",
        "reward.terms=[{name: 'helpers_rewards:sevens'}]", "rollout.max_new_tokens=8", "rollout.group_size=8",
        "train.prompts_per_step=4", "train.micro_batch_size=32", "train.lr=6e-3", "train.steps=30",
        "run.progress=false", "train.seed=0",
    ])
    out = run(cfg, tmp_path / "run")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    r = [x["reward/mean"] for x in rows if x["step"] >= 0]
    first, last = sum(r[:3]) / 3, sum(r[-3:]) / 3
    # a random 380-token vocabulary rarely writes "7": the start is near 0; learning must lift the
    # share of 7s in the text by at least 0.3 absolute (observed: see the assertion message)
    assert last >= first + 0.3, f"reward first {first:.3f} -> last {last:.3f}: {[round(x, 2) for x in r]}"
    assert (out / "DONE").exists() and (out / "config.yaml").exists()
