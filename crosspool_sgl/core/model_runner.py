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
from crosspool_sgl.core.sampling_batch import SamplingState, needs_processing, process_logits
from crosspool_sgl.core.static_decode import DecodeRow, StaticDecodeRunner
from crosspool_sgl.layers.attention.base import AttentionMetadata
from crosspool_sgl.layers.plan_cache import PlanCache
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
    return pack_batches([group], page_tokens, device)[0]


def pack_batches(
    groups: list[list[tuple[Req, int]]], page_tokens: int, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor, AttentionMetadata]]:
    """`pack_batch` of every model's group of a step, in one pass: the ids and positions of all
    groups are one tensor (views per group) and the metadata comes from `AttentionMetadata.build_many`."""
    ints: list[int] = []  # per group: ids [T], then positions [T]
    sizes: list[int] = []
    for group in groups:
        positions: list[int] = []
        for req, n in group:
            ints += req.fill_ids[req.num_cached : req.num_cached + n]
            positions += range(req.num_cached, req.num_cached + n)
        ints += positions
        sizes.append(len(positions))
    metas = AttentionMetadata.build_many(
        [([r.pages for r, _ in g], [r.num_cached + n for r, n in g], [n for _, n in g]) for g in groups],
        page_tokens,
        device,
    )
    packed = torch.tensor(ints, dtype=torch.int64).to(device)
    out, start = [], 0
    for t, meta in zip(sizes, metas, strict=True):
        out.append((packed[start : start + t], packed[start + t : start + 2 * t], meta))
        start += 2 * t
    return out


def _plain_greedy(group: list[tuple[Req, int]]) -> bool:
    """Every row is one decode token that samples greedily: no logprobs, no logit processing."""
    return not needs_processing([r for r, _ in group]) and all(
        n == 1
        and req.num_cached + 1 == len(req.input_ids) + len(req.output_ids)
        and not req.return_logprob
        and (req.params.temperature == 0.0 or req.params.top_k == 1)
        for req, n in group
    )


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
        self.lockstep_plans = PlanCache()  # index tensors per batch structure, reused by later steps

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
        parts = [(self.models[m], group, h) for (m, group), h in zip(by_model.items(), hiddens, strict=True)]
        return self._sample_all(parts)

    def _sample_all(self, parts: list[tuple[DecoderModel, list[tuple[Req, int]], torch.Tensor]]):
        """Logits and sampling of every model's share (model, group, hidden states).

        A share of plain greedy decode rows (`_plain_greedy`) needs only its logits' argmax, the
        same op for every model: those shares are argmaxed together, one call per vocabulary size.
        The others sample per model (`_logits_and_sample`).
        """
        results: dict[str, StepResult] = {}
        plain: dict[int, list[tuple[list[Req], torch.Tensor]]] = {}  # V -> (requests, logits [B, V])
        for model, group, hidden in parts:
            if not _plain_greedy(group):
                results.update(self._logits_and_sample(model, group, hidden))
                continue
            logits = model.logits(hidden)  # one row per request, each sampling
            plain.setdefault(logits.shape[1], []).append(([r for r, _ in group], logits))
        for shares in plain.values():
            logits = torch.cat([x for _, x in shares]) if len(shares) > 1 else shares[0][1]
            tokens = torch.argmax(logits, dim=-1).tolist()  # as `sample` does for greedy rows
            reqs = [r for share, _ in shares for r in share]
            for req, token in zip(reqs, tokens, strict=True):
                results[req.rid] = StepResult(next_token=token)
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
        packed = pack_batches(list(by_model.values()), self.kv_pool.page_tokens, self.device)
        slices = [
            ModelSlice.embed(self.models[model], *inputs, self.kv_pool.kv_view(model))
            for model, inputs in zip(by_model, packed, strict=True)
        ]
        return lockstep_forward(slices, plans=self.lockstep_plans)

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
