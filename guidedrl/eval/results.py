"""Evaluation results: per-problem counts, per-level and overall @k metrics, saved as JSON and
Markdown (`EvalResult`)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from guidedrl.algo.metrics import majority_at_k, mean_at_k, pass_at_k
from guidedrl.core.tables import md_table
from guidedrl.core.types import CORRECT

if TYPE_CHECKING:
    from rich.table import Table

METRICS = ("pass", "mean", "majority")
"""Metric families; keys are `<family>@<k>` (e.g. `pass@8`) plus `score` (mean raw reward)."""


@dataclass
class ProblemResult:
    """One problem's samples: how many, how many correct, and the mean raw reward."""

    id: str
    level: int | None
    n: int
    correct: int
    score: float
    metrics: dict[str, float] = field(default_factory=dict)
    """This problem's `pass@k`, `mean@k`, `majority@k`."""


@dataclass
class GroupMetrics:
    """Metrics averaged over the problems of a group (all, or one level)."""

    count: int
    metrics: dict[str, float]
    """`pass@k`, `mean@k`, `majority@k` for each k, and `score` (mean raw reward)."""


@dataclass
class EvalResult:
    """The outcome of `evaluate`: overall and per-level metrics, per-problem counts, and metadata."""

    n: int
    ks: list[int]
    overall: GroupMetrics
    levels: dict[int, GroupMetrics]
    problems: list[ProblemResult]
    meta: dict[str, Any] = field(default_factory=dict)
    """How it was produced: model, guidance, temperature, seed, generated tokens, seconds, ..."""

    def columns(self) -> list[str]:
        return [f"{m}@{k}" for m in METRICS for k in self.ks] + ["score"]

    def rows(self) -> list[tuple[str, GroupMetrics]]:
        """(label, metrics): `all` first, then each level in order."""
        return [("all", self.overall)] + [(f"L{lv}", g) for lv, g in sorted(self.levels.items())]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (levels as string keys); `from_json` inverts it."""
        return {
            "n": self.n, "ks": list(self.ks), "overall": asdict(self.overall),
            "levels": {str(lv): asdict(g) for lv, g in sorted(self.levels.items())},
            "problems": [asdict(p) for p in self.problems], "meta": self.meta,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "EvalResult":
        return cls(
            n=int(d["n"]), ks=[int(k) for k in d["ks"]], overall=GroupMetrics(**d["overall"]),
            levels={int(lv): GroupMetrics(**g) for lv, g in d["levels"].items()},
            problems=[ProblemResult(**p) for p in d["problems"]], meta=dict(d.get("meta", {})),
        )

    def table(self, title: str | None = None) -> "Table":
        """A rich table for the terminal: one row per metric, one column for all problems and one per
        level (narrow enough for 80 columns with many ks)."""
        from rich.table import Table

        groups = self.rows()
        t = Table(title=title or self.title())
        t.add_column("metric")
        for label, _ in groups:
            t.add_column(label, justify="right")
        t.add_row("problems", *(str(g.count) for _, g in groups))
        for c in self.columns():
            t.add_row(c, *(f"{g.metrics[c]:.3f}" for _, g in groups))
        return t

    def title(self) -> str:
        m = self.meta
        bits = [f"n={self.n}"] + [f"{k}={m[k]}" for k in ("guidance", "temperature", "seed") if k in m]
        return f"eval of {m.get('model', 'model')} ({', '.join(bits)})"

    def markdown(self) -> str:
        """A Markdown section: title, what was run, and the metrics table."""
        rows = [[label, str(g.count), *(f"{g.metrics[c]:.3f}" for c in self.columns())] for label, g in self.rows()]
        meta = ", ".join(f"{k}: {v}" for k, v in self.meta.items())
        note = (f"pass@k is the unbiased estimator of Chen et al. 2021 from n={self.n} samples per problem; "
                f"correct = reward >= {self.meta.get('threshold', CORRECT)}.")
        return f"# {self.title()}\n\n{meta}\n\n{md_table(['level', 'problems', *self.columns()], rows)}\n{note}\n"

    def save(self, out: Path) -> tuple[Path, Path]:
        """Write out/eval.json and out/eval.md; returns both paths."""
        out.mkdir(parents=True, exist_ok=True)
        js, md = out / "eval.json", out / "eval.md"
        js.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        md.write_text(self.markdown())
        return js, md


def problem_metrics(answers: list[str], correct: list[bool], ks: list[int], seed: int = 0) -> dict[str, float]:
    """pass@k, mean@k and majority@k of one problem's n samples, for each k."""
    n, c = len(correct), int(sum(correct))
    out: dict[str, float] = {}
    for k in ks:
        out[f"pass@{k}"] = pass_at_k(n, c, k)
        out[f"mean@{k}"] = mean_at_k(n, c, k)
        out[f"majority@{k}"] = majority_at_k(answers, [float(x) for x in correct], k, seed=seed)
    return out


def summarize(problems: list[ProblemResult]) -> tuple[GroupMetrics, dict[int, GroupMetrics]]:
    """Average per-problem metrics over all problems and over each level."""

    def mean(group: list[ProblemResult]) -> GroupMetrics:
        keys = list(group[0].metrics) + ["score"]
        vals = {k: float(np.mean([p.metrics[k] if k != "score" else p.score for p in group])) for k in keys}
        return GroupMetrics(count=len(group), metrics=vals)

    levels = sorted({p.level for p in problems if p.level is not None})
    return mean(problems), {lv: mean([p for p in problems if p.level == lv]) for lv in levels}


def eval_to_metrics(result: EvalResult, prefix: str = "eval/") -> dict[str, float]:
    """Flat metrics for metrics.jsonl: `eval/pass@1`, `eval/L3/pass@8`, `eval/score`, ..."""
    out = {f"{prefix}{k}": v for k, v in result.overall.metrics.items()}
    for lv, g in sorted(result.levels.items()):
        out |= {f"{prefix}L{lv}/{k}": v for k, v in g.metrics.items()}
    return out
