"""OMCDA's two matrix tasks (common/envs.py, docs/environments.md): the Sec. 3 toy game ``omcda_toy``
and its multi-step variant ``omcda_relay``, their exact expected returns, their ``uniform`` datasets,
and omcda.py end to end on the toy game."""

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

import omcda
from common import envs
from common.collect import RECIPES, generate


def fixed_probs(p: np.ndarray):
    """A probs_fn that plays the per-agent action probabilities ``p [N, K]`` everywhere."""
    return lambda obs, avail: np.broadcast_to(p, (obs.shape[0],) + p.shape)


def test_toy_game_is_one_step_with_the_derived_table():
    env = envs.make_env("matrix", "omcda_toy")
    assert env.episode_limit == 1 and env.n_agents == 2 and env.n_actions == 2
    for a0, a1 in itertools.product(range(2), range(2)):
        env.reset(0)
        *_, r, term, trunc, _ = env.step(np.array([a0, a1]))
        assert r == pytest.approx([[1.3, -0.4], [-1.6, 0.7]][a0][a1]) and term and not trunc
    with pytest.raises(envs.EnvError):
        envs.make_env("matrix", "omcda_toy", episode_limit=5)
    # Eq. 7: uniform play pays 0, the Sec. 3 strategies pay 0.1 and 0.15
    assert env.exact_return(fixed_probs(np.full((2, 2), 0.5))) == pytest.approx(0.0, abs=1e-6)
    assert env.exact_return(fixed_probs(np.array([[0.6, 0.4], [0.6, 0.4]]))) == pytest.approx(0.1, abs=1e-6)
    assert env.exact_return(fixed_probs(np.array([[0.65, 0.35], [0.55, 0.45]]))) == pytest.approx(0.15, abs=1e-6)
    # the repeated games are unchanged: truncated at their limit, exact return = limit x per-step value
    xor = envs.make_env("matrix", "penalty_xor", episode_limit=3)
    for t in range(3):
        *_, r, term, trunc, _ = xor.step(np.array([0, 1]))
    assert (term, trunc) == (False, True)
    assert xor.exact_return(fixed_probs(np.array([[1.0, 0.0], [0.0, 1.0]]))) == pytest.approx(3.0)


def relay_policy_probs(seed: int):
    """Random state-dependent action probabilities for the relay, as a probs_fn and a sampler."""
    table = np.random.default_rng(seed).uniform(0.05, 0.95, size=(8, 7, 2))  # P(action 0) per (t, k, agent)

    def probs(obs, avail):
        t, k = obs[:, 0, :8].argmax(-1), obs[:, 0, 8:].argmax(-1)
        p0 = table[t, k]
        return np.stack([p0, 1 - p0], -1)

    return probs


def test_relay_dynamics_and_exact_return_match_simulation():
    env = envs.make_env("matrix", "omcda_relay")
    assert (env.n_agents, env.obs_dim, env.state_dim, env.episode_limit) == (2, 15, 15, 8)
    obs, state, avail = env.reset(0)
    assert obs[0, 0] == 1 and obs[0, 8] == 1 and (obs[0] == obs[1]).all() and (state == obs[0]).all()
    # always run, never pass: the runner reaches 6 after 6 steps and the last step pays the bonus
    ret, steps = 0.0, 0
    while True:
        obs, state, avail, r, term, trunc, _ = env.step(np.array([0, 0]))
        ret, steps = ret + r, steps + 1
        if term or trunc:
            break
    assert (ret, steps, term, trunc) == (20.0, 8, True, False)
    # run and pass every step: 8 x (-1.5) + 20; hold and pass: 8 x 2, no bonus
    for a0, expected in ((0, 8 * -1.5 + 20), (1, 8 * 2.0)):
        probs = fixed_probs(np.array([[1.0 - a0, float(a0)], [0.0, 1.0]]))
        assert env.exact_return(probs) == pytest.approx(expected, abs=1e-6)
    # exact dynamic programming = Monte Carlo of the environment itself, for a random stochastic policy
    probs = relay_policy_probs(3)
    rng = np.random.default_rng(0)
    returns = []
    for e in range(20000):
        obs, _, avail = env.reset(e)
        total = 0.0
        for _ in range(8):
            p = probs(obs[None], avail[None])[0]
            a = (rng.random(2) > p[:, 0]).astype(np.int64)
            obs, _, avail, r, term, _, _ = env.step(a)
            total += r
        returns.append(total)
    se = np.std(returns) / math.sqrt(len(returns))
    assert abs(np.mean(returns) - env.exact_return(probs)) < 4 * se
    # the optimum (exhaustive over deterministic joint policies of (t, position)) is 24: run six
    # times with the helper back, then hold twice while it passes
    value = np.zeros(7)
    for t in reversed(range(8)):
        value = np.array([max(r + value[k2] for k2, r in (env.transition(k, t, a0, a1) for a0 in (0, 1) for a1 in (0, 1)))
                          for k in range(7)])
    assert value[0] == pytest.approx(24.0)


