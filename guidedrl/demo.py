"""`guidedrl demo`: the embedded default, offline on a CPU.

Builds (or loads the cached) tiny arith base model, then trains plain GRPO and one guided recipe
with the same budget on mixed-difficulty problems, evaluates both before and after (unguided), and
writes a comparison report (tables, plots, HTML) into the output folder.
"""

from __future__ import annotations

import time
from pathlib import Path

from guidedrl.runlog import console

GUIDED = "luffy"
"""The guided recipe shown beside GRPO (see docs/results.md for how the guided recipes compare)."""

# The budget and sizes of the demo; `--quick` shrinks them to a ~2 minute version.
FULL = {"steps": 60, "eval_limit": 96, "eval_samples": 4}
QUICK = {"steps": 8, "eval_limit": 32, "eval_samples": 2}


def demo_overrides(quick: bool) -> list[str]:
    """Overrides applied to both recipes (same task, base model and budget)."""
    size = QUICK if quick else FULL
    return [
        f"eval.limit={size['eval_limit']}",
        f"eval.samples={size['eval_samples']}",
        "run.save_every=0",
    ]


def demo(quick: bool = False, out: Path = Path("runs/demo"), steps: int | None = None) -> int:
    """Run the demo into `out` (finished runs there are reused); returns the exit code."""
    from guidedrl.base import ensure_base
    from guidedrl.compare import compare

    t0 = time.perf_counter()
    console.rule("guidedrl demo: RL on the embedded arith task")
    base = ensure_base("arith", progress=True)
    console.print(f"base model: {base}")
    size = QUICK if quick else FULL
    n = steps if steps is not None else size["steps"]
    out = out / ("quick" if quick else "full")
    compare(["grpo", GUIDED], overrides=demo_overrides(quick), steps=n, seeds=[0], out=out)
    console.print(
        f"\n[bold]demo finished in {time.perf_counter() - t0:.0f} s[/]. Report: {out / 'report.html'}\n"
        "On the hard levels plain GRPO rarely sees a correct answer, so it has no signal there; the guided\n"
        f"recipe ({GUIDED}) puts a worked solution into each group and learns from it. Compare the per-level\n"
        "pass@1 columns above (evaluated without guidance)."
    )
    return 0
