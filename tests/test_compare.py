"""`guidedrl compare`: tables (mean ± std over seeds, hand-computed), plots and the report with a
scripted trainer; resumability; and a real run of two recipes with the tiny model (slow)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from guidedrl.app.compare import CompareStopped, compare, config_differences, group_runs, mean_pm
from guidedrl.core.config import dump_config
from guidedrl.core.errors import ConfigError
from guidedrl.app.report import PLOTS

FINAL_PASS1 = {"a": 0.2, "b": 0.5}
"""Final eval/pass@1 of seed 0; seed s adds 0.2 * s."""


def scripted_trainer(calls: list[tuple[str, bool]], finish: bool = True):
    """A stand-in for guidedrl.trainer.loop.run writing metrics the way it does (eval rows at -1 and at the end)."""

    def train(cfg, run_dir: Path, *, resume: bool) -> Path:
        calls.append((run_dir.name, resume))
        assert resume or not (run_dir / "metrics.jsonl").exists(), "stale metrics left for a fresh run"
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(cfg))
        p1 = FINAL_PASS1[cfg.name] + 0.2 * cfg.train.seed
        rows = [{"step": -1, "eval/pass@1": 0.0, "eval/L1/pass@1": 0.0, "eval/L2/pass@1": 0.0}]
        for s in range(cfg.train.steps):
            rows.append({"step": s, "reward/mean": 0.1 * s, "policy/entropy": 1.0, "policy/len_mean": 5.0 + s,
                         "guide/solved_share": 0.1 * s, "guide/guided_share": 0.25 if cfg.name == "b" else 0.0,
                         "time/step": 1.5, "perf/tokens_generated": 100.0})
        rows.append({"step": cfg.train.steps - 1, "eval/pass@1": p1, "eval/pass@4": 0.5, "eval/L1/pass@1": p1 + 0.1,
                     "eval/L1/pass@4": 0.6, "eval/L2/pass@1": p1 - 0.1, "eval/L2/pass@4": 0.4})
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        if finish:
            (run_dir / "DONE").write_text("{}\n")
        return run_dir

    return train


@pytest.fixture()
def recipes(tmp_path) -> list[str]:
    (tmp_path / "a.yaml").write_text("name: a\n")
    (tmp_path / "b.yaml").write_text("name: b\nrollout:\n  group_size: 4\n")
    return [str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml")]


def _compare(recipes, out, calls, overrides=("train.lr=1e-4",), **kw):
    return compare(recipes, overrides=list(overrides), steps=3, seeds=[0, 1], out=out,
                   train_fn=scripted_trainer(calls, **kw))


def test_mean_pm_hand_values():
    # seeds .2 and .4: mean .3, sample std sqrt((.1^2 + .1^2) / 1) = .1414
    assert mean_pm([0.2, 0.4]) == "0.300 ± 0.141"
    assert mean_pm([4.5, 4.5], 1) == "4.5 ± 0.0"
    assert mean_pm([0.7]) == "0.700" and mean_pm([]) == "-"


def test_compare_tables_plots_and_report(tmp_path, recipes):
    out = tmp_path / "cmp"
    calls: list[tuple[str, bool]] = []
    html = _compare(recipes, out, calls)
    assert calls == [("a-s0", False), ("a-s1", False), ("b-s0", False), ("b-s1", False)]
    md = (out / "compare.md").read_text()
    # a: pass@1 .2/.4 -> .300 ± .141; pass@4 .5/.5; last reward .2; time 3*1.5 = 4.5 s; 300 tokens; guided 0.
    assert "| a | 2 | 0.300 ± 0.141 | 0.500 ± 0.000 | 0.200 ± 0.000 | 4.5 ± 0.0 | 300 ± 0 | 0.000 ± 0.000 |" in md
    # b: pass@1 .5/.7 -> .600 ± .141; guided share .25.
    assert "| b | 2 | 0.600 ± 0.141 | 0.500 ± 0.000 | 0.200 ± 0.000 | 4.5 ± 0.0 | 300 ± 0 | 0.250 ± 0.000 |" in md
    # per level: L1 = pass@1 + .1 (a: .3/.5 -> .400 ± .141), L2 = pass@1 - .1 (b: .4/.6 -> .500 ± .141).
    # pass@1 per level is shown as before -> after (before: the step -1 eval row, 0.0 for every level).
    assert "| recipe | L1 | L2 |" in md
    assert "| a | 0.00 → 0.40 ± 0.14 | 0.00 → 0.20 ± 0.14 |" in md
    assert "| b | 0.00 → 0.70 ± 0.14 | 0.00 → 0.50 ± 0.14 |" in md
    assert "| recipe | L1 pass@4 | L2 pass@4 |" in md
    assert "| a | 0.60 ± 0.00 | 0.40 ± 0.00 |" in md
    assert "`rollout.group_size` differs between recipes" in md  # not like for like: said so
    assert "budget: 3 steps per run, seeds [0, 1]" in md
    for spec in PLOTS:
        png = out / "plots" / f"{spec.name}.png"
        assert png.stat().st_size > 1000 and f"plots/{spec.name}.png" in md
    assert html == out / "report.html" and html.read_text().count("data:image/png;base64,") == len(PLOTS)
    raw = json.loads((out / "compare.json").read_text())
    assert [s["eval/pass@1"] for s in raw["summaries"]["b"]] == pytest.approx([0.5, 0.7])


def test_compare_is_resumable(tmp_path, recipes):
    out = tmp_path / "cmp"
    calls: list[tuple[str, bool]] = []
    _compare(recipes, out, calls)
    calls.clear()
    _compare(recipes, out, calls)
    assert calls == []  # finished runs are not redone
    (out / "b-s1" / "DONE").unlink()  # unfinished, no checkpoint: starts over (stale metrics removed)
    ck = out / "a-s0" / "checkpoints" / "step-000002"  # unfinished with a complete checkpoint: resumes
    ck.mkdir(parents=True)
    (ck / "COMPLETE").write_text("ok\n")
    (out / "a-s0" / "DONE").unlink()
    _compare(recipes, out, calls)
    assert calls == [("a-s0", True), ("b-s1", False)]


def test_compare_refuses_a_finished_run_with_another_config(tmp_path, recipes):
    out = tmp_path / "cmp"
    _compare(recipes, out, [])
    with pytest.raises(ConfigError, match=r"a-s0 finished with a different config \(train.lr differ"):
        _compare(recipes, out, [], overrides=("train.lr=3e-4",))


def test_compare_stops_when_a_run_does_not_finish(tmp_path, recipes):
    with pytest.raises(CompareStopped, match="rerun the same command to resume"):
        _compare(recipes, tmp_path / "cmp", [], finish=False)


def test_compare_rejects_duplicate_recipes(tmp_path, recipes):
    with pytest.raises(ConfigError, match="given twice"):
        compare([recipes[0], recipes[0]], steps=1, seeds=[0], out=tmp_path, train_fn=scripted_trainer([]))


def test_group_runs_and_config_differences():
    runs = [Path("x/grpo-s0"), Path("x/luffy-s0"), Path("x/grpo-s1"), Path("x/custom")]
    assert group_runs(runs) == {"grpo": [runs[0], runs[2]], "luffy": [runs[1]], "custom": [runs[3]]}
    a = {"train": {"lr": 1e-5, "seed": 0}, "run": {"name": "x"}, "algo": {"loss": {"name": "ppo_clip"}}}
    b = {"train": {"lr": 1e-5, "seed": 1}, "run": {"name": "y"}, "algo": {"loss": {"name": "nft"}}}
    assert config_differences(a, b) == ["algo.loss.name", "train.seed"]


@pytest.mark.slow
def test_compare_two_recipes_with_the_tiny_model(tmp_path):
    """The real thing through the CLI: grpo vs luffy (a guided recipe), tiny model, 2 steps each."""
    from guidedrl.app.cli import main

    data = tmp_path / "data.jsonl"
    rows = [{"id": f"q{i}", "prompt": f"What is {i} + {i}?", "answer": str(2 * i), "level": 1 + i % 2,
             "reference": f"{i} + {i} = {2 * i}", "hints": [f"Double {i}."]} for i in range(4)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "cmp"
    sets = ["model.path=tiny", f"data.train.path={data}", f"data.eval.path={data}", "rollout.group_size=2",
            "rollout.max_new_tokens=8", "train.prompts_per_step=2", "eval.samples=2", "run.progress=false"]
    argv = ["compare", "grpo", "luffy", "--steps", "2", "--seeds", "1", "--out", str(out)]
    argv += [x for s in sets for x in ("--set", s)]
    assert main(argv) == 0
    for run in ("grpo-s0", "luffy-s0"):
        assert (out / run / "DONE").exists() and (out / run / "metrics.jsonl").stat().st_size > 0
    md = (out / "compare.md").read_text()
    assert re.search(r"\| grpo \| 1 \| \d\.\d{3} \| \d\.\d{3} \|", md)  # pass@1, pass@2 of the final eval
    assert re.search(r"\| luffy \| 1 \| \d\.\d{3} \| \d\.\d{3} \|", md)
    assert "| recipe | L1 | L2 |" in md and "| recipe | L1 pass@2 | L2 pass@2 |" in md
    assert re.search(r"\| grpo \| \d\.\d{2} → \d\.\d{2} \| \d\.\d{2} → \d\.\d{2} \|", md)  # before -> after
    for spec in PLOTS:
        assert (out / "plots" / f"{spec.name}.png").stat().st_size > 1000
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(PLOTS)
    mtime = (out / "grpo-s0" / "metrics.jsonl").stat().st_mtime_ns
    assert main(argv) == 0  # resumable: nothing is retrained
    assert (out / "grpo-s0" / "metrics.jsonl").stat().st_mtime_ns == mtime