def test_uniform_recipes(tmp_path):
    for task, episodes, steps in (("omcda_toy", 10_000, 1), ("omcda_relay", 2_000, 8)):
        assert ("matrix", task, "uniform") in RECIPES
        from common.data import OfflineDataset

        ds = OfflineDataset.load(generate("matrix", task, "uniform", tmp_path / task))
        assert ds.meta["episodes"] == episodes and ds.meta["transitions"] == episodes * steps
        rows = ~np.asarray(ds.last)
        acts = np.asarray(ds.actions)[rows]
        assert np.abs(acts.mean(0) - 0.5).max() < 0.02  # each agent uniform
        assert np.abs(np.corrcoef(acts.T)[0, 1]) < 0.03  # independently
        assert np.asarray(ds.terminal)[rows].sum() == episodes and not np.asarray(ds.timeout).any()
        env = envs.make_env_for(ds.meta)
        uniform = env.exact_return(fixed_probs(np.full((2, 2), 0.5)))
        ret = np.asarray(ds.reward).sum() / episodes
        assert abs(ret - uniform) < 0.05 * max(1.0, abs(uniform)), (task, ret, uniform)


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory):
    return generate("matrix", "omcda_toy", "uniform", tmp_path_factory.mktemp("toy") / "uniform")


def test_toy_game_end_to_end_allocation_beats_uniform_budgets(tmp_path, toy_data):
    """omcda.py on the toy game (a short, fast version of the documented run): player 1 gets the
    larger conservative degree, and the learned policies' exact expected team reward beats the
    no-allocation run's (at the fixed point: about 0.03 against -0.006; docs/omcda.md)."""
    out = {}
    for flag in ("", "no_allocation"):
        args = omcda.Args(env="matrix", task="omcda_toy", quality="uniform", dataset=str(toy_data), hidden=32,
                          mix_hidden=16, bc_steps=300, total_steps=1500, eval_every=1500, eval_episodes=2,
                          final_eval_episodes=2, eval_envs=2, log_every=500, lr_return=1e-3, lr_policy=1e-3,
                          lr_constraint=1e-3, lr_alpha=5e-3, device="cpu", run_dir=str(tmp_path / (flag or "omcda")),
                          **({flag: True} if flag else {}))
        out[flag] = omcda.main(args)
        done = json.loads((Path(args.run_dir) / "done.json").read_text())
        assert len(done["d"]) == len(done["alpha"]) == 2 and done["expected_return"] == out[flag]["expected_return"]
        assert done["expected_return"] == pytest.approx(done["expected_team_reward"])  # one step: episode = step
    d, alpha = out[""]["d"], out[""]["alpha"]
    assert d[0] > d[1] + 0.05 and sum(d) == pytest.approx(0.4, rel=1e-5)
    assert alpha[0] < 5 and alpha[1] < 5  # the alpha step has moved both from 10
    assert out[""]["expected_return"] > out["no_allocation"]["expected_return"] + 0.02, out  # seeds 0-2: 0.04-0.09


def test_exact_returns_in_done_json_only_where_an_exact_form_exists():
    """common.envs.matrix_policy_summary: the relay gets its exact episode return (no joint policy: its
    state changes), the stateless games also their joint policy; other families and policies without
    action probabilities get nothing."""
    relay = envs.make_env("matrix", "omcda_relay")
    act = lambda obs, state, avail: np.zeros(avail.shape[:2], np.int64)  # noqa: E731
    act.probs = fixed_probs(np.array([[1.0, 0.0], [1.0, 0.0]]))  # run every step, never pass
    out = envs.matrix_policy_summary(relay, act)
    assert set(out) == {"expected_return"} and out["expected_return"] == pytest.approx(20.0)
    toy = envs.make_env("matrix", "omcda_toy")
    out = envs.matrix_policy_summary(toy, act)
    assert out["expected_return"] == pytest.approx(out["expected_team_reward"]) and "joint_policy" in out
    assert envs.matrix_policy_summary(envs.make_env("bridge", "hard"), act) == {}
    del act.probs
    assert envs.matrix_policy_summary(relay, act) == {}
