"""Teachers / guide models: a local model (its own tokenizer and engine) or a remote endpoint.
Both speak text, so a teacher need not share the policy's tokenizer."""

from __future__ import annotations

import math
from typing import Any

from guidedrl.core.config import ModelConfig, RolloutConfig
from guidedrl.core.config.guidance import Teacher
from guidedrl.rollout.base import GenRequest
from guidedrl.rollout.collect import RolloutContext
from guidedrl.core.types import Sample


class LocalTeacher:
    """A local causal LM sampled with the transformers engine."""

    def __init__(self, cfg: Teacher, rollout: RolloutConfig, device: str = "auto") -> None:
        from guidedrl.nn.models import load_model, load_tokenizer, use_chat
        from guidedrl.rollout.hf import HFEngine

        mcfg = ModelConfig(path=cfg.path or "", device=device)
        self.tokenizer = load_tokenizer(mcfg)
        self.model = load_model(mcfg, self.tokenizer, trainable=False)
        self.chat = use_chat(mcfg, self.tokenizer)
        r = rollout.model_copy(update={"temperature": cfg.temperature, "max_new_tokens": cfg.max_new_tokens or rollout.max_new_tokens})
        self.engine = HFEngine(self.model, self.tokenizer, r)

    def complete(self, sample: Sample, *, n: int = 1, seed: int = 0, prefix: str = "") -> list[str]:
        """n continuations of `prefix` as the teacher's answer to `sample` (text, prefix excluded)."""
        from guidedrl.nn.models import render_prompt

        ctx = render_prompt(self.tokenizer, sample, chat=self.chat)
        pre = list(self.tokenizer(prefix, add_special_tokens=False)["input_ids"]) if prefix else []
        gens = self.engine.generate([GenRequest(context=ctx, n=n, prefix=pre)], seed=seed)[0]
        return [g.text for g in gens]


class RemoteTeacher:
    """A teacher behind an OpenAI-compatible /v1/completions endpoint."""

    def __init__(self, cfg: Teacher, max_new_tokens: int) -> None:
        from guidedrl.rollout.remote import RemoteClient

        assert cfg.url is not None
        self.client = RemoteClient(cfg.url, cfg.model_name, cfg.api_key_env)
        self.temperature = cfg.temperature
        self.max_tokens = cfg.max_new_tokens or max_new_tokens

    def complete(self, sample: Sample, *, n: int = 1, seed: int = 0, prefix: str = "") -> list[str]:
        return self.client.complete(sample.prompt + prefix, n=n, max_tokens=self.max_tokens,
                                    temperature=self.temperature, seed=seed)


def build_teachers(cfgs: list[Teacher], rollout: RolloutConfig) -> list[Any]:
    return [RemoteTeacher(t, rollout.max_new_tokens) if t.url else LocalTeacher(t, rollout) for t in cfgs]


def comprehension(trace: str, sample: Sample, context: list[int], ctx: RolloutContext) -> float:
    """AMPO / RLPR: mean probability the policy gives the ground-truth answer tokens after reading
    the teacher's reasoning (the trace with its final answer removed)."""
    if ctx.logprobs is None or not sample.answer or sample.answer not in trace:
        return 0.0
    reasoning = trace[: trace.rindex(sample.answer)]
    lps = ctx.logprobs(context + ctx.encode(reasoning), ctx.encode(sample.answer))
    return sum(math.exp(x) for x in lps) / max(1, len(lps))


def rank_traces(traces: list[str], sample: Sample, context: list[int], ctx: RolloutContext) -> list[str]:
    """Teacher traces, best-comprehended first (AMPO's best_k selection)."""
    scored = [(comprehension(t, sample, context, ctx), i, t) for i, t in enumerate(traces)]
    return [t for _, _, t in sorted(scored, key=lambda x: (-x[0], x[1]))]
