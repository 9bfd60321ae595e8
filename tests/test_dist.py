"""Data parallelism on CPU: 2 processes over gloo (see guidedrl.core.dist).

- one optimizer step split over 2 processes gives the gradients of the whole batch in one process
  (the reducers' global counts and the gradient sum together), on both processes;
- `torchrun --nproc_per_node 2 -m guidedrl train` runs to the end: one run folder, one metrics line
  per step, one checkpoint, written by process 0.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_two_processes_take_the_one_process_gradient_step(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers_dist import gradients

    port = str(_free_port())
    procs = []
    for r in range(2):
        env = os.environ | {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                            "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "tests" / "helpers_dist.py"), str(tmp_path / f"g{r}.pt")],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0, out[-3000:]
    whole = gradients(rank=0, world=1)  # the whole batch in this process
    g0, g1 = (torch.load(tmp_path / f"g{r}.pt") for r in range(2))
    for a, b, c in zip(whole, g0, g1, strict=True):
        assert torch.equal(b, c), "the processes' gradients differ after the sum"
        assert torch.allclose(a, b, atol=1e-6)
    assert any(float(a.abs().max()) > 0 for a in whole)


@pytest.mark.slow  # two processes each load torch + transformers and train 2 steps: ~30 s on 2 cores
def test_torchrun_trains_with_two_processes(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "guidedrl",
           "train", "--out", str(run_dir), "--set", "model.path=tiny", "--set", "rollout.max_new_tokens=8",
           "--set", "rollout.group_size=2", "--set", "train.prompts_per_step=4", "--set", "train.steps=2",
           "--set", "eval.enabled=false", "--set", "data.eval=null", "--set", "run.progress=false"]
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    res = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert (run_dir / "DONE").exists()
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    assert [r["step"] for r in rows] == [0, 1], "one line per step, from process 0 only"
    assert all(r["reward/mean"] is None or isinstance(r["reward/mean"], float) for r in rows)
    assert any((run_dir / "checkpoints").iterdir()), "process 0 saved the final checkpoint"


def test_prompts_per_step_must_split_over_the_processes(monkeypatch) -> None:
    from guidedrl.core import dist
    from guidedrl.core.config import load_config
    from guidedrl.core.errors import ConfigError
    from guidedrl.trainer.loop import run

    monkeypatch.setattr(dist, "init_from_env", lambda: True)
    monkeypatch.setattr(dist, "world_size", lambda: 3)
    cfg = load_config(None, ["model.path=tiny", "train.prompts_per_step=4"])
    with pytest.raises(ConfigError, match="train.prompts_per_step=4 is not a multiple of the 3 processes"):
        run(cfg, Path("/nonexistent/never-made"))
