"""Load the policy / reference / tokenizer from a Hub id, a local folder, a GGUF file, the embedded
base model, or a tiny random config; LoRA via peft; dtype and device chosen automatically."""

from __future__ import annotations

import inspect
import os
import types
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from rich.markup import escape
from safetensors import SafetensorError
from torch import nn

from guidedrl.core.config import ModelConfig
from guidedrl.core.console import console
from guidedrl.core.errors import DataError, ModelError
from guidedrl.core.types import Sample

DEFAULT_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def resolve_device(cfg: ModelConfig) -> torch.device:
    if cfg.device != "auto":
        return torch.device(cfg.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """The weights' dtype: float32 under `autocast` (mixed precision keeps full-precision weights)."""
    if cfg.dtype != "auto":
        return getattr(torch, cfg.dtype)
    return torch.bfloat16 if device.type == "cuda" and cfg.autocast == "none" else torch.float32


def attention_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype attention computes in for an input like x: autocast's where it is on (as torch's
    sdpa does under autocast; our own attention functions cast q, k, v to it), else x's."""
    dev = x.device.type
    return torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype


def autocast_trunk(model: nn.Module, dtype: torch.dtype) -> None:
    """Run the decoder trunk's forward under torch.autocast(dtype) (`model.autocast`), in place.

    Mixed precision as TRL's `bf16=True` or verl's FSDP param_dtype do it: the matmuls compute in
    bf16, while weights, gradients and AdamW state stay float32, so steps far below bf16's 2^-8
    relative precision are not rounded away (with bf16 weights an lr of 1e-6 moves almost nothing).
    The residual stream stays float32 (bf16 block outputs are added to it), and the LM head and the
    log-softmax run outside the autocast region, in float32: selected-token log-probs and the PPO
    ratio keep full precision. Everything that runs the trunk (rollouts, prefill, the update, the
    reference) goes through this forward; parameters and state-dict keys are unchanged.
    """
    trunk, _ = trunk_and_head(model)
    func = trunk.forward.__func__  # the class's forward, unbound

    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(next(self.parameters()).device.type, dtype=dtype):
            return func(self, *args, **kwargs)

    # bound to the trunk (not a closure over it): a deepcopy of the model rebinds it to the copy,
    # and a later .to(device) changes the autocast device with it
    trunk.forward = types.MethodType(forward, trunk)


def make_tiny_tokenizer(corpus: list[str] | None = None, vocab_size: int = 512) -> Any:
    """A byte-level BPE tokenizer trained in ~0.1 s, with bos/eos/pad and a chat template.

    Built locally so tests never download a tokenizer. Deterministic for a given corpus.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = corpus or [
        "What is 12 + 7? Let's think step by step. 12 + 7 = 19. The answer is 19.",
        "Start at 3. Add 4. Times 2. Minus 5. Result? 3+4=7. 7*2=14. 14-5=9. #### 9",
        "The quick brown fox jumps over the lazy dog. 0123456789 +-*/=()[]{}<>",
    ] * 20
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|pad|>", "<|bos|>", "<|eos|>", "<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        padding_side="left",
        chat_template=DEFAULT_CHAT_TEMPLATE,
    )


def make_tiny_model(cfg: ModelConfig, tokenizer: Any) -> nn.Module:
    """A random-init LlamaForCausalLM of the shape in `cfg.tiny` (seeded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    t = cfg.tiny
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=t.hidden_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        num_key_value_heads=t.num_kv_heads,
        intermediate_size=t.intermediate_size,
        max_position_embeddings=t.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )
    if cfg.attn_implementation:
        config._attn_implementation = cfg.attn_implementation  # as from_pretrained(attn_implementation=...) sets it
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(t.seed)
        return LlamaForCausalLM(config)


def _resolve_path(cfg: ModelConfig) -> tuple[str, str | None]:
    """-> (location for from_pretrained, gguf file name or None)."""
    path = cfg.path
    if path.startswith("builtin:"):
        from guidedrl.nn.base import ensure_base

        return str(ensure_base(path.split(":", 1)[1])), None
    if path.endswith(".gguf"):
        p = Path(path)
        if not p.exists():
            raise ModelError(f"model.path: GGUF file {path} does not exist")
        return str(p.parent), p.name
    if (path.startswith(("/", "./", "../", "~")) or os.sep in path and Path(path).exists()) and not Path(
        path
    ).expanduser().exists():
        raise ModelError(f"model.path: local folder {path} does not exist")
    return str(Path(path).expanduser()) if Path(path).expanduser().exists() else path, cfg.gguf_file


