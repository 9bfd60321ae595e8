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
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "tokens_per_s"))} for r in rows]


def _weights(run: Path) -> dict:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return load_file(str(run / "checkpoints" / latest / "model" / "model.safetensors"))


def _child(args: list[str]) -> subprocess.Popen:
    tests = str(Path(__file__).parent)
    env = dict(os.environ, PYTHONPATH=tests + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, "-m", "guidedrl.app.cli", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


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
    assert main(["train", "--resume", str(killed)]) == 0
    assert _metrics(killed) == _metrics(ref)
    a, b = _weights(ref), _weights(killed)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


@pytest.mark.slow
def test_sigterm_checkpoints_exits_0_and_resumes(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = _child(_args(data, run, ["run.save_every=0"]))
    _wait_for_lines(run / "metrics.jsonl", 2, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "--resume" in out
    assert (run / "checkpoints" / "latest").exists() and not (run / "DONE").exists()
    assert main(["train", "--resume", str(run)]) == 0
    steps = [r["step"] for r in _metrics(run)]
    assert steps == list(range(STEPS)) and (run / "DONE").exists()


def test_nonfinite_updates_are_skipped_then_abort(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from guidedrl import algo

    real = algo.LOSSES["ppo_clip"]

    def nan_loss(inp, cfg, reduce):  # a loss that goes non-finite, as a diverging run would
        out = real(inp, cfg, reduce)
        out.loss = out.loss * float("nan")
        return out

    monkeypatch.setitem(algo.LOSSES, "ppo_clip", nan_loss)
    run = tmp_path / "nan"
    rc = main(_args(data, run, ["train.max_nonfinite=2", "algo.epochs=1", "algo.minibatches=1"]))
    err = capsys.readouterr().err
    assert rc == 2
    assert "non-finite" in err and "update skipped" in err and "2 non-finite updates in a row" in err
    assert not (run / "DONE").exists()


def test_bad_data_fails_cleanly(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": 3\n')
    run = tmp_path / "run"
    rc = main(["train", "grpo", "--out", str(run), "--set", "model.path=tiny", "--set", f"data.train.path={bad}",
               "--set", "data.eval=null"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{bad}:2" in err and "Traceback" not in err
    assert not (run / "DONE").exists() and not (run / "metrics.jsonl").exists()
