"""Checks shared by the environment-wrapper tests."""

import numpy as np

from common.envs import make_env


def assert_reset_depends_on_seed_only(env: str, task: str, n_actions: int, max_cut: int, episodes: int = 40,
                                      steps: int = 20) -> None:
    """After ``episodes`` episodes cut at random points (up to ``max_cut`` steps), ``reset(seed)`` of a
    used environment gives what a fresh one gives (every other seed a newly made one), and so do
    ``steps`` identical steps after it: observations, state, masks, reward and endings."""
    used, fresh = make_env(env, task), make_env(env, task)
    rng = np.random.default_rng(0)
    for seed in range(episodes):
        used.reset(seed=1000 + seed)
        for _ in range(int(rng.integers(1, max_cut))):  # end somewhere else
            *_, t, u, _ = used.step(rng.integers(0, n_actions, used.n_agents))
            if t or u:
                break
        other = make_env(env, task) if seed % 2 else fresh
        for x, y in zip(used.reset(seed=seed), other.reset(seed=seed)):
            np.testing.assert_array_equal(x, y)
        for a in rng.integers(0, n_actions, (steps, used.n_agents)):
            o1, s1, m1, r1, t1, u1, _ = used.step(a)
            o2, s2, m2, r2, t2, u2, _ = other.step(a)
            for x, y in ((o1, o2), (s1, s2), (m1, m2)):
                np.testing.assert_array_equal(x, y)
            assert (r1, t1, u1) == (r2, t2, u2)
            if t1 or u1:
                break
