"""The training loop: select -> sample (+ guidance) -> reward -> advantages -> update -> log.

`run(cfg)` is the whole of `guidedrl train`. The loop never looks at the recipe's name: the
config chose the functions, and every Completion carries its own routing.
"""

from __future__ import annotations

import json
import random
import signal
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from guidedrl import algo
from guidedrl.core import dist
from guidedrl.algo.reward_shaping import groups_with_signal, overlong_penalty
from guidedrl.trainer.batch import collate
from guidedrl.core.config import Config, dump_config
from guidedrl.core.errors import ConfigError, UserError
from guidedrl.rollout.collect import Guide, RolloutContext, collect
from guidedrl.core.console import console
from guidedrl.trainer import rundir
from guidedrl.trainer.runlog import NullLogger, RunLogger, print_warning
from guidedrl.trainer.build import Parts, build_parts
from guidedrl.core.types import CORRECT, AdvantageInputs, Batch, Completion
from guidedrl.trainer.update import NonFiniteError, optimizer_step, recompute_old, reference_logprobs, sorted_forward

class TrainingError(UserError):
    """A run that cannot go on for a reason the user can act on (e.g. dynamic sampling starved)."""


@dataclass
class StepState:
    """What persists across steps (and into checkpoints) besides model and optimizer."""

    step: int = 0
    solved: set[str] = field(default_factory=set)
    nonfinite_in_row: int = 0
    generated_tokens: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "solved": sorted(self.solved), "nonfinite_in_row": self.nonfinite_in_row,
                "generated_tokens": self.generated_tokens}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "StepState":
        return cls(d["step"], set(d["solved"]), d["nonfinite_in_row"], d.get("generated_tokens", 0))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def sample_groups(parts: Parts, st: StepState) -> tuple[list[list[Completion]], dict[str, float]]:
    """One step's groups; with dynamic sampling, keep only groups with reward signal (DAPO)."""
    cfg, ds = parts.cfg, parts.cfg.algo.dynamic_sampling
    n = cfg.train.prompts_per_step // dist.world_size()  # this process's share (all draw the same prompts)
    seed = cfg.train.seed * 1_000_003 + st.step * 101 + dist.rank() * 7_919
    groups = collect(_my_share(parts.selector.next(n * dist.world_size())), parts.ctx, parts.guide, seed=seed)
    _shape_rewards(parts, groups)
    if not ds.enabled:
        return groups, {}
    kept = [g for g in groups if groups_with_signal(*_rewards_and_ids(g)).all()]
    rounds = 1
    while len(kept) < n and rounds < ds.max_batches:
        more = collect(_my_share(parts.selector.next(n * dist.world_size())), parts.ctx, parts.guide, seed=seed + rounds,
                       group_offset=rounds * 100_000)
        _shape_rewards(parts, more)
        kept += [g for g in more if groups_with_signal(*_rewards_and_ids(g)).all()]
        rounds += 1
    if len(kept) < n and (ds.on_short == "error" or not kept):
        raise TrainingError(
            f"step {st.step}: dynamic sampling kept {len(kept)}/{n} groups with reward signal after "
            f"{rounds} rounds (algo.dynamic_sampling.max_batches={ds.max_batches}). Raise max_batches, set "
            "algo.dynamic_sampling.on_short=partial, or use easier data."
        )
    return kept[:n], {"sampling/rounds": float(rounds), "sampling/kept_groups": float(min(len(kept), n))}


def _my_share(items: list[Any]) -> list[Any]:
    """This process's contiguous slice of a list every process drew alike (all of it with one process)."""
    per = len(items) // dist.world_size()
    return items[dist.rank() * per : (dist.rank() + 1) * per]


