"""The reward registry and the weighted sum of reward terms a run is scored with.

A reward is a plain callable `fn(samples, completions) -> list[float | None]` or
`(list[float | None], list[dict])` (TRL's reward-function convention, plus oat-style per-sample
info). `None` means "not applicable": that term is skipped for that sample. A term is a built-in
name from `REWARDS` (a factory taking the term's `args`) or `module.path:function` /
`path/to/file.py:function` for a user's own function (its `args` are bound as keywords).

`build_reward` returns one callable giving, per completion, the weighted sum of its terms and an
info dict with each term's score under `reward/<name>`. An exception (or a `sys.exit()`) inside a
reward function fails the run with a `RewardError` naming the first failing sample's id and
holding the function's traceback; with `on_error="zero"` the failing samples score 0, a warning is issued and
`info["reward_error"]` says why. To find the failing sample after a batch call raises, the
function is called again one sample at a time (so a reward with side effects may see a sample twice).
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.util
import inspect
import math
import sys
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from guidedrl.core.config import RewardTerm
from guidedrl.core.errors import ConfigError, RewardError
from guidedrl.rewards.match import make_exact, make_regex_format
from guidedrl.rewards.math import make_math
from guidedrl.rewards.reasoning_gym import make_reasoning_gym
from guidedrl.core.types import RewardFn, Sample

OnError = Literal["raise", "zero"]
Scores = list[float | None]
Infos = list[dict[str, Any]]


def bind_args(fn: Callable[..., Any], args: dict[str, Any], what: str) -> Callable[..., Any]:
    """`fn` with `args` bound as keywords, after checking they fit `fn(samples, completions, ...)`."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have no signature; bind blindly
        return functools.partial(fn, **args) if args else fn
    try:
        sig.bind([], [], **args)
    except TypeError as e:
        raise ConfigError(f"{what}: `args` do not fit {getattr(fn, '__name__', fn)}{sig}: {e}") from None
    return functools.partial(fn, **args) if args else fn


def _lazy(module: str, attr: str) -> Callable[..., RewardFn]:
    """A factory importing `module.attr` on first use, so a missing optional module fails only when used."""

    def factory(**args: Any) -> RewardFn:
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"this reward needs `{module}:{attr}`, which is not available: {e}") from None
        return bind_args(fn, args, f"{module}:{attr}")

    factory.__doc__ = f"`{module}:{attr}` (imported on first use; see its docstring)."
    return factory


def make_code(**args: Any) -> RewardFn:
    """The sandboxed code-execution reward (guidedrl.rewards.code), its limits checked now, not at the first batch."""
    from guidedrl.rewards.code import make_code_reward

    try:
        return make_code_reward(**args)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"code reward: {e}") from None


REWARDS: dict[str, Callable[..., RewardFn]] = {
    "math": make_math,
    "exact": make_exact,
    "regex_format": make_regex_format,
    "reasoning_gym": make_reasoning_gym,
    "arith": _lazy("guidedrl.data.tasks.arith", "arith_reward"),
    "code": make_code,
}
"""Built-in reward name -> factory(**args) -> reward function."""


def import_user_fn(spec: str, where: str) -> Callable[..., Any]:
    """Import `module.path:function` or `path/to/file.py:function`; errors name `where`."""
    module_name, _, attr = spec.rpartition(":")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name).expanduser().resolve()
            if not path.is_file():
                raise ImportError(f"no such file {path}")
            mod_spec = importlib.util.spec_from_file_location(f"guidedrl_user_reward_{path.stem}", path)
            assert mod_spec is not None and mod_spec.loader is not None, path
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[mod_spec.name] = module  # lets pickling / dataclasses in that file work
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except Exception as e:  # any error while importing the user's module is a config problem
        detail = format_user_error(e) if not isinstance(e, ImportError) else str(e)
        sep = "\n" if "\n" in detail else " "
        raise ConfigError(f"`{where}.name`: cannot import `{module_name}` for reward `{spec}`:{sep}{detail}") from None
    fn = getattr(module, attr, None)
    if fn is None or not callable(fn):
        found = "not found" if fn is None else "not callable"
        raise ConfigError(f"`{where}.name`: `{attr}` is {found} in `{module_name}` (reward `{spec}`)")
    return fn


@dataclass
class Term:
    """One resolved reward term."""

    label: str
    """Key suffix in the info dicts: `reward/<label>` (the name, `#i` added if used twice)."""
    weight: float
    fn: RewardFn
    where: str
    """The config key of the term, for messages."""


