"""Interleaved A/B timings of one fast path in one process, on the CPU job's shapes.

On a shared machine sequential runs move by tens of percent between minutes; here the two variants
alternate, repeat after repeat, and the medians are compared, so a change of load hits both.

    .venv/bin/python bench/ab_interleaved.py decode-rev --rev e2b0776      # the decode now vs at a git revision
    .venv/bin/python bench/ab_interleaved.py decode-unroll                 # 4 vs 8 tokens per compiled call
    .venv/bin/python bench/ab_interleaved.py decode-mkl1                   # MKL on one thread inside the decode
    .venv/bin/python bench/ab_interleaved.py decode-skip-guards            # dynamo's skip_guard_eval_unsafe stance
    .venv/bin/python bench/ab_interleaved.py compile-layers                # update fwd+bwd, eager vs compiled layers
    .venv/bin/python bench/ab_interleaved.py attention-kernel              # CPU flash kernel, causal vs not
    .venv/bin/python bench/ab_interleaved.py drop-finished [--with-static] # the demo's rollouts, finished rows dropped or kept
    .venv/bin/python bench/ab_interleaved.py decode-attention --completion-len 256 # the demo's rollouts: sdpa or matmul decode attention
    .venv/bin/python bench/ab_interleaved.py decode-135m --completion-len 64  # cpu-135m's plain decode: sdpa or matmul decode
                                                                           # attention; autocast with weights cast every step or once

The first call of each variant is timed apart (it holds the compile; with an empty
TORCHINDUCTOR_CACHE_DIR, the cold compile). Options: --completion-len (128), --repeats, --threads (2). Shapes: 8 prompts x 8 samples, 64-token
prompts, the tiny Llama of bench_trl.py's CPU job (hidden 64, 2 layers, 4 heads, 2 KV heads).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import importlib.util
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def tiny_model() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=4096, tie_word_embeddings=True, pad_token_id=0))


def interleave(variants: dict[str, Callable[[], float]], repeats: int, warmup: int = 2) -> dict[str, tuple[float, float]]:
    """Each variant returns its own seconds; -> (median ms, first call's seconds: its compile) per variant."""
    first = {}
    for name, fn in variants.items():
        t = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - t
        for _ in range(warmup - 1):
            fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(fn())
    return {k: (round(statistics.median(v) * 1e3, 1), round(first[k], 1)) for k, v in times.items()}


def _module_at(rev: str, path: str, name: str) -> Any:
    """Import a file of this repository as it was at git revision `rev`."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], check=True, capture_output=True, text=True).stdout
    tmp = Path(tempfile.mkdtemp()) / f"{name}.py"
    tmp.write_text(src)
    spec = importlib.util.spec_from_file_location(name, tmp)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _decoder_runner(model: Any, dec: Any, R: int, around: Callable[[], Any] | None = None) -> Callable[[], float]:
    """One timed decode of 64 rows (8 prompts x 8) from a fresh prefill; R tokens forced."""
    from bench_trl import build_tokenizer

    from guidedrl.core.config import RolloutConfig
    from guidedrl.rollout.hf import HFEngine

    rng = random.Random(0)
    contexts = [c for c in [[rng.randrange(3, 512) for _ in range(64)] for _ in range(8)] for _ in range(8)]
    engine = HFEngine(model, build_tokenizer(512), RolloutConfig(max_new_tokens=R))
    gen = torch.Generator().manual_seed(0)

    def run() -> float:
        with torch.no_grad():
            attn, _, inv, first, cache = engine._prefill(contexts)
            with around() if around else contextlib.nullcontext():
                draws = 1.0 - torch.rand((R, len(contexts)), generator=gen)  # (R, B) as the engine draws them
                t = time.perf_counter()
                dec.decode(cache, first, attn, inv, max_new=R, min_new=R, temperature=1.0, top_k=0, top_p=1.0,
                           pad_id=0, eos=torch.tensor([2]), draws=draws)
                return time.perf_counter() - t

    return run


@contextlib.contextmanager
def _mkl_one_thread() -> Iterator[None]:
    lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
    set_local = lib.MKL_Set_Num_Threads_Local  # the C interface (by value); thread-local
    set_local.restype, set_local.argtypes = ctypes.c_int, [ctypes.c_int]
    old = set_local(1)
    try:
        yield
    finally:
        set_local(old)


def decode_variants(a: argparse.Namespace) -> dict[str, Callable[[], float]]:
    from guidedrl.nn.models import cache_kwarg
    from guidedrl.rollout.static import StaticDecoder

    model = tiny_model().eval()
    now = StaticDecoder(model, model.config, compile_step=True)
    R = a.completion_len
    if a.what == "decode-rev":
        old_mod = _module_at(a.rev, "guidedrl/rollout/static.py", "static_at_rev")
        try:
            old = old_mod.StaticDecoder(model, model.config, cache_kwarg(model), compile_step=True)
        except TypeError:  # revisions from this one on take no cache keyword
            old = old_mod.StaticDecoder(model, model.config, compile_step=True)
        return {"now": _decoder_runner(model, now, R), f"at {a.rev}": _decoder_runner(model, old, R)}
    if a.what == "decode-unroll":
        eight = StaticDecoder(model, model.config, compile_step=True, unroll=8)
        return {"4 tokens a call": _decoder_runner(model, now, R), "8 tokens a call": _decoder_runner(model, eight, R)}
    if a.what == "decode-mkl1":
        return {"default": _decoder_runner(model, now, R), "MKL 1 thread": _decoder_runner(model, now, R, _mkl_one_thread)}
    return {"default": _decoder_runner(model, now, R),
            "skip guards": _decoder_runner(model, now, R, lambda: torch.compiler.set_stance(skip_guard_eval_unsafe=True))}


def compile_layer_variants(a: argparse.Namespace) -> dict[str, Callable[[], float]]:
    import copy

    from bench_update import make_batch

    from guidedrl.nn.logprobs import policy_outputs
    from guidedrl.nn.models import compile_layers

    eager = tiny_model()
    compiled = copy.deepcopy(eager)
    compile_layers(compiled)
    b = make_batch(argparse.Namespace(prompts=8, group=8, prompt_len=64, completion_len=a.completion_len, vocab=512,
                                      ragged=False))

    def runner(model: Any) -> Callable[[], float]:
        def run() -> float:
            t = time.perf_counter()
            lp = policy_outputs(model, b, compiled=True, entropy="metric").logprobs  # (B, R)
            (-(lp * b.advantages).sum() / b.mask.sum()).backward()
            model.zero_grad(set_to_none=True)
            return time.perf_counter() - t
        return run

    return {"eager layers": runner(eager), "compiled layers": runner(compiled)}


def attention_variants(a: argparse.Namespace) -> dict[str, Callable[[], float]]:
    fa = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    fb = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    R = a.completion_len - 1  # the update's own part: the response tokens fed, R - 1
    q, k, v = torch.randn(64, 4, R, 16), torch.randn(64, 2, R, 16), torch.randn(64, 2, R, 16)
    out: dict[str, Callable[[], float]] = {}
    for causal in (True, False):
        o, lse = fa(q, k, v, 0.0, causal)
        g = torch.randn_like(o)

        def fwd(causal: bool = causal) -> float:
            t = time.perf_counter()
            fa(q, k, v, 0.0, causal)
            return time.perf_counter() - t

        def bwd(causal: bool = causal, o: torch.Tensor = o, lse: torch.Tensor = lse, g: torch.Tensor = g) -> float:
            t = time.perf_counter()
            fb(g, q, k, v, o, lse, 0.0, causal)
            return time.perf_counter() - t

        out[f"forward causal={causal}"], out[f"backward causal={causal}"] = fwd, bwd
    return out


def _demo_rollout() -> tuple[Any, Any, list[Any]]:
    """The demo's rollout on its own base model (built into the cache first if missing): 32 prompts of
    the arith training split (levels 2-7) x 8 samples. -> (model, tokenizer, requests)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from guidedrl.nn.base import ensure_base
    from guidedrl.data.tasks import arith
    from guidedrl.rollout.base import GenRequest

    path = ensure_base("arith", progress=False)
    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    samples = arith.make_samples("train", size=32, levels=[2, 3, 4, 5, 6, 7], seed=0)
    return model, tok, [GenRequest(tok(s.prompt, add_special_tokens=False)["input_ids"], n=8) for s in samples]


def decode_attention_variants(a: argparse.Namespace) -> dict[str, Callable[[], float]]:
    """The demo's rollouts (`_demo_rollout`) through the plain loop, its decode steps' attention torch's
    sdpa or `plain_decode_attention`: up to 80 tokens at temperature 1, and --completion-len forced."""
    from guidedrl.core.config import RolloutConfig
    from guidedrl.rollout.hf import HFEngine

    model, tok, reqs = _demo_rollout()
    seen: dict[tuple[int, bool], list[list[int]]] = {}

    def runner(n: int, forced: bool, on: bool) -> Callable[[], float]:
        engine = HFEngine(model, tok, RolloutConfig(max_new_tokens=n, min_new_tokens=n if forced else 0,
                                                    static_cache=False), decode_attention=on)

        def run() -> float:
            t = time.perf_counter()
            out = engine.generate(reqs, seed=0)
            dt = time.perf_counter() - t
            seen[(n, on)] = [g.ids for gs in out for g in gs]
            if seen.get((n, not on), seen[(n, on)]) != seen[(n, on)]:
                raise SystemExit(f"{n} tokens: the two attentions gave other tokens")
            return dt
        return run

    return {f"{label}, {att}": runner(n, forced, on) for n, forced, label in
            ((80, False, "up to 80 tokens"), (a.completion_len, True, f"{a.completion_len} forced"))
            for on, att in ((False, "sdpa"), (True, "matmul"))}


def drop_finished_variants(a: argparse.Namespace) -> dict[str, Callable[[], float]]:
    """The demo's rollouts (`_demo_rollout`): up to 80 tokens at temperature 1, plain loop."""
    from guidedrl.core.config import RolloutConfig
    from guidedrl.rollout.hf import HFEngine

    model, tok, reqs = _demo_rollout()
    seen: dict[str, list[list[int]]] = {}

    def runner(name: str, drop: bool, static: bool = False) -> Callable[[], float]:
        engine = HFEngine(model, tok, RolloutConfig(max_new_tokens=80, static_cache=static, compile_decode=static,
                                                    drop_finished_rows=drop))
        if static != engine._use_static():
            raise SystemExit(f"{name}: the engine would not take the path asked for")

        def run() -> float:
            t = time.perf_counter()
            out = engine.generate(reqs, seed=0)
            dt = time.perf_counter() - t
            seen[name] = [g.ids for gs in out for g in gs]
            if any(v != seen[name] for v in seen.values()):  # the same draws: the same tokens on every path
                raise SystemExit(f"{name} gave other tokens")
            return dt
        return run

    variants = {name: runner(name, drop) for name, drop in (("rows kept", False), ("finished rows dropped", True))}
    if a.with_static:  # the compiled static decode (all rows to the end, a 16-step check for all done)
        variants["static compiled decode"] = runner("static compiled decode", False, static=True)
    lengths = [len(g.ids) for gs in HFEngine(model, tok, RolloutConfig(max_new_tokens=80)).generate(reqs, seed=0) for g in gs]
    print(f"completion lengths: mean {statistics.mean(lengths):.1f}, max {max(lengths)}, rows {len(lengths)}")
    return variants


def decode_135m_variants(a: argparse.Namespace) -> dict[str, Callable[[], float]]:
    """bench_trl.py's cpu-135m rollout (SmolLM2-135M's shape, random init: 4 prompts of 32 tokens x 4
    samples, --completion-len tokens forced, the plain loop): float32 or autocast, the decode steps'
    attention torch's sdpa or `plain_decode_attention`, and under autocast the weights cast every
    step or once (`rollout.cast_weights_once`)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from guidedrl.core.config import RolloutConfig
    from guidedrl.nn.models import autocast_trunk
    from guidedrl.rollout.base import GenRequest
    from guidedrl.rollout.hf import HFEngine
    from guidedrl.rollout.weights import CastWeights

    from bench_trl import JOBS, build_tokenizer

    j = JOBS["cpu-135m"]
    torch.manual_seed(0)
    tok = build_tokenizer(j.vocab)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=j.vocab, hidden_size=j.hidden, num_hidden_layers=j.layers, num_attention_heads=j.heads,
        num_key_value_heads=j.kv_heads, intermediate_size=j.intermediate, tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)).eval()
    g = torch.Generator().manual_seed(1)
    reqs = [GenRequest(torch.randint(3, j.vocab, (j.prompt_len,), generator=g).tolist(), n=j.group) for _ in range(j.prompts)]
    rcfg = RolloutConfig(max_new_tokens=a.completion_len, min_new_tokens=a.completion_len, static_cache=False)
    mixed = copy.deepcopy(model)
    autocast_trunk(mixed, torch.bfloat16)
    cast = CastWeights(mixed, torch.bfloat16)
    seen: dict[str, list[list[int]]] = {}

    def runner(name: str, engine: HFEngine) -> Callable[[], float]:
        def run() -> float:
            t = time.perf_counter()
            out = engine.generate(reqs, seed=0)
            dt = time.perf_counter() - t
            seen[name] = [g.ids for gs in out for g in gs]
            for x, y in (("ac sdpa every", "ac sdpa once"), ("float32 sdpa", "float32 matmul"),
                         ("ac sdpa once", "ac matmul once")):
                if name in (x, y) and x in seen and y in seen and seen[x] != seen[y]:
                    rows = sum(r != q for r, q in zip(seen[x], seen[y], strict=True))
                    if x == "ac sdpa every":  # the same operands: must be the same tokens
                        raise SystemExit(f"{x} and {y} gave other tokens")
                    print(f"  ({x} and {y}: {rows} of {len(seen[x])} rows differ, near-ties at their precision)")
            return dt
        return run

    variants = {
        "float32, sdpa": runner("float32 sdpa", HFEngine(model, tok, rcfg, decode_attention=False)),
        "float32, matmul": runner("float32 matmul", HFEngine(model, tok, rcfg, decode_attention=True)),
        "autocast, sdpa, cast every step": runner("ac sdpa every", HFEngine(mixed, tok, rcfg, decode_attention=False)),
        "autocast, sdpa, cast once": runner("ac sdpa once", HFEngine(mixed, tok, rcfg, decode_attention=False,
                                                                    cast_weights=cast)),
        "autocast, matmul, cast once": runner("ac matmul once", HFEngine(mixed, tok, rcfg, decode_attention=True,
                                                                        cast_weights=cast)),
    }
    return variants


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=["decode-rev", "decode-unroll", "decode-mkl1", "decode-skip-guards",
                                     "compile-layers", "attention-kernel", "drop-finished", "decode-135m", "decode-attention"])
    ap.add_argument("--rev", default="HEAD~1", help="decode-rev: the git revision to compare with")
    ap.add_argument("--completion-len", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--with-static", action="store_true", help="drop-finished: also the compiled static decode")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.what == "decode-135m":
        variants = decode_135m_variants(a)
    elif a.what == "decode-attention":
        variants = decode_attention_variants(a)
    elif a.what.startswith("decode"):
        variants = decode_variants(a)
    elif a.what == "compile-layers":
        variants = compile_layer_variants(a)
    elif a.what == "drop-finished":
        variants = drop_finished_variants(a)
    else:
        variants = attention_variants(a)
    res = interleave(variants, a.repeats)
    what = {"drop-finished": "the demo's rollouts (up to 80 tokens)",
            "decode-attention": "the demo's rollouts"}.get(a.what, f"{a.completion_len} tokens")
    print(f"{a.what}, {what}, {a.threads} threads, medians of {a.repeats} interleaved repeats "
          f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load {os.getloadavg()[0]:.2f}):")
    for k, (ms, first) in res.items():
        print(f"  {k:28s} {ms:9.1f} ms   (first call {first:.1f} s)")


if __name__ == "__main__":
    main()
