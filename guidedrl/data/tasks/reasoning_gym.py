"""Any reasoning-gym procedural dataset as a task: `task: reasoning_gym:<name>`.

reasoning-gym (Stojanovski et al., 2025, "REASONING GYM: Reasoning Environments for Reinforcement
Learning with Verifiable Rewards") generates problems from a seeded config; each entry has
`question`, `answer` and `metadata`, and the dataset's own `score_answer(answer, entry)` checks a
response. We keep the entry and the config in `Sample.extra` so the `reasoning_gym` reward can
rebuild the same dataset and call its verifier (some verifiers read the config).

Departures: the `test` split uses seed + TEST_SEED_OFFSET so that train and test are generated
from different streams; reasoning-gym cannot promise that two streams never produce the same
small problem, so tiny configs may still share a few questions.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from guidedrl.core.errors import ConfigError
from guidedrl.core.types import Sample

TEST_SEED_OFFSET = 1_000_003
"""Added to `seed` for the `test` split (a prime, so it is unlikely to equal a user's other seed)."""


def dataset_names() -> list[str]:
    """Every dataset name reasoning-gym registers."""
    from reasoning_gym.factory import DATASETS

    return sorted(DATASETS)


def check_name(name: str, key: str = "data.train.task") -> None:
    """Raise ConfigError, listing close matches, if reasoning-gym has no dataset `name`.

    >>> check_name("leg_countin")
    Traceback (most recent call last):
    ...
    guidedrl.core.errors.ConfigError: `data.train.task`: reasoning-gym has no dataset `leg_countin`. Did you mean: leg_counting, letter_counting, rectangle_count?
    """
    names = dataset_names()
    if name in names:
        return
    close = difflib.get_close_matches(name, names, n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else f" Known datasets: {', '.join(names)}."
    raise ConfigError(f"`{key}`: reasoning-gym has no dataset `{name}`.{hint}")


def split_seed(seed: int, split: str) -> int:
    """The generator seed of a split: `seed` for train, `seed + TEST_SEED_OFFSET` for test.

    >>> split_seed(0, "train"), split_seed(0, "test")
    (0, 1000003)
    """
    if split not in ("train", "test"):
        raise ConfigError(f"reasoning_gym task: `split` must be `train` or `test`, got {split!r}")
    return seed if split == "train" else seed + TEST_SEED_OFFSET


def create(name: str, config: dict[str, Any]) -> Any:
    """`reasoning_gym.create_dataset(name, **config)`, with bad config arguments as ConfigError."""
    import reasoning_gym
    from reasoning_gym.factory import DATASETS

    check_name(name)
    config_cls = DATASETS[name][1]
    valid = [f.name for f in dataclasses.fields(config_cls)]
    unknown = [k for k in config if k not in valid]
    if unknown:
        raise ConfigError(
            f"reasoning_gym:{name}: unknown task_args {unknown}; {config_cls.__name__} takes {valid}"
        )
    try:
        return reasoning_gym.create_dataset(name, **config)
    except (AssertionError, ValueError, TypeError) as e:  # reasoning-gym validates configs with assert
        raise ConfigError(f"reasoning_gym:{name}: invalid task_args {config}: {e}") from None


def make_samples(name: str, /, size: int = 200, seed: int = 0, split: str = "train", **kwargs: Any) -> list[Sample]:
    """`size` Samples from reasoning-gym dataset `name`; `kwargs` go to the dataset's config.

    Sample.extra holds `rg_dataset` (the name), `rg_entry` (the raw entry) and `rg_config` (the
    config arguments) for the `reasoning_gym` reward.

    >>> s = make_samples("basic_arithmetic", size=2, seed=1)
    >>> s[0].id, s[0].prompt, s[0].answer, s[0].extra["rg_dataset"]
    ('reasoning_gym:basic_arithmetic:train:0', 'Calculate 5 - 3 - 6.', '-4', 'basic_arithmetic')
    """
    if size < 0:
        raise ConfigError(f"reasoning_gym:{name}: `size` must be >= 0, got {size}")
    config = {**kwargs, "size": size, "seed": split_seed(seed, split)}
    dataset = create(name, config)
    samples = []
    for index, entry in enumerate(dataset):
        answer = entry.get("answer")
        samples.append(
            Sample(
                id=f"reasoning_gym:{name}:{split}:{index}",
                prompt=entry["question"],
                answer=None if answer is None else str(answer),
                extra={"rg_dataset": name, "rg_entry": entry, "rg_config": config},
            )
        )
    return samples
