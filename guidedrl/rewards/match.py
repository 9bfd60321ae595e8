"""String rewards: exact / normalized answer match and a regex format reward.

Each reward is a plain callable `fn(samples, completions, **args)`; the `make_*` factories check
the arguments once (at config time) and bind them, for `guidedrl.rewards.combine.REWARDS`.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Literal

from guidedrl.core.errors import ConfigError
from guidedrl.core.types import Sample

RegexMode = Literal["search", "fullmatch", "match"]


def extract_tag(text: str, tag: str) -> str | None:
    """The stripped content of the last `<tag>...</tag>` in `text`, or None if there is none.

    >>> extract_tag("<answer> 1 </answer> no, <answer>2</answer>", "answer")
    '2'
    >>> extract_tag("just 2", "answer") is None
    True
    """
    matches = re.findall(rf"<{re.escape(tag)}>(.*?)</{re.escape(tag)}>", text, flags=re.DOTALL)
    return matches[-1].strip() if matches else None


def check_extract(extract: str) -> None:
    """Raise ConfigError unless `extract` is `all`, `last_line` or `after:<marker>`."""
    if extract in ("all", "last_line") or (extract.startswith("after:") and len(extract) > len("after:")):
        return
    raise ConfigError(f"extract must be `all`, `last_line` or `after:<marker>`, got {extract!r}")


def extract_final(text: str, extract: str) -> str | None:
    """The final-answer part of a completion, stripped; None if there is none.

    `all`: the whole text; `last_line`: the last non-blank line; `after:<marker>`: the rest of the
    line after the last occurrence of marker (None if the marker is absent).

    >>> extract_final("work\\n\\n 42 \\n", "last_line"), extract_final("x #### 7\\nbye", "after:####")
    ('42', '7')
    >>> extract_final("no marker", "after:####") is None
    True
    """
    check_extract(extract)
    if extract == "all":
        return text.strip()
    if extract == "last_line":
        lines = [line for line in text.splitlines() if line.strip()]
        return lines[-1].strip() if lines else None
    marker = extract[len("after:"):]
    head, found, tail = text.rpartition(marker)
    return tail.split("\n", 1)[0].strip() if found else None


def normalize_text(text: str) -> str:
    """Lower-case, collapse whitespace, drop trailing periods.

    >>> normalize_text("  The   Answer is\\tParis. ")
    'the answer is paris'
    """
    return " ".join(text.split()).lower().rstrip(".").rstrip()


def exact_reward(
    samples: list[Sample], completions: list[str], extract: str = "all", normalize: bool = False
) -> tuple[list[float | None], list[dict[str, Any]]]:
    """1.0 if the extracted final answer equals `Sample.answer`, else 0.0; None without an answer.

    Both sides are stripped of surrounding whitespace; `normalize` also lower-cases, collapses
    inner whitespace and drops trailing periods (`normalize_text`).

    >>> s = [Sample(id="a", prompt="capital of France?", answer="Paris")] * 3
    >>> exact_reward(s, ["Paris", "paris.", "I think\\nParis"])[0]
    [1.0, 0.0, 0.0]
    >>> exact_reward(s, ["Paris", "paris.", "I think\\nParis"], extract="last_line", normalize=True)[0]
    [1.0, 1.0, 1.0]
    >>> exact_reward([Sample(id="b", prompt="?")], ["x"])[0]
    [None]
    """
    check_extract(extract)
    scores: list[float | None] = []
    infos: list[dict[str, Any]] = []
    for sample, text in zip(samples, completions, strict=True):
        pred = extract_final(text, extract)
        infos.append({"exact/extracted": pred})
        if sample.answer is None:
            scores.append(None)
            continue
        gold = sample.answer.strip()
        if normalize and pred is not None:
            pred, gold = normalize_text(pred), normalize_text(gold)
        scores.append(1.0 if pred is not None and pred == gold else 0.0)
    return scores, infos


def make_exact(extract: str = "all", normalize: bool = False) -> functools.partial:
    """`exact`: 1 if the extracted final answer equals the sample's answer (args: extract, normalize).

    Checks `extract` at config time rather than at the first call.
    """
    check_extract(extract)
    if not isinstance(normalize, bool):
        raise ConfigError(f"normalize must be true or false, got {normalize!r}")
    return functools.partial(exact_reward, extract=extract, normalize=normalize)


def regex_format_reward(
    samples: list[Sample], completions: list[str], pattern: str, mode: RegexMode = "search"
) -> list[float | None]:
    """1.0 if the completion matches `pattern` (re.search / re.fullmatch / re.match), else 0.0.

    Use inline flags for multi-line formats, e.g. `(?s)` so that `.` also matches newlines.

    >>> s = [Sample(id="a", prompt="?")] * 2
    >>> regex_format_reward(s, ["<think>a\\nb</think> 4", "4"], r"(?s)<think>.*</think>\\s*\\S+", mode="fullmatch")
    [1.0, 0.0]
    >>> regex_format_reward(s, ["the answer is 4", "4"], r"answer is \\d")
    [1.0, 0.0]
    """
    match = {"search": re.search, "fullmatch": re.fullmatch, "match": re.match}[mode]
    return [1.0 if match(pattern, text) else 0.0 for _, text in zip(samples, completions, strict=True)]


def make_regex_format(pattern: str, mode: RegexMode = "search") -> functools.partial:
    """`regex_format`: 1 if the completion matches a regular expression (args: pattern, mode).

    Compiles `pattern` at config time so that a typo fails before training.
    """
    if mode not in ("search", "fullmatch", "match"):
        raise ConfigError(f"mode must be `search`, `fullmatch` or `match`, got {mode!r}")
    if not isinstance(pattern, str):
        raise ConfigError(f"pattern must be a string, got {pattern!r}")
    try:
        re.compile(pattern)
    except re.error as e:
        raise ConfigError(f"pattern {pattern!r} is not a valid regular expression: {e}") from None
    return functools.partial(regex_format_reward, pattern=pattern, mode=mode)
