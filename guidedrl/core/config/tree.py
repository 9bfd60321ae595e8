"""One typed config tree. Recipes are YAML files over it; `extends:` chains recipes; `--set a.b=c`
overrides any leaf. Unknown keys and wrong types fail with the dotted key path (exit code 2).

The defaults are the vetted GRPO setting on the embedded `arith` task with the built-in base model.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from guidedrl.core.config.algo import AlgoConfig
from guidedrl.core.config.base import Strict
from guidedrl.core.config.guidance import GuidanceConfig, PromptHint, Refine, Replace


# ----------------------------------------------------------------------------- model


class TinyModel(Strict):
    """A random-init Llama-architecture model built from this config (tests, benchmarks)."""

    hidden_size: int = Field(64, ge=1)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int = Field(2, ge=1)
    intermediate_size: int = Field(128, ge=1)
    max_position_embeddings: int = Field(512, ge=1)
    seed: int = 0


class Lora(Strict):
    """LoRA adapters via peft; only the adapters are trained and saved."""

    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"


class ModelConfig(Strict):
    path: str = "builtin:arith"
    """A Hub id, a local folder, a .gguf file, `builtin:arith` (the embedded base, built and cached
    on first use) or `tiny` (random init from `tiny`)."""
    gguf_file: str | None = None
    """GGUF file name inside `path` (a folder or Hub repo); dequantized by transformers."""
    tiny: TinyModel = Field(default_factory=TinyModel)
    """Shape of the random model when path is `tiny`."""
    tokenizer: str | None = None
    """Tokenizer location when it differs from `path`."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights and optimizer state. auto = bfloat16 on GPU, float32 on CPU or with `autocast`."""
    autocast: Literal["none", "bfloat16"] = "none"
    """Mixed precision: the decoder trunk under torch.autocast; LM head and log-probs in float32."""
    device: str = "auto"
    """auto = cuda if available, else cpu."""
    chat: bool | None = None
    """Render prompts with the tokenizer's chat template. None = when the tokenizer has one."""
    system_prompt: str | None = None
    lora: Lora | None = None
    attn_implementation: str | None = None
    """Passed to from_pretrained (e.g. sdpa, flash_attention_2). None = transformers' default."""
    gradient_checkpointing: bool = False
    max_prompt_tokens: int | None = Field(None, ge=1)
    """Longest prompt (rendered, in tokens). None = the model's position count
    (`max_position_embeddings`). Leaves no room for the response by itself: for a model with learned
    absolute positions, set it to the positions minus `rollout.max_new_tokens`."""
    prompt_overflow: Literal["truncate", "error"] = "truncate"
    """A longer prompt: `truncate` keeps its last `max_prompt_tokens` tokens (the end of the problem
    and the turn marker stay next to the response; one warning per run); `error` stops with a data
    error naming the sample."""

    @model_validator(mode="after")
    def _autocast_weights(self) -> "ModelConfig":
        if self.autocast != "none" and self.dtype not in ("auto", "float32"):
            raise ValueError(f"model.autocast {self.autocast} needs float32 weights (model.dtype auto or float32)")
        return self


# ----------------------------------------------------------------------------- data


class FieldMap(Strict):
    """Which column holds what. Columns not named here are passed to rewards in Sample.extra."""

    id: str = "id"
    prompt: str = "prompt"
    answer: str = "answer"
    reference: str = "reference"
    hints: str = "hints"
    level: str = "level"


class DataSource(Strict):
    """Either a built-in task (`task`) or a file / saved `datasets` dataset (`path`)."""

    task: str | None = "arith"
    """Built-in task: `arith`, or `reasoning_gym:<dataset name>`."""
    task_args: dict[str, Any] = Field(default_factory=dict)
    """Arguments of the task generator (e.g. levels, size, seed)."""
    path: str | None = None
    """A .jsonl / .parquet file, or a folder written by datasets' save_to_disk."""
    split: str | None = None
    """Split name inside a DatasetDict folder."""
    fields: FieldMap = Field(default_factory=FieldMap)
    limit: int | None = Field(None, ge=0)
    """The first N samples (0 = none); None = all."""

    @model_validator(mode="after")
    def _one_source(self) -> "DataSource":
        if self.path is not None:
            self.__dict__["task"] = None
        if self.task is None and self.path is None:
            raise ValueError("set either `task` or `path`")
        return self


