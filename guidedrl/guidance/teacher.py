"""Teachers (guide, helper models): a local model with its own tokenizer and engine, or a remote
OpenAI-compatible endpoint. Both speak text, so a teacher need not share the policy's tokenizer.
Requests are answered in batches (`complete_batch`): one engine call for a round of a step."""

from __future__ import annotations

import math

from guidedrl.core.config import ModelConfig, RolloutConfig, Teacher as TeacherConfig
from guidedrl.core.types import Sample
from guidedrl.guidance.protocol import LogProbs, Program, Teacher
from guidedrl.nn.models import load_model, load_tokenizer, use_chat
from guidedrl.nn.prompts import Renderer
from guidedrl.rollout.base import GenRequest
from guidedrl.rollout.hf import HFEngine
from guidedrl.rollout.remote import RemoteClient


class LocalTeacher:
    """A local causal LM sampled with the transformers engine."""

    def __init__(self, cfg: TeacherConfig, rollout: RolloutConfig, device: str = "auto") -> None:
        mcfg = ModelConfig(path=cfg.path or "", device=device)
        tok = load_tokenizer(mcfg)
        self.model = load_model(mcfg, tok, trainable=False)
        self.renderer = Renderer(tok, chat=use_chat(mcfg, tok))
        r = rollout.model_copy(update={"temperature": cfg.temperature, "max_new_tokens": cfg.max_new_tokens or rollout.max_new_tokens})
        self.engine = HFEngine(self.model, tok, r)

    def complete_batch(self, requests: list[tuple[Sample, str, int]], seed: int) -> list[list[str]]:
        """For each (sample, prefix, n): n continuations of `prefix` as the teacher's answer (prefix excluded)."""
        reqs = [GenRequest(context=self.renderer.render(s), n=n, prefix=self.renderer.encode(prefix) if prefix else [])
                for s, prefix, n in requests]
        return [[g.text for g in gens] for gens in self.engine.generate(reqs, seed=seed)]


class RemoteTeacher:
    """A teacher behind an OpenAI-compatible /v1/completions endpoint."""

    def __init__(self, cfg: TeacherConfig, max_new_tokens: int) -> None:
        assert cfg.url is not None
        self.client = RemoteClient(cfg.url, cfg.model_name, cfg.api_key_env)
        self.temperature = cfg.temperature
        self.max_tokens = cfg.max_new_tokens or max_new_tokens

    def complete_batch(self, requests: list[tuple[Sample, str, int]], seed: int) -> list[list[str]]:
        return [self.client.complete(s.prompt + prefix, n=n, max_tokens=self.max_tokens, temperature=self.temperature,
                                     seed=seed + i) for i, (s, prefix, n) in enumerate(requests)]


def build_teachers(cfgs: list[TeacherConfig], rollout: RolloutConfig) -> list[Teacher]:
    return [RemoteTeacher(t, rollout.max_new_tokens) if t.url else LocalTeacher(t, rollout) for t in cfgs]


def rank_traces(traces: list[str], sample: Sample, context: list[int], renderer: Renderer) -> Program[list[str]]:
    """Teacher traces, best-comprehended first (AMPO's best_k selection): comprehension is the mean
    probability the policy gives the ground-truth answer tokens after reading the teacher's
    reasoning (the trace with its final answer removed); a trace without the answer scores 0."""
    answer = sample.answer
    usable = [i for i, t in enumerate(traces) if answer and answer in t]
    pairs = [(context + renderer.encode(traces[i][: traces[i].rindex(answer)]), renderer.encode(answer))  # type: ignore[arg-type]
             for i in usable]
    lps = (yield LogProbs(pairs)) if pairs else []
    score = [0.0] * len(traces)
    for i, lp in zip(usable, lps, strict=True):
        score[i] = sum(math.exp(x) for x in lp) / max(1, len(lp))
    return [traces[i] for i in sorted(range(len(traces)), key=lambda i: (-score[i], i))]