def _rewards_and_ids(group: list[Completion]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.tensor([c.reward for c in group]), torch.zeros(len(group), dtype=torch.long)


def _shape_rewards(parts: Parts, groups: list[list[Completion]]) -> None:
    """Reward transforms that depend on the completion, not the task (DAPO's overlong penalty)."""
    ol = parts.cfg.reward.overlong
    if ol is None:
        return
    flat = [c for g in groups for c in g]
    lengths = torch.tensor([len(c.ids) for c in flat], dtype=torch.float32)
    pen = overlong_penalty(lengths, parts.cfg.rollout.max_new_tokens, ol.cache_len, ol.factor)
    for c, p in zip(flat, pen.tolist(), strict=True):
        c.reward_info["reward/overlong"] = p
        c.reward += p


def compute_advantages(parts: Parts, batch: Batch) -> None:
    """Fill batch.advantages (and returns / old values for a critic)."""
    a = parts.cfg.algo
    token_rewards = None
    if parts.value_head is not None:
        recompute_values(parts, batch)
    if a.kl.coef and a.kl.in_reward:
        assert batch.ref_logprobs is not None
        token_rewards = -a.kl.coef * algo.kl.kl_estimate(batch.old_logprobs, batch.ref_logprobs, a.kl.estimator) * batch.mask
    fn = algo.get(algo.ADVANTAGES, a.advantage.name, "algo.advantage.name")
    out = fn(AdvantageInputs(rewards=batch.rewards, group_ids=batch.group_ids, mask=batch.mask,
                             onpolicy=batch.onpolicy_rows, values=batch.old_values, token_rewards=token_rewards), a.advantage)
    batch.advantages = out.advantages
    batch.returns = out.returns


@torch.no_grad()
def recompute_values(parts: Parts, batch: Batch) -> None:
    from guidedrl.nn.logprobs import policy_outputs

    vals, = sorted_forward(batch, parts.cfg.train.micro_batch_size, lambda mb: [
        policy_outputs(parts.model, mb, value_head=parts.value_head, cascade=parts.objective.cascade).values])
    assert vals is not None
    batch.old_values = vals * batch.response_mask


def update(parts: Parts, batch: Batch, st: StepState) -> dict[str, float]:
    """Epochs x minibatches optimizer steps over the batch; guards against non-finite updates."""
    a, t = parts.cfg.algo, parts.cfg.train
    if a.epochs > 1 or a.minibatches > 1 or "vocab_mean" in parts.objective.needs:
        recompute_old(parts.model, batch, parts.objective, t.micro_batch_size)
    elif bool(batch.recompute_rows.any()):
        recompute_old(parts.model, batch, parts.objective, t.micro_batch_size, rows_only=True)
    metrics: dict[str, float] = {}
    steps = 0
    for _ in range(a.epochs):
        order = torch.randperm(len(batch)).tolist() if a.minibatches > 1 else list(range(len(batch)))
        size = len(batch) // a.minibatches
        for m in range(a.minibatches):
            mb = batch.select(order[m * size : (m + 1) * size])
            got, ok = optimizer_step(parts.model, parts.params, parts.optimizer, parts.scheduler, parts.objective, mb,
                                     micro_batch_size=t.micro_batch_size, grad_clip=t.grad_clip, value_head=parts.value_head,
                                     micro_batch_tokens=t.micro_batch_tokens)
            if not ok:
                st.nonfinite_in_row += 1
                ids = sorted({c for c in parts.last_ids})
                console.print(f"[yellow]step {st.step}: non-finite loss/gradient, update skipped (samples: {ids[:8]})")
                if st.nonfinite_in_row >= t.max_nonfinite:
                    raise NonFiniteError(f"{st.nonfinite_in_row} non-finite updates in a row at step {st.step} "
                                         f"(samples {ids[:8]}); lower train.lr or check rewards")
                return got
            st.nonfinite_in_row = 0
            steps += 1
            for k, v in got.items():
                metrics[k] = metrics.get(k, 0.0) + v / (a.epochs * a.minibatches)
    return metrics


def step_metrics(groups: list[list[Completion]], st: StepState, n_train: int) -> dict[str, float]:
    flat = [c for g in groups for c in g]
    r = torch.tensor([c.reward for c in flat])
    lens = torch.tensor([float(len(c.ids)) for c in flat])
    guided = [c for c in flat if c.source != "policy"]
    plain = [c for c in flat if c.source == "policy"]
    for c in plain:
        if c.reward >= CORRECT:
            st.solved.add(c.sample.id)
    m = {
        "reward/mean": float(r.mean()), "reward/std": float(r.std()) if len(r) > 1 else 0.0,
        "len/mean": float(lens.mean()), "len/max": float(lens.max()),
        "len/truncated": float(np.mean([c.finish_reason == "length" for c in flat])),
        "guide/guided_share": len(guided) / len(flat),
        "guide/guided_token_share": float(sum(len(c.ids) for c in guided) / max(1.0, float(lens.sum()))),
        "guide/solved_share": len(st.solved) / max(1, n_train),
        "reward/unguided": float(np.mean([c.reward for c in plain])) if plain else float("nan"),
        "reward/guided": float(np.mean([c.reward for c in guided])) if guided else float("nan"),
    }
    for k in {k for c in flat for k in c.reward_info if k.startswith("reward/")}:
        vals = [float(c.reward_info[k]) for c in flat if isinstance(c.reward_info.get(k), (int, float))]
        if vals:
            m[k] = float(np.mean(vals))
    return m


def train_step(parts: Parts, st: StepState) -> tuple[dict[str, float], list[Completion]]:
    t0 = time.perf_counter()
    parts.reward_timer.reset()
    parts.ctx.step = st.step
    parts.ctx.rng = random.Random(parts.cfg.train.seed * 7_919 + st.step)  # exact on resume
    groups, extra = sample_groups(parts, st)
    flat = [c for g in groups for c in g]
    parts.last_ids = [c.sample.id for c in flat]
    t1 = time.perf_counter()
    batch = collate(flat, parts.tokenizer.pad_token_id, parts.cfg.algo.mask_truncated).to(parts.engine.device)
    if parts.ref is not None:
        batch.ref_logprobs = reference_logprobs(parts.ref, batch, parts.cfg.rollout.temperature,
                                                parts.cfg.train.micro_batch_size, parts.objective.cascade)
    compute_advantages(parts, batch)
    metrics = update(parts, batch, st)
    t2 = time.perf_counter()
    gen_tokens = sum(len(c.ids) for c in flat)
    st.generated_tokens += gen_tokens
    metrics |= step_metrics(groups, st, len(parts.selector.samples)) | extra
    if parts.guide is not None:
        metrics |= parts.guide.metrics()
    metrics |= {
        "time/generate": t1 - t0 - parts.reward_timer.seconds, "time/reward": parts.reward_timer.seconds,
        "time/update": t2 - t1, "time/step": t2 - t0, "tokens/generated": float(gen_tokens),
        "tokens/total": float(st.generated_tokens), "tokens_per_s": gen_tokens / max(1e-9, t1 - t0),
    }
    return metrics, flat


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
    from guidedrl.trainer.checkpoint import save_checkpoint

    dist.init_from_env()
    if cfg.train.prompts_per_step % dist.world_size():
        raise ConfigError(f"train.prompts_per_step={cfg.train.prompts_per_step} is not a multiple of the "
                          f"{dist.world_size()} processes")
    run_dir = Path(dist.broadcast_object(str(run_dir or default_run_dir(cfg))))  # process 0's clock names it
    folder = rundir.claim(run_dir, resume=resume, config=dump_config(cfg)) if dist.is_main() else None
    try:  # start-up: a failure or a signal (which stops at once) removes what the claim made
        with _StopFlag(at_once=True):
            parts, st, log = _start(cfg, run_dir, folder, resume=resume)
    except BaseException:
        if folder is not None:
            folder.abandon()
        raise

    def save() -> None:
        if not dist.is_main():
            return
        state = {"train": st.to_json(), "selector": parts.selector.state_dict(),
                 "guide": parts.guide.state_dict() if parts.guide is not None else {}}
        save_checkpoint(run_dir, st.step, model=parts.model, optimizer=parts.optimizer, scheduler=parts.scheduler,
                        state=state, keep_last=cfg.run.keep_last, tokenizer=parts.tokenizer)

    try:
        stopped_by = _train_loop(parts, st, log, save, run_dir)
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
           ) -> tuple[Parts, StepState, RunLogger | NullLogger]:
    """Build the parts; with `resume`, restore the checkpoint process 0 picks (`rundir.resume_point`,
    which also cuts the logs back to it) on every process. `folder`: process 0's claimed run folder."""
    from guidedrl.trainer.checkpoint import read_checkpoint, restore

    seed_everything(cfg.train.seed)
    parts = build_parts(cfg)
    dist.broadcast_module(parts.model)  # one policy on every process, whatever its init
    st = StepState()
    ckpt = None
    if resume:
        ckpt = rundir.resume_point(run_dir) if folder is not None else None
        where = dist.broadcast_object(str(ckpt.path) if ckpt is not None else "")
        ckpt = ckpt or (read_checkpoint(Path(where)) if where else None)
    if ckpt is not None:
        restore(ckpt, parts.model, parts.optimizer, parts.scheduler)
        st = StepState.from_json(ckpt.state["train"])
        parts.selector.load_state_dict(ckpt.state["selector"])
        if parts.guide is not None:
            parts.guide.load_state_dict(ckpt.state.get("guide", {}))
    log: RunLogger | NullLogger = NullLogger()
    if folder is not None:
        log = RunLogger(run_dir, cfg.train.steps, st.step, progress=cfg.run.progress, loggers=cfg.run.loggers,
                        config=cfg.model_dump(mode="json"))
        folder.started()
    return parts, st, log


