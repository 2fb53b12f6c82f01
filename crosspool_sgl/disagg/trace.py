"""A step's pipeline trace: per layer and micro-batch, where the time went.

Timestamps are `time.perf_counter()` of the attention side and of the FFN
workers; on Linux both read CLOCK_MONOTONIC, so they share one time line.
The summary's `parts_s` is what the step's layers would take if nothing
overlapped (attention + posting sends + inbound transfer + FFN + receive);
`overlap_s = parts_s - layers_s` is the time the pipeline hid.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class FFNCall:
    """One layer of one micro-batch: attention here, then its FFN on the workers."""

    micro_batch: int
    model: str
    layer: int
    attn_start: float
    attn_end: float  # attention + routing done
    sent: float  # sends posted
    wait_start: float = 0.0
    wait_end: float = 0.0  # FFN output here
    worker_times: list[tuple[int, float, float]] = field(default_factory=list)  # (worker, inputs in, done)

    @property
    def ffn_done(self) -> float:
        return max(t[2] for t in self.worker_times)


@dataclass
class StepTrace:
    num_micro_batches: int
    interleaved: bool
    start: float
    end: float = 0.0
    calls: list[FFNCall] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        """Seconds per part, summed over the step's layers and micro-batches."""
        attn = sum(c.attn_end - c.attn_start for c in self.calls)
        send = sum(c.sent - c.attn_end for c in self.calls)
        ffn = sum(done - t_in for c in self.calls for _, t_in, done in c.worker_times)
        recv = sum(max(0.0, c.wait_end - max(c.wait_start, c.ffn_done)) for c in self.calls)
        idle = sum(max(0.0, min(c.wait_end, c.ffn_done) - c.wait_start) for c in self.calls)
        xfer_in = self._inbound_transfer()
        layers = (
            (max(c.wait_end for c in self.calls) - min(c.attn_start for c in self.calls))
            if self.calls
            else 0.0
        )
        parts = attn + send + xfer_in + ffn + recv
        return {
            "step_s": self.end - self.start,
            "layers_s": layers,
            "attn_s": attn,
            "send_s": send,
            "xfer_in_s": xfer_in,
            "ffn_s": ffn,
            "recv_s": recv,
            "idle_s": idle,
            "parts_s": parts,
            "overlap_s": parts - layers,
        }

    def _inbound_transfer(self) -> float:
        """Sends posted -> inputs on the worker, not counting time the worker was still busy."""
        busy_until: dict[int, float] = {}
        total = 0.0
        for c in sorted(self.calls, key=lambda c: c.sent):
            for w, t_in, done in c.worker_times:
                total += max(0.0, t_in - max(c.sent, busy_until.get(w, 0.0)))
                busy_until[w] = done
        return total

    def per_layer(self) -> list[dict[str, float]]:
        """Milliseconds per (model, layer), summed over micro-batches."""
        rows: dict[tuple[str, int], dict[str, float]] = {}
        for c in self.calls:
            r = rows.setdefault(
                (c.model, c.layer), {"attn": 0.0, "send": 0.0, "ffn": 0.0, "recv": 0.0, "idle": 0.0}
            )
            r["attn"] += 1e3 * (c.attn_end - c.attn_start)
            r["send"] += 1e3 * (c.sent - c.attn_end)
            r["ffn"] += 1e3 * sum(done - t_in for _, t_in, done in c.worker_times)
            r["recv"] += 1e3 * max(0.0, c.wait_end - max(c.wait_start, c.ffn_done))
            r["idle"] += 1e3 * max(0.0, min(c.wait_end, c.ffn_done) - c.wait_start)
        return [{"model": m, "layer": i, **v} for (m, i), v in rows.items()]

    def format(self) -> str:
        """A plain-text table (ms) plus the step's totals."""
        lines = [f"{'model':<12} {'layer':>5} {'attn':>8} {'send':>8} {'ffn':>8} {'recv':>8} {'idle':>8}"]
        for r in self.per_layer():
            lines.append(
                f"{r['model']:<12} {r['layer']:>5} {r['attn']:8.3f} {r['send']:8.3f} "
                f"{r['ffn']:8.3f} {r['recv']:8.3f} {r['idle']:8.3f}"
            )
        s = self.summary()
        lines.append(
            f"step {1e3 * s['step_s']:.3f} ms ({self.num_micro_batches} micro-batches): layers "
            f"{1e3 * s['layers_s']:.3f} ms, sum of parts {1e3 * s['parts_s']:.3f} ms, "
            f"overlap {1e3 * s['overlap_s']:.3f} ms"
        )
        return "\n".join(lines)
