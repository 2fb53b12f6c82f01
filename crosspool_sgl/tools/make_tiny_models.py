"""Tiny random-weight Hugging Face checkpoints, one per architecture the engine serves.

There is no model hub here, so tests and the server's demo default build their own models: a
transformers config with random fp32 weights (0.4-1.2 MB each) and one small byte-level BPE tokenizer
shared by all of them. Weights are scaled so greedy decoding has clear top-1/top-2 logit gaps: tests
compare our greedy tokens with transformers', and fp32 reordering noise must not flip an argmax.

    python -m crosspool_sgl.tools.make_tiny_models OUT_DIR [--only NAME ...] [--seed N] [--check]

Heavy libraries (torch, transformers, tokenizers) are imported inside functions, so importing this
module costs nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

# Part of the default cache path. Stale models are also caught per directory: each holds MARKER_FILE with a
# fingerprint of this file's source and the seed, and `ensure_tiny_models` rebuilds any that differ.
CACHE_VERSION = "v1"
MARKER_FILE = "crosspool_tiny_model.json"
# Of seeds 0-15 (`check_model` on all 7 models), among the best worst-case greedy margins: min top-1/top-2
# gap 2.2e-3 (6.7e-4 of the logit std; seed 0: 9.8e-4, seed 1: 1.5e-5), min router top-k boundary gap
# 4.4e-4, >= 20 distinct tokens per model. Heavy-tailed lm_head rows widened margins but collapsed
# outputs to 2-10 distinct tokens, so the logits stay plain Gaussian.
DEFAULT_SEED = 13

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)  # trained first, so ids 0, 1, 2
TOKENIZER_VOCAB_SIZE = 512
MAX_POSITION_EMBEDDINGS = 4096

# Every matrix ~ N(0, WEIGHT_STD²): with hidden 64 a projection's output has std ~0.8-1.1, so attention
# and MLP outputs outweigh the embedding in the residual stream and greedy tokens depend on every layer.
WEIGHT_STD = 0.1
# Biases (Qwen2 q/k/v) ~ N(0, BIAS_STD²) and norm gains ~ U(0.5, 1.5) rather than HF's 0 / 1, so an
# engine that drops a bias or a norm weight produces different tokens.
BIAS_STD = 0.2
NORM_GAIN_RANGE = (0.5, 1.5)
# DeepSeek-V3 / GLM-4 e_score_correction_bias ~ N(0, CORRECTION_BIAS_STD²) (HF inits zeros): large enough
# against sigmoid scores ~0.5 +- 0.2 to change which experts are chosen, but not which weigh them.
CORRECTION_BIAS_STD = 0.1
# Extra gain on the final norm: logits std ~0.8 * LOGIT_SCALE, which widens the absolute top-1/top-2 gap.
LOGIT_SCALE = 4.0

# ChatML, as Qwen models use: `<|im_start|>role\ncontent<|im_end|>\n` per message.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Prompts for `check_model`: 25, 37 and 62 tokens, so with 32 new tokens each crosses Mixtral's sliding
# window (48) and Qwen2's (40).
CHECK_PROMPTS: tuple[str | list[dict[str, str]], ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    [{"role": "user", "content": "What is the capital of France? Answer in one short sentence, please."}],
)


@dataclass(frozen=True)
class TinyModelSpec:
    """One tiny checkpoint: a transformers config class (by name) and its size/feature arguments."""

    config_class: str
    config_kwargs: Mapping[str, Any]
    # Set on one model so sharded loading (model.safetensors.index.json) is exercised.
    max_shard_size: str | None = None
    # Layer types the saved config must contain, checked after building (transformers may derive them).
    expect_layer_types: tuple[str, ...] | None = None


# Shared by all; overridden where a model differs (qwen3_moe 3 layers, mixtral MQA, olmoe MHA).
_BASE = {"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2}

MODEL_SPECS: dict[str, TinyModelSpec] = {
    "qwen3_moe": TinyModelSpec(
        "Qwen3MoeConfig",
        {
            **_BASE,
            "num_hidden_layers": 3,
            "head_dim": 32,  # != 64 / 4: the engine must read head_dim, not derive it
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 48,
            "norm_topk_prob": True,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [1],  # layer 1 is a dense MLP of intermediate_size
            "intermediate_size": 96,
        },
    ),
    "qwen2_moe": TinyModelSpec(
        "Qwen2MoeConfig",
        {
            **_BASE,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 32,
            "shared_expert_intermediate_size": 64,
            "intermediate_size": 64,  # unused (no mlp_only_layers) but keeps the config small-looking
            "norm_topk_prob": False,
            "decoder_sparse_step": 1,
        },
    ),
    "mixtral": TinyModelSpec(
        "MixtralConfig",
        {
            **_BASE,
            "num_key_value_heads": 1,  # MQA
            "head_dim": 16,  # explicit: MixtralConfig otherwise saves "head_dim": null
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "intermediate_size": 64,
            "sliding_window": 48,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
        },
        max_shard_size="300KB",  # ~0.75 MB of weights -> 3 shards
    ),
    "olmoe": TinyModelSpec(
        "OlmoeConfig",
        {
            **_BASE,
            "num_key_value_heads": 4,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "intermediate_size": 32,
            "norm_topk_prob": False,
            "clip_qkv": None,
        },
    ),
    "llama": TinyModelSpec(
        "LlamaConfig",
        {
            **_BASE,
            "intermediate_size": 128,
            "tie_word_embeddings": True,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 512,
            },
        },
    ),
    "qwen2": TinyModelSpec(
        "Qwen2Config",
        {
            **_BASE,
            "intermediate_size": 128,
            "use_sliding_window": True,
            "sliding_window": 40,
            "max_window_layers": 1,  # Qwen2 slides on layers >= max_window_layers
        },
        expect_layer_types=("full_attention", "sliding_attention"),
    ),
    "qwen3": TinyModelSpec(
        "Qwen3Config",
        {
            **_BASE,
            "head_dim": 16,
            "intermediate_size": 128,
            "tie_word_embeddings": True,
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 1024,
            },
        },
    ),
    # MLA without a q LoRA, v_head_dim (16) != qk head dim (24), yarn with mscale != mscale_all_dim (so
    # both the cos/sin attention factor and the softmax mscale^2 differ from 1), V2's group-limited
    # greedy routing with a routed scaling factor, a shared expert, one dense first layer.
    "deepseek_v2": TinyModelSpec(
        "DeepseekV2Config",
        {
            **_BASE,
            "num_hidden_layers": 3,
            "num_key_value_heads": 4,
            "q_lora_rank": None,
            "kv_lora_rank": 32,
            "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 8,
            "v_head_dim": 16,
            "first_k_dense_replace": 1,
            "intermediate_size": 96,
            "moe_intermediate_size": 32,
            "n_routed_experts": 8,
            "num_experts_per_tok": 2,
            "n_shared_experts": 1,
            "topk_method": "group_limited_greedy",
            "n_group": 4,
            "topk_group": 2,
            "routed_scaling_factor": 1.5,
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 1024,
                "mscale": 1.0,
                "mscale_all_dim": 0.8,
            },
        },
    ),
    # MLA with a q LoRA, interleaved rope, sigmoid routing with a (non-zero, see _randomize)
    # e_score_correction_bias over 2 groups of which 1 is kept, renormalised and scaled.
    "deepseek_v3": TinyModelSpec(
        "DeepseekV3Config",
        {
            **_BASE,
            "num_key_value_heads": 4,
            "q_lora_rank": 24,
            "kv_lora_rank": 32,
            "qk_nope_head_dim": 16,
            "qk_rope_head_dim": 8,
            "v_head_dim": 16,
            "rope_interleave": True,
            "first_k_dense_replace": 1,
            "intermediate_size": 96,
            "moe_intermediate_size": 32,
            "n_routed_experts": 8,
            "num_experts_per_tok": 2,
            "n_shared_experts": 1,
            "n_group": 2,
            "topk_group": 1,
            "norm_topk_prob": True,
            "routed_scaling_factor": 2.5,
        },
    ),
    # Partial rotary (half of each head), per-head q/k norms, q/k/v biases, a shared expert, sigmoid +
    # correction-bias routing, one dense first layer.
    "glm4_moe": TinyModelSpec(
        "Glm4MoeConfig",
        {
            **_BASE,
            "partial_rotary_factor": 0.5,
            "use_qk_norm": True,
            "attention_bias": True,
            "first_k_dense_replace": 1,
            "intermediate_size": 96,
            "moe_intermediate_size": 32,
            "n_routed_experts": 8,
            "num_experts_per_tok": 2,
            "n_shared_experts": 1,
            "n_group": 2,
            "topk_group": 1,
            "norm_topk_prob": True,
            "routed_scaling_factor": 1.8,
        },
    ),
    # Learned sinks, a sliding (16 < every test prompt) then a full layer, biased experts with the
    # clamped SwiGLU (a low limit so the clamp bites), a router bias, yarn without truncation.
    "gpt_oss": TinyModelSpec(
        "GptOssConfig",
        {
            **_BASE,
            "head_dim": 16,
            "num_local_experts": 4,
            "num_experts_per_tok": 2,
            "intermediate_size": 48,  # 2I != H, so a transposed [H, 2I] expert would not load
            "sliding_window": 16,
            # the clamp changes the output here (7.0, the default, and 3.0 do not); 1.0 collapsed the
            # output to 3-5 distinct tokens. Margins: top-1/top-2 logit gap 1.1e-2, router gap 1.5e-3.
            "swiglu_limit": 2.0,
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 150000.0,
                "factor": 8.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
                "original_max_position_embeddings": 512,
            },
        },
        expect_layer_types=("sliding_attention", "full_attention"),
    ),
}


@dataclass
class CheckResult:
    """Greedy-decoding margins of one model over `CHECK_PROMPTS`."""

    name: str
    min_logit_gap: float  # min over steps of top-1 minus top-2 logit
    min_rel_logit_gap: float  # the same gap divided by that step's logit std
    min_router_gap: float | None  # min gap between the k-th and (k+1)-th router logit; None if dense
    generated: list[list[int]] = field(default_factory=list)


def default_cache_dir() -> Path:
    """Where `ensure_tiny_models` keeps its models unless told otherwise."""
    return Path.home() / ".cache" / "crosspool_sgl" / "tiny_models" / CACHE_VERSION


# --------------------------------------------------------------------------- tokenizer


def corpus_lines(num_lines: int = 400) -> Iterator[str]:
    """A deterministic English-ish corpus, varied enough to fill a 512-token BPE vocabulary."""
    rng = random.Random(1234)
    subjects = "the cat|a small dog|my neighbour|the old fisherman|a young engineer|the teacher|our team"
    subjects += "|the server|a curious child|the model"
    verbs = "reads|writes|finds|builds|watches|carries|opens|paints|sends|loads"
    objects = "a red book|the heavy box|seven apples|a long letter|the blue door|twelve tokens"
    objects += "|a warm cup of tea|the GPU kernel|an empty page|the last train"
    places = "in the garden|by the sea|at the station|under the bridge|on Monday morning|after lunch"
    places += "|in the quiet library|near the river"
    subjects, verbs, objects, places = (words.split("|") for words in (subjects, verbs, objects, places))
    yield "The quick brown fox jumps over the lazy dog."
    yield "Once upon a time, in a small village by the sea, there lived an old fisherman."
    yield "What is the capital of France? The capital of France is Paris."
    for i in range(num_lines):
        subject, verb = rng.choice(subjects), rng.choice(verbs)
        obj, place = rng.choice(objects), rng.choice(places)
        match i % 4:
            case 0:
                yield f"{subject.capitalize()} {verb} {obj} {place}."
            case 1:
                yield f"Why does {subject} {verb[:-1]} {obj} {place}?"
            case 2:
                price = f"${rng.randint(1, 99)}.{i % 100:02d}"
                yield f"On day {rng.randint(1, 999)}, {subject} {verb} {obj}; it costs {price}!"
            case _:
                yield f'"{obj.capitalize()}," said {subject}, "is {rng.choice(places)}."'


def train_tokenizer() -> PreTrainedTokenizerFast:
    """Train the byte-level BPE all tiny models share, wrapped for `save_pretrained`.

    eos is `<|endoftext|>` (and bos/pad, as Qwen does); `<|im_end|>` ends chat turns and is listed as a
    second stop id in each generation_config. No token is added automatically: prompts are raw text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus_lines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=ENDOFTEXT,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_POSITION_EMBEDDINGS,
    )


