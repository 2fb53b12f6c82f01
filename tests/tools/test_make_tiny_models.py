"""The tiny-model generator: complete HF dirs transformers loads, cached idempotently, seed-deterministic.

Builds only two models (Qwen3-MoE: explicit head_dim, a dense layer; Mixtral: sharded) to stay fast.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from crosspool_sgl.tools import make_tiny_models as tiny

NAMES = ("qwen3_moe", "mixtral")


def _digest(model_dir: Path) -> dict[str, str]:
    files = sorted(model_dir.glob("*.safetensors"))
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return tiny.build_models(tmp_path_factory.mktemp("tiny"), NAMES)


def test_import_is_cheap() -> None:
    heavy = "{'torch', 'transformers', 'tokenizers'}"
    code = f"import sys, crosspool_sgl.tools.make_tiny_models; print(sorted({heavy} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_dirs_are_complete_and_sharded_where_asked(built: dict[str, Path]) -> None:
    for name, path in built.items():
        files = {f.name for f in path.iterdir()}
        assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= files
        assert not any(f.startswith(".") for f in files), name
    assert "model.safetensors" in {f.name for f in built["qwen3_moe"].iterdir()}
    index = json.loads((built["mixtral"] / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    assert not any(p.name.startswith(".") for p in built["mixtral"].parent.iterdir())  # no temp dirs left


def test_transformers_loads_them_with_consistent_tokens(built: dict[str, Path]) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    for name, path in built.items():
        config, tok = AutoConfig.from_pretrained(path), AutoTokenizer.from_pretrained(path)
        gen = GenerationConfig.from_pretrained(path)
        im_end = tok.convert_tokens_to_ids(tiny.IM_END)
        assert config.vocab_size == len(tok) == tiny.TOKENIZER_VOCAB_SIZE
        assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (0, 0, 0)
        assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 0, 0)
        assert gen.eos_token_id == [tok.eos_token_id, im_end]
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        ids = tok("The quick brown fox", return_tensors="pt").input_ids
        with torch.no_grad():
            assert model(ids).logits.shape == (1, ids.shape[1], config.vocab_size), name
    qwen3_moe = AutoConfig.from_pretrained(built["qwen3_moe"])
    assert qwen3_moe.head_dim == 32 != qwen3_moe.hidden_size // qwen3_moe.num_attention_heads
    assert qwen3_moe.mlp_only_layers == [1]
    assert AutoConfig.from_pretrained(built["mixtral"]).sliding_window == 48


def test_tokenizer_round_trips_and_chat_template(built: dict[str, Path]) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(built["qwen3_moe"])
    for text in ("Hello, world! The quick brown fox.", "naïve café — 東京 🚀\n\ttabs  x"):
        assert tok.decode(tok(text).input_ids) == text
    messages = [{"role": "user", "content": "Hi there"}]
    chat = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert chat == "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(chat).input_ids
    assert ids[0] == tok.convert_tokens_to_ids(tiny.IM_START)
    assert tiny.IM_END in tok.convert_ids_to_tokens(ids)


def test_greedy_margins_are_wide(built: dict[str, Path]) -> None:
    result = tiny.check_model(built["qwen3_moe"], max_new_tokens=16)
    assert result.min_logit_gap > 1e-3
    assert all(len(tokens) == 16 for tokens in result.generated)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path, built: dict[str, Path]) -> None:
    again = tiny.build_models(tmp_path / "again", ["mixtral"])  # default seed, as `built`
    assert _digest(again["mixtral"]) == _digest(built["mixtral"])
    tokenizer_json = [(d["mixtral"] / "tokenizer.json").read_bytes() for d in (again, built)]
    assert tokenizer_json[0] == tokenizer_json[1]
    other = tiny.build_models(tmp_path / "other", ["mixtral"], seed=tiny.DEFAULT_SEED + 1)
    assert _digest(other["mixtral"]).keys() == _digest(built["mixtral"]).keys()
    assert _digest(other["mixtral"]) != _digest(built["mixtral"])


def test_ensure_builds_once_and_rebuilds_stale(tmp_path: Path) -> None:
    first = tiny.ensure_tiny_models(tmp_path, names=["qwen3_moe"])
    weights = first["qwen3_moe"] / "model.safetensors"
    stamp = (first["qwen3_moe"].stat().st_mtime_ns, weights.stat().st_mtime_ns)
    second = tiny.ensure_tiny_models(tmp_path, names=["qwen3_moe"])
    assert second == first == {"qwen3_moe": tmp_path / "qwen3_moe"}
    assert (first["qwen3_moe"].stat().st_mtime_ns, weights.stat().st_mtime_ns) == stamp

    (first["qwen3_moe"] / tiny.MARKER_FILE).write_text('{"fingerprint": "from an older generator"}')
    tiny.ensure_tiny_models(tmp_path, names=["qwen3_moe"])
    assert tiny.is_current(first["qwen3_moe"], tiny.generator_fingerprint(tiny.DEFAULT_SEED))
    assert weights.stat().st_mtime_ns != stamp[1]
    with pytest.raises(ValueError, match="unknown tiny model"):
        tiny.ensure_tiny_models(tmp_path, names=["gpt5"])


def _fake_build(path: Path, fingerprint: str) -> Path:
    path.mkdir()
    (path / tiny.MARKER_FILE).write_text(json.dumps({"fingerprint": fingerprint}))
    return path


def test_publish_replaces_a_stale_dir(tmp_path: Path) -> None:
    current = tiny.generator_fingerprint(tiny.DEFAULT_SEED)
    dest = _fake_build(tmp_path / "model", "older generator")
    assert tiny._publish(_fake_build(tmp_path / ".model.tmp-a", current), dest, current) is True
    assert tiny.is_current(dest, current)
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # the stale copy is deleted


def test_publish_keeps_a_current_dir_that_won_the_race(tmp_path: Path) -> None:
    current = tiny.generator_fingerprint(tiny.DEFAULT_SEED)
    dest = _fake_build(tmp_path / "model", current)
    (dest / "winner").touch()
    assert tiny._publish(_fake_build(tmp_path / ".model.tmp-b", current), dest, current) is False
    assert (dest / "winner").exists()
