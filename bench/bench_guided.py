"""Guided steps against GRPO's at equal generated tokens, and engine calls per step.

A guided recipe generates more (re-sampled groups, escalation rounds, retries), so its step time is
compared per generated token: seconds per 1,000 generated tokens, and that as a ratio to GRPO's in
the same run. Engine calls per step show the batching: a guided step makes one engine call per
round (the plain round plus one per escalation round), whatever the number of groups.

    .venv/bin/python bench/bench_guided.py                        # grpo vs guide_grpo, ghpo, pope on the embedded task
    .venv/bin/python bench/bench_guided.py --recipes grpo ghpo --steps 6 --rounds 3 --json out.json

Each recipe runs in this process, one after the other, `--rounds` times (alternating, so a change
of load hits every recipe); the first step of each recipe's first round is a warm-up and not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from guidedrl.core.config import load_config  # noqa: E402
from guidedrl.trainer.build import build  # noqa: E402
from guidedrl.trainer.loop import seed_everything  # noqa: E402
from guidedrl.trainer.step import StepState, train_step  # noqa: E402

SETTINGS = [
    "data.train.task_args.levels=[5,6,7]",  # hard levels: guidance triggers on many groups
    "data.train.task_args.size=512", "train.prompts_per_step=16", "eval.enabled=false", "data.eval=null",
    "run.progress=false", "train.lr=1e-5",
]


class Counting:
    """Wraps an engine and counts its generate calls."""

    def __init__(self, engine: Any) -> None:
        self.engine, self.calls = engine, 0

    def generate(self, *a: Any, **k: Any) -> Any:
        self.calls += 1
        return self.engine.generate(*a, **k)


def run(recipe: str, steps: int, extra: list[str], state: dict[str, Any]) -> list[dict[str, float]]:
    """`steps` steps of `recipe` (its pieces built once and kept across rounds)."""
    if recipe not in state:
        seed_everything(0)
        p = build(load_config(recipe, SETTINGS + extra))
        counter = Counting(p.services.engine)
        p.services.engine = counter
        state[recipe] = (p, StepState(), counter)
        train_step(p, state[recipe][1])  # warm-up, not timed
        state[recipe][1].step += 1
    p, st, counter = state[recipe]
    out = []
    for _ in range(steps):
        counter.calls = 0
        t0 = time.perf_counter()
        m, flat = train_step(p, st)
        st.step += 1
        out.append({"seconds": time.perf_counter() - t0, "tokens": m["perf/tokens_generated"],
                    "engine_calls": float(counter.calls), "trigger_rate": m.get("guide/trigger_rate", 0.0)})
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipes", nargs="+", default=["grpo", "guide_grpo", "ghpo", "pope"])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], help="an extra override for every recipe")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    rows: dict[str, list[dict[str, float]]] = {r: [] for r in a.recipes}
    state: dict[str, Any] = {}
    for _ in range(a.rounds):
        for r in a.recipes:
            rows[r] += run(r, a.steps, a.set, state)
    summary = {}
    for r, xs in rows.items():
        per_k = [x["seconds"] / x["tokens"] * 1000 for x in xs]
        summary[r] = {"step_s": statistics.median(x["seconds"] for x in xs),
                      "tokens_per_step": statistics.median(x["tokens"] for x in xs),
                      "s_per_1k_tokens": statistics.median(per_k),
                      "engine_calls_per_step": statistics.median(x["engine_calls"] for x in xs),
                      "max_engine_calls": max(x["engine_calls"] for x in xs),
                      "trigger_rate": statistics.mean(x["trigger_rate"] for x in xs)}
    base = summary[a.recipes[0]]["s_per_1k_tokens"]
    print(f"{'recipe':12s} {'step s':>7s} {'tokens':>7s} {'s/1k tok':>9s} {'ratio':>6s} {'calls':>6s} {'max':>4s} {'trigger':>7s}")
    for r, s in summary.items():
        s["ratio_vs_first"] = s["s_per_1k_tokens"] / base
        print(f"{r:12s} {s['step_s']:7.2f} {s['tokens_per_step']:7.0f} {s['s_per_1k_tokens']:9.3f} "
              f"{s['ratio_vs_first']:6.2f} {s['engine_calls_per_step']:6.1f} {s['max_engine_calls']:4.0f} {s['trigger_rate']:7.2f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"settings": SETTINGS + a.set, "args": vars(a), "summary": summary, "steps": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
