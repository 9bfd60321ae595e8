"""`guidedrl eval`: find the model of a run folder, load the run's config, evaluate, print, save."""

from __future__ import annotations

import argparse
from pathlib import Path

from guidedrl.core.config import load_config
from guidedrl.core.console import console
from guidedrl.core.errors import ConfigError, ModelError
from guidedrl.eval.evaluate import evaluate_model
from guidedrl.trainer.checkpoint import latest_model_dir


def run_folder(path: str) -> Path | None:
    """`path` as a run folder (a folder holding config.yaml), else None."""
    p = Path(path).expanduser()
    return p if p.is_dir() and (p / "config.yaml").exists() else None


def find_run_model(path: str) -> tuple[str, Path | None]:
    """-> (model location, run folder or None). A run folder (it holds config.yaml) resolves to its
    `final/` folder when present, else to the `model/` folder of its latest complete checkpoint
    (`guidedrl.trainer.checkpoint.latest_model_dir`). Anything else is returned as given."""
    p = run_folder(path)
    if p is None:
        return path, None
    model = p / "final" if (p / "final").is_dir() else latest_model_dir(p)
    if model is None or not model.is_dir():
        raise ModelError(f"--model {path}: a run folder without a saved model (no final/ and no complete "
                         "checkpoint under checkpoints/); was the run saved?")
    return str(model.resolve()), p


def evaluate_cli(a: argparse.Namespace) -> int:
    """`guidedrl eval`: resolve the config (the run's config.yaml for a run folder), evaluate, print, save."""
    try:
        ks = [int(k) for k in str(a.k).split(",") if k.strip()]
    except ValueError:
        raise ConfigError(f"--k {a.k!r}: expected comma-separated integers, e.g. 1,8,64") from None
    run = run_folder(a.model)
    cfg = load_config(str(run / "config.yaml") if run is not None else None, a.set)
    out = Path(a.out) if a.out else (run / "eval" if run is not None else Path("eval"))
    location, _ = find_run_model(a.model)
    result = evaluate_model(cfg, location, label=a.model, ks=ks, n=a.n, guided=a.guidance, out=out, task=a.task,
                            limit=a.limit, seed=a.seed)
    console.print(result.table())
    console.print(f"wrote {out / 'eval.json'} and {out / 'eval.md'}")
    return 0
