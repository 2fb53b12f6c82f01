"""Wire disaggregated mode into the runtime: start the FFN workers, hand out the attention-side parts.

`build_runtime` calls `start_ffn_side` first (the workers then load their
weights while this process loads the attention side), then takes the slot-table
pool for the loader, `make_runner` for the runner and `scheduler_cls`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from crosspool_sgl.disagg.pipeline import PipelinedModelRunner
from crosspool_sgl.disagg.remote_ffn import RemoteFFN
from crosspool_sgl.disagg.scheduler import DisaggScheduler
from crosspool_sgl.disagg.slot_tables import SlotTablePool
from crosspool_sgl.mem.kv_pool import KVPool
from crosspool_sgl.models.decoder import DecoderModel
from crosspool_sgl.server_args import DisaggArgs, EngineArgs


@dataclass
class FFNSide:
    args: DisaggArgs
    remote: RemoteFFN
    slot_pool: SlotTablePool
    scheduler_cls: type = DisaggScheduler

    def make_runner(
        self, models: dict[str, DecoderModel], kv_pool: KVPool, device: torch.device
    ) -> PipelinedModelRunner:
        """Waits until every worker has loaded the same slots as the attention side."""
        self.remote.wait_ready(self.slot_pool.num_slots)
        return PipelinedModelRunner(models, kv_pool, device, self.remote, self.args.micro_batches)


def start_ffn_side(args: EngineArgs, dtype: torch.dtype, device: torch.device) -> FFNSide:
    """Spawn the FFN workers and join their process group (blocks until they connected)."""
    if args.disagg.ffn_workers < 0:
        raise ValueError(f"ffn_workers must be >= 0, got {args.disagg.ffn_workers}")
    models = [(s.name, s.path) for s in args.models]
    remote = RemoteFFN(args.disagg, models, dtype, device)
    return FFNSide(args.disagg, remote, SlotTablePool(dtype, device))
