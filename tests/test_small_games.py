"""Penalty-XOR / XOR and Bridge against their rules (docs/environments.md#small-games).

Bridge: the unit cases of docs/environments.md#bridge-unit-cases, exhaustive dynamic
programming over the whole state space reproducing #bridge-reference-values, and
uniform-random rollouts matching the exact (DP) random-policy statistics within sampling
error. Set ``ALBERDICE_BUFFERS`` to the ``buffer/`` folder of the official AlberDICE
repository to also replay its 1,500 Bridge and 400 XOR episodes
(docs/environments.md#checked-against-the-original-code).
"""

import itertools
import os
from pathlib import Path

import numpy as np
import pytest

from common.envs import (BRIDGE_GOALS, BRIDGE_MOVES, BRIDGE_SHAPE, EnvError, _BRIDGE_OPEN, bridge_observation,
                         bridge_step, evaluate, make_env)

JOINT = np.array(list(itertools.product(range(5), range(5))))  # the 25 joint actions, row = a0 * 5 + a1


def step_from(p0, p1, a, episode_limit=50, t=0):
    """One Bridge step from positions p0, p1 (done = standing on one's goal)."""
    pos = np.array([p0, p1])
    done = (pos == BRIDGE_GOALS).all(-1)
    new, new_done, r, term, trunc = bridge_step(pos, done, t, np.array(a), episode_limit)
    return tuple(map(tuple, new)), float(r), bool(term), bool(trunc), new_done


# ------------------------------------------------------------------ the grid
def test_grid_facts():
    assert _BRIDGE_OPEN.sum() == 14 and BRIDGE_SHAPE == (3, 6)
    # the bridge (1,2)-(1,3) is the only link between columns 0-1 and 4-5
    for r in (0, 2):
        assert not _BRIDGE_OPEN[r, 2] and not _BRIDGE_OPEN[r, 3]
    # the actions that keep an agent on its goal (what a done agent records in the optimal data)
    for agent, expect in ((0, {0, 2, 3}), (1, {0, 1, 4})):
        g = BRIDGE_GOALS[agent]
        keep = set()
        for a, d in enumerate(BRIDGE_MOVES):
            n = g + d
            if a == 0 or not (0 <= n[0] < 3 and 0 <= n[1] < 6) or not _BRIDGE_OPEN[n[0], n[1]]:
                keep.add(a)
        assert keep == expect


def test_observation_and_reset():
    env = make_env("bridge", "hard")
    obs, state, avail = env.reset(seed=3)
    assert env.episode_limit == 20 and env.n_actions == 5 and env.obs_dim == env.state_dim == 8
    np.testing.assert_array_equal(state, [1, 2, 2, 5, 1, 3, 0, 0])
    assert state.dtype == np.float32 and obs.shape == (2, 8) and (obs == state).all()
    assert avail.shape == (2, 5) and avail.all()
    _, state, _ = make_env("bridge", "easy").reset()
    np.testing.assert_array_equal(state, [1, 1, 2, 5, 1, 4, 0, 0])
    np.testing.assert_array_equal(bridge_observation(np.array([[[0, 4], [2, 1]]])), [[0, 4, 2, 5, 2, 1, 0, 0]])


# ------------------------------ unit cases (docs/environments.md#bridge-unit-cases)
START = ((1, 2), (1, 3))


def test_unit_start_moves():
    for a, expect in (((3, 3), ((1, 3), (1, 4))), ((4, 4), ((1, 1), (1, 2)))):
        new, r, term, trunc, _ = step_from(*START, a)
        assert new == expect and abs(r - -0.317959) < 1e-6 and not term and not trunc
    for a in ((3, 4), (0, 4), (3, 0), (1, 1)):
        new, r, *_ = step_from(*START, a)
        assert new == START and abs(r - -0.316228) < 1e-6, a


