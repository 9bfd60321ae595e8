"""The training run: `run(cfg)` is the whole of `guidedrl train`: the run folder, evaluation
before and after, the optional SFT stage, the steps (`guidedrl.trainer.step`), checkpoints,
resume and signals."""

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
from guidedrl.trainer.build import Pieces, build
from guidedrl.trainer.checkpoint import load_checkpoint, restore, save_checkpoint
from guidedrl.trainer.evaluation import run_eval
from guidedrl.trainer.runlog import NullLogger, RunLogger
from guidedrl.trainer.sft import run_sft_stage
from guidedrl.trainer.step import StepState, TrainingError, train_step


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def default_run_dir(cfg: Config) -> Path:
    name = cfg.run.name or f"{cfg.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    return Path(cfg.run.dir) / name


class _StopFlag:
    """SIGTERM / SIGINT ask the loop to stop after the current step and checkpoint."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self.requested = True
        console.print(f"[yellow]signal {signum}: finishing the current step, then checkpointing")

    def __exit__(self, *exc: Any) -> None:
        for sig, h in self._old.items():
            signal.signal(sig, h)


def run(cfg: Config, run_dir: Path | None = None, *, resume: bool = False) -> Path:
    """Train `cfg` into `run_dir` (created; or continued from its latest checkpoint when resume).

    Under `torchrun` every process runs this; process 0 alone writes the run folder, evaluates and
    saves (see `guidedrl.core.dist` for how the update is shared)."""
    dist.init_from_env()
    if cfg.train.prompts_per_step % dist.world_size():
        raise ConfigError(f"train.prompts_per_step={cfg.train.prompts_per_step} is not a multiple of the "
                          f"{dist.world_size()} processes")
    run_dir = Path(dist.broadcast_object(str(run_dir or default_run_dir(cfg))))  # process 0's clock names it
    if (run_dir / "DONE").exists() and not resume:
        raise TrainingError(f"{run_dir} holds a finished run; pick another run.name or use --resume")
    if dist.is_main():
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(cfg))
    seed_everything(cfg.train.seed)
    p = build(cfg)
    dist.broadcast_module(p.policy.model)  # one policy on every process, whatever its init
    st = StepState()
    ckpt = load_checkpoint(run_dir) if resume else None
    if ckpt is not None:
        restore(ckpt, p.policy.model, p.optim.optimizer, p.optim.scheduler)
        st = StepState.from_json(ckpt.state["train"])
        p.selector.load_state_dict(ckpt.state["selector"])
        if p.guide is not None:
            p.guide.load_state_dict(ckpt.state.get("guide", {}))
    log: RunLogger | NullLogger = NullLogger()
    if dist.is_main():
        log = RunLogger(run_dir, cfg.train.steps, st.step, progress=cfg.run.progress, loggers=cfg.run.loggers,
                        config=cfg.model_dump(mode="json"))
    if ckpt is not None:
        log.truncate_after(st.step - 1)

    def save() -> None:
        if not dist.is_main():
            return
        state = {"train": st.to_json(), "selector": p.selector.state_dict(),
                 "guide": p.guide.state_dict() if p.guide is not None else {}}
        save_checkpoint(run_dir, st.step, model=p.policy.model, optimizer=p.optim.optimizer,
                        scheduler=p.optim.scheduler, state=state, keep_last=cfg.run.keep_last,
                        tokenizer=p.policy.renderer.tokenizer)

    try:
        if not _train_loop(p, st, log, save, run_dir):
            return run_dir
    finally:
        log.close()
    if dist.is_main():
        (run_dir / "DONE").write_text(json.dumps({"steps": st.step, "finished": datetime.now().isoformat()}) + "\n")
    return run_dir


def _train_loop(p: Pieces, st: StepState, log: RunLogger | NullLogger, save: Callable[[], None], run_dir: Path) -> bool:
    """Evaluate, (SFT stage,) train, checkpoint, evaluate. -> False when a signal stopped it early."""
    cfg = p.cfg
    evaluate = cfg.eval.enabled and bool(p.eval_samples) and dist.is_main()
    with _StopFlag() as stop:
        if st.step == 0 and evaluate:
            log.log(-1, run_eval(p, run_dir / "eval_before.json"))
        if st.step == 0 and cfg.guidance is not None and cfg.guidance.sft_stage is not None:
            log.log(-1, run_sft_stage(p, cfg.guidance.sft_stage))
            dist.broadcast_module(p.policy.model)  # every process ran the same SFT; keep them bitwise equal
        while st.step < cfg.train.steps:
            metrics, flat = train_step(p, st)
            log.log(st.step, dist.mean_metrics(metrics))
            log.log_completions(st.step, flat, cfg.run.log_completions)
            st.step += 1
            if evaluate and cfg.eval.every and st.step % cfg.eval.every == 0 and st.step < cfg.train.steps:
                log.log(st.step - 1, run_eval(p, None))
            stopping = dist.any_true(stop.requested)  # a signal to one process stops them all at this step
            if (cfg.run.save_every and st.step % cfg.run.save_every == 0) or stopping:
                save()
            if stopping:
                console.print(f"[yellow]stopped at step {st.step}; resume with: guidedrl train --resume {run_dir}")
                return False
        save()
        if evaluate:
            log.log(st.step - 1, run_eval(p, run_dir / "eval_after.json"))
    return True
