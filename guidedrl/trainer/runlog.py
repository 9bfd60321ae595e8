"""Run-folder logging: metrics.jsonl, completions.jsonl, a rich progress bar, optional
TensorBoard / W&B."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable

from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from guidedrl.core.console import console
from guidedrl.core.errors import DataError
from guidedrl.core.types import Completion
from guidedrl.trainer.checkpoint import write_text_atomic

LOGS = ("metrics.jsonl", "completions.jsonl")
"""The per-step logs of a run folder (one JSON object a line, each with its `step`)."""


def print_warning(message: str) -> None:
    """`warning: message` on the console, on one line whatever the terminal's width."""
    console.print(f"[yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)


def truncate_log(path: Path, step: int, warn: Callable[[str], None] = print_warning) -> None:
    """Keep the lines of `path` with a step <= `step` (a resume redoes the later ones).

    A last line that is not JSON is what a kill in the middle of a write leaves: it is dropped and
    `warn` says so. A bad line elsewhere is a `DataError` naming file:line. The rewrite is atomic
    (`write_text_atomic`), so a kill during it leaves the old file or the new one.
    """
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    keep: list[str] = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            if n == len(lines):
                warn(f"{path}: dropped an incomplete last line (the run was stopped while writing it)")
                break
            raise DataError(f"{path}:{n}: not a JSON line ({e}); repair or delete it, then resume") from None
        if row.get("step", -1) <= step:
            keep.append(line)
    write_text_atomic(path, "".join(k + "\n" for k in keep))


def _clean(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class RunLogger:
    """Appends one JSON line per step; drives the progress bar and optional external loggers."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, *, progress: bool, loggers: list[str], config: dict[str, Any]) -> None:
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        self.completions_path = run_dir / "completions.jsonl"
        self._progress: Progress | None = None
        self._task = None
        if progress:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                console=console, transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task(run_dir.name, total=total_steps, completed=start_step, info="")
        self._tb = None
        self._wandb = None
        if "tensorboard" in loggers:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tb"))
        if "wandb" in loggers:
            import wandb

            self._wandb = wandb.init(project="guidedrl", name=run_dir.name, config=config, dir=str(run_dir))

    def truncate_after(self, step: int) -> None:
        """On resume: drop log lines of steps after the checkpoint (they will be redone); `truncate_log`."""
        for path in (self.metrics_path, self.completions_path):
            truncate_log(path, step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        row = {"step": step} | {k: _clean(v) for k, v in sorted(metrics.items())}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)
        if self._progress is not None and self._task is not None:
            r = metrics.get("reward/mean")
            info = f"reward {r:.3f}" if r is not None else ""
            self._progress.update(self._task, completed=step + 1, info=info)

    def log_completions(self, step: int, completions: list[Completion], n: int) -> None:
        if n <= 0:
            return
        with self.completions_path.open("a") as f:
            for c in completions[:n]:
                f.write(json.dumps({
                    "step": step, "sample": c.sample.id, "origin": c.origin, "reward": c.reward,
                    "finish": c.finish_reason, "text": c.text,
                }) + "\n")

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


class NullLogger:
    """What processes other than 0 log under torchrun: nothing (process 0 logs the averaged metrics)."""

    def truncate_after(self, step: int) -> None:
        pass

    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def log_completions(self, step: int, completions: list[Completion], n: int) -> None:
        pass

    def close(self) -> None:
        pass
