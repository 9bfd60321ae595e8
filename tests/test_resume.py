"""Runs survive: exact resume after SIGKILL, graceful SIGTERM, numeric guards, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from guidedrl.app.cli import main

STEPS = 6


def _args(data: Path, out: Path, extra: list[str] = ()) -> list[str]:
    sets = [
        "model.path=tiny", f"data.train.path={data}", "data.eval=null", "eval.enabled=false",
        "reward.terms=[{name: 'helpers_rewards:sevens'}]", "rollout.max_new_tokens=8", "rollout.group_size=4",
        "train.prompts_per_step=4", "train.micro_batch_size=16", "train.lr=3e-3", f"train.steps={STEPS}",
        "run.progress=false", "run.save_every=1", "run.keep_last=2", "algo.epochs=2", "algo.minibatches=2",
        *extra,
    ]
    return ["train", "grpo", "--out", str(out)] + [a for s in sets for a in ("--set", s)]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("d") / "d.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"Say something {i}."}) + "\n" for i in range(10)))
    return p


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "perf/tokens_per_s"))} for r in rows]


def _weights(run: Path) -> dict:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return load_file(str(run / "checkpoints" / latest / "model" / "model.safetensors"))


def _child(args: list[str]) -> subprocess.Popen:
    tests = str(Path(__file__).parent)
    env = dict(os.environ, PYTHONPATH=tests + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "guidedrl.app.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _child_code(code: str) -> subprocess.Popen:
    tests = str(Path(__file__).parent)
    env = dict(os.environ, PYTHONPATH=tests + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


# `guidedrl train --resume RUN`, SIGKILLed by the first write of a rewrite of metrics.jsonl, after half of it is
# on disk: any rewrite that truncates the file in place would lose rows.
TORN_REWRITE = """
import builtins, io, os, signal, sys
from guidedrl.app.cli import main
real_open = io.open

class Torn:
    def __init__(self, f):
        self.f = f
    def write(self, text):
        self.f.write(text[: len(text) // 2])
        self.f.flush()
        os.fsync(self.f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    def __getattr__(self, name):
        return getattr(self.f, name)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self.f.close()

def torn_open(file, mode="r", *a, **k):
    f = real_open(file, mode, *a, **k)
    return Torn(f) if "metrics.jsonl" in str(file) and "w" in mode else f

builtins.open = io.open = torn_open
sys.exit(main(["train", "--resume", {run!r}]))
"""


def _wait_for_lines(path: Path, n: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else "child exited"
        time.sleep(0.05)
    raise AssertionError("child made no progress")


@pytest.mark.slow
def test_sigkill_then_resume_is_exact(data: Path, tmp_path: Path) -> None:
    ref = tmp_path / "ref"
    assert main(_args(data, ref)) == 0
    killed = tmp_path / "killed"
    proc = _child(_args(data, killed))
    _wait_for_lines(killed / "metrics.jsonl", 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "DONE").exists()
    # the resume is killed too, while it rewrites metrics.jsonl (the steps after its checkpoint dropped)
    torn = _child_code(TORN_REWRITE.format(run=str(killed)))
    out, _ = torn.communicate(timeout=240)
    assert torn.returncode == -signal.SIGKILL, out
    assert main(["train", "--resume", str(killed)]) == 0
    assert _metrics(killed) == _metrics(ref)
    a, b = _weights(ref), _weights(killed)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


@pytest.mark.slow
def test_sigterm_checkpoints_exits_143_and_resumes(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = _child(_args(data, run, ["run.save_every=0"]))
    _wait_for_lines(run / "metrics.jsonl", 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 143, out  # 128 + SIGTERM: `train && eval` does not go on
    assert "--resume" in out
    assert (run / "checkpoints" / "latest").exists() and not (run / "DONE").exists()
    assert main(["train", "--resume", str(run)]) == 0
    steps = [r["step"] for r in _metrics(run)]
    assert steps == list(range(STEPS)) and (run / "DONE").exists()


def test_nonfinite_updates_are_skipped_then_abort(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from guidedrl import algo

    real = algo.LOSSES["ppo_clip"].fn

    def nan_loss(inp, cfg, reduce):  # a loss that goes non-finite, as a diverging run would
        out = real(inp, cfg, reduce)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setitem(algo.LOSSES, "ppo_clip", algo.Term(nan_loss))
    run = tmp_path / "nan"
    rc = main(_args(data, run, ["train.max_nonfinite=2", "algo.epochs=1", "algo.minibatches=1", "run.save_every=0"]))
    err = capsys.readouterr().err
    assert rc == 2
    assert "non-finite" in err and "update skipped" in err and "2 non-finite updates in a row" in err
    assert not (run / "DONE").exists()
    # the skipped updates left the weights finite: they are checkpointed before the abort
    assert "checkpoint" in err and "--resume" in err
    weights = _weights(run)
    assert weights and all(bool(t.isfinite().all()) for t in weights.values())


def test_bad_data_fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": 3\n')
    run = tmp_path / "run"
    rc = main(["train", "grpo", "--out", str(run), "--set", "model.path=tiny", "--set", f"data.train.path={bad}",
               "--set", "data.eval=null"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{bad}:2" in err and "Traceback" not in err
    assert not run.exists(), "a failed start removes the run folder it created"
