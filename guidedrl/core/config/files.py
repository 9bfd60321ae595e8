"""Recipes as files: a recipe name or YAML path, `extends:` chains, and `--set a.b=c` overrides,
read and merged into a plain tree before `guidedrl.core.config.tree` validates it. Every problem is a
ConfigError naming the file and line, or the `--set` item."""

from __future__ import annotations

import datetime
import difflib
import json
from pathlib import Path
from typing import Any

import yaml

from guidedrl.core.errors import ConfigError

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and "name" not in v:
            out[k] = _deep_merge(out[k], v)
        elif isinstance(v, dict) and isinstance(out.get(k), dict) and v.get("name") == out[k].get("name"):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def recipe_path(name_or_path: str) -> Path:
    """A recipe name (`grpo`) or a path to a YAML file."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise ConfigError(f"{p}: no such recipe file")
        return p
    q = RECIPES_DIR / f"{name_or_path}.yaml"
    if not q.exists():
        names = sorted(x.stem for x in RECIPES_DIR.glob("*.yaml"))
        close = difflib.get_close_matches(name_or_path, names, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else f" Known recipes: {', '.join(names)}."
        raise ConfigError(f"unknown recipe `{name_or_path}`.{hint}")
    return q


def load_yaml(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a recipe, following `extends:` (a recipe name or a path relative to the file)."""
    path = path.resolve()
    if path in _seen:
        raise ConfigError(f"{path}: `extends` cycle: {' -> '.join(str(p) for p in _seen + (path,))}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (ValueError, RecursionError) as e:
        raise ConfigError(f"{path}: invalid value: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping of keys, got {type(raw).__name__}")
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    if not isinstance(parent, str):
        raise ConfigError(f"{path}: `extends` must be a recipe name or a path")
    cand = (path.parent / parent)
    ppath = cand if cand.suffix in (".yaml", ".yml") and cand.exists() else recipe_path(parent)
    return _deep_merge(load_yaml(ppath, _seen + (path,)), raw)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], parsed YAML value)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value (e.g. train.lr=1e-5)")
    key, _, value = item.partition("=")
    keys = key.strip().split(".")
    if not all(keys):
        raise ConfigError(f"--set {item!r}: empty key segment")
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except (yaml.YAMLError, ValueError, RecursionError):  # dates like 2001-13-45, absurd nesting
        parsed = value
    if isinstance(parsed, (datetime.date, datetime.datetime)):
        parsed = value  # `--set run.name=2024-01-01` means the string
    try:
        json.dumps(parsed)
    except (ValueError, TypeError, RecursionError):
        raise ConfigError(f"--set {key}: value is not plain data (YAML anchors/aliases or nesting too deep)") from None
    return keys, parsed


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """The tree with each `key=value` override set (sections created as needed)."""
    tree = dict(tree)
    for item in overrides:
        keys, value = parse_override(item)
        node = tree
        for k in keys[:-1]:
            nxt = node.get(k)
            if not isinstance(nxt, dict):
                nxt = {} if nxt is None else nxt
                if not isinstance(nxt, dict):
                    raise ConfigError(f"--set {item!r}: `{k}` is not a section")
                node[k] = nxt
            node[k] = dict(nxt)
            node = node[k]
        node[keys[-1]] = value
    return tree
