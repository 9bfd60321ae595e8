"""Models: tiny-from-config, local folder round trip, prompt rendering, LoRA, bad paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from guidedrl.core.config import Lora, ModelConfig
from guidedrl.core.errors import ModelError
from guidedrl.nn.models import load_policy, render_prompt, resolve_dtype, use_chat
from guidedrl.core.types import Sample


def test_local_folder_round_trip(tiny, tmp_path: Path) -> None:
    model, tok = tiny
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    m2, t2 = load_policy(ModelConfig(path=str(tmp_path / "m")))
    text = "Start at 3. Add 4. #### 7"
    assert t2(text)["input_ids"] == tok(text)["input_ids"]
    assert t2.padding_side == "left"
    ids = torch.tensor([tok(text)["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, m2(ids).logits, atol=1e-6)


def test_chat_and_raw_prompts(tiny) -> None:
    _, tok = tiny
    s = Sample(id="a", prompt="What is 2+3?")
    chat = tok.decode(render_prompt(tok, s, chat=True, system_prompt="Be brief."))
    assert "<|system|>Be brief." in chat and chat.rstrip().endswith("<|assistant|>")
    raw = tok.decode(render_prompt(tok, s, chat=False, hint="Add."))
    assert raw.endswith("What is 2+3?\nAdd.") and "<|user|>" not in raw
    assert use_chat(ModelConfig(path="tiny"), tok) is True
    assert use_chat(ModelConfig(path="tiny", chat=False), tok) is False


def test_dtype_auto_is_fp32_on_cpu() -> None:
    assert resolve_dtype(ModelConfig(), torch.device("cpu")) == torch.float32
    assert resolve_dtype(ModelConfig(), torch.device("cuda")) == torch.bfloat16
    assert resolve_dtype(ModelConfig(dtype="bfloat16"), torch.device("cpu")) == torch.bfloat16


def test_lora_trains_only_adapters(tiny_cfg: ModelConfig) -> None:
    cfg = tiny_cfg.model_copy(update={"lora": Lora(r=4, alpha=8)})
    model, _ = load_policy(cfg)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_missing_local_paths_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        load_policy(ModelConfig(path=str(tmp_path / "nope")))
    with pytest.raises(ModelError, match="GGUF"):
        load_policy(ModelConfig(path=str(tmp_path / "m.gguf")))
