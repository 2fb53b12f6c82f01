"""Runs one scheduled step: every model's share of the batch, then sampling.

Requests of different models share the step; each model's tokens are packed
into one batch (prefill chunks and decodes mixed), and by default the models run
in lockstep (models/lockstep.py): layer by layer, with one FFN call per layer
index for all of them; `lockstep=False` runs each model's forward in turn (the
old path, kept for comparison). Logits are computed
only for the rows that need them: the last token of a request whose prompt is
now fully cached, and prompt positions whose logprobs were asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from crosspool_sgl.core.req import Req
from crosspool_sgl.core.sampling_batch import SamplingState, process_logits
from crosspool_sgl.core.static_decode import DecodeRow, StaticDecodeRunner
from crosspool_sgl.layers.attention.base import AttentionMetadata
from crosspool_sgl.layers.sampler import SamplingRow, sample, token_logprobs
from crosspool_sgl.mem.kv_pool import KVPool
from crosspool_sgl.mem.residency_manager import ResidencyManager
from crosspool_sgl.models.decoder import DecoderModel
from crosspool_sgl.models.lockstep import ModelSlice, lockstep_forward


@dataclass
class StepResult:
    """Per request: the sampled token (None mid-prefill) and logprobs gathered this step."""

    next_token: int | None = None
    next_logprob: float | None = None
    next_top: list | None = None
    prompt_logprobs: list[tuple[float, int]] | None = None  # for positions start+1.. of this chunk
    prompt_top: list | None = None


def pack_batch(
    group: list[tuple[Req, int]], page_tokens: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
    """One model's share of a step as packed token ids [T], positions [T] and attention metadata."""
    ids: list[int] = []
    positions: list[int] = []
    for req, n in group:
        ids += req.fill_ids[req.num_cached : req.num_cached + n]
        positions += range(req.num_cached, req.num_cached + n)
    meta = AttentionMetadata.build(
        [r.pages for r, _ in group],
        [r.num_cached + n for r, n in group],
        [n for _, n in group],
        page_tokens,
        device,
    )
    as_tensor = lambda x: torch.tensor(x, dtype=torch.int64, device=device)  # noqa: E731
    return as_tensor(ids), as_tensor(positions), meta


