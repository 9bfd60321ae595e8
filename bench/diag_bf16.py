"""Why does a bf16 train step on CUDA go non-finite (tests/gpu: the bf16 step test)? One run on a GPU.

    python3 bench/diag_bf16.py            # run by bench/run_gpu.sh

The same job as the failing test, under each sdpa backend in turn (math, memory-efficient, flash,
cuDNN; one at a time, an unavailable one is reported and skipped), with and without the static
decode. For each: whether the step's loss is finite, and the first module (in call order) whose
forward output holds a non-finite value, with the share of such values and the batch's left
padding. The CPU run of the same step is finite; the suspect is attention over fully masked
(left-padding) query rows in bf16.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
for _k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_k, "1")


def first_nonfinite(model: torch.nn.Module) -> tuple[list[Any], list[Any]]:
    """Forward hooks that record (module name, share of non-finite outputs) in call order."""
    found: list[Any] = []
    handles = []
    for name, mod in model.named_modules():
        def hook(m: Any, i: Any, o: Any, name: str = name) -> None:
            t = o[0] if isinstance(o, tuple) else o
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not found:
                bad = ~torch.isfinite(t)
                if bool(bad.any()):
                    found.append((name, float(bad.float().mean()), tuple(t.shape)))
        handles.append(mod.register_forward_hook(hook))
    return found, handles


def one(backend: str, static: bool) -> str:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from guidedrl.core.config import load_config
    from guidedrl.trainer.build import build
    from guidedrl.trainer.loop import seed_everything
    from guidedrl.trainer.step import StepState, train_step

    cfg = load_config(None, [
        "model.path=tiny", "model.device=cuda", "data.eval=null", "eval.enabled=false", "run.progress=false",
        "rollout.max_new_tokens=16", "rollout.group_size=4", "train.prompts_per_step=2", "train.lr=1e-3",
        "reward.terms=[{name: regex_format, args: {pattern: e}}]", "data.train.task=arith",
        f"rollout.static_cache={str(static).lower()}",
    ])
    seed_everything(0)
    parts = build(cfg)
    found, handles = first_nonfinite(parts.policy.model)
    try:
        with sdpa_kernel(getattr(SDPBackend, backend)):
            metrics, flat = train_step(parts, StepState())
    except Exception as e:  # noqa: BLE001 - report any failure of this backend and go on
        return f"{backend:22s} static={static!s:5s} error {type(e).__name__}: {str(e)[:160]}"
    finally:
        for h in handles:
            h.remove()
    plens = sorted({len(c.gen_context) for c in flat})
    return (f"{backend:22s} static={static!s:5s} loss {metrics.get('loss/policy')} nonfinite {metrics.get('nonfinite')} "
            f"prompt lengths {plens} first non-finite output: {found[0] if found else None}")


def main() -> None:
    assert torch.cuda.is_available(), "needs CUDA"
    for backend in ("MATH", "EFFICIENT_ATTENTION", "FLASH_ATTENTION", "CUDNN_ATTENTION"):
        for static in (True, False):
            print(one(backend, static), flush=True)


if __name__ == "__main__":
    main()
