"""Evaluation inside a training run (before, every N steps, after), unguided."""

from __future__ import annotations

import json
from pathlib import Path

from guidedrl.eval.evaluate import evaluate
from guidedrl.eval.results import eval_to_metrics
from guidedrl.rollout.hf import HFEngine
from guidedrl.trainer.build import Pieces


def run_eval(p: Pieces, out: Path | None) -> dict[str, float]:
    """pass@k per level on the eval set (`eval/...` metrics); writes the EvalResult JSON to `out` when given."""
    e, r = p.cfg.eval, p.policy.renderer
    engine = HFEngine(p.policy.model, r.tokenizer, p.cfg.rollout.model_copy(update={"temperature": e.temperature}),
                      cast_weights=p.engine.cast_weights)
    result = evaluate(engine, p.eval_samples, p.services.reward.fn, n=e.samples, ks=sorted({1, e.samples}),
                      render=r.render, seed=p.cfg.train.seed + 7)
    if out is not None:
        out.write_text(json.dumps(result.to_json(), indent=1) + "\n")
    return eval_to_metrics(result)