def _train_loop(parts: Parts, st: StepState, log: RunLogger | NullLogger, save: Callable[[], None], run_dir: Path) -> int:
    """Evaluate, (SFT stage,) train, checkpoint, evaluate. -> 0, or the signal that stopped it early
    (after checkpointing)."""
    from guidedrl.trainer.evaluation import run_eval

    cfg = parts.cfg
    evaluate = cfg.eval.enabled and bool(parts.eval_samples) and dist.is_main()
    with _StopFlag() as stop:
        if st.step == 0 and evaluate:
            log.log(-1, run_eval(parts, run_dir / "eval_before.json"))
        if st.step == 0 and cfg.guidance is not None and cfg.guidance.sft_stage is not None:
            from guidedrl.trainer.sft import run_sft_stage

            log.log(-1, run_sft_stage(parts, cfg.guidance.sft_stage))
            dist.broadcast_module(parts.model)  # every process ran the same SFT; keep them bitwise equal
        while st.step < cfg.train.steps:
            try:
                metrics, flat = train_step(parts, st)
            except NonFiniteError:  # each non-finite update was skipped: the weights are finite, keep them
                save()
                print_warning(f"saved the last finite weights as the checkpoint of step {st.step}; after a fix, "
                              f"continue with: guidedrl train --resume {run_dir}")
                raise
            log.log(st.step, dist.mean_metrics(metrics))
            log.log_completions(st.step, flat, cfg.run.log_completions)
            st.step += 1
            if evaluate and cfg.eval.every and st.step % cfg.eval.every == 0 and st.step < cfg.train.steps:
                log.log(st.step - 1, run_eval(parts, None))
            stopping = dist.any_true(stop.requested)  # a signal to one process stops them all at this step
            if (cfg.run.save_every and st.step % cfg.run.save_every == 0) or stopping:
                save()
            if stopping:
                return stop.signum or signal.SIGTERM  # (another process got the signal: stop as for SIGTERM)
        save()
        if evaluate:
            log.log(st.step - 1, run_eval(parts, run_dir / "eval_after.json"))
    return 0
