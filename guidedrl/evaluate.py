"""Evaluation: unbiased pass@k, mean@k and majority@k, overall and per difficulty level.

Every `@k` number is the expected value of a k-sample evaluation, estimated from `n >= k`
samples per problem and averaged over problems:

- pass@k: the chance that at least one of k samples is correct. The unbiased estimator of Chen et
  al. 2021 ("Evaluating Large Language Models Trained on Code", the Codex paper, eq. 1):
  1 - C(n-c, k) / C(n, k), computed in their numerically stable product form.
- mean@k: the expected share of correct samples among k. Its expectation does not depend on k,
  so the unbiased, lowest-variance estimate is c / n for every k (reported per k for symmetry).
- majority@k: the chance that the most common answer among k samples is correct (self-consistency,
  Wang et al. 2022), ties broken uniformly at random. Estimated by averaging over every k-subset of
  the n samples when there are at most `max_subsets` of them, else over that many uniform random
  k-subsets (seeded; still unbiased, no longer exact).

A completion is *correct* when its reward is >= `threshold` (default 1 - 1e-6, so partial-credit
rewards count only at full marks). A reward of None (not applicable) counts as 0 and incorrect.
Answers for majority voting are `info["answer"]` from the reward when present, else the stripped
completion text. Problems without a level count only in the overall numbers.

Departures from the papers: none in the estimators; majority@k over more than `max_subsets`
subsets is a Monte Carlo estimate.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from guidedrl.errors import ConfigError, DataError, ModelError, RewardError
from guidedrl.rollout.base import Engine, GenRequest
from guidedrl.types import Sample

if TYPE_CHECKING:
    import argparse

    from rich.table import Table

    from guidedrl.config import Config

CORRECT_THRESHOLD = 1.0 - 1e-6
"""A completion with reward >= this counts as correct."""
METRICS = ("pass", "mean", "majority")
"""Metric families; keys are `<family>@<k>` (e.g. `pass@8`) plus `score` (mean raw reward)."""

RewardCall = Callable[[list[Sample], list[str]], Any]


# ----------------------------------------------------------------------------- estimators


def _check_nk(n: int, k: int) -> None:
    if n < 1:
        raise ValueError(f"n must be >= 1 (samples per problem), got {n}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}: pass@k needs at least k samples per problem")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct (Chen et al. 2021, eq. 1).

    1 - C(n-c, k)/C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k/i), which avoids huge binomials.

    >>> pass_at_k(4, 1, 2)
    0.5
    >>> pass_at_k(5, 0, 3), pass_at_k(5, 5, 3), pass_at_k(3, 1, 3)
    (0.0, 1.0, 1.0)
    """
    _check_nk(n, k)
    if not 0 <= c <= n:
        raise ValueError(f"c must be in [0, n={n}], got {c}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_at_k(n: int, c: int, k: int) -> float:
    """Expected share of correct samples among k draws: c/n for any k <= n (unbiased).

    >>> mean_at_k(4, 1, 2)
    0.25
    """
    _check_nk(n, k)
    if not 0 <= c <= n:
        raise ValueError(f"c must be in [0, n={n}], got {c}")
    return c / n


def majority_at_k(
    answers: Sequence[str], correct: Sequence[float], k: int, *, max_subsets: int = 2000, seed: int = 0
) -> float:
    """Chance that the plurality answer of k samples is correct, averaged over k-subsets.

    `correct[i]` is 1/0 (or a share) for sample i; an answer class is worth the mean correctness
    of its members, and a tie between classes is worth the mean of the tied classes (uniform tie
    break). Exact when C(n, k) <= max_subsets, else a seeded Monte Carlo average.

    >>> majority_at_k(["a", "a", "b"], [1, 1, 0], 2)  # {a,a}: 1, {a,b}: tie 0.5, {a,b}: 0.5
    0.6666666666666666
    """
    n = len(answers)
    _check_nk(n, k)
    if len(correct) != n:
        raise ValueError(f"{n} answers but {len(correct)} correctness values")
    classes: dict[str, int] = {}
    ids = np.array([classes.setdefault(a, len(classes)) for a in answers])  # (n,)
    size = np.bincount(ids, minlength=len(classes)).astype(float)  # (J,)
    worth = np.bincount(ids, weights=np.asarray(correct, dtype=float), minlength=len(classes)) / size  # (J,)
    if math.comb(n, k) <= max_subsets:
        subsets = np.array(list(itertools.combinations(range(n), k)))  # (S, k) every k-subset
    else:
        rng = np.random.default_rng(seed)
        subsets = np.argsort(rng.random((max_subsets, n)), axis=1)[:, :k]  # (S, k) uniform k-subsets
    votes = np.zeros((len(subsets), len(classes)))  # (S, J)
    np.add.at(votes, (np.arange(len(subsets))[:, None], ids[subsets]), 1.0)
    winners = votes == votes.max(axis=1, keepdims=True)  # (S, J) the tied leaders
    value = (winners * worth).sum(axis=1) / winners.sum(axis=1)  # (S,)
    return float(value.mean())


# ----------------------------------------------------------------------------- results


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
        from guidedrl.report import md_table

        rows = [[label, str(g.count), *(f"{g.metrics[c]:.3f}" for c in self.columns())] for label, g in self.rows()]
        meta = ", ".join(f"{k}: {v}" for k, v in self.meta.items())
        note = (f"pass@k is the unbiased estimator of Chen et al. 2021 from n={self.n} samples per problem; "
                f"correct = reward >= {self.meta.get('threshold', CORRECT_THRESHOLD)}.")
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


# ----------------------------------------------------------------------------- evaluate


def _unpack_rewards(out: Any, count: int) -> tuple[list[float], list[dict[str, Any]]]:
    """A reward's return value -> (scores with None as 0.0, infos)."""
    scores, infos = out if isinstance(out, tuple) else (out, [{} for _ in range(count)])
    if len(scores) != count or len(infos) != count:
        raise RewardError(f"the reward returned {len(scores)} scores / {len(infos)} infos for {count} completions")
    return [0.0 if s is None else float(s) for s in scores], list(infos)


def check_ks(ks: Sequence[int], n: int) -> list[int]:
    """Sorted unique ks, each in [1, n]; a ConfigError naming the problem otherwise."""
    if not ks:
        raise ConfigError("no k values given (e.g. --k 1,8)")
    bad = [k for k in ks if not 1 <= k <= n]
    if bad:
        raise ConfigError(f"k={bad} out of range: every k must be in [1, n={n}] (n = samples per problem)")
    return sorted(set(int(k) for k in ks))


def evaluate(
    engine: Engine,
    samples: list[Sample],
    reward_fn: RewardCall,
    *,
    n: int,
    ks: Sequence[int],
    render: Callable[[Sample], list[int]],
    prefix: Callable[[Sample], list[int]] | None = None,
    decode: Callable[[list[int]], str] | None = None,
    temperature: float = 1.0,
    seed: int = 0,
    max_new_tokens: int | None = None,
    threshold: float = CORRECT_THRESHOLD,
    meta: dict[str, Any] | None = None,
) -> EvalResult:
    """Sample n completions per problem, score them, and compute pass@k / mean@k / majority@k.

    Args:
        engine: the generation backend (e.g. `HFEngine`).
        samples: the problems; `Sample.level` groups the per-level numbers.
        reward_fn: `fn(samples, texts) -> scores` or `(scores, infos)`.
        render: Sample -> context token ids (the prompt, maybe with a test-time hint).
        prefix: Sample -> forced response prefix ids (test-time reference prefix); scored together
            with the generation, so `decode` (ids -> text) is then required.
        threshold: reward at or above which a completion counts as correct.
        meta: extra metadata stored in the result (model, guidance, ...).
    """
    ks = check_ks(ks, n)
    if not samples:
        raise DataError("the evaluation set is empty (check data.eval and eval.limit)")
    if prefix is not None and decode is None:
        raise ValueError("evaluate: a forced `prefix` needs `decode` to score prefix + generation")
    t0 = time.perf_counter()
    prefixes = [prefix(s) if prefix is not None else [] for s in samples]
    reqs = [GenRequest(context=render(s), n=n, prefix=p) for s, p in zip(samples, prefixes, strict=True)]
    outs = engine.generate(reqs, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    for s, gens in zip(samples, outs, strict=True):
        if len(gens) != n:
            raise ValueError(f"engine returned {len(gens)} generations for sample {s.id}, expected {n}")
    flat_samples = [s for s, gens in zip(samples, outs, strict=True) for _ in gens]
    texts = [decode(p + g.ids) if p and decode else g.text
             for p, gens in zip(prefixes, outs, strict=True) for g in gens]
    scores, infos = _unpack_rewards(reward_fn(flat_samples, texts), len(texts))
    problems = []
    for i, s in enumerate(samples):
        sl = slice(i * n, (i + 1) * n)
        correct = [x >= threshold for x in scores[sl]]
        answers = [str(info["answer"]) if info.get("answer") is not None else text.strip()
                   for info, text in zip(infos[sl], texts[sl], strict=True)]
        problems.append(ProblemResult(id=s.id, level=s.level, n=n, correct=sum(correct),
                                      score=float(np.mean(scores[sl])),
                                      metrics=problem_metrics(answers, correct, ks, seed=seed)))
    overall, levels = summarize(problems)
    info = {"temperature": temperature, "seed": seed, "max_new_tokens": max_new_tokens, "threshold": threshold,
            "tokens": sum(len(g.ids) for gens in outs for g in gens), "seconds": round(time.perf_counter() - t0, 3),
            "guided_problems": sum(1 for p in prefixes if p)}
    return EvalResult(n=n, ks=ks, overall=overall, levels=levels, problems=problems, meta=info | (meta or {}))


# ----------------------------------------------------------------------------- test-time guidance


def parse_guidance(spec: str | None) -> tuple[str, float]:
    """`none` | `hint` | `prefix:<fraction>` -> (kind, fraction).

    >>> parse_guidance("prefix:0.5"), parse_guidance(None)
    (('prefix', 0.5), ('none', 0.0))
    """
    spec = (spec or "none").strip()
    if spec in ("none", "hint"):
        return spec, 0.0
    kind, _, frac = spec.partition(":")
    try:
        f = float(frac)
    except ValueError:
        f = -1.0
    if kind != "prefix" or not 0.0 < f <= 1.0:
        raise ConfigError(f"--guidance {spec!r}: expected none | hint | prefix:FRACTION with 0 < FRACTION <= 1")
    return "prefix", f


def reference_prefix(tokenizer: Any, reference: str | None, fraction: float) -> list[int]:
    """The first floor(fraction * len) tokens of the reference solution ([] without one)."""
    if not reference:
        return []
    ids = list(tokenizer(reference, add_special_tokens=False)["input_ids"])
    return ids[: int(fraction * len(ids))]


def guided_inputs(
    tokenizer: Any, guidance: str | None, *, chat: bool, system_prompt: str | None
) -> tuple[Callable[[Sample], list[int]], Callable[[Sample], list[int]] | None]:
    """(render, prefix) for `evaluate` under a test-time guidance spec.

    hint: the first hint is appended to the problem (problems without hints get the plain prompt);
    prefix:f: that fraction of the reference solution is forced as the start of the response.
    """
    from guidedrl.models import render_prompt

    kind, frac = parse_guidance(guidance)

    def render(s: Sample) -> list[int]:
        hint = s.hints[0] if kind == "hint" and s.hints else None
        return render_prompt(tokenizer, s, chat=chat, system_prompt=system_prompt, hint=hint)

    if kind != "prefix":
        return render, None
    return render, lambda s: reference_prefix(tokenizer, s.reference, frac)


# ----------------------------------------------------------------------------- models and the CLI


def run_folder(path: str) -> Path | None:
    """`path` as a run folder (a folder holding config.yaml), else None."""
    p = Path(path).expanduser()
    return p if p.is_dir() and (p / "config.yaml").exists() else None


def find_run_model(path: str) -> tuple[str, Path | None]:
    """-> (model location, run folder or None). A run folder (it holds config.yaml) resolves to its
    `final/` folder when present, else to the `model/` folder of its latest complete checkpoint
    (`guidedrl.checkpoint.latest_model_dir`). Anything else is returned as given."""
    from guidedrl.checkpoint import latest_model_dir

    p = run_folder(path)
    if p is None:
        return path, None
    model = p / "final" if (p / "final").is_dir() else latest_model_dir(p)
    if model is None or not model.is_dir():
        raise ModelError(f"--model {path}: a run folder without a saved model (no final/ and no complete "
                         "checkpoint under checkpoints/); was the run saved?")
    return str(model.resolve()), p


def _has_tokenizer(folder: str) -> bool:
    return any((Path(folder) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def eval_source(cfg: "Config", task: str | None) -> "Any":
    """The DataSource to evaluate on: `task` (a built-in task or a data file) or the config's eval set."""
    from guidedrl.config import DataSource

    if task is None:
        return cfg.data.eval or cfg.data.train
    if cfg.data.eval is not None and cfg.data.eval.task == task:
        return cfg.data.eval
    if task.endswith((".jsonl", ".parquet")) or Path(task).expanduser().is_dir():
        return DataSource(path=task)
    return DataSource(task=task, task_args={"split": "test"} if task == "arith" else {})


def evaluate_model(
    cfg: "Config",
    model: str,
    *,
    ks: Sequence[int],
    n: int | None = None,
    guided: str | None = "none",
    out: Path | None = None,
    task: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    reward_fn: RewardCall | None = None,
) -> EvalResult:
    """Evaluate a run folder, checkpoint, model folder or Hub id on the config's eval set (or `task`).

    n defaults to max(ks); limit defaults to `eval.limit`; the reward is the config's (or the task's
    default). Writes eval.json and eval.md to `out` when given.
    """
    from guidedrl.data import load_samples
    from guidedrl.data.loaders import balanced_head
    from guidedrl.data.tasks import default_reward
    from guidedrl.models import load_model, load_tokenizer, use_chat
    from guidedrl.rewards import build_reward
    from guidedrl.rollout.hf import HFEngine
    from guidedrl.rollout.weights import decode_copy

    n = n if n is not None else max(ks)
    ks = check_ks(ks, n)
    parse_guidance(guided)  # fail on a bad spec before loading anything
    location, _run = find_run_model(model)
    same = location == cfg.model.path
    mcfg = cfg.model if same else cfg.model.model_copy(update={"path": location, "lora": None, "gguf_file": None})
    # a checkpoint saved without its tokenizer uses the run's tokenizer
    tok = load_tokenizer(cfg.model if Path(location).is_dir() and not _has_tokenizer(location) else mcfg)
    net = load_model(mcfg, tok, trainable=False)
    src = eval_source(cfg, task)
    samples = load_samples(src, key="data.eval")
    limit = limit if limit is not None else cfg.eval.limit
    samples = samples if limit is None else balanced_head(samples, limit)
    if reward_fn is None:
        task_terms = default_reward(src.task if src.path is None else None)
        reward_fn = build_reward(cfg.reward.terms, task_terms, cfg.reward.on_error)
    render, prefix = guided_inputs(tok, guided, chat=use_chat(cfg.model, tok), system_prompt=cfg.model.system_prompt)
    engine = HFEngine(net, tok, cfg.rollout.model_copy(update={"temperature": cfg.eval.temperature}),
                      cast_weights=decode_copy(net, mcfg, cfg.rollout))
    result = evaluate(engine, samples, reward_fn, n=n, ks=ks, render=render, prefix=prefix,
                      decode=lambda ids: tok.decode(ids, skip_special_tokens=True), temperature=cfg.eval.temperature,
                      seed=seed, max_new_tokens=cfg.rollout.max_new_tokens,
                      meta={"model": model, "guidance": guided or "none", "data": src.path or src.task})
    if out is not None:
        result.save(out)
    return result


def evaluate_cli(a: "argparse.Namespace") -> int:
    """`guidedrl eval`: resolve the config (the run's config.yaml for a run folder), evaluate, print, save."""
    from guidedrl.config import load_config
    from guidedrl.runlog import console

    try:
        ks = [int(k) for k in str(a.k).split(",") if k.strip()]
    except ValueError:
        raise ConfigError(f"--k {a.k!r}: expected comma-separated integers, e.g. 1,8,64") from None
    run = run_folder(a.model)
    cfg = load_config(str(run / "config.yaml") if run is not None else None, a.set)
    out = Path(a.out) if a.out else (run / "eval" if run is not None else Path("eval"))
    result = evaluate_model(cfg, a.model, ks=ks, n=a.n, guided=a.guidance, out=out, task=a.task,
                            limit=a.limit, seed=a.seed)
    console.print(result.table())
    console.print(f"wrote {out / 'eval.json'} and {out / 'eval.md'}")
    return 0