def load_tokenizer(cfg: ModelConfig) -> Any:
    """The tokenizer for `cfg` (left padding, a pad token guaranteed)."""
    if cfg.path == "tiny":
        return make_tiny_tokenizer()
    from transformers import AutoTokenizer

    loc, gguf = _resolve_path(cfg)
    if cfg.tokenizer:  # a tokenizer of its own: not the one inside the GGUF file
        loc, gguf = cfg.tokenizer, None
    try:
        tok = AutoTokenizer.from_pretrained(loc, gguf_file=gguf) if gguf else AutoTokenizer.from_pretrained(loc)
    except (OSError, ValueError) as e:
        raise ModelError(f"model.path: cannot load a tokenizer from {loc!r}: {e}") from None
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg: ModelConfig, tokenizer: Any, *, trainable: bool = True) -> nn.Module:
    """The causal LM for `cfg` on its device and dtype; LoRA-wrapped when `cfg.lora` and trainable."""
    device = resolve_device(cfg)
    dtype = resolve_dtype(cfg, device)
    if cfg.path == "tiny":
        model = make_tiny_model(cfg, tokenizer)
    else:
        from transformers import AutoModelForCausalLM

        loc, gguf = _resolve_path(cfg)
        kwargs: dict[str, Any] = {"dtype": dtype}
        if gguf:
            from transformers import GgufConfig

            kwargs["gguf_file"] = gguf
            kwargs["quantization_config"] = GgufConfig(dequantize=True)  # plain weights: trainable
        if cfg.attn_implementation:
            kwargs["attn_implementation"] = cfg.attn_implementation
        try:
            model = AutoModelForCausalLM.from_pretrained(loc, **kwargs)
        except (OSError, ValueError, SafetensorError) as e:  # SafetensorError: a damaged weights file
            raise ModelError(f"model.path: cannot load a causal LM from {loc!r}: {e}") from None
        if gguf:
            _forget_gguf(model)
    model = model.to(device=device, dtype=dtype)
    limit = PromptLimit.of(model, cfg)
    if _PROMPT_LIMITS.get(tokenizer) != limit:  # (the reference model, loaded second, keeps the policy's warning state)
        _PROMPT_LIMITS[tokenizer] = limit
    if cfg.autocast != "none":
        autocast_trunk(model, getattr(torch, cfg.autocast))
    if cfg.gradient_checkpointing and trainable:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    if not trainable:
        model.eval().requires_grad_(False)
        return model
    if cfg.lora is not None:
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=cfg.lora.target_modules,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lcfg)
    return model


def _forget_gguf(model: nn.Module) -> None:
    """A model loaded from GGUF with `dequantize=True` holds plain weights in the run's dtype, but
    transformers still marks it quantized, and `save_pretrained` refuses a gguf-quantized model.
    Drop the marks with the quantizer's own method, so it checkpoints as a plain model."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)


def load_policy(cfg: ModelConfig) -> tuple[nn.Module, Any]:
    """(model, tokenizer) ready for training."""
    tok = load_tokenizer(cfg)
    return load_model(cfg, tok), tok


def use_chat(cfg: ModelConfig, tokenizer: Any) -> bool:
    """Chat-template prompts for chat models, raw prompts for base models."""
    if cfg.chat is not None:
        if cfg.chat and not getattr(tokenizer, "chat_template", None):
            raise ModelError("model.chat is true but the tokenizer has no chat template")
        return cfg.chat
    return bool(getattr(tokenizer, "chat_template", None))


@dataclass
class PromptLimit:
    """The longest prompt a model takes (`model.max_prompt_tokens`, default its position count) and
    what a longer one does (`model.prompt_overflow`)."""

    max_tokens: int
    overflow: str = "truncate"
    warned: bool = field(default=False, compare=False)

    @classmethod
    def of(cls, model: nn.Module, cfg: ModelConfig) -> "PromptLimit | None":
        positions = getattr(unwrap(model).config, "max_position_embeddings", None)
        limit = cfg.max_prompt_tokens or positions
        return cls(int(limit), cfg.prompt_overflow) if limit else None

    def fit(self, ids: list[int], sample: Sample) -> list[int]:
        """`ids` if they fit; else their last `max_tokens` (one warning a run), or a DataError."""
        if len(ids) <= self.max_tokens:
            return ids
        what = (f"sample `{sample.id}`: the prompt has {len(ids)} tokens, more than the {self.max_tokens} the "
                "model takes (model.max_prompt_tokens, default the model's positions)")
        if self.overflow == "error":
            raise DataError(f"{what}; shorten it, or set model.prompt_overflow=truncate to keep its end")
        if not self.warned:
            self.warned = True
            console.print(f"[yellow]warning:[/] {escape(what)}; keeping its last {self.max_tokens} tokens "
                          "(model.prompt_overflow=truncate; further cuts are not reported)", highlight=False, soft_wrap=True)
        return ids[-self.max_tokens :]


_PROMPT_LIMITS: "weakref.WeakKeyDictionary[Any, PromptLimit | None]" = weakref.WeakKeyDictionary()
"""Per tokenizer: the limit of the model `load_model` loaded with it (`render_prompt` applies it)."""


def prompt_limit(tokenizer: Any) -> PromptLimit | None:
    """The prompt limit `load_model` set for prompts rendered with `tokenizer` (None = none known)."""
    return _PROMPT_LIMITS.get(tokenizer)


def render_prompt(
    tokenizer: Any, sample: Sample, *, chat: bool, system_prompt: str | None = None, hint: str | None = None
) -> list[int]:
    """Token ids of the context for `sample` (optionally with a hint appended to the problem), cut
    to the model's `PromptLimit` (the one `load_model` set for this tokenizer)."""
    ids = _render(tokenizer, sample, chat=chat, system_prompt=system_prompt, hint=hint)
    limit = prompt_limit(tokenizer)
    return limit.fit(ids, sample) if limit is not None else ids


