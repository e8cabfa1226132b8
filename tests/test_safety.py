"""Safe by default: every probe of a careless (or hostile) user ends in one sentence and a non-zero
exit, or works; nothing the project did not write is deleted or overwritten."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from common import OfflineMarlError, collect, formats
from common import benchmark as bm
from common.data import DatasetError, OfflineDataset, data_dir
from test_contract import load, make_args

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bridge(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("safety") / "bridge"
    collect.random_dataset("bridge", "hard", 6, env_options={"episode_limit": 8}, n_envs=2).save(path)
    return path


def cli(*args: str, env: dict | None = None, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    e = {k: v for k, v in os.environ.items() if k != "OFFLINE_MARL_DEBUG"}
    e.update(env or {})
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=e, timeout=300)


def one_line_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1].split("\r")[-1]
    assert last.startswith("error: ") and needle in last, proc.stderr


# ------------------------------------------------------------------- datasets
def test_collect_never_deletes_or_overwrites_a_foreign_folder(tmp_path):
    """The probe of the issue: a folder with a thesis in it survives `collect --out`."""
    out = tmp_path / "v"
    (out / "sub").mkdir(parents=True)
    (out / "thesis.tex").write_text("x")
    proc = cli("-m", "common.collect", "random", "--env", "bridge", "--task", "hard", "--episodes", "3",
               "--out", str(out))
    one_line_error(proc, "not an offline-marl dataset")
    assert sorted(p.name for p in out.iterdir()) == ["sub", "thesis.tex"] and (out / "thesis.tex").read_text() == "x"
    afile = tmp_path / "afile"
    afile.write_text("keep")
    one_line_error(cli("-m", "common.collect", "random", "--env", "bridge", "--task", "hard", "--episodes", "3",
                       "--out", str(afile)), "is a file")
    assert afile.read_text() == "keep"


def test_our_own_dataset_is_replaced_only_when_asked_and_atomically(tmp_path):
    out = tmp_path / "d"
    a = collect.random_dataset("bridge", "hard", 3, n_envs=1)
    b = collect.random_dataset("bridge", "hard", 5, n_envs=1)
    a.save(out)
    with pytest.raises(DatasetError, match="--overwrite"):
        b.save(out)
    assert OfflineDataset.load(out).n_episodes == 3
    b.save(out, overwrite=True)
    assert OfflineDataset.load(out).n_episodes == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temporary folder left beside it


@pytest.mark.parametrize("meta,needle", [("null", "must hold a JSON object"), ("[1, 2]", "must hold a JSON object"),
                                         ('{"format_version": "1"}', "format_version must be an integer")])
def test_a_broken_meta_json_is_one_sentence(meta, needle, bridge, tmp_path):
    bad = tmp_path / "bad"
    OfflineDataset.load(bridge).save(bad)
    if meta.startswith("{"):
        m = json.loads((bad / "meta.json").read_text())
        m.update(json.loads(meta))
        meta = json.dumps(m)
    (bad / "meta.json").write_text(meta)
    bc = load("baselines/bc.py")
    with pytest.raises(OfflineMarlError, match=needle):
        bc.main(make_args(bc, bad, tmp_path / "run"))


def test_the_cache_being_a_file_is_one_sentence(tmp_path, monkeypatch):
    f = tmp_path / "cache"
    f.write_text("")
    monkeypatch.setenv("OFFLINE_MARL_DATA", str(f))
    with pytest.raises(DatasetError, match="is a file"):
        data_dir()


def test_a_killed_conversion_leaves_no_temporary_folder_behind(tmp_path):
    """A conversion killed mid-write left ``<out>.tmp<PID>``; the next conversion into the same place
    removes it (its process is gone) and only the dataset files it holds."""
    from test_formats import make_episodes, madt_episodes

    src = formats.write_madt(tmp_path / "madt", madt_episodes(make_episodes(E=2, seed=1)))
    out = tmp_path / "converted"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"converted.tmp{dead.pid}"
    stale.mkdir()
    (stale / "obs.npy").write_bytes(b"partial")
    formats.convert(src, out)
    assert not stale.exists() and OfflineDataset.load(out).n_episodes == 2


def test_a_dataset_run_is_labelled_with_its_data(bridge, tmp_path):
    bc = load("baselines/bc.py")
    args = make_args(bc, bridge, tmp_path / "run")
    args.quality = bc.Args().quality  # left at the file's default: the data's own quality labels the run
    bc.main(args)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert list(metrics["bridge"]) == ["hard__random"]


# --------------------------------------------------------------------- runs
def test_run_dir_probes_are_one_sentence(bridge, tmp_path):
    base = [str(ROOT / "baselines" / "bc.py"), "--dataset", str(bridge), "--total-steps", "2", "--eval-episodes", "0",
            "--hidden", "8", "--batch-size", "8"]
    one_line_error(cli(*base, "--run-dir", "/proc/offline-marl-run"), "cannot create the run directory")
    f = tmp_path / "afile"
    f.write_text("keep")
    one_line_error(cli(*base, "--run-dir", str(f)), "is a file")
    assert f.read_text() == "keep"
    d = tmp_path / "run"
    (d / "checkpoints" / "latest.pt").mkdir(parents=True)  # a directory where the checkpoint belongs
    (d / "config.json").write_text(json.dumps({"algo": "bc"}))
    one_line_error(cli(*base, "--run-dir", str(d), "--overwrite"), "did not write")
    assert (d / "checkpoints" / "latest.pt").is_dir()
    one_line_error(cli(*base, "--device", "gpu"), "not a torch device")
    one_line_error(cli(*base, "--eval-every", "0", "--log-every", "0"), "--eval-every must be at least 1")


def test_resume_refuses_another_dataset(bridge, tmp_path):
    other = tmp_path / "other"
    collect.random_dataset("bridge", "hard", 4, env_options={"episode_limit": 8}, n_envs=2, seed=3).save(other)
    bc = load("baselines/bc.py")
    bc.main(make_args(bc, bridge, tmp_path / "run", total_steps=3, eval_episodes=0))
    with pytest.raises(OfflineMarlError, match="--resume refuses"):
        bc.main(make_args(bc, other, tmp_path / "run", total_steps=6, eval_episodes=0, resume=True))
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["dataset"] == str(bridge)  # the run's record is not rewritten


def test_resume_of_a_run_saved_before_a_flag_existed(bridge, tmp_path):
    """A checkpoint written before a flag was added lacks it: resumed with the flag at its default
    (the old behaviour), the run continues; with another value, it is refused."""
    import torch

    bc = load("baselines/bc.py")
    bc.main(make_args(bc, bridge, tmp_path / "run", total_steps=3, eval_episodes=0))
    path = tmp_path / "run" / "checkpoints" / "latest.pt"
    ck = torch.load(path, weights_only=True)
    del ck["args"]["lr"]  # as an older version of the file saved it
    torch.save(ck, path)
    with pytest.raises(OfflineMarlError, match=r"--resume refuses .*--lr 0.001 -> 0.002"):
        bc.main(make_args(bc, bridge, tmp_path / "run", total_steps=6, eval_episodes=0, resume=True, lr=2e-3))
    out = bc.main(make_args(bc, bridge, tmp_path / "run", total_steps=6, eval_episodes=0, resume=True))
    assert out["steps"] == 6


@pytest.mark.parametrize("file", ["comadice.py", "baselines/omiga.py", "baselines/cql.py"])
def test_huge_rewards_or_learning_rates_stop_as_a_divergence(file, bridge, tmp_path):
    """Rewards of 1e30 (finite, but their squares are not) stop the run with one line naming the loss
    and the update; no done.json."""
    ds = OfflineDataset.load(bridge, mmap=False)
    arrays = {k: np.array(v) for k, v in ds.arrays.items()}
    arrays["reward"][~arrays["last"]] = 1e30
    big = OfflineDataset(arrays, dict(ds.meta)).save(tmp_path / "big")
    proc = cli(str(ROOT / file), "--dataset", str(big), "--total-steps", "20", "--eval-episodes", "0",
               "--eval-every", "10", "--log-every", "5", "--run-dir", str(tmp_path / "run"), "--device", "cpu")
    one_line_error(proc, "diverged")
    assert "update" in proc.stderr and not (tmp_path / "run" / "done.json").exists()


def test_values_beyond_any_return_of_the_data_stop_as_a_divergence(bridge, tmp_path, monkeypatch):
    """A ComaDICE run whose Q target grows past 10 (r_max + alpha) / (1 - gamma) while staying finite (as
    it did on RWARE at lr 1e-3: 8.7, 53, 938, 3511 over 5,000 updates, nu_tot(s0) to -3.3e6) stops as
    a divergence naming the statistic, with no done.json; below the bound the same run finishes."""
    from common.runs import DivergenceError

    mod = load("comadice.py")
    orig, calls = mod.update, {"n": 0}

    def blowing_up(*a, **k):
        stats = orig(*a, **k)
        calls["n"] += 1
        if calls["n"] > 8:  # the bound is about 1e4 on this data (|r| < 1, alpha 10, gamma 0.99)
            stats["charts/q_target_mean"] = stats["charts/q_target_mean"] * 0 + 2e4
        return stats

    monkeypatch.setattr(mod, "update", blowing_up)
    args = make_args(mod, bridge, tmp_path / "run", total_steps=20, eval_every=10, log_every=5, eval_episodes=0)
    with pytest.raises(DivergenceError, match=r"charts/q_target_mean .*left ±1\.\d+e\+04 .* at update 9"):
        mod.main(args)
    assert not (tmp_path / "run" / "done.json").exists()
    calls["n"] = -10**6  # never past the bound: the same run ends normally
    mod.main(make_args(mod, bridge, tmp_path / "ok", total_steps=20, eval_every=10, log_every=5, eval_episodes=0))
    assert (tmp_path / "ok" / "done.json").exists()


# ---------------------------------------------------------------- benchmarks
@pytest.mark.parametrize("text,needle", [
    ('env = "bridge"\ntasks = "hard"\n', "tasks must be a list"),
    ('env = "bridge"\nseeds = "x"\n', "seeds must be a list"),
    ('env = "bridge"\nseeds = [0, -1]\n', "non-negative integers"),
    ('env = "bridge"\nalgos = ["comadice.py"]\n', "algos must be a table"),
    ('env = "bridge"\ntaks = ["hard"]\n', "unknown entries"),
    ('env = "bridge"\n[paper]\nmix = {bc = -5.88}\n', "maps a quality"),
])
def test_benchmark_definition_types_are_checked(text, needle, tmp_path):
    path = tmp_path / "def.toml"
    path.write_text(text)
    with pytest.raises(bm.BenchmarkError, match=needle):
        bm.load_definition(path)


def test_every_shipped_benchmark_definition_is_well_typed():
    for path in sorted((ROOT / "benchmarks").glob("*.toml")):
        bm.load_definition(path)


def test_a_cell_that_failed_before_its_first_checkpoint_can_be_rerun_with_other_flags(tmp_path, bridge):
    """Fixing the flags of a cell that never checkpointed runs it afresh in its folder."""
    root = tmp_path / "grid"
    bad = bm.expand_grid(["baselines/bc.py"], "bridge", ["hard"], ["random"], [0],
                         extra=["--dataset", str(bridge), "--eval-episodes", "0", "--total-steps", "2",
                                "--hidden", "0"])
    assert bm.run_grid(bad, root)[0].status == "failed"
    good = bm.expand_grid(["baselines/bc.py"], "bridge", ["hard"], ["random"], [0],
                          extra=["--dataset", str(bridge), "--eval-episodes", "0", "--total-steps", "2",
                                 "--hidden", "8", "--batch-size", "8"])
    res = bm.run_grid(good, root)[0]
    assert res.status == "ok", res.log_tail


def test_no_file_is_unpickled_outside_the_unsafe_flag():
    """The only ``weights_only=False`` in the project is behind MADT's explicit --unsafe-pickle."""
    hits = []
    for p in [*ROOT.glob("*.py"), *ROOT.glob("baselines/*.py"), *ROOT.glob("common/*.py")]:
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if "weights_only=False" in line:
                hits.append(f"{p.relative_to(ROOT)}:{i}")
    assert hits == ["common/formats.py:" + hits[0].split(":")[1]] if hits else True
    text = (ROOT / "common" / "formats.py").read_text().splitlines()
    for h in hits:
        i = int(h.split(":")[1])
        assert any("unsafe_pickle" in text[j] for j in range(max(0, i - 4), i)), h
