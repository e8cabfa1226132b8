"""The learning-run recipe (common/mappo.py): GAE and the normalisers against direct
computations, masked sampling, learning a small Level-Based Foraging task, resuming, and
the whole command on the StarCraft stand-in ending where the catalog looks."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common import catalog, collect, mappo
from common.data import OfflineDataset
from test_envs_smac import fake  # noqa: F401  (the StarCraft stand-in fixture)


def test_gae_extremes_against_direct_sums():
    """lambda = 1: the discounted return to the end of the segment (plus the bootstrap
    value where the rollout stops or the time limit cut), minus V; lambda = 0: the TD error."""
    g = torch.Generator().manual_seed(0)
    T, E, N, gamma = 9, 3, 2, 0.9
    reward = torch.rand(T, E, N, generator=g)
    value = torch.rand(T, E, N, generator=g)
    next_value = torch.rand(E, N, generator=g)
    done = (torch.rand(T, E, generator=g) < 0.3).float()
    adv1 = mappo.gae(reward, value, done, next_value, gamma, 1.0)
    adv0 = mappo.gae(reward, value, done, next_value, gamma, 0.0)
    for e in range(E):
        for t in range(T):
            ret, k = 0.0, t
            while True:
                ret = ret + gamma ** (k - t) * reward[k, e]
                if done[k, e]:
                    break
                if k == T - 1:
                    ret = ret + gamma ** (T - t) * next_value[e]
                    break
                k += 1
            torch.testing.assert_close(adv1[t, e], ret - value[t, e])
            nv = next_value[e] if t == T - 1 else value[t + 1, e]
            torch.testing.assert_close(adv0[t, e], reward[t, e] + gamma * nv * (1 - done[t, e]) - value[t, e])


def test_running_norm_is_the_mean_and_variance_of_everything_seen():
    rng = np.random.default_rng(0)
    norm = mappo.RunningNorm(3)
    batches = [rng.normal(2.0, 3.0, size=(n, 3)) for n in (5, 17, 1, 40)]
    for b in batches:
        norm.update(torch.as_tensor(b))
    every = np.concatenate(batches)
    np.testing.assert_allclose(norm.mean.numpy(), every.mean(0), rtol=1e-10)
    np.testing.assert_allclose(norm.var.numpy(), every.var(0), rtol=1e-10)
    x = torch.as_tensor(every[:4], dtype=torch.float64)
    torch.testing.assert_close(norm.denorm(norm(x)), x)


def test_unavailable_actions_are_never_drawn():
    model = mappo.ActorCritic(n_agents=3, obs_dim=4, state_dim=5, n_actions=6, hidden=16, critic="state")
    avail = torch.rand(64, 3, 6) < 0.4
    avail[..., 0] = True
    d = model.dist(torch.randn(64, 3, 4) * 5, avail)
    assert (d.probs[~avail] == 0).all() and torch.isfinite(d.entropy()).all()
    assert avail.gather(-1, d.sample().unsqueeze(-1)).all()
    assert model.value(torch.randn(64, 3, 4), torch.randn(64, 5)).shape == (64, 3)


def lbf_config(tmp_path, **kw):
    return mappo.LearnConfig(**{**dict(env="lbf", task="5x5-2p-1f-coop", total_steps=16_000, record=20,
                                       run_dir=str(tmp_path / "run"), progress=False), **kw})


@pytest.mark.slow
def test_learns_a_small_foraging_task(tmp_path):
    """From a team that almost never loads the food together to one that always does, in
    16k steps; the recorded episodes spread over the run show it."""
    pytest.importorskip("lbforaging")
    ds = mappo.learn(lbf_config(tmp_path))
    ret = ds.episode_returns()
    steps = ds.meta["provenance"]["recorded_at_step"]
    assert ds.n_episodes == 20 and steps == sorted(steps) and steps[0] < 1500 and steps[-1] >= 15_000
    assert ret[:5].mean() <= 0.4 and ret[-5:].mean() >= 0.9
    assert ds.meta["quality"] == "medium-replay" and ds.meta["env"] == "lbf"
    a = {k: np.asarray(v) for k, v in ds.arrays.items()}
    rows = ~a["last"]
    assert a["avail"][rows][np.arange(rows.sum())[:, None], np.arange(2)[None], a["actions"][rows]].all()
    # the checkpoint is a policy for common.collect policy
    act = collect.load_act_fn(tmp_path / "run" / "checkpoint.pt")
    out = np.asarray(act(a["obs"][:3], a["state"][:3], a["avail"][:3]))
    assert out.shape == (3, 2) and a["avail"][:3][np.arange(3)[:, None], np.arange(2)[None], out].all()


def test_only_a_time_limit_cut_bootstraps(tmp_path, monkeypatch):
    """What the learning run hands to GAE, checked against what the environments returned: at
    a true end (all food loaded) the reward alone, at a time-limit cut the reward plus a nonzero
    gamma V(cut state), elsewhere the reward alone; ``done`` at both kinds of end."""
    pytest.importorskip("lbforaging")
    E, T = 8, 16
    steps: list[dict[int, tuple[float, bool, bool]]] = []
    seen = {"term": 0, "trunc": 0, "running": 0}

    class Recording(mappo._Envs):
        def call(self, cmd, args):
            out = super().call(cmd, args)
            if cmd == "step":
                steps.append({i: (float(o[3]), bool(o[4]), bool(o[5])) for i, o in out.items()})
            return out

    real_gae = mappo.gae

    def checking_gae(reward, value, done, next_value, gamma, lam):
        assert len(steps) >= T
        for t, row in enumerate(steps[-T:]):
            assert sorted(row) == list(range(E))
            for i, (r, term, trunc) in row.items():
                boot = reward[t, i] - torch.tensor(r, dtype=reward.dtype)  # [N]
                assert done[t, i] == float(term or trunc)
                if trunc:
                    assert (boot != 0).all()
                    seen["trunc"] += 1
                else:
                    assert (boot == 0).all()
                    seen["term" if term else "running"] += 1
        return real_gae(reward, value, done, next_value, gamma, lam)

    monkeypatch.setattr(mappo, "_Envs", Recording)
    monkeypatch.setattr(mappo, "gae", checking_gae)
    # a 12-step limit on 5x5-2p-1f: some episodes load the food in time, some are cut
    mappo.learn(lbf_config(tmp_path, task="5x5-2p-1f", total_steps=4096, record=4, rollout=T, n_envs=E,
                           env_options=("episode_limit=12",)))
    assert seen["term"] > 0 and seen["trunc"] > 0 and seen["running"] > 0


def interrupt_in_update(monkeypatch, update: int) -> None:
    """Make the learning run stop (KeyboardInterrupt) inside its ``update``-th update."""
    calls = {"n": 0}
    real = mappo.ppo_losses

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4 * 4 * (update - 1) + 1:  # 4 epochs x 4 minibatches an update
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(mappo, "ppo_losses", interrupted)


def run_arrays(ds, run: Path) -> tuple[dict, dict]:
    weights = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    return {k: np.asarray(v) for k, v in ds.arrays.items()}, weights


def test_resumes_after_an_interruption_as_if_it_had_not_stopped(tmp_path, monkeypatch):
    """Stopped in its 7th update and run again, a learning run ends with the data and weights of
    the same run left alone, to the bit: the checkpoint's running episodes are replayed (before
    2026-12-07 they started over, and the resumed run recorded other episodes)."""
    pytest.importorskip("lbforaging")
    kw = dict(task="5x5-2p-1f", total_steps=2048, record=6, rollout=16, checkpoint_every=0.0)
    whole, whole_weights = run_arrays(mappo.learn(lbf_config(tmp_path / "whole", **kw)), tmp_path / "whole" / "run")
    cfg = lbf_config(tmp_path, **kw)
    with monkeypatch.context() as m:
        interrupt_in_update(m, 7)
        with pytest.raises(KeyboardInterrupt):
            mappo.learn(cfg)
    ck = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ck["state"]["updates"] == 6 and ck["state"]["step"] == 6 * 16 * 8
    assert any(len(a) > 0 for a in ck["episodes"]["actions"])  # episodes were running: there is something to replay
    ds = mappo.learn(cfg)
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log] == [128 * k for k in range(1, 17)]  # 6 before, 10 after: none twice
    whole_log = [json.loads(line) for line in (tmp_path / "whole" / "run" / "log.jsonl").read_text().splitlines()]
    assert [x["return_mean_100"] for x in log] == [x["return_mean_100"] for x in whole_log]
    assert ds.n_episodes == 6 and len(list((tmp_path / "run" / "episodes").glob("*.npz"))) == 6
    arrays, weights = run_arrays(ds, tmp_path / "run")
    assert arrays.keys() == whole.keys() and all(np.array_equal(arrays[k], whole[k]) for k in whole)
    assert weights.keys() == whole_weights.keys() and all(torch.equal(weights[k], whole_weights[k]) for k in weights)
    with pytest.raises(Exception, match="different learning run"):
        mappo.learn(lbf_config(tmp_path, task="5x5-2p-1f", total_steps=9999, record=6))


def test_an_environment_that_does_not_replay_starts_its_episodes_over(tmp_path, monkeypatch, capsys):
    """Where the replay does not come back to the checkpoint's observations (here the saved
    observations are altered, as an environment that draws unseeded random numbers would do),
    the run says so, starts the running episodes over and still records every episode."""
    pytest.importorskip("lbforaging")
    cfg = lbf_config(tmp_path, task="5x5-2p-1f", total_steps=2048, record=6, rollout=16, checkpoint_every=0.0)
    with monkeypatch.context() as m:
        interrupt_in_update(m, 7)
        with pytest.raises(KeyboardInterrupt):
            mappo.learn(cfg)
    path = tmp_path / "run" / "checkpoint.pt"
    ck = torch.load(path, weights_only=True)
    ck["episodes"]["obs"] += 1.0
    torch.save(ck, path)
    ds = mappo.learn(cfg)
    assert "did not replay" in capsys.readouterr().err
    assert ds.n_episodes == 6 and len(list((tmp_path / "run" / "episodes").glob("*.npz"))) == 6


def test_a_learning_run_does_not_depend_on_the_callers_thread_count(tmp_path):
    """The data of a learning run depends on its seed alone: called with torch at 2 threads and at
    1, it ends with the same weights to the bit (without the fix, 14 of the 22 tensors differ
    after these 4,096 steps), and the caller's thread count is given back."""
    pytest.importorskip("lbforaging")
    before = torch.get_num_threads()
    weights, data = [], []
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)
            cfg = lbf_config(tmp_path / str(threads), task="5x5-2p-1f", total_steps=4096, record=6, rollout=16)
            ds = mappo.learn(cfg)
            assert torch.get_num_threads() == threads
            weights.append(torch.load(tmp_path / str(threads) / "run" / "checkpoint.pt", weights_only=True)["model"])
            data.append({k: np.asarray(v) for k, v in ds.arrays.items()})
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert data[0].keys() == data[1].keys() and all(np.array_equal(data[0][k], data[1][k]) for k in data[0])


