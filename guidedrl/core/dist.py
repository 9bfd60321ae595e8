"""Thin helpers over torch.distributed: data parallelism under `torchrun`, and one code path for
every global-batch statistic.

Token counts, sequence counts and batch means/stds go through `global_sum`: with one process it is
the identity, under `torchrun` it is an all-reduce (SUM) over the default process group. Nothing
here is differentiable: these are statistics and normalizers, never loss terms.

Data parallelism (`torchrun --nproc_per_node N -m guidedrl train ...`): every process holds the
whole policy, samples its share of the step's prompts, and computes its share of the global loss
(the reducers divide by global counts); `sum_gradients` then all-reduces the gradients (SUM), so
every process takes the same optimizer step on the gradient of the global loss. Plain
`all_reduce` over a flattened gradient instead of DDP: the update calls the trunk and the LM head
separately (chunked log-probs), which DDP's forward hook would not see. Gloo on CPU, NCCL on CUDA.
Departure from the design's FSDP2: every process keeps a whole copy of the policy and optimizer
state (plain data parallelism), so the policy must fit one device; sharding is not built yet.
"""

from __future__ import annotations

import math
import os
from typing import Any, Iterable

import torch
import torch.distributed as torch_dist
from torch import Tensor


def is_initialized() -> bool:
    """True when a default process group exists (running under torchrun / init_process_group)."""
    return torch_dist.is_available() and torch_dist.is_initialized()


def world_size() -> int:
    """Number of processes (1 without torch.distributed)."""
    return torch_dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    """This process's rank (0 without torch.distributed)."""
    return torch_dist.get_rank() if is_initialized() else 0


def is_main() -> bool:
    """True on the process that logs, saves and prints."""
    return rank() == 0


def global_sum(x: Tensor) -> Tensor:
    """Elementwise sum of `x` over all processes (a detached copy; identity with one process)."""
    y = x.detach().clone()
    if is_initialized():
        torch_dist.all_reduce(y, op=torch_dist.ReduceOp.SUM)
    return y


def global_mean_std(values: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unbiased std of `values` where `mask` is set, over every process.

    values, mask: same shape (mask bool or float weights) -> (mean, std), scalar tensors.
    Two passes (mean first, then squared deviations) for numerical stability. The std uses
    Bessel's correction like `torch.std` and verl's `masked_whiten`; with fewer than two
    counted elements it is 0 (and the mean of nothing is 0).
    """
    v = values.detach().to(torch.float64)
    m = mask.detach().to(torch.float64)
    sums = global_sum(torch.stack([(v * m).sum(), m.sum()]))  # (2,): [sum, count]
    n = sums[1]
    mean = sums[0] / n.clamp(min=1.0)
    ss = global_sum(((v - mean) ** 2 * m).sum())
    var = ss / (n - 1.0).clamp(min=1.0)
    std = torch.where(n >= 2, var.sqrt(), torch.zeros_like(var))
    return mean.to(values.dtype), std.to(values.dtype)


def init_from_env() -> bool:
    """Join the process group `torchrun` describes (WORLD_SIZE > 1 in the environment): gloo for CPU
    tensors, NCCL for CUDA ones, this process on GPU LOCAL_RANK. -> whether more than one process runs."""
    if is_initialized():
        return world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch_dist.init_process_group(backend="cpu:gloo,cuda:nccl")
    else:
        torch_dist.init_process_group(backend="gloo")
    return True


def shutdown() -> None:
    """Leave the process group (after a barrier, so that no process exits while another still works)."""
    if is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()


def sum_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """All-reduce (SUM) the gradients of `params` in place, as one flat buffer (one collective).

    A parameter without a gradient counts as zeros, so every process reduces the same buffer."""
    if not is_initialized() or world_size() == 1:
        return
    ps = [p for p in params if p.requires_grad]
    for p in ps:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in ps]
    flat = torch._utils._flatten_dense_tensors(grads)  # (sum of numels,)
    torch_dist.all_reduce(flat, op=torch_dist.ReduceOp.SUM)
    for g, s in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads), strict=True):
        g.copy_(s)


def all_true(flag: bool) -> bool:
    """Whether `flag` holds on every process (so that every process takes the same branch)."""
    if not is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MIN)
    return bool(t.item() == 1.0)


def any_true(flag: bool) -> bool:
    """Whether `flag` holds on at least one process."""
    return not all_true(not flag)


def broadcast_object(obj: Any) -> Any:
    """Process 0's `obj` on every process (e.g. a run folder named by the clock)."""
    if not is_initialized():
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


def broadcast_module(module: torch.nn.Module) -> None:
    """Process 0's parameters and buffers on every process, in place."""
    if not is_initialized():
        return
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            torch_dist.broadcast(t.data, src=0)


def mean_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Each metric averaged over the processes that report a finite value for it (NaN where none does)."""
    if not is_initialized() or world_size() == 1:
        return metrics
    every: list[dict[str, float]] = [{} for _ in range(world_size())]
    torch_dist.all_gather_object(every, metrics)
    out: dict[str, float] = {}
    for k in sorted({k for m in every for k in m}):
        vals = [float(m[k]) for m in every if isinstance(m.get(k), (int, float)) and math.isfinite(float(m[k]))]
        out[k] = sum(vals) / len(vals) if vals else float("nan")
    return out
