"""benchmarks/throughput.py (a benchmark, not a timed test): its FLOP count is the closed form of a
known network, its "update alone" mode really reuses one batch, and a smoke run writes the table."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from common import collect
from common.data import OfflineDataset

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("throughput_bench", ROOT / "benchmarks" / "throughput.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bridge_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("throughput") / "bridge"
    collect.random_dataset("bridge", "hard", 6, env_options={"episode_limit": 8}, n_envs=2).save(path)
    return path


def test_flops_of_one_update_are_the_closed_form_of_bc(bridge_data, capsys):
    """BC's update is per-agent MLPs in -> h -> h -> K on B x N rows: forward 2BN(in h + h h + h K), the
    weight gradients as much again, the input gradients of the two upper layers 2BN(h h + h K)."""
    tp = load_benchmark()
    tp.child(dict(file="baselines/bc.py", shape="bridge", data=str(bridge_data), device="cpu", seconds=0.05,
                  warmup=0.0, compile_warmup=1, configs=[dict(mode="flops", precision="fp32", threads=1, compile=False),
                                                         dict(mode="update", precision="fp32", threads=1, compile=False)]))
    out = [json.loads(line[7:]) for line in capsys.readouterr().out.splitlines() if line.startswith("RESULT ")]
    ds = OfflineDataset.load(bridge_data)
    bc = tp.load_module("baselines/bc.py")
    B, N, i, h, K = bc.Args().batch_size, ds.n_agents, ds.obs_dim, bc.Args().hidden, ds.n_actions
    assert out[0]["mode"] == "flops" and out[0]["flops"] == 2 * B * N * (2 * i * h + 3 * h * h + 3 * h * K)
    assert out[1]["mode"] == "update" and out[1]["updates_per_s"] > 0 and out[1]["batch_size"] == B


def test_update_alone_reuses_one_pre_drawn_batch(bridge_data):
    tp = load_benchmark()
    ds = OfflineDataset.load(bridge_data).to("cpu").seed(0)
    with tp.predrawn_batches():
        a, b = ds.sample(16), ds.sample(16)
        assert a is b and ds.sample_initial(16) is ds.sample_initial(16) and ds.sample(8) is not a
    c = ds.sample(16)
    assert c is not a and not torch.equal(c["rows"], a["rows"])


def test_quick_run_writes_the_table(bridge_data, tmp_path, monkeypatch):
    """The parent: one file at one shape, results appended as JSON lines, a table with its row; a second
    run with the same results file measures nothing again."""
    tp = load_benchmark()
    monkeypatch.setattr(tp, "make_data", lambda shape, out: bridge_data)
    out, res = tmp_path / "t.md", tmp_path / "r.jsonl"
    argv = ["throughput.py", "--quick", "--files", "baselines/bc.py", "--shapes", "bridge", "--no-sampler",
            "--precisions", "fp32", "--seconds", "0.05", "--results", str(res), "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    tp.main()
    rows = [json.loads(line) for line in res.read_text().splitlines()]
    assert {r["mode"] for r in rows} == {"flops", "update", "loop"}
    table = out.read_text()
    assert "| baselines/bc.py |" in table and "Bridge" in table and "--quick" in table
    tp.main()
    assert len(res.read_text().splitlines()) == len(rows)
