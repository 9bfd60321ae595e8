"""The CPU allocator setting (`guidedrl.trainer.memory`): freed memory is reused instead of faulted in again."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

import guidedrl.trainer.build as parts_mod
from guidedrl.core.config import load_config

# Ten training steps of a small MLP (activations of 4 and 16 MiB, more than glibc's starting mmap and
# trim thresholds of 128 KiB), after twelve to settle; prints the median of the process's minor page
# faults per step. One thread, so that the allocation order is the same from run to run; the median,
# because a heap that grows once in a while adds a step of faults either way.
_PROBE = textwrap.dedent("""
    import resource, statistics, sys, torch
    if sys.argv[1] == "keep":
        from guidedrl.trainer.memory import keep_freed_memory
        assert keep_freed_memory()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    m = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.GELU(), torch.nn.Linear(1024, 256))
    opt = torch.optim.AdamW(m.parameters())
    x = torch.randn(4096, 256)
    def step():
        m(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
    for _ in range(12):
        step()
    faults = []
    for _ in range(10):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        step()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(statistics.median(faults))
""")


# glibc's starting thresholds, fixed: set through the environment, they turn off glibc's dynamic
# raising of the mmap threshold, which otherwise may or may not (from run to run, a CI run saw a
# median of 0 faults) lift 4-16 MiB blocks into a heap that then happens not to be trimmed.
_GLIBC_START = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def _faults(mode: str, env: dict[str, str]) -> float:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True,
                         env=os.environ | env)
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
def test_keep_freed_memory_reuses_pages():
    default, keep = _faults("default", _GLIBC_START), _faults("keep", _GLIBC_START)
    # default: every 4-16 MiB activation is mmapped and unmapped, so it faults in again each step
    # (4 MiB + 16 MiB + their gradients: at least 5,000 pages of 4 KiB); kept: mallopt overrides the
    # environment's thresholds and the blocks are reused from the heap (a median of 0)
    assert default > 1000
    assert keep <= 64
    # and with glibc's own dynamic thresholds, as a user runs it
    assert _faults("keep", {}) <= 64


@pytest.mark.parametrize("flag", [True, False])
def test_build_parts_applies_the_setting_on_cpu(monkeypatch, flag):
    calls: list[int] = []
    monkeypatch.setattr(parts_mod, "keep_freed_memory", lambda: calls.append(1) or True)
    cfg = load_config(None, ["model.path=tiny", "data.eval=null", "eval.enabled=false", "run.progress=false",
                             "rollout.max_new_tokens=4", "rollout.group_size=2", "train.prompts_per_step=2",
                             f"train.keep_freed_memory={str(flag).lower()}"])
    parts_mod.build(cfg)
    assert calls == ([1] if flag else [])
