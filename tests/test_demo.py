"""`guidedrl demo --quick` end to end on CPU, with a shrunken base recipe so the base builds in seconds.

What the real demo shows (GRPO vs a guided recipe on the real base) is recorded in docs/results.md
by the commands given there; this test checks the whole path works and writes a complete report.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from guidedrl.nn import base
from guidedrl.app.cli import main

SMALL = {
    "hidden_size": 32, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1, "intermediate_size": 64,
    "steps": 4, "batch_size": 8, "warmup": 1, "problems_per_level": 40, "measure_problems": 0,
}


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("GUIDEDRL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(base, "BASE_RECIPE", dataclasses.replace(base.BASE_RECIPE, **SMALL))
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--steps", "2", "--out", str(out)]) == 0
    folder = out / "quick"
    runs = sorted(p.name for p in folder.iterdir() if p.is_dir() and (p / "DONE").exists())
    assert runs == ["grpo-s0", "luffy-s0"]
    for run in runs:
        metrics = [json.loads(line) for line in (folder / run / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in metrics if "reward/mean" in m] == [0, 1]
    for name in ("compare.md", "compare.json", "report.html"):
        assert (folder / name).stat().st_size > 0
    plots = list(folder.glob("plots/*.png"))
    assert len(plots) >= 3 and all(p.stat().st_size > 1000 for p in plots)
    table = (folder / "compare.md").read_text()
    assert "grpo" in table and "luffy" in table and "pass@1" in table
    cap = capfd.readouterr()
    printed = cap.out + cap.err
    assert "demo finished" in printed
    # a second run reuses the finished runs instead of training again
    assert main(["demo", "--quick", "--steps", "2", "--out", str(out)]) == 0
    cap = capfd.readouterr()
    again = cap.out + cap.err
    assert len(re.findall(r":\s+done\b", again)) == 2 and "trained" not in again
