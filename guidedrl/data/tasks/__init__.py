"""Built-in task families: generators of Samples with verifiable answers.

`TASKS` maps a task name to its generator; `reasoning_gym:<dataset>` names any of reasoning-gym's
procedural datasets. Generators are imported lazily so that a task's dependencies are only needed
when it is used. `default_reward(task)` is the verifier a task is scored with when the recipe
names no `reward.terms`.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable
from typing import Any

from guidedrl.core.config import RewardTerm
from guidedrl.core.errors import ConfigError
from guidedrl.core.types import Sample

RG_PREFIX = "reasoning_gym:"


def _arith(**kwargs: Any) -> list[Sample]:
    """The embedded `arith` task (guidedrl.data.tasks.arith.make_samples), imported on first use."""
    from guidedrl.data.tasks import arith

    return arith.make_samples(**kwargs)


def _reasoning_gym(name: str, **kwargs: Any) -> list[Sample]:
    """Any reasoning-gym dataset (guidedrl.data.tasks.reasoning_gym), imported on first use."""
    from guidedrl.data.tasks import reasoning_gym

    return reasoning_gym.make_samples(name, **kwargs)


TASKS: dict[str, Callable[..., list[Sample]]] = {
    "arith": _arith,
    "reasoning_gym": _reasoning_gym,
}
"""Task name -> generator(**task_args). `reasoning_gym` takes the dataset name first."""


def resolve_task(task: str, key: str = "data.train.task") -> Callable[..., list[Sample]]:
    """The generator for a task name: `arith`, or `reasoning_gym:<dataset>` (name bound).

    >>> resolve_task("reasoning_gym:leg_counting").args
    ('leg_counting',)
    >>> resolve_task("arth")
    Traceback (most recent call last):
    ...
    guidedrl.core.errors.ConfigError: `data.train.task`: unknown task `arth`. Did you mean `arith`?
    """
    if task.startswith(RG_PREFIX):
        name = task[len(RG_PREFIX):]
        if not name:
            raise ConfigError(f"`{key}`: `{task}` names no dataset; use `reasoning_gym:<dataset name>`")
        from guidedrl.data.tasks import reasoning_gym

        reasoning_gym.check_name(name, key)
        return functools.partial(reasoning_gym.make_samples, name)
    if task == "arith":
        # the real function (not the forwarding wrapper), so task_args are checked against it
        from guidedrl.data.tasks import arith

        return arith.make_samples
    if task in TASKS and task != "reasoning_gym":
        return TASKS[task]
    known = [t for t in TASKS if t != "reasoning_gym"] + [f"{RG_PREFIX}<dataset>"]
    close = difflib.get_close_matches(task, known, n=1)
    hint = f" Did you mean `{close[0]}`?" if close else f" Known tasks: {', '.join(known)}."
    raise ConfigError(f"`{key}`: unknown task `{task}`.{hint}")


def default_reward(task: str | None) -> list[RewardTerm]:
    """The reward terms a task is scored with when `reward.terms` is not set.

    >>> [t.name for t in default_reward("arith")], [t.name for t in default_reward(None)]
    (['arith'], ['math'])
    >>> [t.name for t in default_reward("reasoning_gym:leg_counting")]
    ['reasoning_gym']
    """
    if task is None:
        return [RewardTerm(name="math")]
    if task.startswith(RG_PREFIX):
        return [RewardTerm(name="reasoning_gym")]
    if task == "arith":
        return [RewardTerm(name="arith")]
    raise ConfigError(f"no default reward for task `{task}`; set `reward.terms`")
