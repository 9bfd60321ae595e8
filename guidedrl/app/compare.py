"""`guidedrl compare`: recipes head to head on the same task, base model and budget.

Every (recipe, seed) trains into `out/<recipe>-s<seed>/` with the same overrides, `train.steps`
and `train.seed`; then `out/compare.md` (tables), `out/compare.json` (per-seed numbers),
`out/plots/*.png` and `out/report.html` are written. Table cells are the mean over seeds, with
± the sample standard deviation when there are several.

Resumable: a run folder holding `DONE` is not redone (but its config.yaml must match the config
it would be trained with now, else a ConfigError names the differing keys); an unfinished folder
with checkpoints resumes from them; an unfinished folder without checkpoints starts over.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from guidedrl.core.config import Config, load_config
from guidedrl.core.errors import ConfigError, DataError, UserError
from guidedrl.core.tables import fmt
from guidedrl.app.report import (
    Section, TableData, plot_compare, report_run, read_metrics, summarize_run, write_html, write_markdown,
)

RUN_NAME = re.compile(r"^(?P<recipe>.+)-s(?P<seed>\d+)$")
TrainFn = Callable[..., Path]
"""`train_fn(cfg, run_dir, *, resume: bool) -> run_dir`, writing DONE last (guidedrl.trainer.loop.run)."""
SAME_SETUP = ("model.path", "data.train", "data.eval", "rollout.max_new_tokens", "train.prompts_per_step",
              "rollout.group_size")
"""Keys that should agree across recipes for a fair comparison (a difference is reported, not fatal)."""


class CompareStopped(UserError):
    """A run stopped before finishing (e.g. Ctrl-C); rerunning the same command resumes it."""


def recipe_label(recipe: str) -> str:
    """`grpo` -> `grpo`; `path/to/my_recipe.yaml` -> `my_recipe`."""
    p = Path(recipe)
    return p.stem if p.suffix in (".yaml", ".yml") else p.name


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out |= _flat(v, f"{prefix}{k}.")
    return out


def config_differences(a: dict[str, Any], b: dict[str, Any], ignore: tuple[str, ...] = ("run.",)) -> list[str]:
    """Dotted keys whose values differ between two config trees (keys under `ignore` skipped)."""
    fa, fb = _flat(a), _flat(b)
    return sorted(k for k in fa.keys() | fb.keys() if not k.startswith(ignore) and fa.get(k) != fb.get(k))


def plan_runs(
    recipes: Sequence[str], overrides: Sequence[str], steps: int, seeds: Sequence[int], out: Path
) -> list[tuple[str, int, Config, Path]]:
    """(label, seed, config, run folder) for every recipe x seed; configs are validated up front."""
    labels = [recipe_label(r) for r in recipes]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ConfigError(f"compare: recipes {dup} given twice (or two files share a name); run folders would clash")
    if steps < 0 or not seeds:
        raise ConfigError(f"compare: need --steps >= 0 and at least one seed (got steps={steps}, seeds={list(seeds)})")
    return [
        (label, seed, load_config(recipe, [*overrides, f"train.steps={steps}", f"train.seed={seed}"]),
         out / f"{label}-s{seed}")
        for recipe, label in zip(recipes, labels, strict=True) for seed in seeds
    ]


def setup_differences(plans: list[tuple[str, int, Config, Path]]) -> list[str]:
    """Notes on SAME_SETUP keys that differ between recipes (the comparison is then not like for like)."""
    notes = []
    for key in SAME_SETUP:
        vals: dict[str, str] = {}
        for label, _, cfg, _ in plans:
            node: Any = cfg
            for part in key.split("."):
                node = getattr(node, part)
            vals[label] = json.dumps(node.model_dump(mode="json") if hasattr(node, "model_dump") else node)
        if len(set(vals.values())) > 1:
            notes.append(f"`{key}` differs between recipes: " + "; ".join(f"{k}: {v}" for k, v in vals.items()))
    return notes


def run_one(cfg: Config, run_dir: Path, train_fn: TrainFn) -> str:
    """Train one (recipe, seed) unless already done; -> `done` (skipped), `resumed` or `trained`."""
    if (run_dir / "DONE").exists():
        saved = run_dir / "config.yaml"
        if saved.exists():
            diff = config_differences(yaml.safe_load(saved.read_text()) or {}, cfg.model_dump(mode="json"))
            if diff:
                raise ConfigError(f"{run_dir} finished with a different config ({', '.join(diff[:6])} differ); "
                                  "use another --out or delete that folder")
        return "done"
    resume = any((d / "COMPLETE").exists() for d in (run_dir / "checkpoints").glob("step-*"))
    if run_dir.exists() and not resume:  # an unfinished run without checkpoints starts over
        for stale in ("metrics.jsonl", "completions.jsonl", "eval_before.json", "eval_after.json"):
            (run_dir / stale).unlink(missing_ok=True)
    train_fn(cfg, run_dir, resume=resume)
    if not (run_dir / "DONE").exists():
        raise CompareStopped(f"{run_dir} stopped before finishing; rerun the same command to resume it")
    return "resumed" if resume else "trained"


def group_runs(run_dirs: list[Path]) -> dict[str, list[Path]]:
    """Group folders named `<recipe>-s<seed>` by recipe (others stand alone), in order of appearance."""
    groups: dict[str, list[Path]] = {}
    for d in run_dirs:
        m = RUN_NAME.match(d.name)
        groups.setdefault(m.group("recipe") if m else d.name, []).append(d)
    return groups


def compare(
    recipes: Sequence[str],
    *,
    overrides: Sequence[str] = (),
    steps: int,
    seeds: Sequence[int],
    out: Path,
    train_fn: TrainFn | None = None,
) -> Path:
    """Run every recipe for every seed into `out/<recipe>-s<seed>/`, then write the comparison.

    Args:
        recipes: recipe names or YAML paths.
        overrides: `key=value` overrides applied to every recipe (same task, model, budget).
        steps, seeds: the budget (`train.steps`) and the seeds (`train.seed`).
        train_fn: the trainer, `(cfg, run_dir, *, resume) -> run_dir` (default guidedrl.trainer.loop.run).

    Returns the path of out/report.html.
    """
    from guidedrl.core.console import console

    if train_fn is None:
        from guidedrl.trainer.loop import run as train_fn
    plans = plan_runs(recipes, overrides, steps, seeds, out)
    notes = setup_differences(plans)
    for note in notes:
        console.print(f"[yellow]warning: {note}", markup=True, highlight=False)
    for label, seed, cfg, run_dir in plans:
        console.rule(f"compare: {label} seed {seed}")
        status = run_one(cfg, run_dir, train_fn)
        console.print(f"{run_dir}: {status}")
    groups: dict[str, list[Path]] = {}
    for label, _, _, run_dir in plans:
        groups.setdefault(label, []).append(run_dir)
    budget = f"budget: {steps} steps per run, seeds {list(seeds)}, overrides {list(overrides) or 'none'}."
    return write_comparison(groups, out, notes=[budget, *notes])


# ----------------------------------------------------------------------------- the comparison


def mean_pm(vals: list[float], digits: int = 3) -> str:
    """`m` for one value, `m ± sd` (sample std over seeds) for several, `-` for none.

    >>> mean_pm([0.5]), mean_pm([0.25, 0.75]), mean_pm([])
    ('0.500', '0.500 ± 0.354', '-')
    """
    if not vals:
        return "-"
    m = float(np.mean(vals))
    if len(vals) == 1:
        return fmt(m, digits)
    return f"{fmt(m, digits)} ± {fmt(float(np.std(vals, ddof=1)), digits)}"


def _eval_columns(summaries: list[dict[str, float]]) -> tuple[int | None, list[int]]:
    """(largest k with eval/pass@k, sorted levels with eval/L<lv>/pass@1) over all runs."""
    keys = {k for s in summaries for k in s}
    ks = [int(m.group(1)) for k in keys if (m := re.fullmatch(r"eval/pass@(\d+)", k))]
    levels = sorted({int(m.group(1)) for k in keys if (m := re.fullmatch(r"eval/L(-?\d+)/pass@1", k))})
    return (max(ks) if ks else None), levels


def comparison_tables(summaries: dict[str, list[dict[str, float]]]) -> list[TableData]:
    """The summary table and the per-level table (mean ± std over seeds)."""
    flat = [s for runs in summaries.values() for s in runs]
    k, levels = _eval_columns(flat)
    pk = [("eval/pass@1", "pass@1")] + ([(f"eval/pass@{k}", f"pass@{k}")] if k and k > 1 else [])

    def col(runs: list[dict[str, float]], key: str, digits: int = 3) -> str:
        return mean_pm([s[key] for s in runs if key in s], digits)

    head = ["recipe", "seeds", *(name for _, name in pk), "reward (last)", "train time (s)", "generated tokens",
            "guided share"]
    rows = [[label, str(len(runs)), *(col(runs, key) for key, _ in pk), col(runs, "reward/last"),
             col(runs, "time/train", 1), col(runs, "perf/tokens_generated", 0), col(runs, "guide/guided_share")]
            for label, runs in summaries.items()]
    tables = [TableData(head, rows, "Final results (mean ± std over seeds)")]
    if levels:
        def moved(runs: list[dict[str, float]], key: str) -> str:
            before = [s[f"before/{key}"] for s in runs if f"before/{key}" in s]
            return (f"{np.mean(before):.2f} → " if before else "") + col(runs, key, 2)

        lhead = ["recipe"] + [f"L{lv}" for lv in levels]
        lrows = [[label] + [moved(runs, f"eval/L{lv}/pass@1") for lv in levels] for label, runs in summaries.items()]
        tables.append(TableData(lhead, lrows, "Unguided pass@1 per level: before → after training (after: mean ± std over seeds)"))
        if len(pk) > 1:
            name = pk[1][1]
            khead = ["recipe"] + [f"L{lv} {name}" for lv in levels]
            krows = [[label] + [col(runs, f"eval/L{lv}/{name}", 2) for lv in levels] for label, runs in summaries.items()]
            tables.append(TableData(khead, krows, f"Final {name} per level (mean ± std over seeds)"))
    return tables


def _print_tables(tables: list[TableData]) -> None:
    from rich.table import Table

    from guidedrl.core.console import console

    for t in tables:
        rt = Table(title=t.caption)
        for h in t.headers:
            rt.add_column(h, justify="left" if h == "recipe" else "right")
        for row in t.rows:
            rt.add_row(*row)
        console.print(rt)


def write_comparison(groups: dict[str, list[Path]], out: Path, *, notes: Sequence[str] = (),
                     title: str = "guidedrl compare") -> Path:
    """Tables, plots, compare.md / compare.json and report.html for finished runs grouped by recipe."""
    metrics = {label: [read_metrics(d) for d in dirs] for label, dirs in groups.items()}
    summaries = {label: [summarize_run(rows) for rows in runs] for label, runs in metrics.items()}
    tables = comparison_tables(summaries)
    paths, skipped = plot_compare(metrics, out / "plots")
    has_eval = any(k.startswith("eval/") for runs in summaries.values() for s in runs for k in s)
    explain = ["pass@k: unbiased estimator (Chen et al. 2021) on the eval set after training; train time: "
               "sum of time/step (evaluation excluded); generated tokens: sum over steps; guided share: mean "
               "share of guided completions per step; reward (last): reward/mean of the last step."]
    if not has_eval:
        explain.append("No evaluation results in these runs (eval disabled?): pass@k columns are empty.")
    runs_table = TableData(["recipe", "run folders"], [[k, ", ".join(str(d) for d in v)] for k, v in groups.items()])
    sections = [Section("Results", [*notes, *explain], tables),
                Section("Plots", skipped, images=paths),
                Section("Runs", tables=[runs_table])]
    out.mkdir(parents=True, exist_ok=True)
    write_markdown(out / "compare.md", title, sections)
    raw = {"groups": {k: [str(d) for d in v] for k, v in groups.items()}, "summaries": summaries, "notes": list(notes)}
    (out / "compare.json").write_text(json.dumps(raw, indent=1) + "\n")
    _print_tables(tables)
    return write_html(out / "report.html", title, sections)


def report(run_dirs: list[Path], out: Path | None = None) -> Path:
    """`guidedrl report`: one run folder -> its report (`report_run`); several -> a comparison
    (default out ./report), folders named `<recipe>-s<seed>` grouped as seeds of a recipe. -> the HTML path."""
    if not run_dirs:
        raise DataError("report: no run folders given")
    for d in run_dirs:
        if not (Path(d) / "metrics.jsonl").exists():
            raise DataError(f"{d}: no metrics.jsonl (not a run folder, or the run has not logged a step yet)")
    if len(run_dirs) == 1:
        return report_run(Path(run_dirs[0]), out)
    return write_comparison(group_runs([Path(d) for d in run_dirs]), out or Path("report"))
