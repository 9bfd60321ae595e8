"""Evaluation: sample n completions per problem, score them, and report pass@k / mean@k /
majority@k overall and per level (estimators: `guidedrl.algo.metrics`; results:
`guidedrl.eval.results`). Optional test-time guidance: a hint or a reference prefix."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from guidedrl.core.errors import ConfigError, DataError, RewardError
from guidedrl.core.types import CORRECT, Sample
from guidedrl.eval.results import EvalResult, ProblemResult, problem_metrics, summarize
from guidedrl.rollout.base import Engine, GenRequest

if TYPE_CHECKING:
    from guidedrl.core.config import Config

RewardCall = Callable[[list[Sample], list[str]], Any]


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
    threshold: float = CORRECT,
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
    from guidedrl.nn.models import render_prompt

    kind, frac = parse_guidance(guidance)

    def render(s: Sample) -> list[int]:
        hint = s.hints[0] if kind == "hint" and s.hints else None
        return render_prompt(tokenizer, s, chat=chat, system_prompt=system_prompt, hint=hint)

    if kind != "prefix":
        return render, None
    return render, lambda s: reference_prefix(tokenizer, s.reference, frac)


def _has_tokenizer(folder: str) -> bool:
    return any((Path(folder) / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


def eval_source(cfg: "Config", task: str | None) -> "Any":
    """The DataSource to evaluate on: `task` (a built-in task or a data file) or the config's eval set."""
    from guidedrl.core.config import DataSource

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
    label: str | None = None,
) -> EvalResult:
    """Evaluate a model folder, checkpoint or Hub id on the config's eval set (or `task`); `label`
    names it in the result (default: `model`). Run folders are resolved by the caller
    (`guidedrl.app.eval_cmd.find_run_model`).

    n defaults to max(ks); limit defaults to `eval.limit`; the reward is the config's (or the task's
    default). Writes eval.json and eval.md to `out` when given.
    """
    from guidedrl.data import load_samples
    from guidedrl.data.loaders import balanced_head
    from guidedrl.data.tasks import default_reward
    from guidedrl.nn.models import load_model, load_tokenizer, use_chat
    from guidedrl.rewards import build_reward
    from guidedrl.rollout.hf import HFEngine
    from guidedrl.rollout.weights import decode_copy

    n = n if n is not None else max(ks)
    ks = check_ks(ks, n)
    parse_guidance(guided)  # fail on a bad spec before loading anything
    location = model
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
                      meta={"model": label or model, "guidance": guided or "none", "data": src.path or src.task})
    if out is not None:
        result.save(out)
    return result