def _token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, Any]:
    """The config fields that must agree with the tokenizer."""
    return {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _generation_config(tokenizer: PreTrainedTokenizerFast) -> GenerationConfig:
    """Stop on `<|endoftext|>` or `<|im_end|>`; no sampling defaults, so greedy unless asked otherwise."""
    from transformers import GenerationConfig

    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)],
        pad_token_id=tokenizer.pad_token_id,
    )


# --------------------------------------------------------------------------- models


def _model_seed(seed: int, name: str) -> int:
    # Per-model seed: `--only qwen2` builds the same bytes as a full run.
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % 2**63


def _randomize(model: PreTrainedModel, seed: int) -> None:
    """Overwrite every parameter from one seeded generator; independent of transformers' init order."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():  # tied weights are listed once
            if param.ndim >= 2:
                param.normal_(0.0, WEIGHT_STD, generator=gen)
            elif name.endswith("bias"):
                param.normal_(0.0, BIAS_STD, generator=gen)
            else:  # RMSNorm gains (layer norms, q/k norms, final norm; gpt-oss's sinks)
                param.uniform_(*NORM_GAIN_RANGE, generator=gen)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0.0, CORRECTION_BIAS_STD, generator=gen)
        model.model.norm.weight.mul_(LOGIT_SCALE)


def build_model(name: str, tokenizer: PreTrainedTokenizerFast, seed: int = DEFAULT_SEED) -> PreTrainedModel:
    """Instantiate model `name` of `MODEL_SPECS` with seeded random fp32 weights."""
    import torch
    import transformers

    spec = MODEL_SPECS[name]
    config_cls = getattr(transformers, spec.config_class)
    config = config_cls(
        **_token_ids(tokenizer),
        max_position_embeddings=MAX_POSITION_EMBEDDINGS,
        initializer_range=WEIGHT_STD,
        **spec.config_kwargs,
    )
    layer_types = getattr(config, "layer_types", None)
    if spec.expect_layer_types is not None and tuple(layer_types or ()) != spec.expect_layer_types:
        raise RuntimeError(f"{name}: layer_types {layer_types}, expected {spec.expect_layer_types}")
    torch.manual_seed(_model_seed(seed, name))  # transformers' own init, before `_randomize` overwrites it
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, _model_seed(seed, name))
    model.generation_config = _generation_config(tokenizer)
    return model.eval()


def save_model(name: str, model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, out_dir: Path) -> None:
    """Write a complete HF directory (config, generation config, safetensors, tokenizer)."""
    # transformers 5 always writes safetensors (`safe_serialization` is gone), so it is not passed.
    shard = MODEL_SPECS[name].max_shard_size
    model.save_pretrained(out_dir, **({"max_shard_size": shard} if shard else {}))
    tokenizer.save_pretrained(out_dir)


def generator_fingerprint(seed: int) -> str:
    """Identifies what a build would contain: this file's source (specs, init, corpus) plus the seed."""
    return hashlib.sha256(Path(__file__).read_bytes() + f"seed={seed}".encode()).hexdigest()[:16]