def _render(tokenizer: Any, sample: Sample, *, chat: bool, system_prompt: str | None, hint: str | None) -> list[int]:
    text = sample.prompt if hint is None else f"{sample.prompt}\n{hint}"
    if chat:
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": text}
        ]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return list(ids)
    if system_prompt:
        text = f"{system_prompt}\n{text}"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None and getattr(tokenizer, "add_bos_token", True):
        ids = [tokenizer.bos_token_id] + ids
    return ids


def unwrap(model: nn.Module) -> nn.Module:
    """The underlying transformers model (peft adapters stay injected in its layers)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def cache_kwarg(module: nn.Module) -> str:
    """The name of `module.forward`'s KV-cache argument (and output field): transformers renamed
    `past_key_values` to `cache` in 5.2x; both releases are supported."""
    params = inspect.signature(type(unwrap(module)).forward).parameters  # the class's: `autocast_trunk` wraps the instance's
    return "cache" if "cache" in params else "past_key_values"


def trunk_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(decoder trunk returning hidden states, lm_head) so log-probs can be computed in chunks."""
    inner = unwrap(model)
    trunk = inner.get_decoder()
    head = inner.get_output_embeddings()
    if trunk is None or head is None:
        raise ModelError(f"{type(inner).__name__}: cannot find decoder trunk / output embeddings")
    return trunk, head


def compile_layers(model: nn.Module) -> int:
    """torch.compile every decoder layer in place, dynamic in its shapes (`train.compile_model`).

    Compile time grows with depth (a graph per layer and use): seconds for the tiny models, many
    minutes for a 30-layer one on 2 CPU cores, so it pays only on long runs of shallow models.

    Per layer rather than the whole model: the trunk's Python around the layers (cache objects, mask
    building) stays eager, and a new micro-batch length is one more dynamic-shape graph at most.
    Inductor fuses each layer's elementwise passes (RMSNorm, RoPE, SiLU x up, residual adds) in the
    forward and the backward. Parameters and state-dict keys are unchanged. -> layers compiled.
    """
    trunk, _ = trunk_and_head(model)
    layers = getattr(trunk, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ModelError(f"train.compile_model: {type(trunk).__name__} has no `layers` list of decoder layers to compile")
    for layer in layers:
        layer.compile(dynamic=True)
    # The layers share one forward (one code object, for every model in the process), and dynamo
    # specializes it per layer (each reads its own cache layer and prompt keys by index): several graphs
    # a layer (prefill, decode, update; 5-8 for the tiny model). Past dynamo's limit of 8 per code object,
    # the remaining layers would run eager with only a logged warning; room for 8 a layer is added.
    import torch._dynamo.config as dynamo_config

    dynamo_config.recompile_limit += 8 * len(layers)
    return len(layers)


@contextmanager
def attention_implementation(config: Any, name: str) -> Iterator[None]:
    """Temporarily switch the model's attention function to a registered one (the decode step's and
    the shared-prompt update's); the model's own setting is restored after."""
    old = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = old
