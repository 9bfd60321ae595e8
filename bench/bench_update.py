"""What the update's fast paths buy: forward + backward time of one optimizer batch, three ways.

    .venv/bin/python bench/bench_update.py                 # the CPU job's shapes, 1 thread
    .venv/bin/python bench/bench_update.py --ragged        # response lengths spread over 1/8..1 of R
    .venv/bin/python bench/bench_update.py --ragged-groups --micro-batch 16   # each group its own length
    .venv/bin/python bench/bench_update.py --ragged-groups --prompts 32 --micro-batch 16 --no-grad   # forward alone

Ways (each the same loss and gradients, see tests/test_fastpaths.py and tests/test_cascade.py):
- plain: every row's prompt + response through the trunk, micro-batches in row order, untrimmed;
- shared: each group's prompt once, its KV cache expanded to the group's rows, an explicit mask;
- cascade: each group's prompt once, the responses attend to it by cascade attention
  (`guidedrl.nn.cascade`, CPU);
- cascade+trim: also micro-batches of whole groups sorted by length, all-padding columns cut
  (what `guidedrl.trainer.update.optimizer_step` does);
- cascade+trim+tokens: the same, the micro-batches filled with whole groups up to a token budget
  (`train.micro_batch_tokens`; default: --micro-batch rows of the longest prompt + response, the
  row-count way's worst case, so the same peak memory).
The ways run interleaved (one repeat of each in turn), so a change of machine load hits all.
The model and batch shapes default to bench_trl.py's CPU job (hidden 64, 2 layers, vocab 512,
8 prompts x 8 samples, 64-token prompts, 128-token responses, micro-batches of 64).
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from guidedrl.trainer.batch import collate  # noqa: E402
from guidedrl.nn.logprobs import policy_outputs  # noqa: E402
from guidedrl.core.types import Batch, Completion, Sample  # noqa: E402
from guidedrl.trainer.update import micro_batches  # noqa: E402


def _micro_slices(n: int, size: int) -> list[list[int]]:
    """Micro-batches in row order (the plain way)."""
    return [list(range(s, min(n, s + size))) for s in range(0, n, size)]


def make_batch(a: argparse.Namespace) -> Batch:
    rng = random.Random(0)
    comps = []
    scale = [random.Random(g).uniform(1 / 8, 1) for g in range(a.prompts)]  # --ragged-groups: a length per group
    for g in range(a.prompts):
        prompt = [rng.randrange(3, a.vocab) for _ in range(a.prompt_len)]
        for _ in range(a.group):
            if a.ragged_groups:  # rows within 25% of their group's length
                n = max(1, min(a.completion_len, round(a.completion_len * scale[g] * rng.uniform(0.75, 1))))
            else:
                n = rng.randint(max(1, a.completion_len // 8), a.completion_len) if a.ragged else a.completion_len
            ids = [rng.randrange(3, a.vocab) for _ in range(n)]
            comps.append(Completion(sample=Sample(id=str(g), prompt=""), group=g, gen_context=prompt, ids=ids,
                                    behaviour_logprobs=[-1.0] * n, text="", finish_reason="length"))
    b = collate(comps, pad_id=0)
    b.advantages = torch.randn(b.mask.shape) * b.mask  # (B, R)
    return b


def fwd_bwd(model: torch.nn.Module, batch: Batch, micro: int, way: str, tokens: int, no_grad: bool = False) -> float:
    """Seconds of one pass over `batch` the given way: forward + backward, or the forward alone
    without a graph (`no_grad`: the reference / old log-prob passes)."""
    t0 = time.perf_counter()
    if "+trim" in way:
        cuts = micro_batches(batch, micro, tokens if way.endswith("+tokens") else None)
        parts = [batch.select(rows).trimmed() for rows in cuts]
    else:
        parts = [batch.select(rows) for rows in _micro_slices(len(batch), micro)]
    for mb in parts:
        with torch.no_grad() if no_grad else contextlib.nullcontext():
            lp = policy_outputs(model, mb, share_prompts=way != "plain", cascade=way.startswith("cascade")).logprobs  # (b, R)
        if not no_grad:
            (-(lp * mb.advantages).sum() / batch.mask.sum()).backward()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name, default in [("hidden", 64), ("layers", 2), ("heads", 4), ("kv_heads", 2), ("intermediate", 128),
                          ("vocab", 512), ("prompts", 8), ("group", 8), ("prompt_len", 64),
                          ("completion_len", 128), ("micro_batch", 64), ("threads", 1), ("repeats", 7)]:
        ap.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    ap.add_argument("--ragged", action="store_true", help="response lengths uniform in [R/8, R]")
    ap.add_argument("--ragged-groups", action="store_true", help="each group's length uniform in [R/8, R]")
    ap.add_argument("--no-grad", action="store_true", help="time the forward alone (the no-grad passes)")
    ap.add_argument("--micro-batch-tokens", type=int, default=0, help="0: micro-batch x (prompt + completion)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, num_hidden_layers=a.layers, num_attention_heads=a.heads,
        num_key_value_heads=a.kv_heads, intermediate_size=a.intermediate, max_position_embeddings=1024,
        tie_word_embeddings=True, pad_token_id=0))
    batch = make_batch(a)
    print(f"batch {len(batch)} rows, P={batch.prompt_len}, R={batch.response_ids.shape[1]}, "
          f"real response tokens {int(batch.response_mask.sum())}, threads {a.threads}")
    tokens = a.micro_batch_tokens or a.micro_batch * (a.prompt_len + a.completion_len)
    calls = {w: len(micro_batches(batch, a.micro_batch, tokens if w.endswith("tokens") else None))
             for w in ("rows", "tokens")}
    print(f"micro-batches: {calls['rows']} of {a.micro_batch} rows, {calls['tokens']} of up to {tokens} tokens")
    ways = ("plain", "shared", "cascade", "cascade+trim", "cascade+trim+tokens")
    times: dict[str, list[float]] = {w: [] for w in ways}
    for _ in range(a.repeats):
        for way in ways:
            times[way].append(fwd_bwd(model, batch, a.micro_batch, way, tokens, a.no_grad))
            model.zero_grad(set_to_none=True)
    results = {w: statistics.median(t[1:]) for w, t in times.items()}
    for way, t in results.items():
        print(f"{way:20s} {'fwd' if a.no_grad else 'fwd+bwd'} median {t:.3f} s   x{results['plain'] / t:.2f} vs plain")


if __name__ == "__main__":
    main()
