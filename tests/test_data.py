"""OfflineDataset: construction, disk round trip, sampling arithmetic, validation."""

import json

import numpy as np
import pytest
import torch

from common.data import DatasetError, OfflineDataset

META = {"env": "toy", "task": "t", "quality": "q", "source": "test"}


def toy(E=5, N=2, K=3, seed=0, continuous=False):
    """Episodes whose obs encode (episode, t) so that next rows can be checked."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 7, size=E)
    T = lengths.max()
    obs = np.zeros((E, T + 1, N, 2), np.float32)
    obs[..., 0] = np.arange(E)[:, None, None]
    obs[..., 1] = np.arange(T + 1)[None, :, None]
    state = obs[:, :, 0, :].copy()
    if continuous:
        actions = rng.uniform(-1, 1, size=(E, T, N, 2)).astype(np.float32)
        avail = None
    else:
        actions = rng.integers(0, K, size=(E, T, N))
        avail = np.ones((E, T + 1, N, K), bool)
    reward = (10 * np.arange(E)[:, None] + np.arange(T)[None, :]).astype(np.float32)
    terminated = rng.random(E) < 0.5
    meta = dict(META, discrete=not continuous, **({} if continuous else {"n_actions": K}))
    ds = OfflineDataset.from_padded(obs=obs, state=state, actions=actions, reward=reward, lengths=lengths,
                                    terminated=terminated, avail=avail, meta=meta)
    return ds, lengths, terminated


def test_layout_and_flags():
    ds, lengths, terminated = toy()
    assert ds.n_episodes == 5 and ds.n_transitions == lengths.sum() and ds.n_rows == lengths.sum() + 5
    es = ds.episode_start
    for e in range(5):
        rows = np.arange(es[e], es[e + 1])
        assert (ds.obs[rows, 0, 1] == np.arange(len(rows))).all()
        assert ds.last[rows[-1]] and not ds.last[rows[:-1]].any()
        assert ds.terminal[rows[-2]] == terminated[e] and ds.timeout[rows[-2]] == (not terminated[e])
        assert not (ds.terminal[rows[:-2]] | ds.timeout[rows[:-2]]).any()
        assert ds.reward[rows[-1]] == 0
    np.testing.assert_allclose(ds.episode_returns(), [sum(10 * e + t for t in range(L)) for e, L in enumerate(lengths)])


def test_sample_next_row_and_done():
    ds, lengths, terminated = toy(E=20)
    ds.to("cpu").seed(0)
    b = ds.sample(4096)
    assert b["obs"].shape == (4096, 2, 2) and b["actions"].dtype == torch.int64
    # next obs is the same episode, one step later
    assert torch.equal(b["next_obs"][..., 0], b["obs"][..., 0])
    assert torch.equal(b["next_obs"][..., 1], b["obs"][..., 1] + 1)
    # done only on the final transition of a truly terminated episode
    ep = b["obs"][:, 0, 0].long().numpy()
    t = b["obs"][:, 0, 1].long().numpy()
    expect = (t == lengths[ep] - 1) & terminated[ep]
    assert (b["done"].numpy() == expect).all()
    assert (b["timeout"].numpy() == ((t == lengths[ep] - 1) & ~terminated[ep])).all()
    assert (b["first"].numpy() == (t == 0)).all()
    # every transition is reachable, none of the last rows is
    assert set(b["rows"].tolist()) == set(np.flatnonzero(~ds.last).tolist())


def test_initial_states_are_episode_starts():
    ds, *_ = toy(E=8)
    ds.to("cpu").seed(1)
    b = ds.sample_initial(512)
    assert (b["obs"][..., 1] == 0).all()
    assert set(b["obs"][:, 0, 0].long().tolist()) == set(range(8))


def test_weighted_sampling_follows_weights():
    ds, *_ = toy(E=6)
    ds.to("cpu").seed(2)
    w = torch.zeros(ds.n_transitions)
    w[3] = 1.0
    w[7] = 3.0
    rows = ds.sample(4000, weights=w)["rows"]
    tr = ds.transition_rows()
    frac = (rows == tr[7]).float().mean().item()
    assert set(rows.tolist()) == {int(tr[3]), int(tr[7])} and abs(frac - 0.75) < 0.03


def test_sequences_pad_and_mask():
    ds, lengths, terminated = toy(E=10)
    ds.to("cpu").seed(3)
    s = ds.sample_sequences(64)  # whole episodes
    L = lengths.max()
    assert s["obs"].shape == (64, L + 1, 2, 2) and s["actions"].shape == (64, L, 2) and s["mask"].shape == (64, L)
    ep = s["obs"][:, 0, 0, 0].long().numpy()
    assert (s["mask"].sum(1).numpy() == lengths[ep]).all() and s["start"].all()
    assert (s["obs"][:, :, 0, 1] == torch.arange(L + 1).clamp(max=torch.as_tensor(lengths[ep])[:, None])).all()
    assert (s["done"].sum(1).numpy() == terminated[ep]).all()
    w = ds.sample_sequences(64, length=3)  # windows
    assert w["obs"].shape == (64, 4, 2, 2)
    t0 = w["obs"][:, 0, 0, 1].long()
    ep = w["obs"][:, 0, 0, 0].long().numpy()
    assert (w["start"] == (t0 == 0)).all()
    assert (w["mask"].sum(1).numpy() == np.minimum(3, lengths[ep] - t0.numpy())).all()
    assert (w["reward"][~w["mask"]] == 0).all()


def test_returns_to_go():
    ds, lengths, _ = toy(E=7)
    for g in (1.0, 0.9):
        rtg = ds.returns_to_go(g)
        for e in range(7):
            rows = np.arange(ds.episode_start[e], ds.episode_start[e + 1] - 1)
            r = ds.reward[rows].astype(np.float64)
            want = [sum(g**k * x for k, x in enumerate(r[i:])) for i in range(len(r))]
            np.testing.assert_allclose(rtg[rows], want, rtol=1e-5)
        np.testing.assert_allclose(ds.episode_returns(g), rtg[ds.episode_start[:-1]], rtol=1e-6)


def test_save_load_mmap_round_trip(tmp_path):
    ds, *_ = toy(continuous=True)
    ds.save(tmp_path / "d")
    back = OfflineDataset.load(tmp_path / "d")
    assert isinstance(back.obs, np.memmap)
    for k, v in ds.arrays.items():
        np.testing.assert_array_equal(np.asarray(back.arrays[k]), v)
    assert back.meta["act_dim"] == 2 and not back.discrete and back.avail.shape[2] == 1


def test_memory_mapped_sampling_matches_in_memory(tmp_path):
    """A dataset too big for the budget samples from the mapped files: same batches."""
    ds, *_ = toy(E=30)
    ds.save(tmp_path / "d")
    a = OfflineDataset.load(tmp_path / "d").to("cpu").seed(5)
    b = OfflineDataset.load(tmp_path / "d").to("cpu", max_bytes=0).seed(5)
    assert a.on_device and not b.on_device
    ba, bb = a.sample(256), b.sample(256)
    for k in ba:
        assert torch.equal(ba[k], bb[k]), k
    sa, sb = a.sample_sequences(8, length=4), b.sample_sequences(8, length=4)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_select_and_concatenate():
    ds, *_ = toy(E=6)
    sub = ds.select_episodes([4, 1])
    assert sub.n_episodes == 2
    np.testing.assert_allclose(sub.episode_returns(), ds.episode_returns()[[4, 1]])
    both = OfflineDataset.concatenate([sub, ds])
    assert both.n_episodes == 8
    np.testing.assert_allclose(both.episode_returns(), np.r_[ds.episode_returns()[[4, 1]], ds.episode_returns()])


def test_clear_errors(tmp_path):
    ds, *_ = toy()
    with pytest.raises(DatasetError, match="no dataset"):
        OfflineDataset.load(tmp_path / "missing")
    ds.save(tmp_path / "d")
    (tmp_path / "d" / "obs.npy").write_bytes((tmp_path / "d" / "obs.npy").read_bytes()[:100])
    with pytest.raises(DatasetError, match="obs.npy is corrupt or truncated"):
        OfflineDataset.load(tmp_path / "d")
    ds.save(tmp_path / "e")
    (tmp_path / "e" / "last.npy").unlink()
    with pytest.raises(DatasetError, match="last.npy is missing"):
        OfflineDataset.load(tmp_path / "e")
    ds.save(tmp_path / "f")
    meta = json.loads((tmp_path / "f" / "meta.json").read_text())
    meta["obs_dim"] = 99
    (tmp_path / "f" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(DatasetError, match="obs_dim=99"):
        OfflineDataset.load(tmp_path / "f")
    bad = {k: np.array(v) for k, v in ds.arrays.items()}
    bad["obs"][3, 0, 0] = np.nan
    with pytest.raises(DatasetError, match="NaN or infinite value at row 3"):
        OfflineDataset(bad, ds.meta)
    bad = {k: np.array(v) for k, v in ds.arrays.items()}
    bad["timeout"][:] = False
    bad["terminal"][:] = False
    with pytest.raises(DatasetError, match="final transition"):
        OfflineDataset(bad, ds.meta)


def test_check_env_mismatch():
    from common.envs import make_env

    ds, *_ = toy()
    with pytest.raises(DatasetError, match="obs_dim=2 but the environment has obs_dim=4"):
        ds.check_env(make_env("matrix", "penalty_xor"))
