"""Report writing from synthetic runs: tables with medians and ranges, verdicts, files, no machine paths."""

from __future__ import annotations

import gzip
import json
import re
import sys
import tempfile
from pathlib import Path

from crosspool_sgl.bench import aggregate as agg
from crosspool_sgl.bench.monitor import busy_fractions, cores_used
from crosspool_sgl.bench.multi_model import path_replacements
from crosspool_sgl.bench.report import read_raw, render_markdown, scrub_paths, write_report
from crosspool_sgl.bench.servers import ROOT, find_key
from tests.bench import fake_runs as fr

# An absolute path of this machine: one of the usual top-level dirs after a quote, space, `(` or start.
ABS_PATH = re.compile(r"(?:^|[\s\"'`(=:])/(?:root|home|tmp|work|usr|var|opt|mnt|srv)/", re.M)


def _report() -> tuple[dict, dict]:
    bursty, longctx = fr.variant(3.5, 1.0), fr.variant(1.0, 1.5)
    return fr.report(bursty, longctx), {
        "variants": {"bursty": fr.raw_variant(bursty), "longctx": fr.raw_variant(longctx)}
    }


def test_markdown_tables_and_verdicts() -> None:
    report, _ = _report()
    md = render_markdown(report)
    assert md.count("**PASS**") == 7 and "FAIL" not in md
    assert "warm model (most requests over the seeds): **warm**" in md
    warm_row = next(line for line in md.splitlines() if line.startswith("| **warm (warm)**"))
    assert warm_row.rstrip(" |").endswith("3.50 | 3.50")  # stock/ours of P99 TTFT and TBT medians
    # ours' overall TTFT P99: 100 ms x (1 + 0.1 r + 0.05 s), median over r in 1..3, s in 0..1, and range
    assert "122.5 [110.0–135.0]" in md
    assert "Seed 1 only" in md and "Ordinary requests only" in md
    assert "per-core busy" in md and "cpu0 80" in md
    assert "mm_test_bursty_cdf.png" in md and "- a note" in md


def test_markdown_shows_a_failure_loudly() -> None:
    bursty = fr.variant(1.5, 1.0, pages=2)
    md = render_markdown(fr.report(bursty))
    assert "**FAIL** bursty: P99 TBT" in md and "**FAIL** zero request KV pages" in md


def test_write_report_files(tmp_path: Path) -> None:
    report, raw = _report()
    paths = write_report(report, raw, tmp_path, "mm_test")
    names = sorted(p.name for p in paths)
    assert names == sorted(
        ["mm_test.md", "mm_test.json", "mm_test_raw.json.gz"]
        + [f"mm_test_{v}_{k}.png" for v in ("bursty", "longctx") for k in ("cdf", "occupancy")]
    )
    assert all(p.stat().st_size > 0 for p in paths)
    again = json.loads((tmp_path / "mm_test.json").read_text())
    assert [v["status"] for v in again["acceptance"]] == [agg.PASS] * 7
    assert "records" not in json.dumps(again)  # the summary JSON has no per-request data
    assert again["variants"]["bursty"]["setups"]["stock"]["summary"]["overall"]["requests"] == 24
    assert render_markdown(again) == (tmp_path / "mm_test.md").read_text()
    assert read_raw(tmp_path / "mm_test_raw.json.gz") == raw
    first = (tmp_path / "mm_test_raw.json.gz").read_bytes()
    write_report(report, raw, tmp_path, "mm_test")
    assert (tmp_path / "mm_test_raw.json.gz").read_bytes() == first  # reproducible: no gzip timestamp


def test_scrub_paths_longest_prefix_first(tmp_path: Path) -> None:
    home, tmp = f"{tmp_path}/u", f"{tmp_path}/t"  # a home and a temp dir, nested in one another's way
    pairs = [(home, "~"), (f"{home}/.cache/tiny", "<tiny-models>"), (tmp, "<tmp>")]
    obj = {"a": [f"{home}/.cache/tiny/llama", (f"x {tmp}/bench_1/log", 3)], f"{home}/k": None}
    assert scrub_paths(obj, pairs) == {"a": ["<tiny-models>/llama", ["x <tmp>/bench_1/log", 3]], "~/k": None}


def test_written_results_hold_no_path_of_this_machine(tmp_path: Path) -> None:
    from crosspool_sgl.tools.make_tiny_models import default_cache_dir

    work = Path(tempfile.gettempdir()) / "bench_multi_model_x"
    report, raw = _report()
    dep = report["variants"]["bursty"]["deployments"]["stock"]
    dep["reason"] = f"exited (log: {work}/stock-llama.log)"
    report["settings"] = {
        "stock": {
            "commands": [f"-m sglang.launch_server --model-path {default_cache_dir()}/llama"],
            "env": {},
        },
        "crosspool-shared": {
            "commands": [f"{sys.executable} -m x --model a={work}/models/a_ctx16384"],
            "env": {},
        },
    }
    report["command"] = f"python -m x --out-dir {ROOT}/benchmarks/results"
    raw["variants"]["bursty"]["runs"][0]["records"][0]["error"] = f"see {Path.home()}/x"
    reps = path_replacements(work)
    paths = write_report(scrub_paths(report, reps), scrub_paths(raw, reps), tmp_path, "mm_test")
    texts = [
        gzip.decompress(p.read_bytes()).decode() if p.suffix == ".gz" else p.read_text()
        for p in paths
        if p.suffix != ".png"
    ]
    for text in texts:
        for machine_path in (str(ROOT), str(Path.home()), tempfile.gettempdir(), str(default_cache_dir())):
            assert machine_path not in text
        assert not ABS_PATH.search(text), ABS_PATH.search(text)
    assert "<tiny-models>/llama" in texts[0] and "<tmp>/models/a_ctx16384" in texts[0]
    # the check can fail: an unscrubbed report is caught
    write_report(report, raw, tmp_path, "mm_raw")
    assert ABS_PATH.search((tmp_path / "mm_raw.md").read_text())


def test_committed_results_hold_no_absolute_path() -> None:
    for path in sorted((ROOT / "benchmarks" / "results").glob("multi_model*")):
        if path.suffix in (".md", ".json"):
            assert not ABS_PATH.search(path.read_text()), path.name
        elif path.name.endswith(".json.gz"):
            assert not ABS_PATH.search(gzip.decompress(path.read_bytes()).decode()), path.name


def test_cpu_accounting() -> None:
    assert busy_fractions([(10.0, 100.0), (0.0, 100.0)], [(15.0, 110.0), (0.0, 110.0)]) == [0.5, 0.0]
    assert busy_fractions([(1.0, 1.0)], [(1.0, 1.0)]) == [0.0]  # no time passed
    assert cores_used(10.0, 13.0, 2.0) == 1.5 and cores_used(1.0, 2.0, 0.0) is None


def test_find_key_nested() -> None:
    info = {"a": 1, "internal_states": [{"x": 2}, {"max_total_num_tokens": 4096}]}
    assert find_key(info, "max_total_num_tokens") == 4096 and find_key(info, "absent") is None
