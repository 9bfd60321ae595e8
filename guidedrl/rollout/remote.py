"""A guide / teacher / judge behind any OpenAI-compatible server (vLLM serve, SGLang, a hosted API).

Text in, text out through `/v1/completions` (raw prompt + optional assistant prefix) or
`/v1/chat/completions`; the standard library's HTTP client, so no extra dependency.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from typing import Any

from guidedrl.core.errors import ModelError


class RemoteClient:
    """Minimal OpenAI-compatible client: n completions of a prompt."""

    def __init__(self, url: str, model: str | None, api_key_env: str = "OPENAI_API_KEY", timeout: float = 120.0) -> None:
        self.url = url.rstrip("/")
        self.model = model or "default"
        self.key = os.environ.get(api_key_env, "")
        self.timeout = timeout

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        req = urllib.request.Request(
            f"{self.url}{path}", data=json.dumps(body).encode(), method="POST",
            headers={"Content-Type": "application/json", **({"Authorization": f"Bearer {self.key}"} if self.key else {})},
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json.loads(r.read())
        except (urllib.error.URLError, TimeoutError, json.JSONDecodeError) as e:
            raise ModelError(f"guidance.teacher.url {self.url}{path}: request failed: {e}") from None

    def complete(self, prompt: str, *, n: int = 1, max_tokens: int = 256, temperature: float = 1.0, seed: int | None = None) -> list[str]:
        body = {"model": self.model, "prompt": prompt, "n": n, "max_tokens": max_tokens, "temperature": temperature}
        if seed is not None:
            body["seed"] = seed
        out = self._post("/v1/completions", body)
        try:
            return [c["text"] for c in out["choices"]]
        except (KeyError, TypeError):
            raise ModelError(f"guidance.teacher.url {self.url}: unexpected reply {str(out)[:200]}") from None
