"""Models: tiny-from-config, local folder round trip, prompt rendering, LoRA, bad paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from guidedrl.core.config import Lora, ModelConfig, TinyModel
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


# ----------------------------------------------------------------------------- prompts longer than the model


def _short_model(**kw) -> tuple[torch.nn.Module, object, ModelConfig]:
    cfg = ModelConfig(path="tiny", tiny=TinyModel(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                                                  intermediate_size=64, max_position_embeddings=24), **kw)
    model, tok = load_policy(cfg)
    return model, tok, cfg


def test_long_prompt_is_cut_from_the_left_with_one_warning(capsys) -> None:
    _, tok, _ = _short_model()
    long = Sample(id="long-1", prompt="What is 12 + 7? " * 30)
    from guidedrl.nn.models import make_tiny_tokenizer

    unlimited = make_tiny_tokenizer()  # the same tokenizer, loaded with no model: no limit known
    want = render_prompt(unlimited, long, chat=False)
    assert len(want) > 24 and want == render_prompt(unlimited, long, chat=False)
    got = render_prompt(tok, long, chat=False)
    assert got == want[-24:]  # the last 24 tokens: the end of the problem stays next to the response
    err = capsys.readouterr().err
    assert "long-1" in err and f"{len(want)} tokens" in err and "24" in err and "model.prompt_overflow" in err
    render_prompt(tok, Sample(id="long-2", prompt="Start at 3. " * 40), chat=True)
    assert capsys.readouterr().err == "", "warned once"
    short = Sample(id="s", prompt="1+1?")
    assert render_prompt(tok, short, chat=False) == render_prompt(unlimited, short, chat=False)
    assert len(render_prompt(unlimited, Sample(id="x", prompt="Start at 3. " * 40), chat=True)) > 24


def test_long_prompt_refused_when_set_and_max_prompt_tokens() -> None:
    from guidedrl.core.errors import DataError

    _, tok, _ = _short_model(prompt_overflow="error")
    with pytest.raises(DataError, match=r"sample `long-1`: the prompt has \d+ tokens, more than the 24 .*model.prompt_overflow"):
        render_prompt(tok, Sample(id="long-1", prompt="What is 12 + 7? " * 30), chat=False)
    _, tok, _ = _short_model(max_prompt_tokens=10)
    assert len(render_prompt(tok, Sample(id="a", prompt="What is 12 + 7? " * 3), chat=False)) == 10


def test_a_run_with_a_too_long_prompt_trains_on_its_end_and_warns_once(tmp_path: Path, capsys) -> None:
    """The trainer and its evaluation render prompts through `render_prompt`: the model's limit holds there."""
    import json

    from guidedrl.app.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"id": "huge", "prompt": "What is 12 + 7? " * 2000, "answer": "19"}) + "\n"
                    + json.dumps({"id": "small", "prompt": "What is 1 + 1?", "answer": "2"}) + "\n")
    sets = ["model.path=tiny", "model.tiny.max_position_embeddings=64", f"data.train.path={data}",
            f"data.eval.path={data}", "data.eval.task=null", "eval.samples=1", "rollout.max_new_tokens=4",
            "rollout.group_size=2", "train.prompts_per_step=2", "train.micro_batch_size=4", "train.steps=1",
            "run.progress=false"]
    assert main(["train", "--out", str(tmp_path / "run")] + [a for x in sets for a in ("--set", x)]) == 0
    err = capsys.readouterr().err
    assert err.count("sample `huge`: the prompt has") == 1 and "keeping its last 64 tokens" in err


# ----------------------------------------------------------------------------- GGUF and damaged weights


def write_tiny_gguf(path: Path, vocab: int, hidden: int = 32, inter: int = 64, ctx: int = 128) -> None:
    """A 1-layer llama GGUF file, its linear weights Q8_0-quantized (as a real GGUF's are)."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(ctx)
    w.add_embedding_length(hidden)
    w.add_block_count(1)
    w.add_feed_forward_length(inter)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_rope_dimension_count(hidden // 2)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(vocab)])
    rng = np.random.default_rng(0)

    def tensor(name: str, *shape: int, quantize: bool = True) -> None:
        a = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        if not quantize:
            w.add_tensor(name, a)
            return
        q = gguf.quantize(a, gguf.GGMLQuantizationType.Q8_0)
        w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)

    kv = hidden // 2
    tensor("token_embd.weight", vocab, hidden, quantize=False)
    tensor("output_norm.weight", hidden, quantize=False)
    tensor("blk.0.attn_norm.weight", hidden, quantize=False)
    tensor("blk.0.ffn_norm.weight", hidden, quantize=False)
    for name, shape in [("attn_q", (hidden, hidden)), ("attn_k", (kv, hidden)), ("attn_v", (kv, hidden)),
                        ("attn_output", (hidden, hidden)), ("ffn_gate", (inter, hidden)), ("ffn_up", (inter, hidden)),
                        ("ffn_down", (hidden, inter))]:
        tensor(f"blk.0.{name}.weight", *shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gguf_model_checkpoints_as_a_plain_model_in_the_run_dtype(tiny, tmp_path: Path, dtype: str) -> None:
    import json

    from transformers import AutoModelForCausalLM

    from guidedrl.trainer.checkpoint import load_checkpoint, restore, save_checkpoint

    _, tok = tiny
    tok.save_pretrained(tmp_path / "tok")
    write_tiny_gguf(tmp_path / "m.gguf", vocab=len(tok))
    cfg = ModelConfig(path=str(tmp_path / "m.gguf"), tokenizer=str(tmp_path / "tok"), dtype=dtype)
    model, tok2 = load_policy(cfg)
    assert model.dtype == getattr(torch, dtype)
    path = save_checkpoint(tmp_path / "run", 1, model=model, tokenizer=tok2)  # raised "quantized with gguf"
    saved = json.loads((path / "model" / "config.json").read_text())
    assert "quantization_config" not in saved and saved["dtype"] == dtype
    plain = AutoModelForCausalLM.from_pretrained(path / "model")
    want = model.state_dict()
    assert plain.dtype == getattr(torch, dtype)
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in want.items())
    again, _ = load_policy(cfg)  # and the checkpoint restores into a GGUF-loaded model
    with torch.no_grad():
        for p in again.parameters():
            p.add_(1.0)
    restore(load_checkpoint(tmp_path / "run"), again, rng=False)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in want.items())


def test_damaged_weights_file_is_a_model_error(tiny, tmp_path: Path) -> None:
    model, tok = tiny
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with pytest.raises(ModelError, match=r"model.path: cannot load .*m.*incomplete metadata"):
        load_policy(ModelConfig(path=str(tmp_path / "m")))
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match="model.path"):
        load_policy(ModelConfig(path=str(tmp_path / "m")))