def test_learn_command_on_the_starcraft_stand_in(tmp_path, monkeypatch, fake):
    """`python -m common.collect learn` for the user's SMACv2 example, on the stand-in
    game (test_envs_smac's ``fake`` fixture): the dataset lands where
    `comadice.py --env smacv2 --task protoss_5_vs_5` looks."""
    monkeypatch.setenv("OFFLINE_MARL_DATA", str(tmp_path / "data"))
    with pytest.raises(Exception, match="common.collect learn --env smacv2 --task protoss_5_vs_5 --quality mix"):
        catalog.resolve("smacv2", "protoss_5_vs_5", "mix")
    path = collect.main(["learn", "--env", "smacv2", "--task", "protoss_5_vs_5", "--quality", "mix",
                         "--total-steps", "1024", "--record", "5", "--rollout", "32", "--no-progress"])
    assert path == tmp_path / "data" / "smacv2" / "protoss_5_vs_5" / "mix"
    ds = OfflineDataset.load(catalog.resolve("smacv2", "protoss_5_vs_5", "mix"))
    m = ds.meta
    assert (m["env"], m["n_agents"], m["n_actions"], ds.n_episodes) == ("smacv2", 5, 11, 5)
    assert m["provenance"]["command"].startswith("python -m common.collect learn --env smacv2")
    assert (tmp_path / "data" / "learn" / "smacv2" / "protoss_5_vs_5" / "mix-seed0" / "checkpoint.pt").is_file()
    a = {k: np.asarray(v) for k, v in ds.arrays.items()}
    rows = np.flatnonzero(~a["last"])
    assert a["avail"][rows[:, None], np.arange(5)[None], a["actions"][rows]].all()  # dead agents only no-op
