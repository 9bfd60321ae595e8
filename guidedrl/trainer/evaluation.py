"""Evaluation inside a training run (before, every N steps, after), unguided."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from guidedrl.eval.evaluate import evaluate
from guidedrl.eval.results import eval_to_metrics
from guidedrl.rollout.hf import HFEngine

if TYPE_CHECKING:
    from guidedrl.trainer.build import Parts


def run_eval(parts: "Parts", out: Path | None) -> dict[str, float]:
    """pass@k per level on the eval set; writes the EvalResult JSON to `out` when given."""
    e = parts.cfg.eval
    engine = HFEngine(parts.model, parts.tokenizer, parts.cfg.rollout.model_copy(update={"temperature": e.temperature}),
                      cast_weights=parts.engine.cast_weights)
    ks = sorted({1, e.samples})
    result = evaluate(engine, parts.eval_samples, parts.reward_timer.fn, n=e.samples, ks=ks,
                      render=lambda s: parts.render(s, None), seed=parts.cfg.train.seed + 7)
    if out is not None:
        out.write_text(json.dumps(result.to_json(), indent=1) + "\n")
    return eval_to_metrics(result)
