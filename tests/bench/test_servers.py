"""Server-side probes parsed without servers: Prometheus text, pool occupancy."""

from __future__ import annotations

import pytest

from crosspool_sgl.bench.client import check_loopback
from crosspool_sgl.bench.servers import crosspool_kv_used, prometheus_value


def test_prometheus_value_sums_label_sets() -> None:
    text = (
        "# HELP sglang:num_used_tokens x\n"
        'sglang:num_used_tokens{model_name="a"} 12.0\n'
        'sglang:num_used_tokens{model_name="b"} 3.0\n'
        "sglang:num_used_tokens_other 99\n"
    )
    assert prometheus_value(text, "sglang:num_used_tokens") == 15.0
    assert prometheus_value(text, "absent") == 0.0


def test_kv_used_is_what_requests_hold() -> None:
    """The server's `used_bytes` already leaves out evictable prefix-cache pages."""
    info = {
        "kv_pool": {"used_bytes": {"a": 1000, "b": 0}, "allocated_pages": {"a": 16, "b": 0}},
        "prefix_cache": {"evictable_pages": {"a": 6, "b": 0}},
    }
    assert crosspool_kv_used(info) == {"a": 1000.0, "b": 0.0}
    assert crosspool_kv_used({}) == {}


def test_loopback_only() -> None:
    check_loopback(["http://127.0.0.1:3000", "http://localhost:1"])
    with pytest.raises(ValueError):
        check_loopback(["http://10.0.0.1:3000"])
