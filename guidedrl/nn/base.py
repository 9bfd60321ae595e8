"""The embedded base model: a tiny Llama that guidedrl builds itself by SFT on easy `arith` levels.

The demo's claim is that on hard problems plain RL gets no reward and so no signal, while guidance
(hints, reference prefixes) turns that into learning. That needs a base model that solves the easy
levels, sometimes solves the middle ones and almost never the hardest, yet can finish a hard problem
when given the first half of its worked solution. `build_base` makes one in a few minutes on a CPU:

1. a character-level tokenizer (`tokenizers` WordLevel over printable ASCII, wrapped as a
   PreTrainedTokenizerFast with pad/bos/eos, left padding; no bos is added to encoded text, so
   `tokenizer(prompt)` and the project's prompt rendering give the same ids the model was trained on);
2. a LlamaForCausalLM of the shape in `BASE_RECIPE`, seeded;
3. SFT (loss on the response and eos only) on worked solutions of the levels in
   `BASE_RECIPE.sft_levels`, some with a hint appended to the prompt the way guidance adds hints;
4. `measure_properties` (sampling at temperature 1.0 on the test split), stored with the recipe and
   build time in `guidedrl_base.json`.

The folder lives at `$GUIDEDRL_CACHE/base/arith-<hash of the recipe>` (default cache `~/.cache/guidedrl`).
It is written to a hidden temp folder beside it and renamed into place, so a killed build never
leaves a folder that looks complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import string
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from guidedrl.core.errors import ConfigError
from guidedrl.core.types import Sample

INFO_FILE = "guidedrl_base.json"
VARIANTS: dict[str, dict[str, Any]] = {
    "arith": {},
    "arith-teacher": {"sft_levels": (1, 2, 3, 4, 5, 6, 7), "steps": 600},
}
"""Built-in base models: name -> overrides of BASE_RECIPE. `arith-teacher` is SFT on every level
(longer), the teacher/guide model that the ampo and rlgf_* recipes use on the embedded task."""
NAMES = tuple(VARIANTS)
SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"]
CHARS = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
"""The tokenizer's characters: digits, letters, punctuation, ' ' and '\n' (one token each)."""