def resolve_term(term: RewardTerm, where: str) -> RewardFn:
    """The reward function a term names, with its args bound."""
    if ":" in term.name:
        return bind_args(import_user_fn(term.name, where), term.args, f"`{where}.args`")
    if term.name not in REWARDS:
        close = difflib.get_close_matches(term.name, list(REWARDS), n=1)
        hint = f" Did you mean `{close[0]}`?" if close else ""
        raise ConfigError(
            f"`{where}.name`: unknown reward `{term.name}`.{hint} Built-in rewards: {', '.join(REWARDS)}; "
            "or give your own as `module.path:function`"
        )
    try:
        return REWARDS[term.name](**term.args)
    except ConfigError as e:
        raise ConfigError(f"`{where}.args` (reward `{term.name}`): {e}") from None
    except TypeError as e:  # unknown or missing argument of a built-in factory
        raise ConfigError(f"`{where}.args` (reward `{term.name}`): {e}") from None


def build_reward(
    terms: list[RewardTerm] | None, task_default: list[RewardTerm], on_error: OnError = "raise"
) -> "CombinedReward":
    """The run's reward: the weighted sum of `terms` (None = the task's default terms).

    Raises ConfigError for an unknown name, an unimportable user function or bad args.
    """
    if on_error not in ("raise", "zero"):
        raise ConfigError(f"`reward.on_error` must be `raise` or `zero`, got {on_error!r}")
    user = terms is not None
    chosen = terms if terms is not None else task_default
    if not chosen:
        raise ConfigError("`reward.terms` is empty; remove it to use the task's default reward")
    wheres = [f"reward.terms[{i}]" if user else f"reward.terms (task default)[{i}]" for i in range(len(chosen))]
    valid: list[RewardTerm] = []
    for where, raw in zip(wheres, chosen, strict=True):
        try:
            valid.append(raw if isinstance(raw, RewardTerm) else RewardTerm.model_validate(raw))
        except ValidationError as e:
            raise ConfigError(f"`{where}`: {e.errors()[0]['msg']} (got {raw!r})") from None
    names = [t.name for t in valid]
    resolved = [
        Term(
            label=term.name if names.count(term.name) == 1 else f"{term.name}#{i}",
            weight=term.weight,
            fn=resolve_term(term, where),
            where=where,
        )
        for i, (where, term) in enumerate(zip(wheres, valid, strict=True))
    ]
    return CombinedReward(resolved, on_error)