def _default_eval() -> DataSource:
    return DataSource(task="arith", task_args={"split": "test"})


class DataConfig(Strict):
    train: DataSource = Field(default_factory=DataSource)
    eval: DataSource | None = Field(default_factory=_default_eval)
    shuffle: bool = True


# ----------------------------------------------------------------------------- rollout


class RolloutConfig(Strict):
    backend: Literal["hf"] = "hf"
    group_size: int = Field(8, ge=1)
    """G: completions per prompt."""
    max_new_tokens: int = Field(80, ge=1)
    """Generation budget; 80 fits the embedded arith task's longest worked solution (67 characters + eos)."""
    min_new_tokens: int = Field(0, ge=0)
    """Forces at least this many tokens (benchmarks force a fixed length)."""
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    """0 = off."""
    stop: list[str] = Field(default_factory=list)
    """Stop strings; the completion is cut after the first one (finish reason `stop`)."""
    batch_size: int = Field(256, ge=1)
    """Sequences generated together (memory knob)."""
    drop_finished_rows: bool = True
    """Plain decode loop: finished rows leave the batch and KV cache (changes no token)."""
    static_cache: bool | None = None
    """Preallocated KV cache, one compiled decode step (guidedrl.rollout.static). None = on CUDA."""
    compile_decode: bool | None = None
    """torch.compile the static decode step (CUDA graph on GPU; seconds once a shape). None = on CUDA."""
    cast_weights_once: bool = True
    """Under model.autocast: decode from a copy of the trunk's linear weights in the autocast dtype,
    cast once per rollout, not at every token (same numbers; +half the linear weights' memory)."""


# ----------------------------------------------------------------------------- reward


class RewardTerm(Strict):
    name: str
    """Built-in reward (see `guidedrl recipes --rewards`) or `module:function` for your own."""
    weight: float = Field(1.0, allow_inf_nan=False)
    args: dict[str, Any] = Field(default_factory=dict)


class RewardConfig(Strict):
    terms: list[RewardTerm] | None = None
    """None = the task's own verifier (arith: exact answer; files: math-verify)."""
    on_error: Literal["raise", "zero"] = "raise"
    """What an exception inside a reward function does: fail the run, or score 0 and warn."""
    overlong: "Overlong | None" = None
    """DAPO soft overlong penalty."""


class Overlong(Strict):
    """DAPO: R_len = min(-(|o| - (L_max - L_cache)) / L_cache * factor, 0)."""

    cache_len: int = Field(16, ge=1)
    """L_cache, at most rollout.max_new_tokens."""
    factor: float = Field(1.0, ge=0, allow_inf_nan=False)


RewardConfig.model_rebuild()


# ----------------------------------------------------------------------------- train / run


Beta = Annotated[float, Field(ge=0, lt=1)]


class TrainConfig(Strict):
    steps: int = Field(40, ge=0)
    prompts_per_step: int = Field(8, ge=1)
    micro_batch_size: int = Field(32, ge=1)
    """Sequences per forward/backward; gradients are accumulated to the whole batch."""
    micro_batch_tokens: int | None = Field(None, ge=1)
    """Instead: the update's micro-batches filled with whole groups up to this many tokens (rows x
    their longest prompt + response), short rows many to a micro-batch, long ones few (verl's
    use_dynamic_bsz). None = micro_batch_size rows."""
    lr: float = Field(1e-5, gt=0, allow_inf_nan=False)
    weight_decay: float = Field(0.0, ge=0, allow_inf_nan=False)
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    """AdamW's (beta1, beta2), each in [0, 1)."""
    schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    grad_clip: float | None = Field(1.0, gt=0)
    """Max global gradient norm; None = no clipping. (A negative one would reverse the gradient.)"""
    seed: int = 0
    max_nonfinite: int = Field(3, ge=1)
    """Abort after this many non-finite losses/gradients in a row (each one skips its update)."""
    compile_model: bool = False
    """torch.compile each decoder layer (dynamic shapes) for the update and the prefill: fused
    elementwise passes, a one-off compile of ~20 s (CPU benchmark: fwd + bwd 10-14% faster)."""
    cascade_attention: bool = True
    """On CPU, the update's responses attend to their group's shared prompt by cascade attention
    (`guidedrl.nn.cascade`) where it applies; false: the prompt cache expanded to the rows, masked."""
    skip_inert_rows: bool = True
    """Leave out of the update's forward and backward the rows that add exactly no gradient: every
    advantage 0 (a GRPO group with equal rewards), under a loss whose tokens are multiples of their
    advantage (ppo_clip, reinforce) and no other per-row term (entropy bonus, KL loss, CE, critic,
    calibration). The gradient is the same; the update's logged token metrics (entropy, clipfrac,
    ...) then cover the trained rows, and `perf/skipped_rows` is the share left out."""
    keep_freed_memory: bool = True
    """Training on CPU (glibc): the process keeps freed memory for the next step, as PyTorch's GPU
    caching allocator does (`guidedrl.trainer.memory`; process-wide; CPU benchmark: the update 15% faster).
    The process then holds its peak memory until it exits."""
    compile_logprobs: bool = False
    """torch.compile the per-chunk LM head + log-softmax + gather + entropy of the update (one fused
    pass over the chunk's logits forward and backward; a one-off compile of a few seconds). Pays for
    itself after a few steps; off by default so that short runs and tests start at once."""