class ModelRunner:
    def __init__(
        self,
        models: dict[str, DecoderModel],
        kv_pool: KVPool,
        device: torch.device,
        residency: ResidencyManager | None = None,
        static_decode: StaticDecodeRunner | None = None,
        lockstep: bool = True,
    ) -> None:
        self.models = models
        self.lockstep = lockstep  # False: each model's whole forward in turn (M * L FFN calls)
        self.kv_pool = kv_pool
        self.device = device
        self.residency = residency
        self.sampling_state = SamplingState(device)
        self.static_decode = static_decode  # pure-decode steps on persistent buffers / CUDA graphs

    def release_sampling(self, req: Req) -> None:
        """A finished request's sampling state (its output-token counts) is dropped."""
        self.sampling_state.release(req)

    def run(self, items: list[tuple[Req, int]]) -> dict[str, StepResult]:
        by_model: dict[str, list[tuple[Req, int]]] = {}
        for req, n in items:
            by_model.setdefault(req.model, []).append((req, n))
        if self.residency is not None:  # fallback: the scheduler should only run ready models
            self.residency.ensure_resident(by_model, wait=True)
        results: dict[str, StepResult] = {}
        hidden = self._run_static_decode(by_model)
        if hidden is not None:
            hiddens = [hidden[model] for model in by_model]
        elif self.lockstep:
            hiddens = self._forward_lockstep(by_model)
        else:  # each model's whole forward in turn
            for model, group in by_model.items():
                results.update(self._run_model(self.models[model], group))
            return results
        for (model, group), h in zip(by_model.items(), hiddens, strict=True):
            results.update(self._logits_and_sample(self.models[model], group, h))
        return results

    def _run_static_decode(
        self, by_model: dict[str, list[tuple[Req, int]]]
    ) -> dict[str, torch.Tensor] | None:
        """Hidden states per model when the step is pure decode and fits a static bucket, else None.

        Pure decode: every row is one token that ends its sequence (sampling follows). Sampling,
        grammars, penalties and logprobs then run on these rows exactly as after an eager forward.
        """
        if self.static_decode is None:
            return None
        rows: dict[str, list[DecodeRow]] = {}
        for model, group in by_model.items():
            for req, n in group:
                if n != 1 or req.num_cached + 1 != len(req.input_ids) + len(req.output_ids):
                    return None
                last = req.output_ids[-1] if req.output_ids else req.input_ids[-1]
                rows.setdefault(model, []).append(DecodeRow(last, req.num_cached, req.pages))
        return self.static_decode.run(rows)

    def _forward_lockstep(self, by_model: dict[str, list[tuple[Req, int]]]) -> list[torch.Tensor]:
        """Final hidden states [T, H] of each model's group (in order), one FFN call per layer index."""
        slices = []
        for model, group in by_model.items():
            ids, positions, meta = pack_batch(group, self.kv_pool.page_tokens, self.device)
            kv = self.kv_pool.kv_view(model)
            slices.append(ModelSlice.embed(self.models[model], ids, positions, meta, kv))
        return lockstep_forward(slices)

    def _run_model(self, model: DecoderModel, group: list[tuple[Req, int]]) -> dict[str, StepResult]:
        ids, positions, meta = pack_batch(group, self.kv_pool.page_tokens, self.device)
        hidden = model.forward(ids, positions, meta, self.kv_pool.kv_view(model.name))
        return self._logits_and_sample(model, group, hidden)

    def _logits_and_sample(self, model, group, hidden) -> dict[str, StepResult]:
        results: dict[str, StepResult] = {}
        sample_rows: list[int] = []
        sample_reqs: list[Req] = []
        start = 0
        for req, n in group:
            res = results[req.rid] = StepResult()
            if req.return_logprob and req.logprob_start_len >= 0:
                self._prompt_logprobs(model, req, n, hidden[start : start + n], res)
            if req.num_cached + n == len(req.fill_ids):
                sample_rows.append(start + n - 1)
                sample_reqs.append(req)
            start += n
        if not sample_reqs:
            return results
        logits = model.logits(hidden[sample_rows])  # [B, V]
        rows = [
            SamplingRow(r.params.temperature, r.params.top_p, r.params.top_k, r.params.min_p, r.generator)
            for r in sample_reqs
        ]
        processed, step = process_logits(logits, sample_reqs, model.config.eos_token_ids, self.sampling_state)
        next_ids = sample(processed, rows)
        step.after_sample(sample_reqs, next_ids)
        want = [r.return_logprob for r in sample_reqs]
        top_n = max((r.top_logprobs_num for r in sample_reqs), default=0)
        lps, tops = token_logprobs(logits, next_ids, top_n) if any(want) else (None, None)
        for i, req in enumerate(sample_reqs):
            res = results[req.rid]
            res.next_token = int(next_ids[i])
            if lps is not None:
                res.next_logprob = lps[i]
                res.next_top = tops[i][: req.top_logprobs_num] if tops else None
        return results

    @staticmethod
    def _prompt_logprobs(model, req: Req, n: int, hidden, res: StepResult) -> None:
        """Logprobs of prompt tokens predicted inside this chunk (positions past logprob_start_len)."""
        prompt_len = len(req.input_ids)
        first = req.num_cached  # hidden row j predicts token at position first + j + 1
        next_pos = req.logprob_start_len + len(req.input_logprobs)  # survives retraction + re-prefill
        rows = [j for j in range(n) if next_pos <= first + j + 1 < prompt_len]
        if not rows:
            return
        targets = torch.tensor([req.input_ids[first + j + 1] for j in rows])
        lps, tops = token_logprobs(model.logits(hidden[rows]), targets, req.top_logprobs_num)
        res.prompt_logprobs = list(zip(lps, targets.tolist(), strict=True))
        res.prompt_top = tops
