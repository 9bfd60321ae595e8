"""Any reasoning-gym dataset's own verifier as a reward.

The entry comes from `Sample.extra`: `rg_entry` / `rg_dataset` / `rg_config` as written by the
`reasoning_gym:<name>` task, or, for rows loaded from a file that was dumped from reasoning-gym,
the columns `metadata` (with `metadata.source_dataset`) plus the Sample's prompt and answer.
The dataset is rebuilt from its config (cached) because some verifiers read their config.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from guidedrl.core.errors import ConfigError
from guidedrl.core.types import Sample


_SCORERS: dict[tuple[str, str], Callable[[str | None, dict[str, Any]], float]] = {}


def _scorer(name: str, config: dict[str, Any]) -> Callable[[str | None, dict[str, Any]], float]:
    """The dataset's `score_answer`, built once per (name, config)."""
    from guidedrl.data.tasks.reasoning_gym import create

    key = (name, repr(sorted(config.items())))
    if key not in _SCORERS:
        _SCORERS[key] = create(name, config).score_answer
    return _SCORERS[key]


def entry_of(sample: Sample) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(dataset name, entry, config) of a sample; ValueError if it carries no reasoning-gym entry."""
    extra = sample.extra
    if "rg_entry" in extra and "rg_dataset" in extra:
        return extra["rg_dataset"], extra["rg_entry"], extra.get("rg_config") or {}
    meta = extra.get("metadata")
    if isinstance(meta, dict) and isinstance(meta.get("source_dataset"), str):
        entry = {"question": sample.prompt, "answer": sample.answer, "metadata": meta}
        return meta["source_dataset"], entry, {}
    raise ValueError(
        f"sample {sample.id!r} has no reasoning-gym entry (extra `rg_entry` + `rg_dataset`, or a "
        "`metadata` column with `source_dataset`); use the `reasoning_gym:<name>` task or another reward"
    )


def reasoning_gym_reward(
    samples: list[Sample], completions: list[str], answer_tag: str | None = "answer"
) -> tuple[list[float | None], list[dict[str, Any]]]:
    """The dataset's own `score_answer(answer, entry)` (a float in [0, 1]).

    The answer is the content of the last `<answer_tag>` element if there is one (extracted by
    `reasoning_gym.utils.extract_answer`), else the whole completion, stripped.

    >>> from guidedrl.data.tasks.reasoning_gym import make_samples
    >>> s = make_samples("leg_counting", size=1, seed=1)  # 13 woodlice, 8 leeches, ... -> 292 legs
    >>> reasoning_gym_reward(s * 3, ["<answer>292</answer>", "292", "<answer>291</answer>"])[0]
    [1.0, 1.0, 0.0]
    """
    from reasoning_gym.utils import extract_answer

    scores: list[float | None] = []
    infos: list[dict[str, Any]] = []
    for sample, text in zip(samples, completions, strict=True):
        name, entry, config = entry_of(sample)
        answer = extract_answer(text, tag_name=answer_tag) if answer_tag is not None else None
        if answer is None:
            answer = text.strip()
        score = _scorer(name, config)(answer, entry)
        scores.append(float(score))
        infos.append({"reasoning_gym/extracted": answer})
    return scores, infos


def make_reasoning_gym(answer_tag: str | None = "answer") -> functools.partial:
    """`reasoning_gym`: the reasoning-gym dataset's own verifier, in [0, 1] (args: answer_tag)."""
    if answer_tag is not None and (not isinstance(answer_tag, str) or not answer_tag.strip()):
        raise ConfigError(f"answer_tag must be a tag name such as `answer`, or null, got {answer_tag!r}")
    return functools.partial(reasoning_gym_reward, answer_tag=answer_tag)
