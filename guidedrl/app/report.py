"""Run folders -> plots (PNG) and one self-contained report (HTML with embedded images, and Markdown).

Reads only what a run wrote: `metrics.jsonl` (one JSON object per logged row; not every key on
every row: eval keys appear on eval rows, logged at step -1 before training), `eval_before.json`,
`eval_after.json` and `config.yaml`. So `guidedrl report RUN_DIR...` can regenerate everything
after the fact. Plots use matplotlib's Agg canvas (no display needed); a plot whose metrics are
absent from every run is skipped with a note in the report. Several run folders are reported as a
comparison (see `guidedrl.app.compare.write_comparison`); folders named `<recipe>-s<seed>` are grouped
as seeds of one recipe.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from guidedrl.core.errors import DataError
from guidedrl.core.tables import fmt, md_table
from guidedrl.eval.results import EvalResult

Rows = list[dict[str, Any]]
LEVEL_KEY = re.compile(r"^eval/L(-?\d+)/pass@1$")


# ----------------------------------------------------------------------------- metrics


def read_metrics(run_dir: Path) -> Rows:
    """The rows of run_dir/metrics.jsonl, in file order. A bad line raises DataError naming file:line."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise DataError(f"{path}: no metrics.jsonl (is {run_dir} a run folder?)")
    rows = []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: invalid JSON: {e.msg}") from None
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise DataError(f"{path}:{i}: expected a JSON object with an integer `step`")
        rows.append(row)
    return rows


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def series(rows: Rows, key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key`, sorted by step; non-finite / null values skipped; a step logged twice
    (e.g. after a resume) keeps its last value."""
    by_step = {r["step"]: float(r[key]) for r in rows if _finite(r.get(key))}
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def keys_of(rows: Rows) -> set[str]:
    return {k for r in rows for k in r if k != "step"}


def summarize_run(rows: Rows) -> dict[str, float]:
    """One run's totals and final values.

    `steps`: training rows; `time/train`: sum of `time/step` (seconds, evaluation excluded);
    `perf/tokens_generated`: sum over steps; `guide/guided_share`: mean over steps; `reward/last`: the
    last `reward/mean`; every `eval/...` key: its value at the last step it was logged, and as
    `before/eval/...` its value before training (step -1) when it was logged then.
    """
    train = [r for r in rows if r["step"] >= 0 and "reward/mean" in r]
    out: dict[str, float] = {"steps": float(len({r["step"] for r in train}))}
    for key, how in (("time/step", "sum"), ("perf/tokens_generated", "sum"), ("guide/guided_share", "mean")):
        vals = series(train, key)[1]
        if vals:
            out["time/train" if key == "time/step" else key] = float(np.sum(vals) if how == "sum" else np.mean(vals))
    reward = series(train, "reward/mean")[1]
    if reward:
        out["reward/last"] = reward[-1]
    for key in sorted((k for k in keys_of(rows) if k.startswith("eval/")), key=lambda k: ("/L" in k, k)):
        steps, vals = series(rows, key)
        if vals:
            out[key] = vals[-1]
            if steps[0] < 0:  # logged before training too: keep that value for before/after tables
                out[f"before/{key}"] = vals[0]
    return out


# ----------------------------------------------------------------------------- plots


def _level_keys(keys: set[str]) -> list[str]:
    levels = sorted((int(m.group(1)), k) for k in keys if (m := LEVEL_KEY.match(k)))
    return (["eval/pass@1"] if "eval/pass@1" in keys else []) + [k for _, k in levels]


@dataclass(frozen=True)
class PlotSpec:
    """One figure: its file stem, title, y label, and which metric keys it draws."""

    name: str
    title: str
    ylabel: str
    keys: Callable[[set[str]], list[str]]
    wants: str
    """What it needs, for the skip note."""


def _single(key: str) -> Callable[[set[str]], list[str]]:
    return lambda keys: [key] if key in keys else []


PLOTS: list[PlotSpec] = [
    PlotSpec("reward", "Reward vs step", "mean reward", _single("reward/mean"), "reward/mean"),
    PlotSpec("pass1_by_level", "pass@1 vs step, per level", "pass@1", _level_keys, "eval/pass@1, eval/L<level>/pass@1"),
    PlotSpec("solved", "Solved-set growth", "share of training problems solved", _single("guide/solved_share"),
             "guide/solved_share"),
    PlotSpec("entropy", "Policy entropy", "entropy (nats/token)", _single("policy/entropy"), "policy/entropy"),
    PlotSpec("length", "Response length", "mean tokens", _single("policy/len_mean"), "policy/len_mean"),
]


def _label(key: str) -> str:
    if key == "eval/pass@1":
        return "all"
    m = LEVEL_KEY.match(key)
    return f"L{m.group(1)}" if m else key


def _figure(ncols: int = 1, nrows: int = 1) -> tuple[Any, Any]:
    """A Figure on matplotlib's Agg canvas (no pyplot global state, no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * ncols + 1.0, 3.2 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, squeeze=False)


def _style(ax: Any, title: str, ylabel: str) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step (-1 = before training)" if "pass@1" in ylabel else "step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers


def plot_run(rows: Rows, out_dir: Path, title: str = "") -> tuple[list[Path], list[str]]:
    """One PNG per plot in PLOTS whose keys exist in `rows`; -> (written paths, skip notes)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    present = keys_of(rows)
    paths, notes = [], []
    for spec in PLOTS:
        keys = spec.keys(present)
        if not keys:
            notes.append(f"{spec.title}: skipped (no {spec.wants} in metrics.jsonl)")
            continue
        fig, axes = _figure()
        ax = axes[0, 0]
        for key in keys:
            x, y = series(rows, key)
            ax.plot(x, y, marker="o" if len(x) < 12 else None, ms=3, label=_label(key))
        _style(ax, f"{title}: {spec.title}" if title else spec.title, spec.ylabel)
        if len(keys) > 1:
            ax.legend(fontsize=8)
        path = out_dir / f"{spec.name}.png"
        fig.savefig(path, dpi=100)
        paths.append(path)
    return paths, notes


def seed_band(runs: list[Rows], key: str) -> tuple[list[int], np.ndarray, np.ndarray, np.ndarray]:
    """(steps, mean, min, max) of `key` over seeds, at every step any seed logged it."""
    per_step: dict[int, list[float]] = {}
    for rows in runs:
        for s, v in zip(*series(rows, key), strict=True):
            per_step.setdefault(s, []).append(v)
    steps = sorted(per_step)
    vals = [np.array(per_step[s]) for s in steps]
    mean, lo, hi = (np.array([f(v) for v in vals]) for f in (np.mean, np.min, np.max))
    return steps, mean, lo, hi


def plot_compare(groups: dict[str, list[Rows]], out_dir: Path) -> tuple[list[Path], list[str]]:
    """Recipes head to head: one PNG per plot in PLOTS, one line per recipe (mean over seeds, with a
    min-max band when there are several seeds), one panel per key (e.g. per level)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    present = set().union(*(keys_of(r) for runs in groups.values() for r in runs))
    paths, notes = [], []
    for spec in PLOTS:
        keys = spec.keys(present)
        if not keys:
            notes.append(f"{spec.title}: skipped (no {spec.wants} in any run's metrics.jsonl)")
            continue
        ncols = min(3, len(keys))
        fig, axes = _figure(ncols, math.ceil(len(keys) / ncols))
        for i, ax in enumerate(axes.flat):
            if i >= len(keys):
                ax.set_visible(False)
                continue
            for j, (label, runs) in enumerate(groups.items()):
                steps, mean, lo, hi = seed_band(runs, keys[i])
                if not steps:
                    continue
                ax.plot(steps, mean, color=f"C{j}", label=label, marker="o" if len(steps) < 12 else None, ms=3)
                if len(runs) > 1:
                    ax.fill_between(steps, lo, hi, color=f"C{j}", alpha=0.2, linewidth=0)
            name = spec.title if len(keys) == 1 else f"{spec.title}: {_label(keys[i])}"
            _style(ax, name, spec.ylabel)
            ax.legend(fontsize=8)
        path = out_dir / f"{spec.name}.png"
        fig.savefig(path, dpi=100)
        paths.append(path)
    return paths, notes


# ----------------------------------------------------------------------------- documents


@dataclass
class TableData:
    headers: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Section:
    """A report section: paragraphs, tables, images (PNG paths) and an optional preformatted block."""

    title: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[TableData] = field(default_factory=list)
    images: list[Path] = field(default_factory=list)
    pre: str | None = None


CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { border-bottom: 2px solid #444; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #bbb; padding: 3px 8px; text-align: right; }
th { background: #eee; } td:first-child, th:first-child { text-align: left; }
caption { caption-side: top; text-align: left; font-weight: bold; padding: 4px 0; }
figure { display: inline-block; margin: 0.5em; } img { max-width: 100%; border: 1px solid #ddd; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
"""


def _html_table(t: TableData) -> str:
    e = html.escape
    cap = f"<caption>{e(t.caption)}</caption>" if t.caption else ""
    head = "".join(f"<th>{e(h)}</th>" for h in t.headers)
    body = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in row) + "</tr>" for row in t.rows)
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html_image(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    name = html.escape(path.stem)
    return f'<figure><img alt="{name}" src="data:image/png;base64,{data}"><figcaption>{name}</figcaption></figure>'


def write_html(out: Path, title: str, sections: list[Section]) -> Path:
    """One self-contained HTML file (inline CSS, images embedded as base64, no scripts)."""
    e = html.escape
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}</title>",
             f"<style>{CSS}</style></head><body><h1>{e(title)}</h1>"]
    for s in sections:
        parts.append(f"<section><h2>{e(s.title)}</h2>")
        parts += [f"<p>{e(p)}</p>" for p in s.paragraphs]
        parts += [_html_table(t) for t in s.tables]
        parts += [_html_image(p) for p in s.images]
        if s.pre is not None:
            parts.append(f"<pre>{e(s.pre)}</pre>")
        parts.append("</section>")
    parts.append("</body></html>\n")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts), encoding="utf-8")
    return out


def write_markdown(out: Path, title: str, sections: list[Section]) -> Path:
    """The same sections as Markdown; images are linked relative to `out`."""
    lines = [f"# {title}", ""]
    for s in sections:
        lines += [f"## {s.title}", ""]
        lines += [p + "\n" for p in s.paragraphs]
        for t in s.tables:
            lines += ([f"**{t.caption}**", ""] if t.caption else []) + [md_table(t.headers, t.rows)]
        for p in s.images:
            rel = p.relative_to(out.parent) if p.is_relative_to(out.parent) else p
            lines += [f"![{p.stem}]({rel.as_posix()})", ""]
        if s.pre is not None:
            lines += ["```", s.pre.rstrip("\n"), "```", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines), encoding="utf-8")
    return out


# ----------------------------------------------------------------------------- run reports


def eval_sections(run_dir: Path) -> list[Section]:
    """Tables from eval_before.json / eval_after.json, when the run wrote them."""

    out = []
    for name, label in (("eval_before.json", "Evaluation before training"),
                        ("eval_after.json", "Evaluation after training")):
        path = run_dir / name
        if not path.exists():
            continue
        try:
            res = EvalResult.from_json(json.loads(path.read_text()))
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataError(f"{path}: not an evaluation result ({type(e).__name__}: {e})") from None
        rows = [[lab, str(g.count), *(fmt(g.metrics[c]) for c in res.columns())] for lab, g in res.rows()]
        out.append(Section(label, [res.title()], [TableData(["level", "problems", *res.columns()], rows)]))
    return out


def run_sections(run_dir: Path, plots_dir: Path) -> list[Section]:
    """Summary, evaluation tables, plots (with skip notes) and the config of one run."""
    rows = read_metrics(run_dir)
    summ = summarize_run(rows)
    digits = {"steps": 0, "perf/tokens_generated": 0, "time/train": 1}
    table = TableData(["metric", "value"], [[k, fmt(v, digits.get(k, 3))] for k, v in summ.items()])
    sections = [Section("Summary", [f"run folder: {run_dir}"], [table])]
    sections += eval_sections(run_dir)
    paths, notes = plot_run(rows, plots_dir, title=run_dir.name)
    sections.append(Section("Plots", notes, images=paths))
    cfg = run_dir / "config.yaml"
    if cfg.exists():
        sections.append(Section("Config", pre=cfg.read_text()))
    return sections


def report_run(run_dir: Path, out: Path | None = None) -> Path:
    """`guidedrl report RUN`: regenerate one run's plots and report: out (default the run folder)/
    report.html, report.md and plots/*.png; -> the HTML path."""
    if not (Path(run_dir) / "metrics.jsonl").exists():
        raise DataError(f"{run_dir}: no metrics.jsonl (not a run folder, or the run has not logged a step yet)")
    run_dir = Path(run_dir)
    out = out or run_dir
    sections = run_sections(run_dir, out / "plots")
    write_markdown(out / "report.md", f"guidedrl run {run_dir.name}", sections)
    return write_html(out / "report.html", f"guidedrl run {run_dir.name}", sections)
