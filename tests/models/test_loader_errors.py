"""Loading errors name the culprit: missing directory, unsupported architecture, missing tensor."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from crosspool_sgl.layers.attention.torch_backend import TorchAttentionBackend
from crosspool_sgl.mem.weight_pool import WeightPool
from crosspool_sgl.models.config import UnsupportedModelError, load_model_config
from crosspool_sgl.models.loader import MissingWeightError, load_model


def _load(path):
    return load_model(
        "m",
        path,
        WeightPool(torch.float32),
        TorchAttentionBackend(),
        torch.device("cpu"),
        torch.float32,
        False,
    )


def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _load(tmp_path / "nope")


def test_unsupported_architecture_is_named(tmp_path, tiny_models):
    d = tmp_path / "bert"
    shutil.copytree(tiny_models["llama"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["BertForMaskedLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="BertForMaskedLM"):
        load_model_config(d)


def test_unsupported_rope_type_is_named(tmp_path, tiny_models):
    d = tmp_path / "rope"
    shutil.copytree(tiny_models["llama"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "longrope", "rope_theta": 10000.0}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="longrope"):
        load_model_config(d)


def test_missing_tensor_is_named(tmp_path, tiny_models):
    d = tmp_path / "broken"
    shutil.copytree(tiny_models["qwen3_moe"], d)
    weights = load_file(d / "model.safetensors")
    gone = "model.layers.0.mlp.experts.3.down_proj.weight"
    del weights[gone]
    save_file(weights, d / "model.safetensors")
    with pytest.raises(MissingWeightError, match=gone.replace(".", r"\.")):
        _load(d)
