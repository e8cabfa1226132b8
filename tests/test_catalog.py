"""The dataset catalog: names, the resolve order (dataset, cache, local recipe, download),
downloads through a fake opener (no network here), and the messages for what is missing."""

import io
import json
import shutil
import sys
import types
import urllib.error
from pathlib import Path

import numpy as np
import pytest

from common import catalog, formats, friendly_errors
from common.data import DatasetError, OfflineDataset, data_dir

sys.path.insert(0, str(Path(__file__).parent))
from dataset_fixtures import make_episodes, pymarl_arrays, vault_streams  # noqa: E402


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFLINE_MARL_DATA", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "common.collect", types.ModuleType("common.collect"))  # no recipes by default

    def offline(req, timeout=None):
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(catalog, "_urlopen", offline)


class FakeResponse(io.BytesIO):
    def __init__(self, data: bytes, status: int = 200):
        super().__init__(data)
        self.status = status
        self.headers = {"Content-Length": str(len(data))}

    def getcode(self):
        return self.status


def serve(monkeypatch, files: dict[str, bytes]):
    """A fake urlopen serving ``files`` by URL, honouring Range requests; returns the call log."""
    calls = []

    def opener(req, timeout=None):
        calls.append((req.full_url, req.get_header("Range")))
        if req.full_url not in files:
            raise urllib.error.HTTPError(req.full_url, 404, "Not Found", {}, None)
        data, rng = files[req.full_url], req.get_header("Range")
        if rng:
            start = int(rng.split("=")[1].rstrip("-"))
            return FakeResponse(data[start:], status=206)
        return FakeResponse(data)

    monkeypatch.setattr(catalog, "_urlopen", opener)
    return calls


def vault_zip(tmp_path, scenario: str, uids: dict[str, list], final_obs_row=False) -> bytes:
    """A zip like OG-MARL's: <scenario>.vlt/<uid>/..."""
    src = tmp_path / f"zip-{scenario}"
    for uid, eps in uids.items():
        formats.write_vault(src / f"{scenario}.vlt", vault_streams(eps, final_obs_row=final_obs_row)[0], uid=uid)
    return Path(shutil.make_archive(str(tmp_path / scenario), "zip", src)).read_bytes()


