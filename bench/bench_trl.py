"""guidedrl vs TRL's GRPOTrainer on the same GRPO job: median step time, tokens/s, peak memory.

    .venv/bin/python bench/bench_trl.py --job cpu          # tiny model, 2-core CPU (a few minutes)
    python3 bench/bench_trl.py --job gpu                   # Qwen2-0.5B-shaped model in bf16, one GPU

One command runs both sides on one job: the same random-init model (saved once, loaded by both),
the same tokenizer and prompts, group size, prompt length, forced completion length
(min_new_tokens = max_new_tokens), no KL (beta 0, no reference model), one optimizer update per
step (TRL: steps_per_generation = gradient_accumulation_steps, num_iterations 1), the same
micro-batch size, learning rate and reward (a cheap text score, identical for both).

Each side runs in its own child process (so peak memory is its own: max RSS on CPU, max allocated
CUDA memory on GPU), warm-up steps first, then the timed steps. With --rounds > 1 the sides
alternate (guidedrl, TRL, guidedrl, TRL, ...) so that a load change on a shared machine hits both;
medians are over all timed steps of all rounds. TRL's step time is the wall time between the ends
of consecutive optimizer steps (data loading, generation, rewards, loss, backward, optimizer, its
logging); guidedrl's is `train_step` (the same work).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

for _k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_k, "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


@dataclass(frozen=True)
class Job:
    """One benchmark job: model shape, batch shape and lengths."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    prompts: int
    group: int
    prompt_len: int
    completion_len: int
    micro_batch: int
    device: str
    dtype: str
    warmup: int
    steps: int
    rounds: int
    threads: int = 0
    """torch threads on CPU (0 = leave torch's default)."""
    qkv_bias: bool = False
    """Biases on the q, k, v projections (Qwen2 has them)."""
    options: tuple[str, ...] = ()
    """guidedrl config overrides that pick its fast paths for this job (documented options only)."""


# guidedrl's CPU fast paths that are off by default there (their compiles take seconds)
CPU_FAST_PATHS = ("rollout.static_cache=true", "rollout.compile_decode=true", "train.compile_logprobs=true",
                  "train.compile_model=true")

JOBS = {
    # the tiny default model (guidedrl's TinyModel shape) with a realistic GRPO batch
    # (both cores of the 2-core machine, torch's default there; --threads 1 for the one-core numbers)
    "cpu": Job(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vocab=512, prompts=8, group=8,
               prompt_len=64, completion_len=128, micro_batch=64, device="cpu", dtype="float32",
               warmup=2, steps=10, rounds=3, threads=2, options=CPU_FAST_PATHS),
    # the length sweep's control: head dimension 64 and a 4x MLP, so that attention is a small share of
    # the FLOPs (6% at 128 completion tokens, 14% at 512; the GPU job's 2-4%), not the tiny model's 17-38%
    "cpu-wide": Job(hidden=256, layers=2, heads=4, kv_heads=2, intermediate=1024, vocab=512, prompts=4, group=8,
                    prompt_len=64, completion_len=128, micro_batch=32, device="cpu", dtype="float32",
                    warmup=2, steps=6, rounds=1, threads=2, options=CPU_FAST_PATHS),
    # a real small model's shape on CPU (SmolLM2-135M: hidden 576, 30 layers, 9 heads of 64, 3 KV heads,
    # vocab 49152, no qkv bias), random init, a short job: 4 prompts x 4 samples, 32 + 64 tokens. guidedrl's
    # CPU defaults (plain decode loop, nothing compiled): with the CPU job's compile options the first
    # step had not ended after 17 minutes on the 2-core machine (30 layers to compile)
    "cpu-135m": Job(hidden=576, layers=30, heads=9, kv_heads=3, intermediate=1536, vocab=49152, prompts=4, group=4,
                    prompt_len=32, completion_len=64, micro_batch=16, device="cpu", dtype="float32",
                    warmup=2, steps=4, rounds=1, threads=2),
    # the anchor: Qwen2-0.5B shape, bf16, 8 prompts x 8 samples, 64 + 256 tokens
    "gpu": Job(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=151936, prompts=8, group=8,
               prompt_len=64, completion_len=256, micro_batch=32, device="cuda", dtype="bfloat16",
               warmup=2, steps=5, rounds=1, qkv_bias=True),
}


