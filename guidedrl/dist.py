"""Thin helpers over torch.distributed so every global-batch statistic has one code path.

Token counts, sequence counts and batch means/stds go through `global_sum`: with one process it is
the identity, under `torchrun` it is an all-reduce (SUM) over the default process group. Nothing
here is differentiable: these are statistics and normalizers, never loss terms.
"""

from __future__ import annotations

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
