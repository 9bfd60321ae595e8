"""Checkpoints: exact round trip, pruning, and crash safety (an exception or SIGKILL mid-save)."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from guidedrl.trainer import checkpoint as ck
from guidedrl.trainer.checkpoint import latest_model_dir, load_checkpoint, restore, save_checkpoint
from guidedrl.core.errors import ModelError

REPO = Path(__file__).resolve().parents[1]


def tiny_llama(seed: int, hidden: int = 32, layers: int = 1, inter: int = 64) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                      num_key_value_heads=1, intermediate_size=inter)
    return LlamaForCausalLM(cfg)


def make_opt(model: torch.nn.Module) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    return opt, sched


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, sched) -> float:
    """One update whose data depends on all three RNGs, so a wrong RNG restore changes the result."""
    offset = random.randrange(8) + int(np.random.randint(8))
    ids = torch.randint(0, 48, (2, 6)) + offset  # (B, T) token ids < 64
    loss = model(input_ids=ids, labels=ids).loss
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    return loss.item()


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_round_trip_continues_exactly(tmp_path: Path) -> None:
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    model = tiny_llama(seed=1)
    opt, sched = make_opt(model)
    for _ in range(2):
        train_step(model, opt, sched)
    state = {"data_pos": 17, "selector": {"seen": [3, 1, 2]}, "guide": {"rate": 0.5}}
    path = save_checkpoint(tmp_path, 2, model=model, optimizer=opt, scheduler=sched, state=state, keep_last=3)
    assert path == tmp_path / "checkpoints" / "step-000002"
    assert (path / "COMPLETE").is_file() and (path / "model" / "model.safetensors").is_file()
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-000002"

    # the reference continuation: RNG draws and one more step straight after the save
    draws = (random.random(), float(np.random.rand()), float(torch.rand(())))
    loss3 = train_step(model, opt, sched)
    want = params(model)

    # a fresh process state: other weights, other optimizer, other RNG streams
    random.seed(99), np.random.seed(99), torch.manual_seed(99)
    model2 = tiny_llama(seed=2)
    opt2, sched2 = make_opt(model2)
    train_step(model2, opt2, sched2)  # optimizer state that must be overwritten
    ckpt = load_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.step == 2 and ckpt.path == path
    assert restore(ckpt, model2, opt2, sched2) == state
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == draws
    assert sched2.last_epoch == 2 and opt2.param_groups[0]["lr"] == pytest.approx(1e-2 / 3)
    # restore again (the draws above moved the RNGs) and continue: bit-identical to the reference
    restore(ckpt, model2, opt2, sched2)
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == draws
    assert train_step(model2, opt2, sched2) == loss3
    got = params(model2)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_model_dir_loads_standalone_with_tokenizer(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from guidedrl.nn.models import make_tiny_tokenizer

    model = tiny_llama(seed=3)
    tok = make_tiny_tokenizer()
    save_checkpoint(tmp_path, 5, model=model, tokenizer=tok, keep_last=1)
    folder = latest_model_dir(tmp_path)
    assert folder == tmp_path / "checkpoints" / "step-000005" / "model"
    loaded = AutoModelForCausalLM.from_pretrained(folder)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert AutoTokenizer.from_pretrained(folder)("12 + 7").input_ids == tok("12 + 7").input_ids
    assert latest_model_dir(tmp_path / "nothing-here") is None


def test_lora_adapter_round_trip(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    def lora(seed: int):
        base = tiny_llama(seed=4)  # same base weights in both
        torch.manual_seed(seed)
        m = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
        for n, p in m.named_parameters():
            if "lora_B" in n:  # B starts at zero; make the adapter non-trivial
                torch.nn.init.normal_(p)
        return m

    m1 = lora(seed=5)
    save_checkpoint(tmp_path, 1, model=m1, keep_last=1)
    folder = tmp_path / "checkpoints" / "step-000001" / "model"
    assert (folder / "adapter_model.safetensors").is_file() and not (folder / "model.safetensors").exists()
    m2 = lora(seed=6)
    restore(load_checkpoint(tmp_path), m2, rng=False)
    for (n1, p1), (n2, p2) in zip(m1.named_parameters(), m2.named_parameters(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2), n1
    with pytest.raises(ModelError, match="LoRA adapter"):
        restore(load_checkpoint(tmp_path), tiny_llama(seed=4), rng=False)


def test_mismatched_model_is_a_model_error(tmp_path: Path) -> None:
    save_checkpoint(tmp_path, 1, model=tiny_llama(seed=0), keep_last=1)
    with pytest.raises(ModelError, match="do not fit"):
        restore(load_checkpoint(tmp_path), tiny_llama(seed=0, hidden=64), rng=False)


def test_keep_last_prunes_but_never_latest(tmp_path: Path) -> None:
    model = tiny_llama(seed=0)
    for step in range(1, 6):
        save_checkpoint(tmp_path, step, model=model, state={"step": step}, keep_last=2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000004", "step-000005"]
    # `latest` naming an older checkpoint protects it from pruning
    (root / "latest").write_text("step-000004\n")
    assert ck.prune_checkpoints(tmp_path, keep_last=1) == []
    assert load_checkpoint(tmp_path).step == 4
    with pytest.raises(ValueError):
        save_checkpoint(tmp_path, 6, model=model, keep_last=0)
    # a non-JSON state fails before anything is written
    with pytest.raises(TypeError):
        save_checkpoint(tmp_path, 7, model=model, state={"x": object()})
    assert not list(root.glob("*7*"))


def test_same_step_saved_twice_replaces_it(tmp_path: Path) -> None:
    model = tiny_llama(seed=0)
    save_checkpoint(tmp_path, 3, model=model, state={"v": 1})
    save_checkpoint(tmp_path, 3, model=model, state={"v": 2})
    assert load_checkpoint(tmp_path).state == {"v": 2}
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-000003"]


@pytest.mark.parametrize("fail_at", ["model", "optimizer", "complete", "rename", "latest"])
def test_exception_mid_save_keeps_previous(tmp_path: Path, monkeypatch, fail_at: str) -> None:
    model = tiny_llama(seed=0)
    opt, sched = make_opt(model)
    train_step(model, opt, sched)
    save_checkpoint(tmp_path, 1, model=model, optimizer=opt, scheduler=sched, state={"pos": 1})
    want = params(model)
    train_step(model, opt, sched)

    def boom(*a, **k):
        raise OSError(28, "No space left on device (simulated)")

    if fail_at == "model":
        monkeypatch.setattr(type(model), "save_pretrained", boom)
    elif fail_at == "optimizer":
        real = torch.save
        monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: boom() if str(f).endswith("optimizer.pt") else real(obj, f, *a, **k))
    elif fail_at == "complete":
        real_open = open
        monkeypatch.setattr("builtins.open", lambda f, *a, **k: boom() if str(f).endswith("COMPLETE") else real_open(f, *a, **k))
    elif fail_at == "rename":
        monkeypatch.setattr(os, "rename", boom)
    elif fail_at == "latest":
        monkeypatch.setattr(ck, "write_text_atomic", boom)
    with pytest.raises(ck.CheckpointError, match=r"checkpoint step-000002 .*could not be written.*simulated") as err:
        save_checkpoint(tmp_path, 2, model=model, optimizer=opt, scheduler=sched, state={"pos": 2})
    assert "\n" not in str(err.value) and "MB free" in str(err.value)
    monkeypatch.undo()
    assert not list((tmp_path / "checkpoints").glob(".tmp-*")), "a failed save removes its temp folder at once"

    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-000001"
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.step == 1 and ckpt.state == {"pos": 1}
    fresh = tiny_llama(seed=9)
    o2, s2 = make_opt(fresh)
    restore(ckpt, fresh, o2, s2)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in want.items())
    # the next save succeeds and cleans up the debris of the failed one
    save_checkpoint(tmp_path, 2, model=model, optimizer=opt, scheduler=sched, state={"pos": 2})
    assert load_checkpoint(tmp_path).step == 2
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-000001", "step-000002"]


def test_latest_naming_incomplete_falls_back(tmp_path: Path, caplog) -> None:
    model = tiny_llama(seed=0)
    save_checkpoint(tmp_path, 1, model=model, state={"pos": 1})
    save_checkpoint(tmp_path, 2, model=model, state={"pos": 2})
    root = tmp_path / "checkpoints"
    (root / "step-000002" / "COMPLETE").unlink()  # as if it had been written by a tool that crashed
    (root / "step-000009").mkdir()  # debris without COMPLETE is never chosen
    with caplog.at_level(logging.WARNING, logger="guidedrl.trainer.checkpoint"):
        ckpt = load_checkpoint(tmp_path)
    assert ckpt.step == 1 and "not a complete checkpoint" in caplog.text
    (root / "latest").unlink()
    assert load_checkpoint(tmp_path).step == 1
    assert load_checkpoint(tmp_path / "empty") is None


CHILD = """
import os, sys, time
sys.path.insert(0, {repo!r})
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from guidedrl.trainer.checkpoint import save_checkpoint
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=256, num_hidden_layers=4, num_attention_heads=2,
                                     num_key_value_heads=1, intermediate_size=1024))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
