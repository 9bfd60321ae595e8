"""The CPU allocator setting (`guidedrl.memory`): freed memory is reused instead of faulted in again."""

from __future__ import annotations

import platform
import subprocess
import sys
import textwrap

import pytest

import guidedrl.parts as parts_mod
from guidedrl.config import load_config

# Five training steps of a small MLP (activations of 4 and 16 MiB, more than glibc's starting mmap and
# trim thresholds of 128 KiB), after six to settle; prints the process's minor page faults over them.
# One thread: the allocation order is then the same from run to run.
_PROBE = textwrap.dedent("""
    import resource, sys, torch
    if sys.argv[1] == "keep":
        from guidedrl.memory import keep_freed_memory
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
    for _ in range(6):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
""")


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's")
def test_keep_freed_memory_reuses_pages():
    default, keep = _faults("default"), _faults("keep")
    # default: freed activations go back to the OS and fault in again (21,000-66,000 faults over the
    # five steps in development runs, 4 KiB each); kept: reused from the heap (0-548)
    assert default > 10000
    assert keep < 0.1 * default


@pytest.mark.parametrize("flag", [True, False])
def test_build_parts_applies_the_setting_on_cpu(monkeypatch, flag):
    calls: list[int] = []
    monkeypatch.setattr(parts_mod, "keep_freed_memory", lambda: calls.append(1) or True)
    cfg = load_config(None, ["model.path=tiny", "data.eval=null", "eval.enabled=false", "run.progress=false",
                             "rollout.max_new_tokens=4", "rollout.group_size=2", "train.prompts_per_step=2",
                             f"train.keep_freed_memory={str(flag).lower()}"])
    parts_mod.build_parts(cfg)
    assert calls == ([1] if flag else [])
