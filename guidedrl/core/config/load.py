"""Loading configs: recipe files and `--set` overrides -> a validated Config, every problem one
line that names the dotted key (exit code 2)."""

from __future__ import annotations

import difflib
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from guidedrl.core.config.files import apply_overrides, load_yaml, recipe_path
from guidedrl.core.config.tree import Config
from guidedrl.core.errors import ConfigError


def _models(ann: Any) -> list[type[BaseModel]]:
    """The config classes an annotation can hold (through Optional, list, Annotated and unions)."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return [ann]
    return [m for a in getattr(ann, "__args__", ()) for m in _models(a)]


def _tag(model: type[BaseModel]) -> str | None:
    """A union member's tag: the default of its `name` or `injection` field."""
    for key in ("name", "injection"):
        f = model.model_fields.get(key)
        if f is not None and isinstance(f.default, str):
            return f.default
    return None


def _walk(loc: tuple[Any, ...]) -> tuple[list[str], list[type[BaseModel]]]:
    """pydantic's error location -> (the dotted key's parts, the config classes where it ends).
    Union tags that pydantic adds to the location (`ppo_clip`, `prompt_hint`, `function-after`) are
    dropped, and list indexes join their key (`reward.terms[0]`)."""
    parts: list[str] = []
    here: list[type[BaseModel]] = [Config]
    for x in loc:
        if isinstance(x, int):
            parts[-1] = f"{parts[-1]}[{x}]" if parts else f"[{x}]"
            continue
        x = str(x)
        if x.startswith("function-"):
            continue
        owners = [m for m in here if x in m.model_fields]
        if owners:
            parts.append(x)
            here = [m for o in owners for m in _models(o.model_fields[x].annotation)]
        elif len(here) > 1 and any(_tag(m) == x or m.__name__ == x for m in here):  # a union's tag
            here = [m for m in here if _tag(m) == x or m.__name__ == x]
        else:
            parts.append(x)
            here = []
    return parts, here


def _format_error(err: dict[str, Any], source: str) -> str:
    parts, _ = _walk(tuple(err["loc"]))
    dotted = ".".join(parts)
    etype, ctx = err["type"], err.get("ctx") or {}
    if etype == "extra_forbidden":
        _, parents = _walk(tuple(err["loc"])[:-1])
        known = sorted({k for m in parents for k in m.model_fields})
        close = difflib.get_close_matches(parts[-1], known, n=1) if parts else []
        hint = f" Did you mean `{'.'.join(parts[:-1] + [close[0]])}`?" if close else f" Known here: {', '.join(known)}."
        return f"{source}: unknown key `{dotted}`.{hint}"
    if etype == "union_tag_invalid":
        return f"{source}: `{dotted}`: unknown {ctx.get('tag')!r}; valid: {ctx.get('expected_tags')}"
    if etype == "union_tag_not_found":
        return f"{source}: `{dotted}.{ctx.get('discriminator', 'name').strip(chr(39))}` is required"
    if etype == "value_error":  # a validator's own message names its keys
        where = f"`{dotted}`: " if dotted else ""
        return f"{source}: {where}{err['msg'].removeprefix('Value error, ')}"
    return f"{source}: `{dotted or '(top level)'}`: {err['msg']} (got {err.get('input')!r})"


def validate(tree: dict[str, Any], source: str = "config") -> Config:
    """Validate a raw tree; every problem becomes one ConfigError line naming the dotted key."""
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        lines = [_format_error(err, source) for err in e.errors()]
        raise ConfigError("\n".join(dict.fromkeys(lines))) from None


def load_config(recipe: str | None = None, overrides: list[str] | None = None) -> Config:
    """Load a recipe by name or path (None = defaults), apply `key=value` overrides, validate."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if recipe is not None:
        path = recipe_path(recipe)
        tree = load_yaml(path)
        source = str(path)
    tree = apply_overrides(tree, overrides or [])
    return validate(tree, source)


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (round-trips through load_config)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