@dataclass
class CombinedReward:
    """Weighted sum of reward terms; `__call__(samples, completions) -> (rewards, infos)`."""

    terms: list[Term]
    on_error: OnError = "raise"

    def __call__(self, samples: list[Sample], completions: list[str]) -> tuple[list[float], Infos]:
        if len(samples) != len(completions):
            raise ValueError(f"{len(samples)} samples but {len(completions)} completions")
        n = len(samples)
        totals = [0.0] * n
        scored = [False] * n
        infos: Infos = [{} for _ in range(n)]
        for term in self.terms:
            scores, term_infos = self._run(term, samples, completions)
            for j, (score, info) in enumerate(zip(scores, term_infos, strict=True)):
                infos[j].update(info)
                infos[j][f"reward/{term.label}"] = score
                if score is not None:
                    totals[j] += term.weight * score
                    scored[j] = True
        for j in range(n):
            if not scored[j]:
                infos[j]["reward/all_none"] = True  # no term applied: the reward is 0.0
        return totals, infos

    def _run(self, term: Term, samples: list[Sample], completions: list[str]) -> tuple[Scores, Infos]:
        """Call one term on the whole batch; on an exception, isolate the failing samples."""
        batch_error: BaseException | None = None
        try:
            out = term.fn(samples, completions)
        except (Exception, SystemExit) as e:  # a reward's sys.exit() is its error, not the run's end
            batch_error = e
        if batch_error is not None:  # outside the except block, so per-sample errors don't chain to it
            return self._per_sample(term, samples, completions, batch_error)
        scores, infos = _unpack(term, out, samples)
        failures: list[tuple[int, BaseException]] = [
            (j, ValueError(f"returned a non-finite score {s!r}"))
            for j, s in enumerate(scores)
            if s is not None and not math.isfinite(s)
        ]
        return self._apply_failures(term, samples, scores, infos, failures)

    def _per_sample(
        self, term: Term, samples: list[Sample], completions: list[str], batch_error: BaseException
    ) -> tuple[Scores, Infos]:
        """Re-run a failed batch one sample at a time to find (raise) or zero (zero) the failures."""
        scores: Scores = []
        infos: Infos = []
        failures: list[tuple[int, BaseException]] = []
        for j, (sample, text) in enumerate(zip(samples, completions, strict=True)):
            try:
                out = term.fn([sample], [text])
            except (Exception, SystemExit) as e:
                if self.on_error == "raise":
                    raise RewardError(_message(term, f"on sample `{sample.id}`", e)) from None
                failures.append((j, e))
                scores.append(None)
                infos.append({})
                continue
            one_scores, one_infos = _unpack(term, out, [sample])
            scores += one_scores
            infos += one_infos
        if not failures:
            ids = ", ".join(dict.fromkeys(s.id for s in samples[:5]))
            where = f"on a batch of {len(samples)} samples (ids {ids}, ...), though each sample alone passed"
            if self.on_error == "raise":
                raise RewardError(_message(term, where, batch_error))
            warnings.warn(f"reward `{term.label}` raised {where}; using the per-sample scores", RuntimeWarning)
        return self._apply_failures(term, samples, scores, infos, failures)

    def _apply_failures(
        self, term: Term, samples: list[Sample], scores: Scores, infos: Infos, failures: list[tuple[int, BaseException]]
    ) -> tuple[Scores, Infos]:
        """raise: RewardError for the first failure. zero: score 0.0, note it in info, warn once."""
        if not failures:
            return scores, infos
        first, err = failures[0]
        if self.on_error == "raise":
            raise RewardError(_message(term, f"on sample `{samples[first].id}`", err))
        for j, e in failures:
            scores[j] = 0.0
            infos[j]["reward_error"] = f"{term.label}: {type(e).__name__}: {e}"
        warnings.warn(
            f"reward `{term.label}` ({term.where}) failed on {len(failures)} of {len(samples)} samples, "
            f"first `{samples[first].id}`: {type(err).__name__}: {err}; scored 0 (reward.on_error=zero)",
            RuntimeWarning,
            stacklevel=3,
        )
        return scores, infos


def format_user_error(err: BaseException) -> str:
    """`err` with its traceback, without guidedrl's or importlib's frames (the user's code only)."""
    importlib_dir = str(Path(importlib.__file__).parent)
    te = traceback.TracebackException.from_exception(err)
    te.stack = traceback.StackSummary.from_list(
        [
            f
            for f in te.stack
            if f.filename != __file__ and not f.filename.startswith(("<frozen", importlib_dir))
        ]
    )
    return "".join(te.format()).rstrip()


def _message(term: Term, where: str, err: BaseException) -> str:
    """RewardError text: which function, which sample, and the function's own traceback."""
    if err.__traceback__ is None:  # a check of ours (e.g. a non-finite score), not a raise in user code
        return f"reward `{term.label}` ({term.where}) failed {where}: {err}"
    return f"reward `{term.label}` ({term.where}) raised {where}:\n{format_user_error(err)}"


def _unpack(term: Term, out: Any, samples: list[Sample]) -> tuple[Scores, Infos]:
    """Check a reward's output: n scores (numbers or None), optionally with n info dicts."""
    name = f"reward `{term.label}` ({term.where})"
    infos: Any = None
    if isinstance(out, tuple) and len(out) == 2 and all(isinstance(x, (list, tuple)) for x in out):
        out, infos = out
    if not isinstance(out, (list, tuple)):
        raise RewardError(f"{name} must return a list of scores (or (scores, infos)), got {type(out).__name__}")
    if len(out) != len(samples):
        raise RewardError(f"{name} returned {len(out)} scores for {len(samples)} completions")
    if infos is not None and (len(infos) != len(samples) or not all(isinstance(d, dict) for d in infos)):
        raise RewardError(f"{name} must return one info dict per completion ({len(samples)})")
    scores: Scores = []
    for sample, s in zip(samples, out, strict=True):
        if s is None:
            scores.append(None)
            continue
        try:
            if isinstance(s, (str, bytes)):  # float("1") works, but a string score is a bug
                raise TypeError
            scores.append(float(s))
        except Exception:  # numbers, numpy scalars and 0-d tensors convert; anything else is a bug
            raise RewardError(f"{name} returned {s!r} for sample `{sample.id}`; expected a number or None") from None
    return scores, [dict(d) for d in infos] if infos is not None else [{} for _ in samples]
