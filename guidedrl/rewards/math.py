"""Math answers checked by math-verify (Hugging Face, github.com/huggingface/Math-Verify).

math-verify extracts the answer from the completion itself (`\\boxed{}` first, then the last
LaTeX / plain expression) and compares it symbolically with the gold answer, so `1/2`, `0.5` and
`\\frac{1}{2}` are equal. We add only what the library does not do:

- `answer_tag`: read the content of the last `<answer_tag>...</answer_tag>` first (math-verify
  ignores such tags); a completion without the tag scores 0.
- The gold answer (and a tag's content) is a bare answer, not prose, so it is parsed wrapped in
  `$...$` (unwrapped, `2\\pi` would parse as 2); the unwrapped text is the fallback.
- math-verify's timeouts use SIGALRM, which only works in the main thread: outside it we pass
  `parsing_timeout=None` / `timeout_seconds=None` (the caller owns timeouts there).
"""

from __future__ import annotations

import functools
import threading
import warnings
from typing import Any

from guidedrl.core.errors import ConfigError
from guidedrl.rewards.match import extract_tag
from guidedrl.core.types import Sample

TIMEOUT_S = 5
"""math-verify's own default timeout (seconds) for parsing and for verifying, main thread only."""


def _timeout() -> int | None:
    return TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def parse_answer(text: str) -> list[Any]:
    """Parse a bare answer (gold, or a tag's content) with math-verify; [] if it cannot be parsed.

    >>> parse_answer("2\\\\pi")[0], parse_answer("x^2+1")[0], parse_answer("")
    (2*pi, x**2 + 1, [])
    """
    from math_verify import parse

    wrapped = text if ("$" in text or "\\boxed" in text) else f"${text}$"
    parsed = parse(wrapped, parsing_timeout=_timeout())
    return parsed if parsed or wrapped == text else parse(text, parsing_timeout=_timeout())


@functools.lru_cache(maxsize=4096)
def _gold(answer: str) -> list[Any]:
    """Parsed gold answers are cached: every completion of a group shares one."""
    gold = parse_answer(answer)
    if not gold:
        warnings.warn(f"math reward: math-verify cannot parse the gold answer {answer!r}; scoring None", stacklevel=3)
    return gold


def math_reward(
    samples: list[Sample], completions: list[str], answer_tag: str | None = None
) -> tuple[list[float | None], list[dict[str, Any]]]:
    """1.0 if math-verify finds the completion's answer equal to `Sample.answer`, else 0.0.

    None (not applicable) when the sample has no answer or its answer cannot be parsed.

    >>> s = [Sample(id="a", prompt="1/4 + 1/4?", answer="1/2")] * 4
    >>> math_reward(s, ["so \\\\boxed{\\\\frac{1}{2}}", "it is 0.5", "\\\\boxed{1/3}", "no idea"])[0]
    [1.0, 1.0, 0.0, 0.0]
    >>> math_reward(s[:2], ["<answer>0.5</answer>", "0.5"], answer_tag="answer")[0]
    [1.0, 0.0]
    """
    from math_verify import parse, verify

    scores: list[float | None] = []
    infos: list[dict[str, Any]] = []
    for sample, text in zip(samples, completions, strict=True):
        gold = _gold(sample.answer) if sample.answer is not None else []
        if not gold:
            scores.append(None)
            infos.append({"math/extracted": None})
            continue
        if answer_tag is not None:
            content = extract_tag(text, answer_tag)
            pred = parse_answer(content) if content is not None else []
        else:
            pred = parse(text, parsing_timeout=_timeout())
        ok = bool(pred) and verify(gold, pred, timeout_seconds=_timeout())
        scores.append(1.0 if ok else 0.0)
        infos.append({"math/extracted": str(pred[-1]) if pred else None})
    return scores, infos


def make_math(answer_tag: str | None = None) -> functools.partial:
    """`math`: 1 if math-verify finds the completion's answer equal to the sample's (args: answer_tag)."""
    if answer_tag is not None and (not isinstance(answer_tag, str) or not answer_tag.strip()):
        raise ConfigError(f"answer_tag must be a tag name such as `answer`, got {answer_tag!r}")
    return functools.partial(math_reward, answer_tag=answer_tag)
