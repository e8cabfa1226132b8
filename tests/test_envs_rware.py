"""RWARE: dimensions, the team reward against the package's per-agent rewards,
AlberDICE's state and reward conventions, the time limit, determinism."""

import gymnasium
import numpy as np
import pytest

from common.envs import EnvError, alberdice_warehouse_reward, make_env
from _env_checks import assert_reset_depends_on_seed_only


@pytest.mark.parametrize("task,n,queue", [("tiny-2ag", 2, 2), ("tiny-2ag-easy", 2, 4), ("small-4ag", 4, 4),
                                          ("medium-6ag-hard", 6, 3)])
def test_dimensions(task, n, queue):
    env = make_env("rware", task)
    assert (env.n_agents, env.obs_dim, env.state_dim, env.n_actions) == (n, 71, 71 * n, 5)
    assert env.discrete and env.episode_limit == 500
    obs, state, avail = env.reset(seed=0)
    assert obs.shape == (n, 71) and obs.dtype == np.float32
    np.testing.assert_array_equal(state, obs.reshape(-1))
    assert avail.shape == (n, 5) and avail.dtype == bool and avail.all()
    assert make_env("rware", task, state="alberdice").state_dim == 3 * n + 2 * queue


def test_alberdice_state_is_positions_and_directions_then_requested_shelves():
    env = make_env("rware", "small-4ag", state="alberdice")
    obs, state, _ = env.reset(seed=3)
    rng = np.random.default_rng(0)
    for _ in range(20):
        agents = state[:12].reshape(4, 3)
        np.testing.assert_array_equal(agents[:, :2], obs[:, :2])  # rware's obs starts with the agent's x, y
        np.testing.assert_array_equal(agents[:, 2], obs[:, 3:7].argmax(1))  # then carrying, direction one-hot
        assert state.size == 12 + 2 * 4 and (state[12:] >= 0).all()
        obs, state, *_ = env.step(rng.integers(0, 5, size=4))


def test_team_reward_is_the_sum_of_the_agents_rewards():
    # a random policy delivers rarely: search a few seeds for an episode with a delivery
    for seed in (4, 0, 1, 2, 3, 5, 6, 7):
        env = make_env("rware", "tiny-2ag-easy")
        ref = gymnasium.make("rware-tiny-2ag-easy-v2", disable_env_checker=True)
        obs, _, _ = env.reset(seed=seed)
        ref_obs, _ = ref.reset(seed=seed)
        rng = np.random.default_rng(seed)
        total = 0.0
        for t in range(500):
            np.testing.assert_array_equal(obs, np.stack(ref_obs))
            a = rng.integers(0, 5, size=2)
            obs, _, _, r, term, trunc, _ = env.step(a)
            ref_obs, ref_r, _, _, _ = ref.step(a.tolist())
            assert r == sum(ref_r) and not term and trunc == (t == 499)
            total += r
        if total > 0:
            return
    pytest.fail("no delivery in any episode, so the sum was never tested")


def test_alberdice_reward_shaping():
    obs = np.zeros(71, np.float32)
    assert alberdice_warehouse_reward(0.0, obs) == 0.0
    assert alberdice_warehouse_reward(1.0, obs) == 1.0
    cell = lambda i: slice(8 + 7 * i, 15 + 7 * i)  # noqa: E731
    side = obs.copy()
    side[cell(0)][5:7] = 1  # a requested shelf in view, not under the agent
    assert alberdice_warehouse_reward(0.0, side) == pytest.approx(0.001)
    plain = obs.copy()
    plain[cell(4)][5] = 1  # under an unrequested shelf
    assert alberdice_warehouse_reward(0.0, plain) == 0.0
    under = obs.copy()
    under[cell(4)][5:7] = 1  # under a requested shelf
    assert alberdice_warehouse_reward(0.0, under) == pytest.approx(0.004)
    under[2] = 1  # and carrying it
    assert alberdice_warehouse_reward(1.0, under) == pytest.approx(1.007)


def test_alberdice_reward_is_agent_0s_shaped_reward():
    """Played by the scripted expert (which delivers), step by step against the package: the
    reward is agent 0's shaped reward, which tells it from the team's or agent 1's when only
    agent 1 delivers."""
    from common.scripted import RwareExpert

    env = make_env("rware", "tiny-2ag-easy", reward="alberdice")
    ref = gymnasium.make("rware-tiny-2ag-easy-v2", disable_env_checker=True)
    obs, state, avail = env.reset(seed=2)
    ref.reset(seed=2)
    expert = RwareExpert()
    expert.reset(env, np.random.default_rng(2))
    shaped = only_1 = only_0 = 0
    for _ in range(300):
        a = np.asarray(expert(env, obs, state, avail))
        obs, state, avail, r, *_ = env.step(a)
        _, ref_r, _, _, _ = ref.step(a.tolist())
        assert r == alberdice_warehouse_reward(ref_r[0], obs[0])
        shaped += r != ref_r[0]
        only_1 += ref_r[1] > 0 and ref_r[0] == 0
        only_0 += ref_r[0] > 0 and ref_r[1] == 0
    assert shaped > 0 and only_1 > 0 and only_0 > 0  # the shaping, and a delivery by each agent alone


def test_time_limit_is_truncation():
    env = make_env("rware", "tiny-2ag", episode_limit=5)
    for _ in range(2):
        env.reset(seed=0)
        flags = [env.step(np.array([1, 2]))[4:6] for _ in range(5)]
        assert flags == [(False, False)] * 4 + [(False, True)]


def test_deterministic_under_seed():
    def rollout(seed):
        env = make_env("rware", "small-4ag")
        rng = np.random.default_rng(0)
        out = [env.reset(seed=seed)[0]]
        for _ in range(30):
            out.append(env.step(rng.integers(0, 5, size=4))[0])
        return np.stack(out)

    np.testing.assert_array_equal(rollout(1), rollout(1))
    assert not np.array_equal(rollout(1), rollout(2))


def test_bad_names():
    with pytest.raises(EnvError, match="tiny-2ag"):
        make_env("rware", "huge-2ag")
    with pytest.raises(EnvError, match="state"):
        make_env("rware", "tiny-2ag", state="global")
    with pytest.raises(EnvError, match="reward"):
        make_env("rware", "tiny-2ag", reward="mean")
    with pytest.raises(EnvError, match="unknown rware option.*max_steps"):
        make_env("rware", "tiny-2ag", max_steps=100)


def test_a_reset_depends_on_its_seed_only():
    """As for LBF (whose reset kept the previous players' positions): after 40 episodes cut at
    random points, ``reset(seed)`` in a used environment gives the same episode, observations and
    action masks over 20 identical steps, as in a fresh one, so collect's worker processes record
    the episodes that one process would."""
    assert_reset_depends_on_seed_only("rware", "tiny-2ag", n_actions=5, max_cut=60)
