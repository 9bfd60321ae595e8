"""MkDocs hook: the Recipes page is generated from the recipe files' headers (method, paper, what
the recipe does, its departures), so it can never drift from them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

RECIPES = Path(__file__).resolve().parents[1] / "guidedrl" / "recipes"
MARKER = "<!-- recipes -->"


def _header(path: Path) -> tuple[str, str]:
    """(first line of the header: method and paper, the rest of the header as one paragraph)."""
    lines = [line[2:] if line.startswith("# ") else line[1:] for line in path.read_text().splitlines() if line.startswith("#")]
    return (lines[0] if lines else path.stem), " ".join(lines[1:])


def recipes_markdown() -> str:
    out = []
    for path in sorted(RECIPES.glob("*.yaml")):
        tree: dict[str, Any] = yaml.safe_load(path.read_text()) or {}
        title, body = _header(path)
        g = tree.get("guidance") or {}
        facts = [f"extends `{tree['extends']}`" if "extends" in tree else "base recipe"]
        if g.get("injection"):
            facts.append(f"guidance: `{g['injection']}` of `{g.get('source', 'reference')}`")
        out.append(f"## {path.stem}\n\n**{title}**\n\n{tree.get('description', '')} ({'; '.join(facts)})\n\n"
                   f"{body}\n\n`guidedrl train {path.stem}` · file `guidedrl/recipes/{path.name}`\n")
    return "\n".join(out)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    return markdown.replace(MARKER, recipes_markdown()) if MARKER in markdown else markdown
