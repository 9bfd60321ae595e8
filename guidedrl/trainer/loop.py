"""The training run: `run(cfg)` is the whole of `guidedrl train`: the run folder (locked,
`guidedrl.trainer.rundir`), evaluation before and after, the optional SFT stage, the steps
(`guidedrl.trainer.step`), checkpoints, resume and signals."""

from __future__ import annotations

import json
import random
import signal
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from guidedrl.core import dist
from guidedrl.core.config import Config, dump_config
from guidedrl.core.console import console
from guidedrl.core.errors import ConfigError
from guidedrl.trainer import rundir
from guidedrl.trainer.build import Pieces, build
from guidedrl.trainer.checkpoint import read_checkpoint, restore, save_checkpoint
from guidedrl.trainer.evaluation import run_eval
from guidedrl.trainer.runlog import NullLogger, RunLogger, print_warning
from guidedrl.trainer.sft import run_sft_stage
from guidedrl.trainer.step import StepState, train_step
from guidedrl.trainer.update import NonFiniteError


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_run_dir(cfg: Config) -> Path:
    name = cfg.run.name or f"{cfg.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    return Path(cfg.run.dir) / name


class _StopFlag:
    """SIGTERM / SIGINT ask the loop to stop after the current step and checkpoint; a second one
    stops at once, and so does any during start-up (`at_once`: nothing to checkpoint yet).
    Stopping at once raises `rundir.Interrupted` (the CLI exits 128 + the signal's number)."""

    def __init__(self, *, at_once: bool = False) -> None:
        self.signum = 0
        """The signal that asked to stop (0 = none)."""
        self.at_once = at_once
        self._old: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum != 0

    def __enter__(self) -> "_StopFlag":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.at_once:
            raise rundir.Interrupted(signum, f"{name} during start-up: stopped, nothing was trained")
        if self.requested:
            raise rundir.Interrupted(signum, f"second signal ({name}): stopped at once, without checkpointing this "
                                             "step; the last checkpoint is kept (continue it with --resume)")
        self.signum = signum
        console.print(f"[yellow]{name}: finishing the current step, then checkpointing (again to stop at once)")

    def __exit__(self, *exc: Any) -> None:
        for sig, h in self._old.items():
            signal.signal(sig, h)


def run(cfg: Config, run_dir: Path | None = None, *, resume: bool = False) -> Path:
    """Train `cfg` into `run_dir` (created; or continued from its latest checkpoint when resume).

    The folder is locked for the run and must not hold another run unless resuming
    (`guidedrl.trainer.rundir`); a failed start removes what it created. A SIGINT / SIGTERM stops
    the run after checkpointing its step and raises `rundir.Interrupted`.

    Under `torchrun` every process runs this; process 0 alone writes the run folder, evaluates and
    saves (see `guidedrl.core.dist` for how the update is shared)."""
    dist.init_from_env()
    if cfg.train.prompts_per_step % dist.world_size():
        raise ConfigError(f"train.prompts_per_step={cfg.train.prompts_per_step} is not a multiple of the "
                          f"{dist.world_size()} processes")
    run_dir = Path(dist.broadcast_object(str(run_dir or default_run_dir(cfg))))  # process 0's clock names it
    folder = rundir.claim(run_dir, resume=resume, config=dump_config(cfg)) if dist.is_main() else None
    try:  # start-up: a failure or a signal (which stops at once) removes what the claim made
        with _StopFlag(at_once=True):
            p, st, log = _start(cfg, run_dir, folder, resume=resume)
    except BaseException:
        if folder is not None:
            folder.abandon()
        raise

    def save() -> None:
        if not dist.is_main():
            return
        state = {"train": st.to_json(), "selector": p.selector.state_dict(),
                 "guide": p.guide.state_dict() if p.guide is not None else {}}
        save_checkpoint(run_dir, st.step, model=p.policy.model, optimizer=p.optim.optimizer,
                        scheduler=p.optim.scheduler, state=state, keep_last=cfg.run.keep_last,
                        tokenizer=p.policy.renderer.tokenizer)

    try:
        stopped_by = _train_loop(p, st, log, save, run_dir)
        if not stopped_by and dist.is_main():
            done = {"steps": st.step, "finished": datetime.now().isoformat()}
            (run_dir / rundir.DONE).write_text(json.dumps(done) + "\n")
    finally:
        log.close()
        if folder is not None:
            folder.release()
    if stopped_by:
        raise rundir.Interrupted(stopped_by, f"{signal.Signals(stopped_by).name}: stopped at step {st.step}, checkpoint "
                                             f"saved; resume with: guidedrl train --resume {run_dir}")
    return run_dir


