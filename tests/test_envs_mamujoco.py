"""MaMuJoCo: literature dimensions, equality with the gymnasium single-agent envs,
the action partition, time limit vs fall, determinism, evaluation in workers."""

import gymnasium
import numpy as np
import pytest

from common.envs import EnvError, _build_quietly, evaluate, make_env, omiga_obs

# task -> (n_agents, obs_dim, state_dim, act_dim)
OMIGA_DIMS = {  # the OMIGA datasets' shapes (OMIGA paper / ComaDICE, OMCDA tables)
    "Hopper-3x1": (3, 14, 42, 1),
    "Ant-2x4": (2, 113, 226, 4),
    "HalfCheetah-6x1": (6, 23, 138, 1),
    "HalfCheetah-2x3": (2, 19, 38, 3),
}
LOCAL_DIMS = {  # gymnasium-robotics mamujoco_v1, agent_obsk=1, v5 single-agent envs
    "Hopper-3x1": (3, 9, 11, 1),
    "Ant-2x4": (2, 63, 105, 4),
    "HalfCheetah-6x1": (6, 9, 17, 1),
    "HalfCheetah-2x3": (2, 12, 17, 3),
}


def reference(gym_id, **kwargs):
    """The single-agent env, built without MuJoCo's log file (half_cheetah.xml's deprecation)."""
    return _build_quietly(gymnasium.make, gym_id, **kwargs)


def unstandardise(obs):
    """Invert ``omiga_obs``: the id part was one-hot, which fixes each vector's mean and std."""
    n = obs.shape[-2]
    i = np.arange(n)
    hot = obs[..., i, obs.shape[-1] - n + i].astype(np.float64)  # z of the 1
    cold = obs[..., i, obs.shape[-1] - n + (i + 1) % n].astype(np.float64)  # z of a 0
    std = 1.0 / (hot - cold)
    return obs[..., : obs.shape[-1] - n] * std[..., None] - cold[..., None] * std[..., None]


@pytest.mark.parametrize("mode,dims", [("omiga", OMIGA_DIMS), ("local", LOCAL_DIMS)])
def test_dimensions(mode, dims):
    for task, (n, o, s, a) in dims.items():
        env = make_env("mamujoco", task, obs_mode=mode)
        assert (env.n_agents, env.obs_dim, env.state_dim, env.act_dim) == (n, o, s, a), task
        assert not env.discrete and env.n_actions == 1 and env.episode_limit == 1000
        obs, state, avail = env.reset(seed=0)
        assert obs.shape == (n, o) and obs.dtype == np.float32
        assert state.shape == (s,) and state.dtype == np.float32
        assert avail.shape == (n, 1) and avail.dtype == bool and avail.all()
        out = env.step(np.zeros((n, a)))
        assert out[0].shape == (n, o) and out[1].shape == (s,) and isinstance(out[3], float)
        env.close()