def one_line(fn, *args, **kwargs) -> str:
    with pytest.raises(DatasetError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


# --------------------------------------------------------------------------------- table
def test_every_og_marl_vault_is_listed_with_our_names():
    urls = {e.url for e in catalog.ENTRIES if e.url}
    assert len(urls) == 39 and all(u.startswith(catalog.HF) and u.endswith(".zip") for u in urls)
    assert {e.source for e in catalog.ENTRIES if e.url} == {"og_marl", "og_marl_legacy", "omiga", "cfcql",
                                                            "alberdice", "omar"}
    for prior in ("omiga", "cfcql", "alberdice", "omar"):
        assert any(f"prior_work/{prior}/" in u for u in urls)
    hop = catalog.available("gymnasium_mamujoco", "3hopper")  # OG-MARL names map to ours
    assert hop and {e.task for e in hop} == {"Hopper-3x1"}
    assert {e.name for e in hop} >= {"omiga/expert", "omiga/medium-replay", "omiga-hdf5/medium-expert", "og_marl/*"}
    assert {e.quality for e in catalog.available("smac_v1", "5m_vs_6m")} >= {"good", "medium", "poor", "expert",
                                                                              "mixed", "medium-replay"}
    assert {e.task for e in catalog.available("mamujoco")} >= {"Hopper-3x1", "Ant-2x4", "HalfCheetah-6x1",
                                                                "HalfCheetah-2x3"}
    assert not catalog.available("smacv2", "protoss_5_vs_5")
    assert catalog._canon_task("mamujoco", "HalfCheetah-v2-6x1") == "HalfCheetah-6x1"
    assert catalog._canon_quality("Medium_Replay") == (None, "medium-replay")
    assert catalog._canon_quality("og_marl/Good") == ("og_marl", "good")


# --------------------------------------------------------------------------------- resolve order
def test_dataset_argument_is_converted_and_checked(tmp_path):
    eps = make_episodes(E=3, seed=1)
    buf = formats.write_pymarl(tmp_path / "buf", pymarl_arrays(eps, 7, timeouts_flagged=False))
    path = catalog.resolve("matrix", "xor", "a", dataset=str(buf))
    ds = OfflineDataset.load(path)
    assert (ds.meta["env"], ds.meta["task"], ds.meta["quality"]) == ("matrix", "xor", "a")
    assert catalog.resolve("matrix", "xor", "a", dataset=str(path)) == path  # native: as it is
    msg = one_line(catalog.resolve, "bridge", "hard", "mix", dataset=str(path))
    assert "matrix/xor" in msg and "bridge/hard" in msg
    msg = one_line(catalog.resolve, "matrix", "xor", "a", dataset=str(tmp_path / "missing"))
    assert "no dataset at" in msg


def native(path: Path, env="matrix", task="xor", quality="a", seed=0) -> Path:
    eps = make_episodes(E=2, seed=seed)
    meta = dict(env=env, task=task, quality=quality, discrete=True, n_actions=4)
    return OfflineDataset.from_episodes(eps, meta).save(path)


def test_cache_then_local_recipe_then_download(monkeypatch):
    calls = []
    fake = types.ModuleType("common.collect")
    fake.has_recipe = lambda env, task, quality: (env, task) == ("matrix", "penalty_xor") and quality in "abcd"

    def generate(env, task, quality, out, seed=0):
        calls.append((env, task, quality, Path(out), seed))
        return native(Path(out), env, task, quality)

    fake.generate = generate
    monkeypatch.setitem(sys.modules, "common.collect", fake)
    p = catalog.resolve("matrix", "penalty_xor", "b")
    assert p == data_dir() / "matrix" / "penalty_xor" / "b" and calls == [("matrix", "penalty_xor", "b", p, 0)]
    assert catalog.resolve("matrix", "penalty_xor", "b") == p and len(calls) == 1  # now from the cache
    # a cached dataset wins over everything, generated or not
    cached = native(data_dir() / "bridge" / "hard" / "mix", "bridge", "hard", "mix")
    assert catalog.resolve("bridge", "hard", "mix") == cached
    # generate=False skips the recipe; nothing else knows the name
    msg = one_line(catalog.resolve, "matrix", "penalty_xor", "c", generate=False)
    assert "generated locally: a, b, c, d" in msg and "--dataset PATH" in msg


def test_collect_without_the_hook_is_ignored(monkeypatch):
    monkeypatch.setitem(sys.modules, "common.collect", types.ModuleType("common.collect"))
    assert catalog._collect() is None
    assert "no dataset is known for matrix/xor/a" in one_line(catalog.resolve, "matrix", "xor", "a")


def test_download_unpack_convert_once(tmp_path, monkeypatch):
    eps = make_episodes(E=4, A=1, seed=2, lengths=[3, 2, 3, 1])
    data = vault_zip(tmp_path, "3hopper", {"Expert": eps, "Medium": eps[:2]}, final_obs_row=True)
    url = catalog.HF + "prior_work/omiga/mamujoco/3hopper.zip"
    calls = serve(monkeypatch, {url: data})
    p = catalog.resolve("mamujoco", "3hopper", "Expert")  # OG-MARL names; bare quality -> omiga's copy
    assert p == data_dir() / "mamujoco" / "Hopper-3x1" / "expert" and calls == [(url, None)]
    ds = OfflineDataset.load(p)
    assert ds.meta["source"] == "omiga" and ds.meta["env_options"] == {"obs_mode": "omiga"}
    assert ds.meta["provenance"]["url"] == url and ds.meta["provenance"]["options"]["final_obs_row"]
    assert ds.n_episodes == 4 and ds.state_dim == 3 * ds.obs_dim and ds.n_transitions == 9
    assert not (data_dir() / "downloads" / "prior_work" / "omiga" / "mamujoco" / "3hopper.zip").exists()
    assert catalog.resolve("mamujoco", "Hopper-3x1", "expert") == p and len(calls) == 1  # cached
    q = catalog.resolve("mamujoco", "Hopper-3x1", "omiga/medium")  # same archive: no new download
    assert q == data_dir() / "mamujoco" / "Hopper-3x1" / "omiga" / "medium" and len(calls) == 1
    assert OfflineDataset.load(q).n_episodes == 2


def test_archive_with_undocumented_names(tmp_path, monkeypatch):
    eps = make_episodes(E=2, A=2, seed=3)
    url = catalog.HF + "core/gymnasium_mamujoco/2walker.zip"
    serve(monkeypatch, {url: vault_zip(tmp_path, "2walker", {"Good": eps})})
    p = catalog.resolve("mamujoco", "2walker", "good")
    assert p == data_dir() / "mamujoco" / "Walker2d-2x3" / "good"
    assert OfflineDataset.load(p).meta["env_options"] == {"obs_mode": "local", "agent_obsk": 1}
    msg = one_line(catalog.resolve, "mamujoco", "2walker", "superb")
    assert "has no dataset 'superb'" in msg and "['good']" in msg


def test_download_resumes_a_partial_file(tmp_path, monkeypatch):
    data = bytes(range(256)) * 1000
    url = "https://example.org/x.zip"
    calls = serve(monkeypatch, {url: data})
    dest = tmp_path / "x.zip"
    (tmp_path / "x.zip.part").write_bytes(data[:1234])
    catalog._download(url, dest)
    assert dest.read_bytes() == data and calls == [(url, "bytes=1234-")]


def test_offline_and_unknown_names_get_one_clear_line():
    msg = one_line(catalog.resolve, "mamujoco", "Hopper-3x1", "expert")
    assert "are you offline" in msg and "--dataset PATH" in msg and "common.collect" in msg
    assert "omiga: expert, medium, medium-expert, medium-replay (download)" in msg
    msg = one_line(catalog.resolve, "mamujoco", "Hopper-3x1", "expert", download=False)
    assert "downloads are off" in msg
    msg = one_line(catalog.resolve, "smacv1", "5m_vs_6m", "superb")
    assert "no dataset smacv1/5m_vs_6m/superb" in msg and "cfcql: expert, medium, medium-replay, mixed" in msg
    msg = one_line(catalog.resolve, "mamujoco", "Hopper-3x1", "superb")  # OG-MARL's archive may hold it
    assert "could not download" in msg and "omiga-hdf5: expert" in msg
    msg = one_line(catalog.resolve, "smacv1", "nomap", "good")
    assert "known smacv1 tasks:" in msg and "5m_vs_6m" in msg
    assert "known envs:" in one_line(catalog.resolve, "nope", "x", "y")
    msg = one_line(catalog.resolve, "smacv2", "protoss_5_vs_5", "medium")
    assert "no public offline dataset" in msg and "--dataset PATH" in msg and "common.collect" in msg


def test_file_placed_by_hand_is_used_first(tmp_path, monkeypatch):
    eps = make_episodes(E=2, A=3, seed=4, lengths=[2, 3])
    rows = {k: [] for k in "soard"}
    for ep in eps:
        L = len(ep["reward"])
        for t in range(L + 1):
            rows["s"].append(ep["obs"][t]), rows["o"].append(ep["obs"][t])
            rows["a"].append(ep["actions"][min(t, L - 1)]), rows["r"].append([1.0]), rows["d"].append([t == L])
    target = data_dir() / "manual" / "omiga-hdf5" / "Hopper-v2-3x1-medium.hdf5"
    target.parent.mkdir(parents=True)
    formats.write_omiga_hdf5(target, **{k: np.array(v, dtype=np.float32) for k, v in rows.items()})
    ds = catalog.load("mamujoco", "Hopper-3x1", "medium")  # no download attempted: offline fixture
    assert ds.meta["source"] == "omiga-hdf5" and ds.n_transitions == 5 and ds.state_dim == 3 * ds.obs_dim


def test_cli_lists_and_gets(capsys):
    catalog.cli(["list", "--env", "smac_v1", "--task", "2s3z"])
    out = capsys.readouterr().out.splitlines()
    assert any("og_marl/good" in line and "core/smac_v1/2s3z.zip" in line for line in out)
    assert any("cfcql-h5/medium-replay" in line and "by hand" in line for line in out)
    catalog.cli(["list", "--env", "rware"])
    out = capsys.readouterr().out
    assert "alberdice/expert" in out and "tiny-2ag" in out
    with pytest.raises(SystemExit) as info, friendly_errors():
        catalog.cli(["get", "smacv2", "protoss_5_vs_5", "medium"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("error: SMACv2 protoss_5_vs_5 has no public")
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("forces", [False, True])
def test_omiga_ant_data_records_which_ant_model(tmp_path, forces):
    # OMIGA's observation: the full Ant observation (111) + the agent id (2), z-scored per vector;
    # under MuJoCo 2.0 entries 27..110 (contact forces) were all zero before the z-scoring
    rng = np.random.default_rng(5)
    R, N = 9, 2
    raw = rng.normal(size=(R, N, 111))
    if not forces:
        raw[:, :, 27:] = 0.0
    o = np.concatenate([raw, np.broadcast_to(np.eye(N), (R, N, N))], axis=2)
    o = ((o - o.mean(axis=2, keepdims=True)) / o.std(axis=2, keepdims=True)).astype(np.float32)
    d = np.zeros((R, 1), np.float32)
    d[[3, 8]] = 1
    target = data_dir() / "manual" / "omiga-hdf5" / "Ant-v2-2x4-expert.hdf5"
    target.parent.mkdir(parents=True)
    formats.write_omiga_hdf5(target, s=o, o=o, a=rng.uniform(-1, 1, (R, N, 4)).astype(np.float32),
                             r=np.ones((R, 1), np.float32), d=d)
    ds = catalog.load("mamujoco", "2ant", "expert")
    assert ds.meta["env_options"] == {"obs_mode": "omiga", "ant_contact_forces": forces}
    assert (ds.obs_dim, ds.state_dim, ds.n_episodes) == (113, 226, 2)


def test_real_collect_recipes_are_used(monkeypatch):
    monkeypatch.delitem(sys.modules, "common.collect")
    if catalog._collect() is None:
        pytest.skip("common.collect has no generation hook yet")
    p = catalog.resolve("matrix", "penalty_xor", "a")
    ds = OfflineDataset.load(p)
    assert p == data_dir() / "matrix" / "penalty_xor" / "a" and ds.meta["source"] == "generated"
    assert ds.n_episodes == 100 and float(ds.episode_returns().mean()) == 50.0


def test_cli_stats_of_a_dataset_file(tmp_path, capsys):
    """``stats`` reports the episode returns and ends of exactly the stored episodes."""
    path = native(tmp_path / "ds", seed=3)
    ds = OfflineDataset.load(path)
    catalog.cli(["stats", "matrix", "xor", "a", "--dataset", str(path)])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    eps = make_episodes(E=2, seed=3)
    returns = np.array([e["reward"].sum() for e in eps])
    assert out["episodes"] == 2 and out["transitions"] == sum(len(e["reward"]) for e in eps)
    assert out["return_mean"] == pytest.approx(returns.mean(), rel=1e-5)
    assert out["return_min"] == pytest.approx(returns.min(), rel=1e-5)
    assert out["terminal_ends"] == sum(e["terminated"] for e in eps) and out["episodes"] == ds.n_episodes
