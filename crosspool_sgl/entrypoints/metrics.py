"""Prometheus metrics for `GET /metrics`: per-model request counts, latencies, queues and pool bytes.

Counters and histograms are fed by the tokenizer side as outputs arrive;
gauges (queue depth, KV and weights pool bytes) are refreshed from the
scheduler at scrape time, so they are never staler than the scrape.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from crosspool_sgl.managers.metrics_hooks import MetricsHooks

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("crosspool_requests", "Requests received", ["model"], registry=r)
        self.finished = Counter(
            "crosspool_requests_finished", "Requests finished", ["model", "reason"], registry=r
        )
        self.prompt_tokens = Counter("crosspool_prompt_tokens", "Prompt tokens", ["model"], registry=r)
        self.generation_tokens = Counter(
            "crosspool_generation_tokens", "Generated tokens", ["model"], registry=r
        )
        self.ttft = Histogram(
            "crosspool_time_to_first_token_seconds",
            "Time to first token",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "crosspool_inter_token_latency_seconds",
            "Inter-token latency",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge("crosspool_num_queue_reqs", "Requests waiting", ["model"], registry=r)
        self.running = Gauge("crosspool_num_running_reqs", "Requests running", ["model"], registry=r)
        self.kv_used_pages = Gauge("crosspool_kv_used_pages", "KV pages in use", ["model"], registry=r)
        self.kv_used = Gauge("crosspool_kv_used_bytes", "KV bytes in use (pages)", ["model"], registry=r)
        self.kv_owned = Gauge(
            "crosspool_kv_owned_bytes", "KV arena bytes owned (chunks)", ["model"], registry=r
        )
        self.kv_free = Gauge(
            "crosspool_kv_free_bytes",
            "KV bytes free to the model: its owned slack plus the pool's free chunks",
            ["model"],
            registry=r,
        )
        self.kv_pool_free = Gauge("crosspool_kv_pool_free_bytes", "Unowned KV arena bytes", registry=r)
        self.kv_pool_total = Gauge("crosspool_kv_pool_total_bytes", "KV arena bytes", registry=r)
        self.weights = Gauge("crosspool_weights_pool_bytes", "Weights pool bytes", ["model"], registry=r)
        self.init_residency_metrics()

    def init_residency_metrics(self) -> None:
        """Weights residency: counters mirror the scheduler's running totals (incremented by delta)."""
        r = self.registry
        self.evictions = Counter(
            "crosspool_weights_evictions", "Models evicted to host memory", ["model"], registry=r
        )
        self.reloads = Counter(
            "crosspool_weights_reloads", "Models paged back into the weights pool", ["model"], registry=r
        )
        self.resident = Gauge(
            "crosspool_weights_resident_bytes",
            "Expert bytes resident in the weights pool",
            ["model"],
            registry=r,
        )
        self.host = Gauge(
            "crosspool_weights_host_bytes", "Expert bytes held in host memory", ["model"], registry=r
        )
        self.pinned = Gauge(
            "crosspool_weights_pinned_host_bytes", "Pinned host bytes of evicted experts", registry=r
        )
        self.planner_decisions = Counter(
            "crosspool_kv_planner_decisions",
            "KV planner decisions: grant (chunks given to a model), reclaim (cached pages evicted), "
            "preempt (requests retracted)",
            ["decision", "model"],
            registry=r,
        )
        self.prefix_cached = Gauge(
            "crosspool_kv_prefix_cached_pages", "KV pages held by the prefix cache", ["model"], registry=r
        )
        self._seen: dict[tuple[str, str], int] = {}

    def hooks(self) -> MetricsHooks:
        return MetricsHooks(
            on_request=lambda m: self.requests.labels(m).inc(),
            on_first_token=lambda m, s: self.ttft.labels(m).observe(s),
            on_inter_token=lambda m, s: self.itl.labels(m).observe(s),
            on_finish=self._on_finish,
        )

    def _on_finish(self, model: str, reason: dict, prompt_tokens: int, completion_tokens: int) -> None:
        self.finished.labels(model, reason.get("type", "unknown")).inc()
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.generation_tokens.labels(model).inc(completion_tokens)

    def update_from_scheduler(self, info: dict[str, Any]) -> None:
        kv = info["kv_pool"]
        self.kv_pool_free.set(kv["free_bytes"])
        self.kv_pool_total.set(kv["total_bytes"])
        for model, used in kv["used_bytes"].items():
            owned = kv["owned_bytes"].get(model, 0)
            self.kv_used_pages.labels(model).set(kv["used_pages"].get(model, 0))
            self.kv_used.labels(model).set(used)
            self.kv_owned.labels(model).set(owned)
            self.kv_free.labels(model).set(owned - used + kv["free_bytes"])
        for model, n in info["num_waiting"].items():
            self.queue_depth.labels(model).set(n)
            self.running.labels(model).set(info["num_running"].get(model, 0))
        for model, n in info["weight_pool"]["model_bytes"].items():
            self.weights.labels(model).set(n)
        self._update_residency(info["weight_pool"])
        self._update_planner(info)

    def _update_planner(self, info: dict[str, Any]) -> None:
        for decision, per_model in info.get("planner_decisions", {}).items():
            for model, total in per_model.items():
                delta = total - self._seen.get((decision, model), 0)
                if delta > 0:
                    self.planner_decisions.labels(decision, model).inc(delta)
                self._seen[(decision, model)] = total
        for model, n in info.get("prefix_cache", {}).get("cached_pages", {}).items():
            self.prefix_cached.labels(model).set(n)

    def _update_residency(self, wp: dict[str, Any]) -> None:
        if "evictions" not in wp:
            return
        for key, counter in (("evictions", self.evictions), ("reloads", self.reloads)):
            for model, total in wp[key].items():
                delta = total - self._seen.get((key, model), 0)
                if delta > 0:
                    counter.labels(model).inc(delta)
                self._seen[(key, model)] = total
        for model, n in wp["resident_bytes"].items():
            self.resident.labels(model).set(n)
            self.host.labels(model).set(wp["host_bytes"].get(model, 0))
        self.pinned.set(wp["pinned_host_bytes"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
