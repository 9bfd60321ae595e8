"""Reductions with global normalizers: hand values, micro-batch additivity, padding, and the same
under torch.distributed (gloo, 2 processes on CPU)."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from guidedrl.core import dist
from guidedrl.algo.reduce import REDUCTIONS, build_reducer
from guidedrl.core.config import ReduceConfig
from guidedrl.core.config import load_config
from guidedrl.core.errors import ConfigError

T = torch.tensor
MODES = list(REDUCTIONS)

# rows: [1, 2, (3)], [4, (5), (6)], [(7), (7), (7)] -- parentheses = masked; row 2 is fully masked
LOSS = T([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 7.0, 7.0]])
MASK = T([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])


@pytest.mark.parametrize(
    "name, expected",
    [
        ("token_mean", 7 / 3),  # (1 + 2 + 4) / 3 tokens
        ("seq_mean_token_mean", 2.75),  # (mean(1, 2) + mean(4)) / 2 sequences = (1.5 + 4) / 2
        ("seq_mean_token_sum", 3.5),  # ((1 + 2) + 4) / 2 sequences
        ("sum_over_constant", 0.35),  # 7 / (2 sequences * constant 10)
    ],
)
def test_reductions_by_hand(name, expected):
    red = build_reducer(ReduceConfig(name=name, constant=10.0), MASK, default_constant=99.0)
    assert abs(float(red.tokens(LOSS, MASK)) - expected) < 1e-6


def test_fully_masked_rows_are_not_sequences_and_seqs_divides_by_them():
    red = build_reducer(ReduceConfig(), MASK, default_constant=1.0)
    assert red.counts.seqs == 2.0 and red.counts.tokens == 3.0
    assert abs(float(red.seqs(T([1.0, 3.0, 0.0]))) - 2.0) < 1e-6  # (1 + 3) / 2


def test_default_constant_and_bad_constant():
    red = build_reducer(ReduceConfig(name="sum_over_constant"), MASK, default_constant=7.0)
    assert abs(float(red.tokens(LOSS, MASK)) - 7 / (2 * 7.0)) < 1e-6
    with pytest.raises(ConfigError, match="algo.reduce.constant"):
        load_config(None, ["algo.reduce={name: sum_over_constant, constant: 0.0}"])


def test_masked_nan_and_inf_do_not_leak():
    loss = LOSS.clone()
    loss[0, 2], loss[2, 1] = float("nan"), float("inf")
    for name in MODES:
        red = build_reducer(ReduceConfig(name=name, constant=10.0), MASK, 1.0)
        assert torch.isfinite(red.tokens(loss, MASK))


@pytest.mark.parametrize("name", MODES)
def test_micro_batches_sum_to_the_batch_loss_and_gradient(name):
    torch.manual_seed(0)
    x = torch.randn(7, 5, requires_grad=True)
    mask = (torch.rand(7, 5) > 0.4).float()
    mask[3] = 0  # a fully masked row in the middle
    red = build_reducer(ReduceConfig(name=name, constant=5.0), mask, 1.0)
    full = red.tokens(x**2, mask)
    (g_full,) = torch.autograd.grad(full, x)
    parts = [slice(0, 2), slice(2, 3), slice(3, 7)]
    micro = sum(red.tokens(x[s] ** 2, mask[s]) for s in parts)
    (g_micro,) = torch.autograd.grad(micro, x)
    assert abs(float(full.detach()) - float(micro.detach())) < 1e-5
    torch.testing.assert_close(g_micro, g_full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", MODES)
def test_padding_more_columns_changes_nothing(name):
    red = build_reducer(ReduceConfig(name=name, constant=10.0), MASK, 1.0)
    wide_loss = torch.cat([LOSS, torch.full((3, 4), 123.0)], dim=1)
    wide_mask = torch.cat([MASK, torch.zeros(3, 4)], dim=1)
    red_wide = build_reducer(ReduceConfig(name=name, constant=10.0), wide_mask, 1.0)
    assert abs(float(red.tokens(LOSS, MASK)) - float(red_wide.tokens(wide_loss, wide_mask))) < 1e-6


def test_single_process_dist_helpers():
    assert dist.world_size() == 1 and dist.rank() == 0 and dist.is_main()
    x = T([1.0, 2.0])
    torch.testing.assert_close(dist.global_sum(x), x)
    v = T([1.0, 2.0, 4.0, 100.0])
    mean, std = dist.global_mean_std(v, T([True, True, True, False]))
    # mean 7/3; unbiased std of [1, 2, 4] = sqrt((16/9 + 1/9 + 25/9) / 2) = sqrt(7/3)
    assert abs(float(mean) - 7 / 3) < 1e-6 and abs(float(std) - (7 / 3) ** 0.5) < 1e-6


# ----------------------------------------------------------------------------- 2 processes (gloo)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch_dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        x, mask = torch.randn(6, 4), (torch.rand(6, 4) > 0.3).float()  # same full batch on both ranks
        mask[5] = 0
        rows = slice(0, 2) if rank == 0 else slice(2, 6)  # uneven shards
        res = {"world": dist.world_size(), "rank": dist.rank()}
        for name in MODES:
            red = build_reducer(ReduceConfig(name=name, constant=3.0), mask[rows], 1.0)
            res[name] = float(red.tokens(x[rows], mask[rows]))
        mean, std = dist.global_mean_std(x[rows], mask[rows])
        res["mean"], res["std"] = float(mean), float(std)
        torch.save(res, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        torch_dist.destroy_process_group()


def test_two_processes_shares_sum_to_the_global_loss():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        r0, r1 = (torch.load(os.path.join(tmp, f"{r}.pt")) for r in (0, 1))
    assert (r0["world"], r0["rank"], r1["rank"]) == (2, 0, 1)
    torch.manual_seed(0)
    x, mask = torch.randn(6, 4), (torch.rand(6, 4) > 0.3).float()
    mask[5] = 0
    for name in MODES:
        full = float(build_reducer(ReduceConfig(name=name, constant=3.0), mask, 1.0).tokens(x, mask))
        assert abs(r0[name] + r1[name] - full) < 1e-5, name
    sel = mask > 0
    for r in (r0, r1):
        assert abs(r["mean"] - float(x[sel].mean())) < 1e-5
        assert abs(r["std"] - float(x[sel].std())) < 1e-5