def test_omiga_obs_is_the_standardised_full_obs_plus_id():
    x = np.random.default_rng(0).normal(size=(5, 11)) * 3 + 1
    z = omiga_obs(x, 3)
    assert z.shape == (5, 3, 14) and z.dtype == np.float32
    np.testing.assert_allclose(z.mean(-1), 0, atol=1e-6)
    np.testing.assert_allclose(z.std(-1), 1, atol=1e-5)
    assert (z[..., 11:].argmax(-1) == np.arange(3)).all()  # agent i's id entry is the large one
    for i in range(3):
        np.testing.assert_allclose(unstandardise(z)[:, i], x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("task,gym_id,kwargs", [
    ("Hopper-3x1", "Hopper-v4", {}),
    ("Ant-2x4", "Ant-v4", {"use_contact_forces": True}),
    ("HalfCheetah-6x1", "HalfCheetah-v4", {}),
])
def test_omiga_matches_the_single_agent_env(task, gym_id, kwargs):
    env = make_env("mamujoco", task)
    ref = reference(gym_id, **kwargs)
    obs, state, _ = env.reset(seed=1)
    ref_obs, _ = ref.reset(seed=1)
    rng = np.random.default_rng(1)
    ended = False
    for _ in range(300):
        np.testing.assert_allclose(unstandardise(obs), np.broadcast_to(ref_obs, (env.n_agents, ref_obs.size)),
                                   rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(state, obs.reshape(-1))
        a = rng.uniform(-1, 1, size=(env.n_agents, env.act_dim))
        obs, state, _, r, term, trunc, _ = env.step(a)
        ref_obs, ref_r, ref_term, _, _ = ref.step(a.reshape(-1))
        assert r == ref_r and term == ref_term and not trunc
        if term:
            ended = True
            break
    assert ended != gym_id.startswith("HalfCheetah")  # random actions make Hopper and Ant fall early


def test_ant_without_contact_forces_is_ant_v2_under_mujoco_2():
    env = make_env("mamujoco", "Ant-2x4", ant_contact_forces=False)
    assert (env.obs_dim, env.state_dim) == (113, 226)
    ref = reference("Ant-v4", use_contact_forces=False)  # 27-dim obs, no contact cost
    obs, _, _ = env.reset(seed=1)
    ref_obs, _ = ref.reset(seed=1)
    rng = np.random.default_rng(1)
    for _ in range(20):
        x = unstandardise(obs)
        np.testing.assert_allclose(x[:, :27], np.broadcast_to(ref_obs, (2, 27)), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(x[:, 27:], 0, atol=1e-4)
        a = rng.uniform(-1, 1, size=(2, 4))
        obs, _, _, r, term, _, _ = env.step(a)
        ref_obs, ref_r, ref_term, _, _ = ref.step(a.reshape(-1))
        assert r == ref_r and term == ref_term


def test_local_matches_the_single_agent_env():
    env = make_env("mamujoco", "Hopper-3x1", obs_mode="local")
    ref = reference("Hopper-v5")
    _, state, _ = env.reset(seed=2)
    ref_obs, _ = ref.reset(seed=2)
    rng = np.random.default_rng(2)
    for _ in range(150):
        np.testing.assert_allclose(state, ref_obs, rtol=1e-6, atol=1e-6)
        a = rng.uniform(-1, 1, size=(3, 1))
        _, state, _, r, term, trunc, _ = env.step(a)
        ref_obs, ref_r, ref_term, _, _ = ref.step(a.reshape(-1))  # Hopper's partition is the joint order
        assert r == ref_r and term == ref_term and not trunc
        if term:
            break
    assert term


def _ctrl(env):
    inner = env._env if env.obs_mode == "omiga" else env._env.single_agent_env
    return np.array(inner.unwrapped.data.ctrl)


def test_action_partition():
    a = np.array([[0.1, 0.2, 0.3, 0.4], [-0.5, -0.6, -0.7, 5.0]])
    omiga = make_env("mamujoco", "Ant-2x4")
    omiga.reset(seed=0)
    omiga.step(a)
    # OMIGA: agent i drives the contiguous chunk i of Ant's actuators; out-of-range values are clipped
    np.testing.assert_allclose(_ctrl(omiga), [0.1, 0.2, 0.3, 0.4, -0.5, -0.6, -0.7, 1.0])
    local = make_env("mamujoco", "Ant-2x4", obs_mode="local")
    local.reset(seed=0)
    local.step(a)
    # gymnasium-robotics: agent 0 = front legs (hip1 ankle1 hip2 ankle2 = actuators 2..5),
    # agent 1 = back legs (hip3 ankle3 hip4 ankle4 = actuators 6, 7, 0, 1)
    np.testing.assert_allclose(_ctrl(local), [-0.7, 1.0, 0.1, 0.2, 0.3, 0.4, -0.5, -0.6])
    cheetah = make_env("mamujoco", "HalfCheetah-6x1")
    cheetah.reset(seed=0)
    cheetah.step(np.linspace(-0.6, 0.6, 6)[:, None])  # bthigh bshin bfoot fthigh fshin ffoot
    np.testing.assert_allclose(_ctrl(cheetah), np.linspace(-0.6, 0.6, 6))


@pytest.mark.parametrize("mode", ["omiga", "local"])
def test_time_limit_is_truncation(mode):
    env = make_env("mamujoco", "HalfCheetah-2x3", obs_mode=mode, episode_limit=7)
    for _ in range(2):  # and again after a reset
        env.reset(seed=0)
        flags = [env.step(np.zeros((2, 3)))[4:6] for _ in range(7)]
        assert flags == [(False, False)] * 6 + [(False, True)]


@pytest.mark.parametrize("mode", ["omiga", "local"])
def test_deterministic_under_seed(mode):
    def rollout(seed):
        env = make_env("mamujoco", "Hopper-3x1", obs_mode=mode)
        rng = np.random.default_rng(0)
        out = [env.reset(seed=seed)[0]]
        for _ in range(10):
            o, _, _, r, *_ = env.step(rng.uniform(-1, 1, size=(3, 1)))
            out += [o, np.float32(r)]
        return out

    a, b, c = rollout(5), rollout(5), rollout(6)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[0], c[0])


def test_evaluate_in_worker_processes():
    env = make_env("mamujoco", "HalfCheetah-2x3", episode_limit=15)

    def act(obs, state, avail):
        return np.tanh(obs[..., :3])  # a deterministic function of the observation

    here = evaluate(env, act, episodes=3, seed=10, n_envs=2)
    there = evaluate(env, act, episodes=3, seed=10, n_envs=2, workers=True)
    assert there["lengths"] == [15, 15, 15] and there["win_rate"] is None
    np.testing.assert_allclose(sorted(there["returns"]), sorted(here["returns"]), rtol=1e-6)


def test_bad_options():
    with pytest.raises(EnvError, match="obs_mode"):
        make_env("mamujoco", "Hopper-3x1", obs_mode="global")
    with pytest.raises(EnvError, match="Hopper-3x1"):
        make_env("mamujoco", "Hopper-2x1")
    with pytest.raises(EnvError, match="unknown mamujoco option.*obsmode; the options are obs_mode"):
        make_env("mamujoco", "Hopper-3x1", obsmode="local")
    with pytest.raises(EnvError, match="obs_mode='local'"):
        make_env("mamujoco", "Hopper-3x1", agent_obsk=2)
    with pytest.raises(EnvError, match="obs_mode='omiga'"):
        make_env("mamujoco", "Ant-2x4", obs_mode="local", ant_contact_forces=False)


def test_local_without_root_features_is_the_original_mamujoco_obs():
    # CFCQL/OMAR's HalfCheetah-2x3: agent_obsk=0 and no global categories, i.e. each agent sees
    # its own three joints' (qpos, qvel), joints sorted by name (bfoot, bshin, bthigh for agent 0)
    env = make_env("mamujoco", "HalfCheetah-2x3", obs_mode="local", agent_obsk=0, global_categories=[])
    assert (env.obs_dim, env.state_dim) == (6, 17)
    obs, _, _ = env.reset(seed=0)
    data = env._env.single_agent_env.unwrapped.data  # qpos/qvel: root x z y, bthigh bshin bfoot fthigh fshin ffoot
    for agent, joints in [(0, [5, 4, 3]), (1, [8, 7, 6])]:
        expected = np.stack([data.qpos[joints], data.qvel[joints]], axis=1).reshape(-1)
        np.testing.assert_allclose(obs[agent], expected, rtol=1e-6)


def test_contact_forces_tell_the_two_ant_variants_apart():
    # the check docs/environments.md suggests for a dataset: entries 27..110 of each obs vector
    # are all equal (zero before standardisation) without contact forces, not with them
    for forces, equal in [(True, False), (False, True)]:
        env = make_env("mamujoco", "Ant-2x4", ant_contact_forces=forces)
        env.reset(seed=0)
        for _ in range(10):
            obs = env.step(np.full((2, 4), 0.5))[0]
        assert np.ptp(obs[:, 27:111], axis=1).max() < 1e-6 if equal else np.ptp(obs[:, 27:111], axis=1).min() > 1e-3
