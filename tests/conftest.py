"""Shared fixtures: a tiny random Llama model and a tokenizer made locally (no downloads)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

from guidedrl.core.config import ModelConfig, TinyModel
from guidedrl.nn.models import load_policy

torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (GPU tests run on a lent GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_cfg() -> ModelConfig:
    return ModelConfig(path="tiny", tiny=TinyModel(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2))


@pytest.fixture()
def tiny(tiny_cfg):
    """(model, tokenizer): a fresh 2-layer random model (seeded) on CPU, fp32."""
    return load_policy(tiny_cfg)