def is_current(model_dir: Path, fingerprint: str) -> bool:
    """Whether `model_dir` was built by this generator with this seed (so it need not be rebuilt)."""
    try:
        return json.loads((model_dir / MARKER_FILE).read_text())["fingerprint"] == fingerprint
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _publish(tmp_dir: Path, dest: Path, fingerprint: str, force: bool = False) -> bool:
    """Atomically move a finished build to `dest`, replacing a stale one; False if a current one beat us."""
    if dest.exists() and (force or not is_current(dest, fingerprint)):
        trash = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        with contextlib.suppress(FileNotFoundError):  # a racing process may have moved it already
            os.replace(dest, trash / dest.name)
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.rename(tmp_dir, dest)  # atomic; fails if dest exists and is not empty
        return True
    except OSError:
        if not dest.is_dir():
            raise
        return False  # another process published first; the caller deletes tmp_dir


def build_models(
    out_dir: str | Path, names: Iterable[str] | None, seed: int = DEFAULT_SEED, force: bool = False
) -> dict[str, Path]:
    """Build `names` (default: all) into `out_dir/<name>`, skipping up-to-date ones unless `force`.

    Each model is built in a temp dir and renamed into place, so no reader sees half a model and two
    racing processes are safe (the loser discards its identical copy).
    """
    out_dir, names = Path(out_dir), _validated(names)
    fingerprint = generator_fingerprint(seed)
    todo = [name for name in names if force or not is_current(out_dir / name, fingerprint)]
    if not todo:
        return {name: out_dir / name for name in names}
    from transformers.utils import logging as hf_logging

    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tokenizer = train_tokenizer()  # once, reused by every model
    logger.info("tokenizer: %d tokens in %.2f s", len(tokenizer), time.perf_counter() - start)
    bars_were_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # one log line per model instead of a "Writing model shards" bar each
    try:
        for i, name in enumerate(todo, 1):
            start = time.perf_counter()
            published = _build_one(name, tokenizer, seed, out_dir / name, force)
            size_kib = sum(f.stat().st_size for f in (out_dir / name).iterdir()) / 1024
            verb = "wrote" if published else "kept a concurrent build of"
            logger.info(
                "[%d/%d] %s: %s %s (%.0f KiB) in %.2f s",
                *(i, len(todo), name, verb, out_dir / name, size_kib, time.perf_counter() - start),
            )
    finally:
        if bars_were_on:
            hf_logging.enable_progress_bar()
    return {name: out_dir / name for name in names}


