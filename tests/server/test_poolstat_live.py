"""poolstat --once against the live test server: every hosted model gets a row, residency included."""

from __future__ import annotations

from crosspool_sgl.tools.poolstat import main


def test_poolstat_once_against_the_server(server, capsys):
    server.post("/generate", json={"text": "hi", "model": "llama", "sampling_params": {"max_new_tokens": 2}})
    assert main(["--url", server.base_url, "--once"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("model"))
    rows = {line.split()[0]: line.split() for line in lines[header + 1 :]}
    assert set(rows) == set(server.model_paths)
    assert all(r[5] == "resident" and r[7] == "0B" for r in rows.values())  # no bound: nothing evicted
    info = server.get("/get_server_info").json()["weight_pool"]
    assert info["location"] == dict.fromkeys(server.model_paths, "resident")
    assert info["pinned_host_bytes"] == 0 and info["evictions"] == dict.fromkeys(server.model_paths, 0)