@pytest.mark.parametrize("p0, p1, a, expect", [
    ((0, 1), (1, 0), (2, 3), ((1, 1), (1, 0))),  # same target: agent 0 takes it, agent 1 stays
    ((1, 0), (0, 1), (1, 4), ((0, 0), (0, 1))),  # agent 1 blocked even though (0,0) is its goal
    ((0, 0), (0, 1), (0, 4), ((0, 0), (0, 0))),  # agent 1 enters its goal onto agent 0: overlap
    ((1, 5), (2, 5), (2, 1), ((2, 5), (1, 5))),  # swap allowed: agent 0 enters its goal
    ((0, 0), (0, 1), (3, 4), ((0, 0), (0, 1))),  # head-on swap blocked
    ((1, 0), (1, 1), (3, 1), ((1, 1), (0, 1))),  # agent 0 follows agent 1
])
def test_unit_collisions(p0, p1, a, expect):
    new, r, term, trunc, done = step_from(p0, p1, a)
    assert new == expect
    assert (done == (np.array(new) == BRIDGE_GOALS).all(-1)).all()
    assert not term and not trunc


def test_done_agent_is_frozen_and_invisible():
    # a done agent ignores its action, and the other agent may step onto its cell (rules 2d, 3d)
    new, *_ = step_from((2, 5), (1, 5), (1, 2))  # agent 0 done: Up ignored; agent 1 Down onto it
    assert new == ((2, 5), (2, 5))
    new, *_ = step_from((0, 1), (0, 0), (4, 3))  # agent 1 done: Right ignored; agent 0 Left onto it
    assert new == ((0, 0), (0, 0))


def test_episode_end_flags_and_zero_reward():
    # both reach their goals: a true end, paying 0
    pos = np.array([[2, 4], [0, 1]])
    new, done, r, term, trunc = bridge_step(pos, np.zeros(2, bool), 3, np.array([3, 4]), 50)
    assert term and not trunc and r == 0 and done.all()
    # the time limit: truncated, paying 0, even if one agent reaches its goal on that step
    new, done, r, term, trunc = bridge_step(pos, np.zeros(2, bool), 49, np.array([3, 0]), 50)
    assert trunc and not term and r == 0
    # reaching both goals on the very last step is still a true end
    new, done, r, term, trunc = bridge_step(pos, np.zeros(2, bool), 49, np.array([3, 4]), 50)
    assert term and not trunc


def test_env_class_agrees_with_vectorised_step():
    rng = np.random.default_rng(1)
    for task in ("hard", "easy"):
        for L in (4, 50):
            env = make_env("bridge", task, episode_limit=L)
            for _ in range(20):
                _, state, _ = env.reset()
                pos, done, t, end = state.reshape(2, 4)[:, :2].astype(np.int64), np.zeros(2, bool), 0, False
                while not end:
                    a = rng.integers(0, 5, size=2)
                    _, state, _, r, term, trunc, _ = env.step(a)
                    pos, done, r2, term2, trunc2 = bridge_step(pos, done, t, a, L)
                    t += 1
                    assert (state == bridge_observation(pos)).all() and r == r2
                    assert term == term2 and trunc == trunc2
                    end = term or trunc


def test_env_protocol_and_errors():
    env = make_env("bridge", "hard", episode_limit=3)
    env.reset()
    for k in range(3):
        obs, state, avail, r, term, trunc, info = env.step(np.array([0, 0]))
        assert isinstance(r, float) and not term and trunc == (k == 2)
    assert abs(r) == 0.0  # the truncating step pays 0
    with pytest.raises(RuntimeError):
        env.step(np.array([0, 0]))
    env.reset()
    with pytest.raises(EnvError, match="0..4"):
        env.step(np.array([0, 5]))
    with pytest.raises(EnvError, match="unknown bridge task"):
        make_env("bridge", "medium")
    with pytest.raises(EnvError, match="positive integer"):
        make_env("bridge", "hard", episode_limit="abc")
    with pytest.raises(EnvError, match="unknown bridge option"):
        make_env("bridge", "hard", horizon=5)


def test_always_stay_returns():
    stay = lambda obs, state, avail: np.zeros((obs.shape[0], 2), dtype=np.int64)
    for L, expect in ((20, -6.008328), (50, -15.495161)):
        res = evaluate(make_env("bridge", "hard", episode_limit=L), stay, episodes=2)
        assert abs(res["return_mean"] - expect) < 1e-5 and res["length_mean"] == L and res["win_rate"] is None