def _start(cfg: Config, run_dir: Path, folder: rundir.RunDir | None, *, resume: bool
           ) -> tuple[Pieces, StepState, RunLogger | NullLogger]:
    """Build the pieces; with `resume`, restore the checkpoint process 0 picks (`rundir.resume_point`,
    which also cuts the logs back to it) on every process. `folder`: process 0's claimed run folder."""
    seed_everything(cfg.train.seed)
    p = build(cfg)
    dist.broadcast_module(p.policy.model)  # one policy on every process, whatever its init
    st = StepState()
    ckpt = None
    if resume:
        ckpt = rundir.resume_point(run_dir) if folder is not None else None
        where = dist.broadcast_object(str(ckpt.path) if ckpt is not None else "")
        ckpt = ckpt or (read_checkpoint(Path(where)) if where else None)
    if ckpt is not None:
        restore(ckpt, p.policy.model, p.optim.optimizer, p.optim.scheduler)
        st = StepState.from_json(ckpt.state["train"])
        p.selector.load_state_dict(ckpt.state["selector"])
        if p.guide is not None:
            p.guide.load_state_dict(ckpt.state.get("guide", {}))
    log: RunLogger | NullLogger = NullLogger()
    if folder is not None:
        log = RunLogger(run_dir, cfg.train.steps, st.step, progress=cfg.run.progress, loggers=cfg.run.loggers,
                        config=cfg.model_dump(mode="json"))
        folder.started()
    return p, st, log


def _train_loop(p: Pieces, st: StepState, log: RunLogger | NullLogger, save: Callable[[], None], run_dir: Path) -> int:
    """Evaluate, (SFT stage,) train, checkpoint, evaluate. -> 0, or the signal that stopped it early
    (after checkpointing)."""
    cfg = p.cfg
    evaluate = cfg.eval.enabled and bool(p.eval_samples) and dist.is_main()
    with _StopFlag() as stop:
        if st.step == 0 and evaluate:
            log.log(-1, run_eval(p, run_dir / "eval_before.json"))
        if st.step == 0 and cfg.guidance is not None and cfg.guidance.sft_stage is not None:
            log.log(-1, run_sft_stage(p, cfg.guidance.sft_stage))
            dist.broadcast_module(p.policy.model)  # every process ran the same SFT; keep them bitwise equal
        while st.step < cfg.train.steps:
            try:
                metrics, flat = train_step(p, st)
            except NonFiniteError:  # each non-finite update was skipped: the weights are finite, keep them
                save()
                print_warning(f"saved the last finite weights as the checkpoint of step {st.step}; after a fix, "
                              f"continue with: guidedrl train --resume {run_dir}")
                raise
            log.log(st.step, dist.mean_metrics(metrics))
            log.log_completions(st.step, flat, cfg.run.log_completions)
            st.step += 1
            if evaluate and cfg.eval.every and st.step % cfg.eval.every == 0 and st.step < cfg.train.steps:
                log.log(st.step - 1, run_eval(p, None))
            stopping = dist.any_true(stop.requested)  # a signal to one process stops them all at this step
            if (cfg.run.save_every and st.step % cfg.run.save_every == 0) or stopping:
                save()
            if stopping:
                return stop.signum or signal.SIGTERM  # (another process got the signal: stop as for SIGTERM)
        save()
        if evaluate:
            log.log(st.step - 1, run_eval(p, run_dir / "eval_after.json"))
    return 0
