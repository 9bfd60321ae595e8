"""The run folder of `guidedrl train`: one writer at a time, never two runs mixed in one folder, a
failed start that leaves nothing behind, and a resume that says what it resumes from.

    RUN_DIR/
        .lock                 # flock'ed by the process that writes the run, for the whole run
        config.yaml           # the resolved config
        metrics.jsonl         # one line per step (and step -1: evaluation before training)
        completions.jsonl     # a few completions per step
        eval_before.json, eval_after.json
        checkpoints/          # guidedrl.trainer.checkpoint
        DONE                  # written last, when the run finished

`claim` takes the folder (creating it, locking it, refusing one that holds another run), `resume_point`
picks the checkpoint to continue from and cuts the logs back to it, `RunDir.abandon` undoes a claim
whose start failed. Only process 0 under torchrun calls them.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from guidedrl.core.errors import UserError
from guidedrl.trainer.checkpoint import CHECKPOINTS, COMPLETE, Checkpoint, load_checkpoint, remove_debris, write_text_atomic
from guidedrl.trainer.runlog import LOGS, print_warning, truncate_log

LOCK = ".lock"
CONFIG = "config.yaml"
DONE = "DONE"
EVALS = ("eval_before.json", "eval_after.json")


class RunDirError(UserError):
    """A run folder that cannot be used as asked (in use, holds another run, cannot be created)."""


class Interrupted(KeyboardInterrupt):
    """SIGINT / SIGTERM stopped the run: after checkpointing the step, or at once (a second signal,
    or one during start-up). A KeyboardInterrupt, so that no `except Exception` swallows it; the
    CLI prints the message and exits with 128 + the signal's number (130 SIGINT, 143 SIGTERM)."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


@dataclass
class RunDir:
    """A claimed run folder: locked until `release`; `abandon` removes what the claim made."""

    path: Path
    config: str
    """The resolved config (YAML); written by `claim` for a new run, by `started` for a resumed one."""
    made: list[Path] = field(default_factory=list)
    """What the claim created: the topmost new folder, or files it added to a folder that existed."""
    lock: IO[str] | None = None

    def started(self) -> None:
        """Start-up is over: from here a failure keeps the folder (it holds a resumable run)."""
        self.made = []
        write_text_atomic(self.path / CONFIG, self.config)
        (self.path / DONE).unlink(missing_ok=True)  # a finished run resumed for more steps is unfinished again

    def abandon(self) -> None:
        """A failed start: remove what the claim created (nothing of a run that was there before), release."""
        for p in self.made:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        self.made = []
        self.release()

    def release(self) -> None:
        if self.lock is not None:
            self.lock.close()  # closing the file drops the flock
            self.lock = None


def claim(run_dir: Path, *, resume: bool, config: str) -> RunDir:
    """Create (if needed) and lock `run_dir` for this process.

    Refused with a `RunDirError` (exit 2): a folder another process is writing; without `resume`,
    a folder holding a finished run, or an unfinished one (its logs, evaluations or checkpoints);
    a folder that cannot be created. Stale temp files of crashed writers are removed."""
    rd = RunDir(run_dir, config)
    top = next((p for p in reversed([run_dir, *run_dir.parents]) if not p.exists()), None)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"{run_dir}: cannot create the run folder ({e.strerror or e})") from None
    rd.made = [top] if top is not None else [p for p in (run_dir / LOCK, run_dir / CONFIG) if not p.exists()]
    try:
        rd.lock = _lock(run_dir)
    except BaseException:
        if top is not None and not any(top.iterdir()):  # nobody else is using what we just made
            shutil.rmtree(top, ignore_errors=True)
        raise
    try:
        if not resume:
            _check_fresh(run_dir)
        for stale in run_dir.glob(".*.tmp-*"):  # a log or config rewrite killed midway (we hold the lock)
            stale.unlink(missing_ok=True)
        if not resume:
            write_text_atomic(run_dir / CONFIG, config)
    except BaseException:
        rd.abandon()
        raise
    return rd


def _lock(run_dir: Path) -> IO[str]:
    """An exclusive flock on RUN_DIR/.lock (dropped by the kernel when the process dies, even by SIGKILL)."""
    try:
        f = open(run_dir / LOCK, "a+")
    except OSError as e:
        raise RunDirError(f"{run_dir}: cannot create the run folder's lock file ({e.strerror or e})") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise RunDirError(f"{run_dir} is in use by another guidedrl process (pid {holder}); wait for it to end, "
                          "or use another --out") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def _check_fresh(run_dir: Path) -> None:
    """A new run may only go into a folder that holds no run's results."""
    if (run_dir / DONE).exists():
        raise RunDirError(f"{run_dir} holds a finished run; use another --out (or run.name), or --resume to continue it")
    logs = [n for n in LOGS if (run_dir / n).exists() and (run_dir / n).stat().st_size > 0]
    evals = [n for n in EVALS if (run_dir / n).exists()]
    ckpts = [d.name for d in sorted((run_dir / CHECKPOINTS).glob("step-*")) if (d / COMPLETE).exists()]
    found = logs + evals + ([f"{CHECKPOINTS}/{ckpts[-1]}"] if ckpts else [])
    if found:
        raise RunDirError(f"{run_dir} holds an unfinished run ({', '.join(found)}); use --resume or another --out "
                          f"(to continue it: guidedrl train --resume {run_dir})")


def resume_point(run_dir: Path) -> Checkpoint | None:
    """The checkpoint to resume `run_dir` from, its logs cut back to it; None = start over.

    A damaged or half-written latest checkpoint falls back to the previous complete one (a
    warning names the file). Without any checkpoint the logs of the earlier attempt are cleared
    and a line says the run starts over; the steps after the checkpoint are dropped from the logs
    (they will be redone), a torn last line with a warning."""
    remove_debris(run_dir / CHECKPOINTS)
    ckpt = load_checkpoint(run_dir, warn=print_warning)
    if ckpt is None:
        cleared = [n for n in (*LOGS, *EVALS) if (run_dir / n).exists()]
        for n in cleared:
            (run_dir / n).unlink()
        print_warning(f"{run_dir}: no checkpoint to resume from; starting over from step 0"
                      + (f" (cleared {', '.join(cleared)})" if cleared else ""))
        return None
    for n in LOGS:
        truncate_log(run_dir / n, ckpt.step - 1, warn=print_warning)
    (run_dir / EVALS[1]).unlink(missing_ok=True)  # written again when the run finishes
    return ckpt