# -------------------------------------------------- exhaustive dynamic programming
def transition_tables():
    """Every (state, joint action) of the Bridge: states are pairs of open cells (a
    done agent is one standing on its goal), ``nxt [S, 25]``, ``r [S, 25]`` (the
    reward when the step does not hit the limit), ``term [S, 25]``."""
    cells = np.argwhere(_BRIDGE_OPEN)
    n = len(cells)
    pair = np.stack(np.meshgrid(np.arange(n), np.arange(n), indexing="ij"), -1).reshape(-1, 2)
    pos = cells[pair]  # [S, 2, 2]
    done = (pos == BRIDGE_GOALS).all(-1)
    new, _, r, term, _ = bridge_step(pos[:, None], done[:, None], 0, JOINT[None], 10**9)
    index = -np.ones(BRIDGE_SHAPE, dtype=np.int64)
    index[cells[:, 0], cells[:, 1]] = np.arange(n)
    nxt = index[new[..., 0, 0], new[..., 0, 1]] * n + index[new[..., 1, 0], new[..., 1, 1]]
    start = index[1, 2] * n + index[1, 3]
    return nxt, r.astype(np.float64), term, start


def solve(L, policy):
    """Finite-horizon DP. ``policy="max"``: optimal values; ``"uniform"``: exact
    mean, second moment and success probability of the uniform random joint
    policy. ``V[m]`` is the value with ``m`` steps left (the L-th step of an
    episode always pays 0 and ends it, so ``V[1] = 0``); ``Q(m)`` the action values."""
    nxt, r, term, start = transition_tables()
    live = ~term
    V = {1: np.zeros(len(nxt))}
    M = np.zeros(len(nxt))
    P = term.mean(1)  # one step left: success iff that step puts both on their goals

    def Q(m):
        return r + live * V[m - 1][nxt]

    for m in range(2, L + 1):
        if policy == "max":
            V[m] = Q(m).max(1)
        else:
            M = (r ** 2 + live * (2 * r * V[m - 1][nxt] + M[nxt])).mean(1)
            P = (term + live * P[nxt]).mean(1)
            V[m] = Q(m).mean(1)
    return dict(V=V, Q=Q, M=M, P=P, start=start, nxt=nxt)


@pytest.mark.parametrize("L", [20, 50])
def test_dp_optimum(L):
    s = solve(L, "max")
    v, q = s["V"][L][s["start"]], s["Q"](L)[s["start"]]
    assert abs(v - -1.235453) < 1e-6
    assert {tuple(a) for a in JOINT[q > v - 1e-6]} == {(3, 3), (4, 4)}
    # acting greedily on the DP values in the real env reaches both goals in exactly 8 steps
    env = make_env("bridge", "hard", episode_limit=L)
    for first in ((3, 3), (4, 4)):
        env.reset()
        state, ret, a = s["start"], 0.0, np.array(first)
        for k in range(L):
            *_, r, term, trunc, _ = env.step(a)
            ret += r
            state = s["nxt"][state, a[0] * 5 + a[1]]
            if term or trunc:
                break
            a = JOINT[int(np.argmax(s["Q"](L - k - 1)[state]))]
        assert term and k == 7 and abs(ret - -1.235453) < 1e-6


def test_dp_uniform_random_exact_statistics():
    for L, mean, std in ((20, -7.09, 1.05), (50, -17.53, 3.94)):
        s = solve(L, "uniform")
        m = s["V"][L][s["start"]]
        sd = np.sqrt(s["M"][s["start"]] - m ** 2)
        # simulation estimates (docs/environments.md#bridge-reference-values); the exact values agree
        assert abs(m - mean) < 0.05 and abs(sd - std) < 0.05, (L, m, sd)
    assert abs(s["P"][s["start"]] - 0.033) < 0.005  # both agents reach their goals (L = 50)


