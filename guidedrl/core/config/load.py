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


def _model_at(path: tuple[Any, ...]) -> type[BaseModel] | None:
    """The config class at a dotted path (for suggestions), following discriminated unions loosely."""
    node: Any = Config
    for part in path:
        if not (isinstance(node, type) and issubclass(node, BaseModel)):
            return None
        field = node.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        candidates = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        node = candidates[0] if candidates else None
    return node if isinstance(node, type) else None


def _format_error(err: dict[str, Any], source: str) -> str:
    loc = [str(x) for x in err["loc"] if not (isinstance(x, str) and x in ("function-after", "function-before"))]
    # discriminated unions add the tag as a path element; drop tags that are class names
    dotted = ".".join(x for x in loc if not x[:1].isupper() and not x.startswith("function"))
    etype = err["type"]
    if etype == "extra_forbidden":
        parent = _model_at(tuple(dotted.split(".")[:-1]) if "." in dotted else ())
        known = list(parent.model_fields) if parent else []
        close = difflib.get_close_matches(dotted.split(".")[-1], known, n=1)
        hint = f" Did you mean `{'.'.join(dotted.split('.')[:-1] + [close[0]])}`?" if close else ""
        return f"{source}: unknown key `{dotted}`.{hint}"
    if etype == "union_tag_invalid":
        return f"{source}: `{dotted}.name`: {err['msg']}"
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
