"""Reports: metrics parsing, run summaries (hand-computed), plots, self-contained HTML, and the HTML
rendered by headless Chromium (installed with apt-get when absent)."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest

from guidedrl.core.errors import DataError
from guidedrl.eval.results import EvalResult, GroupMetrics, ProblemResult
from guidedrl.app.compare import report
from guidedrl.core.tables import md_table
from guidedrl.app.report import (
    PLOTS, Section, TableData, plot_compare, plot_run, read_metrics, series, summarize_run,
    write_html,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def synthetic_rows(steps: int = 4, reward0: float = 0.1, levels: tuple[int, ...] = (1, 3)) -> list[dict]:
    """metrics.jsonl rows the way train.run logs them: eval before (step -1), steps, eval after."""
    rows = [{"step": -1, "eval/pass@1": 0.1, **{f"eval/L{lv}/pass@1": 0.2 / lv for lv in levels}}]
    for s in range(steps):
        rows.append({"step": s, "reward/mean": reward0 + 0.1 * s, "policy/entropy": 2.0 - 0.1 * s, "policy/len_mean": 10.0 + s,
                     "guide/solved_share": 0.25 * s / steps, "guide/guided_share": 0.5, "time/step": 1.5,
                     "perf/tokens_generated": 100.0, "loss/total": None})
    rows.append({"step": steps - 1, "eval/pass@1": 0.4, "eval/pass@4": 0.7,
                 **{f"eval/L{lv}/pass@1": 0.6 / lv for lv in levels},
                 **{f"eval/L{lv}/pass@4": 0.9 / lv for lv in levels}})
    return rows


def write_run(run: Path, rows: list[dict]) -> Path:
    run.mkdir(parents=True, exist_ok=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "config.yaml").write_text("name: grpo\ntrain:\n  steps: 4\n")
    return run


# ----------------------------------------------------------------------------- metrics


def test_read_metrics_and_errors(tmp_path):
    run = write_run(tmp_path / "r", synthetic_rows())
    rows = read_metrics(run)
    assert len(rows) == 6 and rows[0]["step"] == -1
    (run / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1,\n')
    with pytest.raises(DataError, match=r"metrics.jsonl:2: invalid JSON"):
        read_metrics(run)
    (run / "metrics.jsonl").write_text('{"step": 0}\n\n["no"]\n')
    with pytest.raises(DataError, match=r"metrics.jsonl:3: expected a JSON object"):
        read_metrics(run)
    with pytest.raises(DataError, match="no metrics.jsonl"):
        read_metrics(tmp_path / "nothing")


def test_series_skips_missing_and_keeps_last_duplicate():
    rows = [{"step": 2, "x": 3.0}, {"step": 0, "x": 1.0}, {"step": 1, "x": None}, {"step": 1, "y": 5.0},
            {"step": 3, "x": float("nan")}, {"step": 2, "x": 4.0}]
    assert series(rows, "x") == ([0, 2], [1.0, 4.0])
    assert series(rows, "missing") == ([], [])


def test_summarize_run_hand_values():
    # 4 steps: time 4*1.5 = 6 s, tokens 4*100 = 400, guided share mean .5, last reward .1+.3 = .4;
    # eval keys take the last logged value (after training): pass@1 .4, L3 pass@1 .6/3 = .2, pass@4 .7.
    s = summarize_run(synthetic_rows())
    assert s["steps"] == 4 and s["time/train"] == pytest.approx(6.0) and s["perf/tokens_generated"] == 400
    assert s["guide/guided_share"] == pytest.approx(0.5) and s["reward/last"] == pytest.approx(0.4)
    assert s["eval/pass@1"] == pytest.approx(0.4) and s["eval/L3/pass@1"] == pytest.approx(0.2)
    assert s["eval/pass@4"] == pytest.approx(0.7)
    assert "loss/total" not in s


# ----------------------------------------------------------------------------- plots and documents


def _is_png(p: Path) -> bool:
    return p.exists() and p.stat().st_size > 1000 and p.read_bytes()[:8] == PNG_MAGIC


def test_plot_run_writes_every_plot(tmp_path):
    paths, notes = plot_run(synthetic_rows(), tmp_path / "plots", title="demo")
    assert [p.stem for p in paths] == [spec.name for spec in PLOTS] and notes == []
    assert all(_is_png(p) for p in paths)


def test_plot_run_skips_missing_metrics_with_a_note(tmp_path):
    rows = [{"step": s, "reward/mean": 0.1 * s} for s in range(3)]
    paths, notes = plot_run(rows, tmp_path)
    assert [p.name for p in paths] == ["reward.png"]
    assert len(notes) == len(PLOTS) - 1 and any("entropy" in n and "skipped" in n for n in notes)
    assert not (tmp_path / "entropy.png").exists()


def test_plot_compare_two_recipes_two_seeds(tmp_path):
    groups = {"grpo": [synthetic_rows(), synthetic_rows(reward0=0.2)], "guided": [synthetic_rows(levels=(1, 2, 3, 5))]}
    paths, notes = plot_compare(groups, tmp_path)
    assert [p.stem for p in paths] == [spec.name for spec in PLOTS] and notes == []
    assert all(_is_png(p) for p in paths)


def test_md_table_escapes_pipes():
    assert md_table(["a", "b|c"], [["1", "x|y"]]) == "| a | b\\|c |\n|---|---|\n| 1 | x\\|y |\n"


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.srcs: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.srcs += [v for k, v in attrs if k in ("src", "href") and v]

    def handle_data(self, data):
        self.text.append(data)


def test_write_html_is_self_contained(tmp_path):
    import matplotlib.image as mpimg

    paths, _ = plot_run(synthetic_rows(), tmp_path / "plots")
    out = write_html(tmp_path / "r.html", "<b>title</b>", [
        Section("One", ["a <script>alert(1)</script> paragraph"], [TableData(["k", "v"], [["x", "1"]], "cap")], paths),
        Section("Two", pre="key: value\n"),
    ])
    doc = out.read_text()
    parser = _Collect()
    parser.feed(doc)
    assert "script" not in parser.tags  # user text is escaped, the page carries no script
    assert "&lt;b&gt;title&lt;/b&gt;" in doc and parser.tags.count("img") == len(paths)
    assert all(s.startswith("data:image/png;base64,") for s in parser.srcs)  # nothing external
    for src in parser.srcs:
        png = base64.b64decode(src.split(",", 1)[1])
        assert png[:8] == PNG_MAGIC
        (tmp_path / "x.png").write_bytes(png)
        assert mpimg.imread(tmp_path / "x.png").shape[0] > 100


def _eval_result(p1: float) -> EvalResult:
    g = GroupMetrics(count=2, metrics={"pass@1": p1, "mean@1": p1, "majority@1": p1, "score": p1})
    return EvalResult(n=1, ks=[1], overall=g, levels={1: g},
                      problems=[ProblemResult(id="a", level=1, n=1, correct=1, score=1.0)], meta={"model": "m"})


def test_report_single_run(tmp_path):
    run = write_run(tmp_path / "grpo-s0", synthetic_rows())
    (run / "eval_after.json").write_text(json.dumps(_eval_result(0.75).to_json()))
    html_path = report([run])
    assert html_path == run / "report.html"
    doc = html_path.read_text()
    assert "Evaluation after training" in doc and "0.750" in doc and "name: grpo" in doc
    assert all(_is_png(run / "plots" / f"{s.name}.png") for s in PLOTS)
    md = (run / "report.md").read_text()
    assert "![reward](plots/reward.png)" in md and "| steps | 4 |" in md and "| perf/tokens_generated | 400 |" in md


def test_report_several_runs_is_a_comparison(tmp_path):
    runs = [write_run(tmp_path / "grpo-s0", synthetic_rows()), write_run(tmp_path / "grpo-s1", synthetic_rows()),
            write_run(tmp_path / "other", synthetic_rows(reward0=0.5))]
    out = report(runs, tmp_path / "cmp")
    assert out == tmp_path / "cmp" / "report.html" and out.exists()
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert re.search(r"\| grpo \| 2 \|", md) and re.search(r"\| other \| 1 \|", md)
    with pytest.raises(DataError, match="no metrics.jsonl"):
        report([tmp_path / "nope"])
    bad = tmp_path / "bad"
    write_run(bad, synthetic_rows())
    (bad / "eval_before.json").write_text('{"n": 1}')
    with pytest.raises(DataError, match="eval_before.json: not an evaluation result"):
        report([bad])


# ----------------------------------------------------------------------------- headless Chromium


@pytest.fixture(scope="session")
def chromium() -> str:
    """The chromium executable; installed with apt-get (we are root) when absent."""
    exe = shutil.which("chromium")
    if exe is not None:
        return exe
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        pytest.skip("chromium is not installed and cannot be installed here (needs apt-get as root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log = []
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "chromium"]):
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
        except subprocess.TimeoutExpired:
            pytest.skip(f"chromium could not be installed: `{' '.join(cmd)}` timed out")
        log.append(r.stdout[-400:] + r.stderr[-400:])
        if r.returncode != 0:
            break
    exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("chromium could not be installed with apt-get: " + " / ".join(log))
    return exe


def render(chromium: str, page: Path, png: Path, profile: Path) -> subprocess.CompletedProcess:
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--enable-logging=stderr", "--v=0", f"--user-data-dir={profile}", f"--screenshot={png}",
           "--window-size=1200,900", page.resolve().as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def console_messages(stderr: str) -> list[str]:
    """Chromium's page-console lines (`...:INFO:CONSOLE:1] "msg"` or `CONSOLE(1)`) and uncaught errors.

    The report carries no script, so any console line at all is a problem (Chromium logs
    console.error at the same INFO level as console.log, so errors cannot be told apart by level)."""
    return [ln for ln in stderr.splitlines() if "Uncaught" in ln or re.search(r":CONSOLE[:(]\d+", ln)]


def test_html_report_renders_in_headless_chromium(chromium, tmp_path):
    import matplotlib.image as mpimg

    run = write_run(tmp_path / "grpo-s0", synthetic_rows())
    (run / "eval_after.json").write_text(json.dumps(_eval_result(0.5).to_json()))
    page = report([run])
    png = tmp_path / "shot.png"
    t0 = time.perf_counter()
    r = render(chromium, page, png, tmp_path / "profile")
    seconds = time.perf_counter() - t0
    assert r.returncode == 0, r.stderr[-2000:]
    assert console_messages(r.stderr) == [], r.stderr[-2000:]
    img = mpimg.imread(png)  # (H, W, C) floats in [0, 1]
    assert img.shape[:2] == (900, 1200)
    gray = img[..., :3].mean(axis=-1)  # (H, W)
    assert gray.std() > 0.05 and (gray < 0.5).mean() > 0.005, "screenshot is blank"
    # the check can fail: a page with a script error is caught, a blank page is flagged blank
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><script>undefinedFunction();</script></body></html>")
    r2 = render(chromium, bad, tmp_path / "bad.png", tmp_path / "profile2")
    assert console_messages(r2.stderr), r2.stderr[-2000:]
    blank = mpimg.imread(tmp_path / "bad.png")[..., :3].mean(axis=-1)
    assert not (blank.std() > 0.05)
    print(f"chromium render of the report: {seconds:.1f} s")
