"""MaMuJoCo behaviour policies and dataset recipes (common/behaviour.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("gymnasium")
pytest.importorskip("mujoco")

from common import behaviour as bh  # noqa: E402
from common.data import OfflineDataset  # noqa: E402

DIMS = {"Hopper-3x1": (11, 3, 3), "Ant-2x4": (111, 8, 2), "HalfCheetah-6x1": (17, 6, 6)}  # raw obs, joint action, agents


def _shipped(task: str) -> bool:
    return all((bh.ASSETS / task / f"{lvl}.pt").exists() for lvl in ("expert", "medium", "replay"))


needs_hopper = pytest.mark.skipif(not _shipped("Hopper-3x1"), reason="Hopper-3x1 behaviour policies not shipped yet")


# ------------------------------------------------------------------ layout
@pytest.mark.parametrize("task,obs_dim,state_dim", [("Hopper-3x1", 14, 42), ("Ant-2x4", 113, 226), ("HalfCheetah-6x1", 23, 138)])
def test_omiga_layout_dims_onehot_zscore_and_inverse(task, obs_dim, state_dim):
    env = bh.make_gym_env(task)
    raw_dim, act_dim, n = DIMS[task]
    raw = np.stack([env.reset(seed=s)[0] for s in range(4)])
    for _ in range(5):  # move away from the initial pose
        raw = np.concatenate([raw, env.step(env.action_space.sample())[0][None]])
    env.close()
    assert raw.shape[1] == raw_dim
    obs, state = bh.omiga_layout(raw, n)
    assert obs.shape == (len(raw), n, obs_dim) and state.shape == (len(raw), state_dim)
    np.testing.assert_allclose(obs.mean(-1), 0, atol=1e-5)  # z-scored within each agent's vector
    np.testing.assert_allclose(obs.std(-1), 1, atol=1e-4)
    ids = obs[..., raw_dim:]  # the one-hot id block: agent i's entry i is the largest
    assert (ids.argmax(-1) == np.arange(n)).all()
    off = ids[..., ~np.eye(n, dtype=bool)].reshape(len(raw), n, n - 1)
    assert np.allclose(off, off[..., :1])  # all zeros of the one-hot map to one value
    np.testing.assert_array_equal(state, obs.reshape(len(raw), -1))  # state = the agents' obs concatenated
    # each agent's vector is z([raw, onehot(i)]), computed independently here
    for i in range(n):
        x = np.concatenate([raw, np.eye(n)[[i] * len(raw)]], 1)
        np.testing.assert_allclose(obs[:, i], (x - x.mean(1, keepdims=True)) / x.std(1, keepdims=True), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bh.raw_from_omiga(obs, n), raw, rtol=1e-4, atol=1e-4 * np.abs(raw).max())


def test_action_chunks_are_contiguous():
    joint = np.arange(2 * 8, dtype=np.float32).reshape(2, 8)  # Ant-2x4: agent 0 owns 0..3, agent 1 owns 4..7
    per = bh.split_actions(joint, 2)
    assert per.shape == (2, 2, 4)
    np.testing.assert_array_equal(per[:, 0], joint[:, :4])
    np.testing.assert_array_equal(per[:, 1], joint[:, 4:])
    np.testing.assert_array_equal(bh.split_actions(joint[:, :6], 6)[0, :, 0], joint[0, :6])


# --------------------------------------------------------------------- SAC
def test_actor_log_prob_matches_tanh_gaussian():
    torch.manual_seed(0)
    actor = bh.Actor(5, 3, 16)
    obs = torch.randn(64, 5)
    a, logp = actor(obs, torch.Generator().manual_seed(1))
    mean, log_std = actor.net(obs).chunk(2, -1)
    dist = torch.distributions.TransformedDistribution(
        torch.distributions.Normal(mean, log_std.clamp(-20, 2).exp()), [torch.distributions.TanhTransform()])
    u = torch.atanh(a.clamp(-1 + 1e-6, 1 - 1e-6))
    ok = a.abs().max(-1).values < 0.999  # away from the saturated edge where atanh is ill-conditioned
    expected = dist.base_dist.log_prob(u).sum(-1) - torch.log1p(-a.pow(2)).sum(-1)
    torch.testing.assert_close(logp[ok], expected[ok], rtol=1e-3, atol=1e-3)
    det, _ = actor(obs, deterministic=True)
    torch.testing.assert_close(det, torch.tanh(mean))


def test_twin_q_members_are_independent_mlps():
    q = bh.TwinQ(4, 2, 8)
    o, a = torch.randn(7, 4), torch.randn(7, 2)
    out = q(o, a)
    assert out.shape == (2, 7)
    x = torch.cat([o, a], -1)
    for m in range(2):
        h = torch.relu(x @ q.w[0][m] + q.b[0][m])
        h = torch.relu(h @ q.w[1][m] + q.b[1][m])
        torch.testing.assert_close(out[m], (h @ q.w[2][m] + q.b[2][m]).squeeze(-1))


def test_training_resumes_exactly(tmp_path):
    kw = dict(task="Hopper-3x1", total_steps=500, learning_starts=150, hidden=16, batch_size=32,
              snapshot_every=200, snapshot_episodes=1)
    a = bh.train(bh.TrainConfig(run_dir=str(tmp_path / "a"), **kw), progress=False)
    b = bh.train(bh.TrainConfig(run_dir=str(tmp_path / "b"), stop_after=250, **kw), progress=False)
    mid = torch.load(b / "checkpoint.pt", weights_only=True)
    assert 250 <= mid["step"] < 500  # stopped at the first episode end after step 250
    b = bh.train(bh.TrainConfig(run_dir=str(tmp_path / "b"), **kw), progress=False)  # resumes
    A = torch.load(a / "checkpoint.pt", weights_only=True)
    B = torch.load(b / "checkpoint.pt", weights_only=True)
    assert A["step"] == B["step"] == 500 and A["episodes"] == B["episodes"]
    for part in ("actor", "q", "q_target"):
        for k, v in A["sac"][part].items():
            torch.testing.assert_close(B["sac"][part][k], v, rtol=0, atol=0)
    torch.testing.assert_close(A["sac"]["opt"]["state"][5]["exp_avg"], B["sac"]["opt"]["state"][5]["exp_avg"], rtol=0, atol=0)
    for k in bh.Buffer.FIELDS:
        np.testing.assert_array_equal(np.load(a / "buffer" / f"{k}.npy"), np.load(b / "buffer" / f"{k}.npy"))
    la = [json.loads(x) for x in (a / "log.jsonl").read_text().splitlines()]
    lb = [json.loads(x) for x in (b / "log.jsonl").read_text().splitlines()]
    assert [r["eval_return"] for r in la] == [r["eval_return"] for r in lb]
    # the recorded buffer converts into a dataset whose episodes are the training episodes
    ds = bh.buffer_to_dataset(a, "Hopper-3x1", 300)
    assert ds.n_transitions == 300 and ds.meta["env_options"] == {"obs_mode": "omiga"}
    np.testing.assert_allclose(ds.reward[~ds.last], np.load(a / "buffer" / "rew.npy")[:300])
    with pytest.raises(bh.BehaviourError, match="started with"):
        bh.train(bh.TrainConfig(run_dir=str(tmp_path / "a"), **{**kw, "hidden": 32}), progress=False)


# ----------------------------------------------------------------- recipes
def test_replay_schedule_goes_from_noise_through_snapshots_in_order():
    head = dict(obs_dim=3, act_dim=1, hidden=4, medium_step=40_000, learning_starts=5_000, snapshot_every=5_000,
                snapshots={str(s): bh.Actor(3, 1, 4).state_dict() for s in range(5_000, 40_000, 5_000)})
    at = bh._replay_schedule(head, transitions=800)
    assert at(0) is None and at(99) is None and at(100) is not None  # 5000/40000 of 800 = 100 steps of noise
    ids = [id(at(t)) for t in range(100, 800)]
    changes = [i for i in range(1, len(ids)) if ids[i] != ids[i - 1]]
    assert len(set(ids)) == 7 and len(changes) == 6  # each of the 7 snapshots acts once, in one block
    assert all(b - a == 100 for a, b in zip(changes[:-1], changes[1:]))


@needs_hopper
def test_recipes_deterministic_layout_and_quality_order(tmp_path):
    gen = lambda q, name, seed=0, n=2500: OfflineDataset.load(  # noqa: E731
        bh.generate_mamujoco("Hopper-3x1", q, tmp_path / name, seed=seed, transitions=n, n_envs=2, progress=False))
    e1, e2, e3 = gen("expert", "e1"), gen("expert", "e2"), gen("expert", "e3", seed=1)
    for k in ("obs", "actions", "reward", "episode_start"):
        np.testing.assert_array_equal(e1.arrays[k], e2.arrays[k])
    assert not np.array_equal(e1.reward, e3.reward)
    assert e1.n_transitions == 2500 and e1.meta["env_options"] == {"obs_mode": "omiga"}
    assert (e1.obs_dim, e1.state_dim, e1.n_agents, e1.act_dim) == (14, 42, 3, 1)
    # a fall is a terminal; an episode cut by the budget (or the 1000-step limit) a time-out
    lengths = e1.episode_lengths
    ends = e1.episode_start[1:] - 2
    assert (e1.terminal[ends] | e1.timeout[ends]).all() and not (e1.terminal[ends] & e1.timeout[ends]).any()
    assert e1.timeout[ends][-1]  # the last episode ran out of budget
    done = slice(0, -2)  # the last 2 episodes (one per parallel env) are the ones cut by the budget
    np.testing.assert_array_equal(e1.terminal[ends][done], lengths[done] < 1000)
    np.testing.assert_allclose(e1.obs.mean(-1), 0, atol=1e-5)
    # medium: complete episodes only, so the budget cut does not bias the comparison
    m = gen("medium", "m")

    def full_returns(ds):
        complete = ds.terminal[ends_of(ds)] | (ds.episode_lengths == 1000)
        return ds.episode_returns()[complete]

    ends_of = lambda ds: ds.episode_start[1:] - 2  # noqa: E731
    rec = json.loads((bh.ASSETS / "behaviour.json").read_text())["Hopper-3x1"]
    assert full_returns(e1).mean() > full_returns(m).mean()
    assert rec["expert"]["return_mean"] > 2 * rec["medium"]["return_mean"]


@needs_hopper
def test_medium_expert_is_equal_parts_of_medium_and_expert(tmp_path):
    gen = lambda q, n: OfflineDataset.load(  # noqa: E731
        bh.generate_mamujoco("Hopper-3x1", q, tmp_path / q, seed=3, transitions=n, progress=False))
    me, m, e = gen("medium-expert", 1600), gen("medium", 800), gen("expert", 800)
    assert me.n_transitions == 1600 and me.n_episodes == m.n_episodes + e.n_episodes
    both = OfflineDataset.concatenate([m, e])
    for k in ("obs", "state", "actions", "reward", "terminal", "timeout", "episode_start"):
        np.testing.assert_array_equal(me.arrays[k], both.arrays[k])


@needs_hopper
def test_medium_replay_rises_from_random_to_medium(tmp_path):
    ck = bh.load_checkpoint(bh.shipped_path("Hopper-3x1", "replay"))
    n = 4000
    ds = OfflineDataset.load(bh.generate_mamujoco("Hopper-3x1", "medium-replay", tmp_path / "mr", seed=0,
                                                  transitions=n, n_envs=2, progress=False))
    assert ds.n_transitions == n
    # the first learning_starts / medium_step of the data is uniform noise in [-1, 1]
    n_rand = n * ck["learning_starts"] // ck["medium_step"]
    acts = ds.actions[~ds.last][:n_rand]
    assert abs(np.abs(acts).mean() - 0.5) < 0.05 and np.abs(acts).max() <= 1
    ret = ds.episode_returns()
    rec = json.loads((bh.ASSETS / "behaviour.json").read_text())["Hopper-3x1"]
    third = len(ret) // 3
    assert ret[:third].mean() < ret[-third:].mean()  # improves along the training run
    assert ret[:third].mean() < 0.25 * rec["medium"]["return_mean"]  # starts near random
    assert ret.max() > 0.5 * rec["medium"]["return_mean"]  # reaches the medium level
    assert ret.max() < 1.5 * rec["expert"]["return_mean"]


@needs_hopper
def test_load_behaviour_policy_acts_on_the_omiga_layout():
    ck = bh.load_checkpoint(bh.shipped_path("Hopper-3x1", "expert"))
    actor = bh._actor_from(ck, ck["actor"])
    env = bh.make_gym_env("Hopper-3x1")
    raw = np.stack([env.reset(seed=s)[0] for s in range(6)])
    obs, state = bh.omiga_layout(raw, 3)
    act = bh.load_behaviour_policy(bh.shipped_path("Hopper-3x1", "expert"), deterministic=True)(obs, state, None)
    assert act.shape == (6, 3, 1)
    expect = actor(torch.as_tensor(raw, dtype=torch.float32), deterministic=True)[0]
    torch.testing.assert_close(act.reshape(6, 3), expect, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("task", ["Hopper-3x1", "Ant-2x4", "HalfCheetah-6x1"])
def test_recording_layout_matches_the_mamujoco_wrapper(task):
    """Data recorded on the single-agent robot and converted with ``omiga_layout`` is
    what ``make_env('mamujoco', task, obs_mode='omiga')`` shows the agents."""
    from common.envs import make_env

    raw_dim, act_dim, n = DIMS[task]
    ma = make_env("mamujoco", task, obs_mode="omiga")
    single = bh.make_gym_env(task)
    o, s, _ = ma.reset(seed=7)
    raw = single.reset(seed=7)[0]
    rng = np.random.default_rng(0)
    for t in range(20):
        obs, state = bh.omiga_layout(raw, n)
        np.testing.assert_allclose(o, obs, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(s, state, rtol=1e-6, atol=1e-6)
        joint = rng.uniform(-1, 1, act_dim)
        o, s, _, r, term, trunc, _ = ma.step(bh.split_actions(joint, n))
        raw, r1, term1, _, _ = single.step(joint)
        assert r == pytest.approx(r1) and term == term1
        if term:
            break
    ma.close()
    single.close()


@needs_hopper
def test_behaviour_policy_in_the_multi_agent_env_matches_its_record():
    from common.envs import evaluate, make_env

    rec = json.loads((bh.ASSETS / "behaviour.json").read_text())["Hopper-3x1"]["medium"]
    res = evaluate(make_env("mamujoco", "Hopper-3x1", obs_mode="omiga"),
                   bh.load_behaviour_policy(bh.shipped_path("Hopper-3x1", "medium")), episodes=4, seed=0, n_envs=4)
    assert abs(res["return_mean"] - rec["return_mean"]) < 3 * rec["return_std"] + 0.2 * rec["return_mean"]