def _build_one(name: str, tokenizer: PreTrainedTokenizerFast, seed: int, dest: Path, force: bool) -> bool:
    """Build one model in a temp dir beside `dest` and publish it; False if another process won the race."""
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=dest.parent))
    try:
        save_model(name, build_model(name, tokenizer, seed), tokenizer, tmp_dir)
        marker = {"name": name, "seed": seed, "fingerprint": generator_fingerprint(seed)}
        (tmp_dir / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
        _make_readable(tmp_dir)
        return _publish(tmp_dir, dest, marker["fingerprint"], force)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)  # no-op once renamed


def _make_readable(directory: Path) -> None:
    # mkdtemp makes the dir 0700 and safetensors files come out 0600: give them the usual umask modes.
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)


def _validated(names: Iterable[str] | None) -> list[str]:
    names = list(MODEL_SPECS) if names is None else list(dict.fromkeys(names))
    unknown = sorted(set(names) - set(MODEL_SPECS))
    if unknown:
        raise ValueError(f"unknown tiny model(s) {unknown}; known: {sorted(MODEL_SPECS)}")
    return names


def ensure_tiny_models(root: str | Path | None = None, names: Iterable[str] | None = None) -> dict[str, Path]:
    """Return name -> directory of the tiny models (default seed), building only missing or stale ones.

    A directory is current when its marker matches this generator's fingerprint, so editing this file
    rebuilds caches instead of silently serving models made by an older version.
    """
    root = default_cache_dir() if root is None else Path(root)
    return build_models(root, names, seed=DEFAULT_SEED)