# glibc's malloc returns big freed blocks to the OS (mmap'd chunks, heap trimming), so every step's
# activations are fresh pages that fault in on first touch; these keep them (env, read at start)
KEEP_FREED_MEMORY = {"MALLOC_MMAP_THRESHOLD_": "2000000000", "MALLOC_TRIM_THRESHOLD_": "2000000000"}


# ----------------------------------------------------------------------------- shared job inputs


def score_text(text: str) -> float:
    """The reward of both sides: the share of characters that are the digit 7 (cheap, varies)."""
    return text.count("7") / max(1, len(text))


def guidedrl_reward(samples: list[Any], completions: list[str]) -> list[float]:
    return [score_text(t) for t in completions]


def trl_reward(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
    return [score_text(c if isinstance(c, str) else str(c)) for c in completions]


def build_tokenizer(vocab: int) -> Any:
    """A word-level tokenizer over `vocab` ids (w3 .. w{vocab-1}); no bos is added on either side.

    Word-level so that a prompt of k words is exactly k tokens (+ bos) on both sides, and every id
    a random model samples decodes to text.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<bos>": 1, "<eos>": 2} | {f"w{i}": i for i in range(3, vocab)}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   padding_side="left")


def build_inputs(job: Job, folder: Path) -> tuple[Path, Path]:
    """Save the random-init model + tokenizer and the prompt file both sides read. -> (model dir, jsonl)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = build_tokenizer(job.vocab)
    config = LlamaConfig(
        vocab_size=job.vocab, hidden_size=job.hidden, num_hidden_layers=job.layers, num_attention_heads=job.heads,
        num_key_value_heads=job.kv_heads, intermediate_size=job.intermediate, max_position_embeddings=4096,
        rope_theta=1_000_000.0, tie_word_embeddings=True, attention_bias=job.qkv_bias,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, rms_norm_eps=1e-6,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(getattr(torch, job.dtype))
    mdir = folder / "model"
    model.save_pretrained(mdir)
    tok.save_pretrained(mdir)
    rng = random.Random(0)
    n = job.prompts * (job.warmup + job.steps + 2)
    rows = [{"id": f"p{i}", "prompt": " ".join(f"w{rng.randrange(3, job.vocab)}" for _ in range(job.prompt_len))}
            for i in range(n)]
    data = folder / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return mdir, data


# ----------------------------------------------------------------------------- measuring


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _peak_memory(device: str) -> float:
    """Peak bytes: max allocated CUDA memory on GPU, max resident set size of this process on CPU."""
    import resource

    import torch

    if device == "cuda":
        return float(torch.cuda.max_memory_allocated())
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024.0


def _minor_faults() -> int:
    """The process's minor page faults so far (fresh pages touched: memory the allocator returned to
    the OS and took again, among others)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def run_guidedrl(job: Job, mdir: Path, data: Path) -> dict[str, Any]:
    """Warm-up + timed `train_step`s of guidedrl's default GRPO on the job."""
    import torch

    from guidedrl.core.config import load_config
    from guidedrl.trainer.build import build
    from guidedrl.trainer.loop import seed_everything
    from guidedrl.trainer.step import StepState, train_step

    n = job.prompts * job.group
    cfg = load_config(None, [
        f"model.path={mdir}", "model.chat=false", f"model.dtype={job.dtype}", f"model.device={job.device}",
        f"data.train.path={data}", "data.eval=null", "eval.enabled=false", "run.progress=false",
        "reward.terms=[{name: 'bench_trl:guidedrl_reward'}]", f"rollout.group_size={job.group}",
        f"rollout.max_new_tokens={job.completion_len}", f"rollout.min_new_tokens={job.completion_len}",
        f"rollout.batch_size={n}", f"train.prompts_per_step={job.prompts}",
        f"train.micro_batch_size={job.micro_batch}", "train.lr=1e-6", f"train.steps={job.warmup + job.steps}",
        *job.options,
    ])
    seed_everything(0)
    parts = build(cfg)
    st = StepState()
    steps, gen, upd, warm, faults, plen = [], [], [], [], [], 0
    for i in range(job.warmup + job.steps):
        if i == job.warmup and job.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        _sync(job.device)
        f0 = _minor_faults()
        m, flat = train_step(parts, st)
        _sync(job.device)
        faults.append(_minor_faults() - f0)
        st.step += 1
        assert all(len(c.ids) == job.completion_len for c in flat), "the completion length was not forced"
        plen = len(flat[0].gen_context)
        if i < job.warmup:
            warm.append(m["time/step"])  # the first holds the one-off compile of the decode step
        else:
            steps.append(m["time/step"])
            gen.append(m["time/generate"] + m["time/reward"])
            upd.append(m["time/update"])
    return {"step_s": steps, "generate_s": gen, "update_s": upd, "warmup_s": warm, "faults": faults[job.warmup :],
            "peak_bytes": _peak_memory(job.device),
            "prompt_tokens": plen, "params": sum(p.numel() for p in parts.policy.model.parameters())}


def run_trl(job: Job, mdir: Path, data: Path) -> dict[str, Any]:
    """Warm-up + timed optimizer steps of TRL's GRPOTrainer (transformers generate, no vLLM)."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from bench_trl import trl_reward  # the same module object TRL and guidedrl both call into

    n = job.prompts * job.group
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    ends: list[float] = []
    gen_times: list[float] = []
    fault_ends: list[int] = []

    class StepEnds(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            _sync(job.device)
            ends.append(time.perf_counter())
            fault_ends.append(_minor_faults())
            if len(ends) == job.warmup and job.device == "cuda":
                torch.cuda.reset_peak_memory_stats()

    cuda = job.device == "cuda"
    # guidedrl's mixed precision asked for (--set model.autocast=bfloat16): TRL's too (its bf16 flag
    # runs the forward under torch.autocast through accelerate, on CPU as well)
    from guidedrl.core.config import load_config

    autocast = cuda or load_config(None, list(job.options)).model.autocast != "none"
    args = GRPOConfig(
        output_dir=str(mdir.parent / "trl_out"), per_device_train_batch_size=job.micro_batch,
        gradient_accumulation_steps=n // job.micro_batch, num_generations=job.group,
        max_completion_length=job.completion_len, generation_kwargs={"min_new_tokens": job.completion_len},
        beta=0.0, num_iterations=1, learning_rate=1e-6, max_steps=job.warmup + job.steps, logging_steps=1,
        report_to="none", save_strategy="no", use_cpu=not cuda, bf16=autocast, gradient_checkpointing=False,
        dataloader_num_workers=0, seed=0, temperature=1.0, disable_tqdm=True,
    )
    trainer = GRPOTrainer(model=str(mdir), reward_funcs=trl_reward, args=args,
                          train_dataset=Dataset.from_list([{"prompt": r["prompt"]} for r in rows]),
                          processing_class=build_tokenizer(job.vocab), callbacks=[StepEnds()])
    generate = trainer._generate_single_turn

    def timed_generate(*a: Any, **kw: Any) -> Any:
        _sync(job.device)
        t0 = time.perf_counter()
        out = generate(*a, **kw)
        _sync(job.device)
        gen_times.append(time.perf_counter() - t0)
        lengths = {len(c) for c in out[0]}
        assert lengths == {job.completion_len}, f"TRL completion lengths {lengths}: the length was not forced"
        return out

    trainer._generate_single_turn = timed_generate  # type: ignore[method-assign]
    t_start, f_start = time.perf_counter(), _minor_faults()
    trainer.train()
    starts = [t_start] + ends[:-1]
    steps = [e - s for s, e in zip(starts, ends, strict=True)]
    faults = [e - s for s, e in zip([f_start] + fault_ends[:-1], fault_ends, strict=True)]
    plen = len(trainer.processing_class(text=rows[0]["prompt"])["input_ids"])
    return {"step_s": steps[job.warmup :], "generate_s": gen_times[job.warmup :], "update_s": [],
            "warmup_s": steps[: job.warmup], "faults": faults[job.warmup :],
            "peak_bytes": _peak_memory(job.device), "prompt_tokens": plen,
            "params": sum(p.numel() for p in trainer.model.parameters())}


# ----------------------------------------------------------------------------- driver


def child(side: str, job: Job, folder: Path, out: Path) -> None:
    import torch

    if job.threads:
        torch.set_num_threads(job.threads)
    mdir, data = folder / "model", folder / "prompts.jsonl"
    res = run_guidedrl(job, mdir, data) if side == "guidedrl" else run_trl(job, mdir, data)
    out.write_text(json.dumps(res))


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def summarize(job: Job, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Medians, tokens/s, memory and ratios; MFU of guidedrl's update on GPU."""
    toks = job.prompts * job.group * job.completion_len
    summary: dict[str, Any] = {"job": asdict(job)}
    for side, r in results.items():
        med = median(r["step_s"])
        summary[side] = {
            "median_step_s": med, "completion_tokens_per_s": toks / med, "peak_gib": r["peak_bytes"] / 2**30,
            "median_generate_s": median(r["generate_s"]), "median_update_s": median(r["update_s"]),
            "steps_timed": len(r["step_s"]), "prompt_tokens": r["prompt_tokens"], "params": r["params"],
            "warmup_s": r["warmup_s"], "median_minor_faults_per_step": median(r["faults"]),
        }
    if "guidedrl" in results and "trl" in results:
        g, t = summary["guidedrl"], summary["trl"]
        summary["speedup"] = t["median_step_s"] / g["median_step_s"]
        summary["memory_ratio"] = g["peak_gib"] / t["peak_gib"]
    if job.device == "cuda" and "guidedrl" in results:
        g = summary["guidedrl"]
        # matmul FLOPs of fwd + bwd (attention scores left out): 6 * trunk params * all tokens, plus
        # 6 * lm_head params * response tokens (log-probs are only taken there); the tied embedding
        # lookup is no matmul
        n = job.prompts * job.group
        head = job.vocab * job.hidden
        flops = 6 * (g["params"] - head) * n * (job.prompt_len + job.completion_len) + 6 * head * n * job.completion_len
        g["update_tflops"] = flops / g["median_update_s"] / 1e12
        g["update_mfu_vs_989"] = g["update_tflops"] / 989.0  # H100 SXM dense bf16 peak
    return summary


def print_table(s: dict[str, Any]) -> None:
    sides = [k for k in ("guidedrl", "trl") if k in s]
    print(f"\n{'':28s}" + "".join(f"{k:>14s}" for k in sides))
    for key, fmt in [("median_step_s", "{:.3f}"), ("completion_tokens_per_s", "{:.0f}"), ("peak_gib", "{:.3f}"),
                     ("median_generate_s", "{:.3f}"), ("median_update_s", "{:.3f}"),
                     ("median_minor_faults_per_step", "{:.0f}"), ("steps_timed", "{}"),
                     ("prompt_tokens", "{}")]:
        print(f"{key:28s}" + "".join(f"{fmt.format(s[k][key]):>14s}" for k in sides))
    if "speedup" in s:
        print(f"speedup (TRL step / guidedrl step): {s['speedup']:.2f}x   memory guidedrl/TRL: {s['memory_ratio']:.2f}")
    if "update_tflops" in s.get("guidedrl", {}):
        g = s["guidedrl"]
        print(f"guidedrl update: {g['update_tflops']:.0f} TFLOP/s, MFU {100 * g['update_mfu_vs_989']:.1f}% of 989")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--job", choices=sorted(JOBS), default="cpu")
    ap.add_argument("--sides", default="guidedrl,trl", help="comma-separated: guidedrl, trl")
    ap.add_argument("--completion-len", type=int, default=None, help="override the job's forced completion length")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads on CPU (both sides)")
    ap.add_argument("--set", action="append", default=[], help="extra guidedrl override (repeatable)")
    ap.add_argument("--json", type=Path, default=None, help="also write the summary here")
    ap.add_argument("--keep-freed-memory", action="store_true",
                    help="TRL too (guidedrl does it itself on CPU, train.keep_freed_memory): glibc keeps freed "
                         "memory for reuse (no page faults on each step's fresh "
                         "activations; the allocator tuning PyTorch's CPU guide recommends)")
    ap.add_argument("--child", choices=["guidedrl", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    job = JOBS[a.job]
    over = {"completion_len": a.completion_len, "steps": a.steps, "warmup": a.warmup, "rounds": a.rounds,
            "threads": a.threads}
    job = replace(job, **{k: v for k, v in over.items() if v is not None}, options=job.options + tuple(a.set))
    if a.child:
        child(a.child, job, a.folder, a.out)
        return
    sides = [s.strip() for s in a.sides.split(",") if s.strip()]
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench_trl_") as tmp:
        folder = Path(tmp)
        build_inputs(job, folder)
        for rnd in range(job.rounds):
            for side in sides:
                out = folder / f"{side}_{rnd}.json"
                cmd = [sys.executable, __file__, "--job", a.job, "--child", side, "--folder", str(folder),
                       "--out", str(out)] + [f"--set={o}" for o in a.set] + sum(([f"--{k.replace('_', '-')}", str(v)] for k, v in over.items() if v is not None), [])
                t0 = time.perf_counter()
                subprocess.run(cmd, check=True, env=os.environ | (KEEP_FREED_MEMORY if a.keep_freed_memory else {}))
                r = json.loads(out.read_text())
                print(f"round {rnd} {side}: warm-up {', '.join(f'{x:.1f}' for x in r['warmup_s'])} s; "
                      f"median step {median(r['step_s']):.3f} s "
                      f"(steps {', '.join(f'{x:.3f}' for x in r['step_s'])}; process {time.perf_counter() - t0:.0f} s)",
                      flush=True)
                acc = results.setdefault(side, {"step_s": [], "generate_s": [], "update_s": [], "warmup_s": [],
                                                "faults": [], "peak_bytes": 0.0})
                for k in ("step_s", "generate_s", "update_s", "warmup_s", "faults"):
                    acc[k] += r[k]
                acc["peak_bytes"] = max(acc["peak_bytes"], r["peak_bytes"])
                acc["prompt_tokens"], acc["params"] = r["prompt_tokens"], r["params"]
    s = summarize(job, results)
    s["machine"] = machine_info(job)
    s["keep_freed_memory"] = bool(a.keep_freed_memory)
    s["date"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print_table(s)
    print(json.dumps(s["machine"]))
    if a.json:
        a.json.write_text(json.dumps(s, indent=2))


def machine_info(job: Job) -> dict[str, Any]:
    import torch
    import transformers

    info: dict[str, Any] = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                            "transformers": transformers.__version__, "load_avg_1m": os.getloadavg()[0]}
    try:
        import trl

        info["trl"] = trl.__version__
    except ImportError:
        info["trl"] = None
    if job.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


if __name__ == "__main__":
    main()
