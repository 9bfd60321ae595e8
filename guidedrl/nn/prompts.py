"""Prompt rendering: samples -> token ids for one tokenizer (chat template or raw text, system
prompt, guidance text appended to the problem), and text <-> ids."""

from __future__ import annotations

from typing import Any

from guidedrl.core.types import Sample
from guidedrl.nn.models import render_prompt


class Renderer:
    """Renders prompts for one tokenizer the same way everywhere (rollouts, guidance, evaluation)."""

    def __init__(self, tokenizer: Any, *, chat: bool, system_prompt: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.chat = chat
        self.system_prompt = system_prompt

    def render(self, sample: Sample, guidance: str | None = None) -> list[int]:
        """The context ids for `sample`, with `guidance` text appended to the problem when given."""
        return render_prompt(self.tokenizer, sample, chat=self.chat, system_prompt=self.system_prompt, hint=guidance)

    def encode(self, text: str) -> list[int]:
        """Text -> ids without special tokens (a response's or a prefix's tokens)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    @property
    def eos_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)
