"""Run folders: one writer at a time, no silent mixing of runs, clean failed starts, safe resume
(torn logs, damaged or half-written checkpoints, a full disk), and the exit codes of `train`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from guidedrl.app.cli import main

STEPS = 3
TESTS = Path(__file__).parent


def _args(data: Path, out: Path, extra: list[str] = (), recipe: str | None = "grpo") -> list[str]:
    sets = [
        "model.path=tiny", f"data.train.path={data}", "data.eval=null", "eval.enabled=false",
        "reward.terms=[{name: 'helpers_rewards:sevens'}]", "rollout.max_new_tokens=8", "rollout.group_size=4",
        "train.prompts_per_step=4", "train.micro_batch_size=16", "train.lr=3e-3", f"train.steps={STEPS}",
        "run.progress=false", "run.save_every=1", "run.keep_last=3", *extra,
    ]
    return ["train", *([recipe] if recipe else []), "--out", str(out)] + [a for s in sets for a in ("--set", s)]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("d") / "d.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"Say something {i}."}) + "\n" for i in range(10)))
    return p


@pytest.fixture(scope="module")
def finished(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 3-step run with a checkpoint after every step (the tests copy it, then break the copy)."""
    run = tmp_path_factory.mktemp("f") / "run"
    assert main(_args(data, run)) == 0
    return run


def _copy(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "perf/tokens_per_s"))} for r in rows]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return load_file(str(run / "checkpoints" / latest / "model" / "model.safetensors"))


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _unfinish(run: Path, keep_step: int) -> None:
    """Make `run` look killed after the checkpoint of `keep_step` (later checkpoints gone)."""
    (run / "DONE").unlink()
    root = run / "checkpoints"
    for d in root.glob("step-*"):
        if int(d.name.split("-")[1]) > keep_step:
            shutil.rmtree(d)
    (root / "latest").write_text(f"step-{keep_step:06d}\n")