step = 0
while True:
    step += 1
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(step))  # every weight equals the step: a torn checkpoint would show
    ids = torch.randint(0, 64, (1, 4))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    save_checkpoint({run!r}, step, model=model, optimizer=opt, state={{"step": step}}, keep_last=2)
    print(step, flush=True)
"""


def _kill_mid_save(run: Path, stage: str) -> None:
    """Start a child saving checkpoints in a loop; SIGKILL it while a save is at `stage`."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", CHILD.format(repo=str(REPO), run=str(run))],
                            stdout=subprocess.PIPE, env=env, text=True)
    try:
        while int(proc.stdout.readline() or 0) < 2:  # two complete checkpoints exist
            assert proc.poll() is None, "child died"
        deadline = time.monotonic() + 60
        root = run / "checkpoints"
        while time.monotonic() < deadline:
            tmps = list(root.glob(".tmp-step-*"))
            if tmps and (stage == "start" or (tmps[0] / "optimizer.pt").exists()):
                os.kill(proc.pid, signal.SIGKILL)
                break
        else:
            pytest.fail(f"never saw a save at stage {stage}")
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def test_sigkill_mid_save_leaves_previous_usable(tmp_path: Path) -> None:
    """The kill lands after the new weights and optimizer state are on disk, before COMPLETE/rename
    (the earlier stages are covered by the exception tests above)."""
    for attempt in range(3):  # the kill can (rarely) land just after the rename; then try again
        run = tmp_path / f"run{attempt}"
        _kill_mid_save(run, "optimizer")
        root = run / "checkpoints"
        if list(root.glob(".tmp-step-*")):
            break
    else:
        pytest.fail("the kill never landed mid-save")
    ckpt = load_checkpoint(run)
    assert ckpt is not None and ckpt.path.name == (root / "latest").read_text().strip()
    step = ckpt.step
    assert ckpt.state == {"step": step} and step >= 2
    model = tiny_llama(seed=0, hidden=256, layers=4, inter=1024)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    restore(ckpt, model, opt, rng=False)
    # every weight was filled with `step` before the optimizer moved it by at most lr = 1e-3
    for name, p in model.named_parameters():
        assert torch.allclose(p, torch.full_like(p, float(step)), atol=2e-3), name
    assert len(opt.state) == len(list(model.parameters()))
    # a new save from another process removes the dead writer's temp folder
    save_checkpoint(run, step + 1, model=model, optimizer=opt, state={"step": step + 1})
    assert not list(root.glob(".tmp-*"))
    assert json.loads((root / "step-{:06d}".format(step + 1) / "state.json").read_text())["step"] == step + 1


