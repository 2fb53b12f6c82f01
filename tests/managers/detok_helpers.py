"""Shared pieces of the detokenizer tests: tokenizers, a manager without a process, a stream driver."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from crosspool_sgl.core.req import ReqOutput
from crosspool_sgl.managers.detokenizer_process import (
    MultiModelDetokenizerManager,
    detokenizer_port_args,
    detokenizer_server_args,
)
from crosspool_sgl.managers.token_id_output import DetokenizeOptions, TokenIdOutputs

# Words of the llama-style tokenizer; every other character falls back to its UTF-8 bytes.
_SPM_WORDS = ("hello", "world", "the", "cat", "reads", "a", "book", "again", "ok", "and", "naive", "caf")


def spm_tokenizer() -> Any:
    """A SentencePiece-like BPE (Llama's shape): `▁` for spaces, byte fallback, a stripped leading space.

    Built here because the demo models share one byte-level BPE; this one splits multi-byte
    characters into `<0xNN>` tokens and decodes them with ByteFallback + Fuse, as Llama/Mistral do.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for ch in "▁" + "".join(sorted(set("".join(_SPM_WORDS)))):
        vocab.setdefault(ch, len(vocab))
    merges = []
    for word in _SPM_WORDS:
        piece = "▁"
        for ch in word:
            if piece + ch not in vocab:
                merges.append((piece, ch))
                vocab[piece + ch] = len(vocab)
            piece += ch
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


class CountingTokenizer:
    """A tokenizer that counts the token ids it is asked to decode (the detokenizer's cost)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.decoded_ids = 0

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def decode(self, ids: Sequence[int], *args: Any, **kwargs: Any) -> str:
        self.decoded_ids += len(ids)
        return self.inner.decode(ids, *args, **kwargs)

    def batch_decode(self, batch: Sequence[Sequence[int]], *args: Any, **kwargs: Any) -> list[str]:
        self.decoded_ids += sum(len(ids) for ids in batch)
        return self.inner.batch_decode(batch, *args, **kwargs)


@contextmanager
def detokenizer(
    tokenizers: dict[str, Any], tmp_path: Any, model_path: str
) -> Iterator[MultiModelDetokenizerManager]:
    """The manager as its process builds it (SGLang's config from `model_path`), under a model-owned
    SGLang context (the test process's published config is left alone), sockets on temporary ipc paths."""
    from sglang.srt import runtime_context

    paths = dict.fromkeys(tokenizers, model_path)
    server_args = detokenizer_server_args(paths)
    port_args = detokenizer_port_args(f"ipc://{tmp_path}/detok-in")
    with runtime_context.use_context(runtime_context.create_context(server_args, role="detokenizer")):
        manager = MultiModelDetokenizerManager(server_args, port_args, tokenizers)
    try:
        yield manager
    finally:
        manager.recv_from_scheduler.close(linger=0)


def stream(
    manager: MultiModelDetokenizerManager,
    model: str,
    ids: list[int],
    step: int = 1,
    options: DetokenizeOptions | None = None,
    finish_reason: dict | None = None,
    tail_decoder: Any = None,
    rid: str = "r",
) -> list[str]:
    """Send `ids` through the scheduler-side conversion and the detokenizer, `step` tokens per scheduler
    step, finishing on the last one; the text deltas the tokenizer side receives."""
    conv = TokenIdOutputs({model: tail_decoder} if tail_decoder is not None else {})
    conv.add(rid, options or DetokenizeOptions())
    deltas = []
    for start in range(0, len(ids), step):
        chunk = ids[start : start + step]
        done = start + step >= len(ids)
        reason = (finish_reason or {"type": "length", "length": len(ids)}) if done else None
        out = ReqOutput(rid, model, chunk, [], [], done, reason, 3, start + len(chunk))
        for msg in conv.convert([out]):
            batch = manager.handle_batch_token_id_out(msg)
            assert batch.rids == [rid]
            deltas.append(batch.output_strs[0])
    return deltas