class EvalConfig(Strict):
    every: int = Field(0, ge=0)
    """Evaluate every N steps (0 = only before and after training)."""
    samples: int = Field(4, ge=1)
    """Completions per problem (pass@k for k <= samples)."""
    limit: int | None = Field(64, ge=1)
    temperature: float = Field(1.0, gt=0, allow_inf_nan=False)
    enabled: bool = True


class RunConfig(Strict):
    dir: str = "runs"
    name: str | None = None
    """Run folder name; None = recipe name + timestamp."""
    save_every: int = Field(0, ge=0)
    """Checkpoint every N steps (0 = only at the end)."""
    keep_last: int = Field(2, ge=1)
    """Complete checkpoints kept (the newest; at least 1)."""
    log_completions: int = Field(2, ge=0)
    """Completions written to completions.jsonl per step."""
    loggers: list[Literal["tensorboard", "wandb"]] = Field(default_factory=list)
    progress: bool = True


class Config(Strict):
    name: str = "grpo"
    description: str = ""
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    algo: AlgoConfig = Field(default_factory=AlgoConfig)
    guidance: GuidanceConfig | None = None
    """Guidance layer (see guidedrl.guidance); None = plain RL."""
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    run: RunConfig = Field(default_factory=RunConfig)

    @model_validator(mode="after")
    def _sizes(self) -> "Config":
        if self.algo.loss.whole_groups:  # (token-budget micro-batches hold whole groups)
            whole = self.train.micro_batch_tokens is not None or self.train.micro_batch_size % self.rollout.group_size == 0
            if not whole or self.algo.minibatches != 1:
                raise ValueError(
                    f"algo.loss `{self.algo.loss.name}` computes group statistics per micro-batch: "
                    "train.micro_batch_size must be a multiple of rollout.group_size (or set "
                    "train.micro_batch_tokens: whole groups by tokens) and algo.minibatches 1"
                )
        seqs = self.train.prompts_per_step * self.rollout.group_size
        if seqs % self.algo.minibatches:
            raise ValueError(
                f"train.prompts_per_step*rollout.group_size ({seqs}) must be divisible by algo.minibatches"
            )
        ol = self.reward.overlong
        if ol is not None and ol.cache_len > self.rollout.max_new_tokens:
            raise ValueError(f"reward.overlong.cache_len ({ol.cache_len}) must be <= rollout.max_new_tokens "
                             f"({self.rollout.max_new_tokens})")
        return self

    @model_validator(mode="after")
    def _guidance_fits_algo(self) -> "Config":
        """Settings that would silently do nothing together."""
        g, a = self.guidance, self.algo
        injection = g.injection if g is not None else None
        if (injection == "auxiliary") != (a.calibration is not None):
            raise ValueError("algo.calibration and guidance.injection `auxiliary` go together: the calibration term "
                             "needs the expert sequence the auxiliary injection attaches, which only it reads")
        offpolicy = isinstance(g, (PromptHint, Replace, Refine)) and g.offpolicy
        if offpolicy and not a.loss.weights_offpolicy:
            raise ValueError(f"guidance.offpolicy is true but algo.loss `{a.loss.name}` does not weight off-policy "
                             "tokens (use loss ppo_clip, or set guidance.offpolicy false)")
        if a.ce_coef and injection != "replace":
            raise ValueError("algo.ce_coef > 0 imitates completions flagged sft, which only guidance.injection "
                             "`replace` makes: nothing would be imitated")
        return self