# --------------------------------------------------------------------------- checks


def _min_router_gap(model: PreTrainedModel, sequences: Any) -> float | None:
    """Smallest gap between the k-th and (k+1)-th router logit: a near tie could flip an expert."""
    import torch

    k = getattr(model.config, "num_experts_per_tok", None)
    if k is None:
        return None
    with torch.no_grad():
        router_logits = model(sequences, output_router_logits=True).router_logits  # per MoE layer: [T, E]
    tops = [logits.topk(k + 1, dim=-1).values for logits in router_logits]  # [T, k+1] each
    gaps = [(top[:, k - 1] - top[:, k]).min() for top in tops]
    return float(torch.stack(gaps).min())


def check_model(path: str | Path, max_new_tokens: int = 32) -> CheckResult:
    """Greedy-decode `CHECK_PROMPTS` with transformers (EOS ignored) and measure the decision margins."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    gaps, rel_gaps, router_gaps, generated = [], [], [], []
    for prompt in CHECK_PROMPTS:
        text = prompt
        if not isinstance(prompt, str):
            text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        input_ids = tokenizer(text, return_tensors="pt").input_ids
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=None,  # never stop, like an engine's ignore_eos (min_new_tokens would mask EOS)
            output_logits=True,
            return_dict_in_generate=True,
        )
        logits = torch.cat(out.logits)  # [N, V] raw, before logits processors
        top2 = logits.topk(2, dim=-1).values
        gap = top2[:, 0] - top2[:, 1]
        gaps.append(gap.min())
        rel_gaps.append((gap / logits.std(dim=-1)).min())
        router_gaps.append(_min_router_gap(model, out.sequences))
        generated.append(out.sequences[0, input_ids.shape[1] :].tolist())
    return CheckResult(
        name=path.name,
        min_logit_gap=float(torch.stack(gaps).min()),
        min_rel_logit_gap=float(torch.stack(rel_gaps).min()),
        min_router_gap=None if router_gaps[0] is None else min(router_gaps),
        generated=generated,
    )


# --------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: build (and optionally check) tiny models into OUT_DIR."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    names = sorted(MODEL_SPECS)
    parser.add_argument("--only", nargs="+", choices=names, metavar="NAME", help=f"subset of {names}")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--check", action="store_true", help="greedy-decode and print logit margins")
    parser.add_argument("--force", action="store_true", help="rebuild even models that are up to date")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    start = time.perf_counter()
    paths = build_models(args.out_dir, args.only, seed=args.seed, force=args.force)
    print(f"{len(paths)} model(s) ready under {args.out_dir} after {time.perf_counter() - start:.2f} s")
    if args.check:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # no "Loading weights" bar between the result lines
        for path in paths.values():
            res = check_model(path)
            router = "-" if res.min_router_gap is None else f"{res.min_router_gap:.4g}"
            print(
                f"{res.name:10s} min top1-top2 logit gap {res.min_logit_gap:.4g}"
                f" (relative {res.min_rel_logit_gap:.4g}), min router k/k+1 gap {router}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