def _child(code: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


# ----------------------------------------------------------------------------- one run per folder


@pytest.mark.slow
def test_second_train_into_a_folder_in_use_is_refused(data: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    first = _child(f"import sys; from guidedrl.app.cli import main; "
                   f"sys.exit(main({_args(data, run, ['train.steps=500', 'run.save_every=0'])!r}))")
    try:
        t0 = time.time()
        while not ((run / "metrics.jsonl").exists() and (run / "metrics.jsonl").read_text().count("\n") >= 1):
            assert first.poll() is None, first.stdout.read()
            assert time.time() - t0 < 240, "the first run made no progress"
            time.sleep(0.1)
        rc = main(_args(data, run))
        err = capsys.readouterr().err
        assert rc == 2, err
        assert "in use by another guidedrl process" in err and f"pid {first.pid}" in err and "Traceback" not in err
        assert first.poll() is None, "the first run goes on"
    finally:
        first.kill()
        first.wait()
    steps = [r["step"] for r in _metrics(run)]
    assert steps == list(range(len(steps))), "only the first run wrote the metrics"


def test_train_into_an_unfinished_run_is_refused(finished: Path, data: Path, tmp_path: Path, capsys) -> None:
    run = _copy(finished, tmp_path / "run")
    _unfinish(run, keep_step=2)
    before = (run / "metrics.jsonl").read_text()
    rc = main(_args(data, run))
    err = capsys.readouterr().err
    assert rc == 2 and "holds an unfinished run" in err and "use --resume or another --out" in err
    assert (run / "metrics.jsonl").read_text() == before and not (run / "DONE").exists()
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-000001", "step-000002"]
    # a finished one too
    rc = main(_args(data, finished))
    assert rc == 2 and "holds a finished run" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_without_a_checkpoint_clears_the_logs_and_says_so(finished: Path, data: Path, tmp_path: Path, capsys) -> None:
    run = _copy(finished, tmp_path / "run")  # as if killed before its first checkpoint: logs, no checkpoint
    (run / "DONE").unlink()
    shutil.rmtree(run / "checkpoints")
    capsys.readouterr()
    assert main(["train", "grpo", "--resume", str(run)]) == 0  # a matching recipe name is allowed
    err = capsys.readouterr().err
    assert "no checkpoint" in err and "starting over from step 0" in err
    assert _metrics(run) == _metrics(finished)  # no duplicated rows; the same run again
    assert _same_weights(run, finished)


def test_torn_last_log_line_is_dropped_with_a_warning(finished: Path, tmp_path: Path, capsys) -> None:
    run = _copy(finished, tmp_path / "run")
    _unfinish(run, keep_step=2)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "reward/me')  # a kill in the middle of a line
    with (run / "completions.jsonl").open("a") as f:
        f.write('{"step": 3, "sam')
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--out", str(run)]) == 0  # --out naming the run's own folder is fine
    err = capsys.readouterr().err
    assert "metrics.jsonl" in err and "incomplete last line" in err and "Traceback" not in err
    assert _metrics(run) == _metrics(finished)
    assert (run / "completions.jsonl").read_text() == (finished / "completions.jsonl").read_text()
    assert _same_weights(run, finished)


@pytest.mark.parametrize("damage", ["truncated weights", "missing rng.pt"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous(finished: Path, tmp_path: Path, capsys, damage: str) -> None:
    run = _copy(finished, tmp_path / "run")
    _unfinish(run, keep_step=3)
    latest = run / "checkpoints" / "step-000003"
    if damage == "truncated weights":
        weights = latest / "model" / "model.safetensors"
        with weights.open("r+b") as f:
            f.truncate(weights.stat().st_size // 2)
        named = "model/model.safetensors"
    else:
        (latest / "rng.pt").unlink()
        named = "rng.pt"
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    err = capsys.readouterr().err
    assert "step-000003 is damaged" in err and named in err and "using step-000002" in err
    assert _metrics(run) == _metrics(finished) and _same_weights(run, finished)


@pytest.mark.slow
def test_full_disk_during_a_checkpoint_is_a_clean_error_then_resumes(
    finished: Path, data: Path, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = torch.save

    def full_disk(obj, f, *a, **k):  # what torch.save raises on ENOSPC, at the second checkpoint
        if str(f).endswith("optimizer.pt") and "step-000002" in str(f):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 4352 vs 4240")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    run = tmp_path / "run"
    rc = main(_args(data, run))
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert "checkpoint step-000002" in err and "could not be written" in err and "free" in err and "--resume" in err
    root = run / "checkpoints"
    assert not list(root.glob(".tmp-*")), "the half-written checkpoint is removed"
    assert (root / "latest").read_text().strip() == "step-000001"
    monkeypatch.undo()
    assert main(["train", "--resume", str(run)]) == 0
    assert _metrics(run) == _metrics(finished) and _same_weights(run, finished)


def _logger(run: Path):
    from guidedrl.trainer.runlog import RunLogger

    return RunLogger(run, 10, 0, progress=False, loggers=[], config={})


def test_log_rewrite_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that dies halfway (a kill, a full disk) during the resume's log rewrite loses no row."""
    import builtins
    import io

    rows = "".join(json.dumps({"step": i, "reward/mean": i / 10}) + "\n" for i in range(5))
    (tmp_path / "metrics.jsonl").write_text(rows)
    real_open = io.open

    class HalfThenFail:
        def __init__(self, f):
            self.f = f

        def write(self, text: str) -> int:
            self.f.write(text[: len(text) // 2])
            self.f.flush()
            raise OSError(28, "No space left on device (simulated)")

        def __getattr__(self, name: str):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.f.close()

    def half_open(file, mode="r", *a, **k):
        f = real_open(file, mode, *a, **k)
        return HalfThenFail(f) if "metrics.jsonl" in str(file) and "w" in mode else f

    monkeypatch.setattr(builtins, "open", half_open)
    monkeypatch.setattr(io, "open", half_open)
    with pytest.raises(OSError, match="simulated"):
        _logger(tmp_path).truncate_after(2)
    monkeypatch.undo()
    assert (tmp_path / "metrics.jsonl").read_text() == rows
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"], "no temp file left"
    _logger(tmp_path).truncate_after(2)
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]


def test_a_bad_line_inside_a_log_names_file_and_line(tmp_path: Path) -> None:
    from guidedrl.core.errors import DataError

    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1, oops\n{"step": 2}\n')
    with pytest.raises(DataError, match=r"metrics.jsonl:2: not a JSON line"):
        _logger(tmp_path).truncate_after(5)


# ----------------------------------------------------------------------------- start-up


def test_failed_start_removes_the_folder_it_created(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"prompt": 3}\n')
    out = tmp_path / "new" / "deeper" / "run"
    rc = main(_args(bad, out))
    assert rc == 2 and f"{bad}:2" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    # a folder that was there before stays (only what the failed start made is removed)
    keep = tmp_path / "mine"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    assert main(_args(bad, keep)) == 2
    assert sorted(p.name for p in keep.iterdir()) == ["notes.txt"]  # no config.yaml, no .lock


def test_unwritable_out_is_a_one_line_error(data: Path, tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    rc = main(_args(data, blocker / "run"))
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "cannot create the run folder" in err and str(blocker) in err


def test_ctrl_c_during_start_up_is_one_line_and_exit_130(data: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    from guidedrl.trainer import loop

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "build", interrupted)
    out = tmp_path / "run"
    try:
        rc = main(_args(data, out))
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C during start-up escaped main() (a traceback for the user)")
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # (after the config the command prints first)
    assert rc == 130 and last.startswith("interrupted:") and "Traceback" not in err
    assert not out.exists()


def test_errors_are_one_line_whatever_the_terminal_width(tmp_path: Path, capsys) -> None:
    missing = tmp_path / ("a-rather-long-folder-name-" * 4) / "no-such-file.jsonl"
    rc = main(["train", "--out", str(tmp_path / "run"), "--set", "model.path=tiny", "--set", f"data.train.path={missing}",
               "--set", "data.eval=null"])
    err = capsys.readouterr().err
    assert rc == 2
    last = err.strip().splitlines()[-1]  # (after the config the command prints first)
    assert last.startswith("error:") and str(missing) in last  # stderr is not a terminal here: no wrap at 80


# ----------------------------------------------------------------------------- --resume arguments


def test_resume_refuses_another_recipe_or_out(finished: Path, tmp_path: Path, capsys) -> None:
    run = _copy(finished, tmp_path / "run")
    _unfinish(run, keep_step=2)
    assert main(["train", "dapo", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "`grpo`" in err and "dapo" in err
    assert main(["train", "--resume", str(run), "--out", str(tmp_path / "elsewhere")]) == 2
    err = capsys.readouterr().err
    assert "--out" in err and str(tmp_path / "elsewhere") in err
    assert not (tmp_path / "elsewhere").exists() and not (run / "DONE").exists()


# ----------------------------------------------------------------------------- signals and exit codes


def _signal_child(data: Path, run: Path, sends: list[int]) -> subprocess.Popen:
    """A run whose step 1 sends itself `sends` (signals), as a user's Ctrl-C or a scheduler's SIGTERM would."""
    return _child(f"""
        import os, sys
        from guidedrl.app.cli import main
        from guidedrl.trainer import loop
        real = loop.train_step
        def step(parts, st):
            out = real(parts, st)
            if st.step == 1:
                for sig in {[int(s) for s in sends]!r}:
                    os.kill(os.getpid(), sig)
            return out
        loop.train_step = step
        sys.exit(main({_args(data, run, ['train.steps=5', 'run.save_every=0'])!r}))
    """)


@pytest.mark.slow
def test_ctrl_c_checkpoints_then_exits_130(data: Path, tmp_path: Path) -> None:
    """(SIGTERM -> 143: tests/test_resume.py::test_sigterm_checkpoints_exits_143_and_resumes.)"""
    run = tmp_path / "run"
    proc = _signal_child(data, run, [signal.SIGINT])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out
    assert "Traceback" not in out and f"guidedrl train --resume {run}" in out
    assert (run / "checkpoints" / "step-000002" / "COMPLETE").exists() and not (run / "DONE").exists()


@pytest.mark.slow
def test_second_ctrl_c_stops_at_once_with_one_line(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = _signal_child(data, run, [signal.SIGINT, signal.SIGINT])
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out
    assert "Traceback" not in out and "second signal" in out
    assert not (run / "checkpoints" / "step-000002").exists(), "it did not wait to checkpoint"