def test_uniform_random_rollouts_match_exact_values():
    """Vectorised uniform-random rollouts (the same step function the env uses)
    agree with the exact DP statistics within sampling error."""
    rng = np.random.default_rng(0)
    E, L = 20000, 50
    pos = np.broadcast_to(np.array(START), (E, 2, 2)).copy()
    done = np.zeros((E, 2), bool)
    alive = np.ones(E, bool)
    ret = np.zeros(E)
    success = np.zeros(E, bool)
    for t in range(L):
        a = rng.integers(0, 5, size=(E, 2))
        new, new_done, r, term, trunc = bridge_step(pos, done, t, a, L)
        ret += np.where(alive, r, 0.0)
        success |= alive & term
        alive &= ~(term | trunc)
        pos, done = new, new_done
    assert not alive.any()
    exact = solve(L, "uniform")
    m = exact["V"][L][exact["start"]]
    sd = np.sqrt(exact["M"][exact["start"]] - m ** 2)
    p = exact["P"][exact["start"]]
    assert abs(ret.mean() - m) < 4 * sd / np.sqrt(E)
    assert abs(ret.std() - sd) < 0.05 * sd
    assert abs(success.mean() - p) < 4 * np.sqrt(p * (1 - p) / E)
    # and the env class itself (a few hundred episodes, L = 20)
    rand = lambda obs, state, avail: rng.integers(0, 5, size=(obs.shape[0], 2))
    res = evaluate(make_env("bridge", "hard"), rand, episodes=400, n_envs=8)
    exact = solve(20, "uniform")
    m20 = exact["V"][20][exact["start"]]
    sd20 = np.sqrt(exact["M"][exact["start"]] - m20 ** 2)
    assert abs(res["return_mean"] - m20) < 4 * sd20 / np.sqrt(400)


# ------------------------------------------------------------- matrix games
@pytest.mark.parametrize("task, payoff", [("penalty_xor", [[0, 1], [1, -2]]), ("xor", [[0, 1], [1, 0]])])
def test_matrix_games(task, payoff):
    env = make_env("matrix", task, episode_limit=5)
    obs, state, avail = env.reset()
    np.testing.assert_array_equal(obs, [[0, 1, 0, 1]] * 2)
    np.testing.assert_array_equal(state, [0, 1, 0, 1])
    assert avail.all() and avail.shape == (2, 2)
    for k, (a0, a1) in enumerate(itertools.product(range(2), range(2))):
        obs2, state2, _, r, term, trunc, _ = env.step(np.array([a0, a1]))
        assert r == payoff[a0][a1] and not term and not trunc and (obs2 == obs).all()
    *_, r, term, trunc, _ = env.step(np.array([0, 1]))
    assert r == 1 and trunc and not term  # the last step pays too; a time limit, not a true end
    assert make_env("matrix", task).episode_limit == 100  # the shipped AlberDICE config


# -------------------------------------------- optional: the official buffers
BUFFERS = os.environ.get("ALBERDICE_BUFFERS")


@pytest.mark.skipif(not BUFFERS, reason="set ALBERDICE_BUFFERS to the official AlberDICE buffer/ folder")
@pytest.mark.parametrize("folder, env, task", [
    ("bridge_from_start/buffer_optimal", "bridge", "hard"), ("bridge_from_start/buffer_mix", "bridge", "hard"),
    ("mmdp_game_1_from_start/buffer_02", "matrix", "penalty_xor"),
    ("mmdp_game_1_from_start/buffer_02_20", "matrix", "penalty_xor"),
    ("mmdp_game_1_from_start/buffer_00_02_20", "matrix", "penalty_xor"),
    ("mmdp_game_1_from_start/buffer_random", "matrix", "penalty_xor"),
])
def test_replay_official_buffers(folder, env, task):
    d = Path(BUFFERS) / folder
    b = {k: np.load(d / f"{k}.npy") for k in ("obs", "state", "actions", "reward", "terminated", "filled")}
    for e in range(len(b["obs"])):
        T = int(b["filled"][e].sum()) - 1
        en = make_env(env, task, episode_limit=50)
        obs, state, _ = en.reset()
        assert (obs == b["obs"][e, 0]).all() and (state == b["state"][e, 0]).all()
        for t in range(T):
            obs, state, _, r, term, trunc, _ = en.step(b["actions"][e, t, :, 0])
            assert abs(r - b["reward"][e, t, 0]) < 1e-6
            assert (obs == b["obs"][e, t + 1]).all() and (state == b["state"][e, t + 1]).all()
            assert (term or trunc) == bool(b["terminated"][e, t, 0])
        assert term or trunc