@dataclass(frozen=True)
class BaseRecipe:
    """Every setting of a base-model build; its hash names the cache folder."""

    hidden_size: int = 192
    num_layers: int = 3
    num_heads: int = 6
    num_kv_heads: int = 2
    intermediate_size: int = 512
    sft_levels: tuple[int, ...] = (1, 2, 3, 4)
    """The easier levels SFT sees (the hardest, 7, needs almost twice the steps of the longest)."""
    steps: int = 400
    batch_size: int = 64
    micro_batches: int = 4
    """Each batch is sorted by length and cut into this many micro-batches, each padded only to its
    own longest example (one optimizer step per batch; the loss is normalized over the whole batch's
    tokens, so this saves padding work without changing the objective)."""
    threads: int = 2
    """Torch threads for the build, fixed (not the machine's core count): the float reductions then
    happen in the same order on any machine, so a recipe gives the same weights wherever it is built
    with the same torch and CPU kind."""
    lr: float = 2e-3
    warmup: int = 30
    weight_decay: float = 0.01
    hint_share: float = 0.25
    """Share of SFT prompts with hints appended (so the base model knows how to read a hint)."""
    problems_per_level: int = 4000
    """Distinct train problems drawn per SFT level (fewer when the level has fewer)."""
    seed: int = 0
    measure_problems: int = 50
    """Test problems per level for the properties measured at the end of the build (0 = skip)."""
    measure_samples: int = 8

    def key(self) -> str:
        """A short stable hash of every setting and of the task generator's settings (its data)."""
        from guidedrl.data.tasks import arith

        task = [arith.MAX_VALUE, arith.NAMES, arith.SHUFFLE, arith.TAIL, arith.TEST_SHARE, arith.QUERY_NAME]
        blob = json.dumps([dataclasses.asdict(self), task], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


BASE_RECIPE = BaseRecipe()
"""The default build: ~1.2M parameters, SFT on arith levels 1-4 (chosen by the sweep in docs/results.md)."""


def _recipe(overrides: dict[str, Any] | None) -> BaseRecipe:
    """BASE_RECIPE with `overrides` applied; unknown keys raise ConfigError naming them."""
    overrides = dict(overrides or {})
    known = {f.name for f in dataclasses.fields(BaseRecipe)}
    bad = sorted(set(overrides) - known)
    if bad:
        raise ConfigError(f"base recipe: unknown setting(s) {bad}; known: {sorted(known)}")
    if "sft_levels" in overrides:
        overrides["sft_levels"] = tuple(overrides["sft_levels"])
    return dataclasses.replace(BASE_RECIPE, **overrides)


def _check_name(name: str) -> None:
    if name not in NAMES:
        raise ConfigError(f"builtin base model `{name}` does not exist; known: {', '.join(NAMES)}")


def _named(name: str, overrides: dict[str, Any] | None) -> dict[str, Any]:
    """The variant's own overrides, then the caller's."""
    _check_name(name)
    return {**VARIANTS[name], **(overrides or {})}


def cache_root() -> Path:
    """`$GUIDEDRL_CACHE`, default `~/.cache/guidedrl`."""
    return Path(os.environ.get("GUIDEDRL_CACHE", "~/.cache/guidedrl")).expanduser()


def base_path(name: str = "arith", overrides: dict[str, Any] | None = None) -> Path:
    """Where the base model `name` built with BASE_RECIPE (+ overrides) is (or would be) cached."""
    _check_name(name)
    return cache_root() / "base" / f"{name}-{_recipe(_named(name, overrides)).key()}"


def _is_built(path: Path) -> bool:
    return (path / INFO_FILE).is_file()


# ----------------------------------------------------------------------------- tokenizer and model


def make_tokenizer() -> Any:
    """A character-level tokenizer over printable ASCII with pad/bos/eos/unk; decode(encode(s)) == s."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")  # one token per character
    tok.decoder = decoders.Fuse()  # concatenate, no spaces between characters
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        unk_token="<|unk|>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def make_model(recipe: BaseRecipe, vocab_size: int) -> nn.Module:
    """A seeded random-init LlamaForCausalLM of the recipe's shape."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=recipe.hidden_size,
        num_hidden_layers=recipe.num_layers,
        num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_kv_heads,
        intermediate_size=recipe.intermediate_size,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(recipe.seed)
    return LlamaForCausalLM(config)


# ----------------------------------------------------------------------------- SFT


def hinted_prompt(sample: Sample, hints: int) -> str:
    """The prompt with its first `hints` hints appended as guidance appends them (prompt + "\\n" + hints)."""
    return sample.prompt if hints == 0 else sample.prompt + "\n" + "\n".join(sample.hints[:hints])


def sft_examples(recipe: BaseRecipe, tokenizer: Any) -> list[tuple[list[int], list[int]]]:
    """(context ids, response ids + eos) for every SFT problem; a `hint_share` of them carry hints."""
    from guidedrl.data.tasks import arith

    rng = torch.Generator().manual_seed(recipe.seed)
    out = []
    for level in recipe.sft_levels:
        for s in arith.distinct_problems("train", level, recipe.problems_per_level, seed=recipe.seed):
            with_hint = torch.rand((), generator=rng).item() < recipe.hint_share
            k = int(torch.randint(1, len(s.hints) + 1, (), generator=rng)) if with_hint else 0
            ctx = tokenizer(hinted_prompt(s, k), add_special_tokens=False)["input_ids"]
            resp = tokenizer(s.reference, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            out.append((ctx, resp))
    return out


def collate_sft(examples: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded (input_ids, attention_mask, labels); labels are -100 on context and padding."""
    width = max(len(c) + len(r) for c, r in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)  # (B, T)
    attn = torch.zeros((len(examples), width), dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)  # (B, T)
    for i, (c, r) in enumerate(examples):
        n = len(c) + len(r)
        ids[i, :n] = torch.tensor(c + r)
        attn[i, :n] = 1
        labels[i, len(c) : n] = torch.tensor(r)  # loss on the response and eos only
    return ids, attn, labels


def _split(items: list[Any], parts: int) -> list[list[Any]]:
    """`items` cut into `parts` consecutive runs of near-equal size (none empty)."""
    parts = max(1, min(parts, len(items)))
    bounds = [round(i * len(items) / parts) for i in range(parts + 1)]
    return [items[a:b] for a, b in zip(bounds, bounds[1:])]


def lr_at(step: int, recipe: BaseRecipe) -> float:
    """Linear warmup over `warmup` steps, then cosine decay to 10% of `lr`."""
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    done = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return recipe.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * done)))


def train_sft(model: nn.Module, tokenizer: Any, recipe: BaseRecipe, progress: bool = True) -> list[float]:
    """SFT `model` in place for `recipe.steps` steps; returns the per-step losses."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    examples = sft_examples(recipe, tokenizer)
    gen = torch.Generator().manual_seed(recipe.seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay, betas=(0.9, 0.98))
    model.train()
    losses: list[float] = []
    cols = (TextColumn("[bold]building arith base"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"), TimeRemainingColumn())
    with Progress(*cols, disable=not progress, transient=False) as bar:
        task = bar.add_task("sft", total=recipe.steps, info="")
        for step in range(recipe.steps):
            pick = torch.randint(len(examples), (recipe.batch_size,), generator=gen).tolist()
            batch = sorted((examples[i] for i in pick), key=lambda e: len(e[0]) + len(e[1]))
            tokens = sum(len(r) for _, r in batch)  # the loss is a mean over the whole batch's tokens
            for group in opt.param_groups:
                group["lr"] = lr_at(step, recipe)
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for part in _split(batch, recipe.micro_batches):
                ids, attn, labels = collate_sft(part, tokenizer.pad_token_id)
                loss = model(input_ids=ids, attention_mask=attn, labels=labels, num_items_in_batch=tokens).loss
                loss.backward()
                total += loss.detach().item()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(total)
            bar.update(task, advance=1, info=f"loss {losses[-1]:.3f}")
    model.eval()
    return losses


# ----------------------------------------------------------------------------- measuring


@torch.no_grad()
def sample_texts(
    model: nn.Module, tokenizer: Any, contexts: list[list[int]], samples: int, max_new_tokens: int, chunk: int = 512
) -> list[list[str]]:
    """`samples` completions per context, sampled at temperature 1.0 (top_p 1, no top_k), left padded."""
    per = max(1, chunk // samples)
    out: list[list[str]] = []
    for lo in range(0, len(contexts), per):
        part = contexts[lo : lo + per]
        width = max(len(c) for c in part)
        ids = torch.full((len(part), width), tokenizer.pad_token_id, dtype=torch.long)  # (N, P) left padded
        attn = torch.zeros_like(ids)  # (N, P)
        for i, c in enumerate(part):
            ids[i, width - len(c) :] = torch.tensor(c)
            attn[i, width - len(c) :] = 1
        gen = model.generate(
            input_ids=ids,
            attention_mask=attn,
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            max_new_tokens=max_new_tokens,
            num_return_sequences=samples,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )  # (N * samples, P + new)
        texts = tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
        out.extend(texts[i * samples : (i + 1) * samples] for i in range(len(part)))
    return out


def _pass_rates(samples: list[Sample], texts: list[list[str]], ks: tuple[int, ...]) -> dict[str, float]:
    """Mean over problems of the unbiased pass@k (Chen et al., 2021) for each k."""
    from guidedrl.data.tasks.arith import arith_reward
    from guidedrl.algo.metrics import pass_at_k

    out = {}
    counts = [int(sum(arith_reward([s] * len(t), t))) for s, t in zip(samples, texts, strict=True)]
    for k in ks:
        out[f"pass@{k}"] = sum(pass_at_k(len(t), c, k) for t, c in zip(texts, counts, strict=True)) / len(samples)
    return out


def measure_properties(path: str | Path, n_per_level: int = 50, samples: int = 8, seed: int = 0) -> dict[str, Any]:
    """Unguided pass@1 / pass@k per level, and at the hardest level pass@k with half the reference
    as a forced response prefix and with the first hint in the prompt (test split, temperature 1.0).

    k = `samples` (8 by default). Returns {"levels": {level: {"pass@1", "pass@8"}}, "half_prefix":
    {...}, "hint": {...}, "settings": {...}}.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from guidedrl.data.tasks import arith

    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
    ks = (1, samples) if samples > 1 else (1,)
    enc = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    torch.manual_seed(seed)
    levels: dict[int, dict[str, float]] = {}
    hardest: list[Sample] = []
    for level in range(1, arith.LEVELS + 1):
        probs = arith.make_samples("test", size=n_per_level, levels=[level], seed=seed)
        budget = max(len(enc(s.reference)) for s in probs) + 8
        texts = sample_texts(model, tok, [enc(s.prompt) for s in probs], samples, budget)
        levels[level] = _pass_rates(probs, texts, ks)
        hardest, hard_budget = probs, budget
    halves = [enc(s.reference)[: len(enc(s.reference)) // 2] for s in hardest]
    texts = sample_texts(model, tok, [enc(s.prompt) + h for s, h in zip(hardest, halves, strict=True)], samples, hard_budget)
    prefixed = [[tok.decode(h) + t for t in ts] for h, ts in zip(halves, texts, strict=True)]
    hint_texts = sample_texts(model, tok, [enc(hinted_prompt(s, 1)) for s in hardest], samples, hard_budget)
    return {
        "levels": levels,
        "half_prefix": {"level": arith.LEVELS, **_pass_rates(hardest, prefixed, ks)},
        "hint": {"level": arith.LEVELS, "hints": 1, **_pass_rates(hardest, hint_texts, ks)},
        "settings": {"n_per_level": n_per_level, "samples": samples, "seed": seed, "split": "test", "temperature": 1.0},
    }


# ----------------------------------------------------------------------------- build and cache


def build_base(
    name: str = "arith", force: bool = False, progress: bool = True, overrides: dict[str, Any] | None = None
) -> Path:
    """Build the base model `name` (BASE_RECIPE + `overrides`) into the cache and return its folder.

    An existing complete build is returned as is unless `force`. The folder is written under a
    hidden temp name and renamed into place only once complete (model, tokenizer, info file).
    """
    from transformers import AutoModelForCausalLM

    recipe = _recipe(_named(name, overrides))
    final = base_path(name, overrides)
    if _is_built(final) and not force:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{time.time_ns()}"
    threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)  # fixed, not the core count: see BaseRecipe.threads
    try:
        t0 = time.perf_counter()
        tok = make_tokenizer()
        model = make_model(recipe, len(tok))
        losses = train_sft(model, tok, recipe, progress=progress)
        train_s = time.perf_counter() - t0
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        props = None
        if recipe.measure_problems > 0:
            props = measure_properties(tmp, recipe.measure_problems, recipe.measure_samples, seed=recipe.seed)
        info = {
            "name": name,
            "recipe": dataclasses.asdict(recipe),
            "recipe_key": recipe.key(),
            "params": sum(p.numel() for p in model.parameters()),
            "train_seconds": round(train_s, 1),
            "build_seconds": round(time.perf_counter() - t0, 1),
            "torch_threads": recipe.threads,
            "final_loss": sum(losses[-20:]) / len(losses[-20:]),
            "properties": props,
        }
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=1))
        AutoModelForCausalLM.from_pretrained(str(tmp))  # fail here, not later, if the folder does not load
        if final.exists():  # force: the old build goes only once the new one is complete
            shutil.rmtree(final)
        os.rename(tmp, final)
    finally:
        torch.set_num_threads(threads)
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def ensure_base(name: str = "arith", progress: bool = True, overrides: dict[str, Any] | None = None) -> Path:
    """The cached base model folder, built first if missing."""
    path = base_path(name, overrides)
    return path if _is_built(path) else build_base(name, progress=progress, overrides=overrides)


def base_info(name: str = "arith", overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Path, whether it is built, parameter count, build settings and time, measured properties."""
    path = base_path(name, overrides)
    recipe = _recipe(_named(name, overrides))
    recipe_json = json.loads(json.dumps(dataclasses.asdict(recipe)))  # tuples as lists, as in the info file
    info: dict[str, Any] = {"name": name, "path": str(path), "built": _is_built(path), "recipe": recipe_json}
    if info["built"]:
        info.update(json.loads((path / INFO_FILE).read_text()))
        info["path"], info["built"] = str(path), True
    else:
        info["params"] = sum(p.numel() for p in make_model(recipe, len(SPECIALS) + len(CHARS)).parameters())
    return info