def test_stale_temp_folders_are_removed_before_a_save(tmp_path: Path, monkeypatch) -> None:
    """A dead writer's half-written checkpoint can hold the disk space the next save needs."""
    model = tiny_llama(seed=0)
    save_checkpoint(tmp_path, 1, model=model)
    root = tmp_path / "checkpoints"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = root / f".tmp-step-000002-{int(dead.stdout)}"
    stale.mkdir()
    (stale / "optimizer.pt").write_bytes(b"x" * 1000)
    half = root / "step-000007"  # a step folder without COMPLETE: debris too
    half.mkdir()
    real = ck._write_contents
    seen: list[list[str]] = []

    def spy(tmp, *a, **k):
        seen.append(sorted(p.name for p in root.iterdir()))
        return real(tmp, *a, **k)

    monkeypatch.setattr(ck, "_write_contents", spy)
    save_checkpoint(tmp_path, 2, model=model)
    assert stale.name not in seen[0] and half.name not in seen[0], seen[0]


def _damage(folder: Path, how: str) -> str:
    if how == "truncated weights":
        weights = folder / "model" / "model.safetensors"
        with weights.open("r+b") as f:
            f.truncate(weights.stat().st_size // 2)
        return "model/model.safetensors"
    if how == "truncated optimizer":
        opt = folder / "optimizer.pt"
        with opt.open("r+b") as f:
            f.truncate(opt.stat().st_size - 10)
        return "optimizer.pt"
    (folder / "rng.pt").unlink()
    return "rng.pt"


@pytest.mark.parametrize("how", ["truncated weights", "truncated optimizer", "missing rng.pt"])
def test_damaged_latest_falls_back_to_the_previous_complete_one(tmp_path: Path, caplog, how: str) -> None:
    model = tiny_llama(seed=0)
    opt, sched = make_opt(model)
    for step in (1, 2):
        train_step(model, opt, sched)
        if step == 1:
            want = params(model)
        save_checkpoint(tmp_path, step, model=model, optimizer=opt, scheduler=sched, state={"pos": step}, keep_last=3)
    named = _damage(tmp_path / "checkpoints" / "step-000002", how)
    with caplog.at_level(logging.WARNING, logger="guidedrl.trainer.checkpoint"):
        ckpt = load_checkpoint(tmp_path)
    assert ckpt.step == 1
    assert "step-000002 is damaged" in caplog.text and named in caplog.text and "using step-000001" in caplog.text
    fresh = tiny_llama(seed=9)
    o2, s2 = make_opt(fresh)
    restore(ckpt, fresh, o2, s2)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in want.items())
    # every checkpoint damaged: an error naming them, never a silent start from scratch
    _damage(tmp_path / "checkpoints" / "step-000001", how)
    with pytest.raises(ck.CheckpointError, match=r"no usable checkpoint.*step-000002.*step-000001"):
        load_checkpoint(tmp_path)


def test_unreadable_files_restore_as_model_errors(tmp_path: Path) -> None:
    """Damage the manifest cannot see (same size, other bytes) is still a one-line error, not a traceback."""
    model = tiny_llama(seed=0)
    opt, sched = make_opt(model)
    save_checkpoint(tmp_path, 1, model=model, optimizer=opt, scheduler=sched)
    folder = tmp_path / "checkpoints" / "step-000001"
    for name in ("model/model.safetensors", "optimizer.pt", "rng.pt"):
        f = folder / name
        good = f.read_bytes()
        f.write_bytes(b"\0" * len(good))
        with pytest.raises(ModelError, match=name):
            restore(load_checkpoint(tmp_path), model, opt, sched)
        f.write_bytes(good)
    restore(load_checkpoint(tmp_path), model, opt, sched)
