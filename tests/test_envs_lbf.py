"""Level-Based Foraging: the wrapper against the lbforaging package (observations, team
reward, available actions), termination vs the time limit, the state, task names."""

import copy

import numpy as np
import pytest

gymnasium = pytest.importorskip("gymnasium")
pytest.importorskip("lbforaging")

from common import OfflineMarlError  # noqa: E402
from common.envs import EnvError, make_env  # noqa: E402
from common.scripted import LBFExpert  # noqa: E402
from _env_checks import assert_reset_depends_on_seed_only  # noqa: E402


@pytest.mark.parametrize("task,n,f", [("8x8-2p-2f-coop", 2, 2), ("10x10-3p-3f", 3, 3), ("15x15-4p-3f", 4, 3),
                                      ("2s-8x8-2p-2f", 2, 2)])
def test_dimensions(task, n, f):
    env = make_env("lbf", task)
    assert (env.n_agents, env.obs_dim, env.state_dim, env.n_actions) == (n, 3 * (f + n), 3 * (f + n), 6)
    assert env.discrete and env.episode_limit == 50
    obs, state, avail = env.reset(seed=0)
    assert obs.shape == (n, 3 * (f + n)) and obs.dtype == np.float32 and state.dtype == np.float32
    assert avail.shape == (n, 6) and avail.dtype == bool and avail[:, 0].all()


def test_observations_and_team_reward_match_the_package():
    """Same seed, same actions: the package's observations, the sum of its rewards, and
    its done flag (= terminated or truncated) at every step."""
    hits = 0
    for seed in range(6):
        env = make_env("lbf", "8x8-2p-2f")
        ref = gymnasium.make("Foraging-8x8-2p-2f-v3", disable_env_checker=True)
        obs, _, avail = env.reset(seed=seed)
        ref_obs, _ = ref.reset(seed=seed)
        rng = np.random.default_rng(seed)
        expert = LBFExpert()
        expert.reset(env, rng)
        while True:
            np.testing.assert_array_equal(obs, np.stack(ref_obs))
            a = expert(env, obs, None, avail) if rng.random() < 0.5 else rng.integers(0, 6, size=2)
            obs, _, avail, r, term, trunc, _ = env.step(a)
            ref_obs, ref_r, ref_done, _, _ = ref.step(a.tolist())
            assert r == pytest.approx(sum(ref_r), abs=1e-12) and (term or trunc) == ref_done
            hits += r > 0
            if ref_done:
                break
    assert hits > 0  # some food was loaded, so the sum was tested on non-zero rewards


def test_available_actions_are_the_packages_valid_actions():
    """An action marked unavailable is one the package turns into 'none': stepping a copy
    of the game with it gives exactly what 'none' gives; every available move moves."""
    env = make_env("lbf", "10x10-3p-3f")
    rng = np.random.default_rng(0)
    checked = 0
    for seed in range(3):
        obs, state, avail = env.reset(seed=seed)
        for _ in range(25):
            for i in range(env.n_agents):
                for a in range(6):
                    base = np.zeros(env.n_agents, dtype=np.int64)  # the others stay
                    acts = base.copy()
                    acts[i] = a
                    g1, g2 = copy.deepcopy(env.game), copy.deepcopy(env.game)
                    g1.step(acts.tolist())
                    g2.step(base.tolist())
                    same = [p.position for p in g1.players] == [p.position for p in g2.players] and \
                        (g1.field == g2.field).all()
                    if not avail[i, a]:
                        assert same
                        checked += 1
                    elif 1 <= a <= 4:  # an available move into a cell no other agent stands on
                        y, x = env.game.players[i].position
                        to = (y + (-1, 1, 0, 0)[a - 1], x + (0, 0, -1, 1)[a - 1])
                        if all(p.position != to for p in env.game.players):
                            assert g1.players[i].position == to
            obs, state, avail, r, term, trunc, _ = env.step((rng.random(avail.shape) * avail).argmax(-1))
            if term or trunc:
                break
    assert checked > 50


def test_collecting_everything_terminates_with_return_one():
    env = make_env("lbf", "8x8-2p-2f-coop")
    expert = LBFExpert()
    for seed in range(3):
        obs, state, avail = env.reset(seed=seed)
        expert.reset(env, np.random.default_rng(seed))
        total, t = 0.0, 0
        while True:
            obs, state, avail, r, term, trunc, _ = env.step(expert(env, obs, state, avail))
            total, t = total + r, t + 1
            if term or trunc:
                break
        assert term and not trunc and t < 50 and total == pytest.approx(1.0)
        assert (state[:6].reshape(2, 3) == [-1, -1, 0]).all()  # no food left in the state
        with pytest.raises(RuntimeError, match="reset"):
            env.step(np.zeros(2, dtype=np.int64))


def test_load_is_available_exactly_next_to_food():
    """The documented rule, read off the grid itself: agent i may load iff a food lies in one of
    the four cells next to it (a mask with load always on, or always off, fails)."""
    env = make_env("lbf", "8x8-2p-2f-coop")
    expert = LBFExpert()
    seen = {True: 0, False: 0}
    for seed in range(4):
        obs, state, avail = env.reset(seed=seed)
        rng = np.random.default_rng(seed)
        expert.reset(env, rng)
        while True:
            field = env.game.field
            for i, p in enumerate(env.game.players):
                y, x = p.position
                near = any(0 <= y + dy < field.shape[0] and 0 <= x + dx < field.shape[1] and field[y + dy, x + dx] > 0
                           for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)))
                assert avail[i, 5] == near
                seen[near] += 1
            a = expert(env, obs, state, avail) if rng.random() < 0.8 else rng.integers(0, 6, size=2)
            obs, state, avail, r, term, trunc, _ = env.step(a)
            if term or trunc:
                break
    assert seen[True] > 10 and seen[False] > 10


def test_the_last_food_on_the_last_allowed_step_terminates():
    """An episode that ends with all food collected exactly at ``episode_limit`` is terminated,
    not truncated (the package reports one flag for both), and cannot be stepped further."""
    env = make_env("lbf", "8x8-2p-2f-coop")
    expert = LBFExpert()
    obs, state, avail = env.reset(seed=1)
    expert.reset(env, np.random.default_rng(1))
    actions = []
    while True:
        actions.append(expert(env, obs, state, avail))
        obs, state, avail, r, term, trunc, _ = env.step(actions[-1])
        if term or trunc:
            break
    assert term and len(actions) > 2
    tight = make_env("lbf", "8x8-2p-2f-coop", episode_limit=len(actions))
    tight.reset(seed=1)
    for t, a in enumerate(actions):
        *_, r, term, trunc, _ = tight.step(a)
        last = t == len(actions) - 1
        assert (term, trunc) == (last, False)
    with pytest.raises(RuntimeError, match="reset"):
        tight.step(actions[-1])
    short = make_env("lbf", "8x8-2p-2f-coop", episode_limit=len(actions) - 1)  # one step less: cut with food left
    short.reset(seed=1)
    flags = [short.step(a)[4:6] for a in actions[:-1]]
    assert flags[-1] == (False, True)


def test_time_limit_is_truncation():
    for limit in (50, 7):
        env = make_env("lbf", "8x8-2p-2f-coop", **({} if limit == 50 else {"episode_limit": limit}))
        assert env.episode_limit == limit
        for seed in range(2):
            env.reset(seed=seed)
            flags = [env.step(np.zeros(2, dtype=np.int64))[4:6] for _ in range(limit)]
            assert flags == [(False, False)] * (limit - 1) + [(False, True)]


def test_state_is_the_full_sight_view_in_agent_order():
    full = make_env("lbf", "8x8-2p-2f")
    part = make_env("lbf", "2s-8x8-2p-2f")
    rng = np.random.default_rng(1)
    differs = False
    for seed in range(3):
        o1, s1, a1 = full.reset(seed=seed)
        o2, s2, a2 = part.reset(seed=seed)
        for _ in range(20):
            np.testing.assert_array_equal(s1, o1[0])  # agent 0 sees everything, itself first
            np.testing.assert_array_equal(s1, s2)  # the state does not depend on sight
            np.testing.assert_array_equal(a1, a2)
            differs |= not np.array_equal(o1, o2)
            a = (rng.random(a1.shape) * a1).argmax(-1)
            o1, s1, a1, _, t1, u1, _ = full.step(a)
            o2, s2, a2, _, t2, u2, _ = part.step(a)
            if t1 or u1:
                break
    assert differs  # sight 2 hides something


def test_an_unknown_task_is_reported_once_without_the_evaluation_hint(tmp_path):
    """An algorithm file given a task that does not exist says so once, and does not suggest
    training without the environment (no environment can be installed for it)."""
    from _baselines_common import load_script

    bc = load_script("bc")
    with pytest.raises(OfflineMarlError) as info:
        bc.main(bc.Args(env="lbf", task="9x9", quality="expert", total_steps=1, device="cpu",
                        run_dir=str(tmp_path / "run")))
    msg = str(info.value)
    assert msg.count("unknown lbf task '9x9'") == 1 and "only needed for evaluation" not in msg


def test_task_names():
    assert make_env("lbf", "Foraging-8x8-2p-2f-coop-v3").n_agents == 2
    with pytest.raises(EnvError, match="unknown lbf task.*8x8-2p-2f-coop"):
        make_env("lbf", "8x8-2p")
    with pytest.raises(EnvError, match="unknown lbf task"):
        make_env("lbf", "Foraging-grid-8x8-2p-2f-v3")
    with pytest.raises(EnvError, match="unknown lbf option"):
        make_env("lbf", "8x8-2p-2f", sight=2)
    with pytest.raises(EnvError, match="episode_limit"):
        make_env("lbf", "8x8-2p-2f", episode_limit=0)


def test_deterministic_under_seed():
    def run(seed):
        env = make_env("lbf", "10x10-3p-3f")
        rng = np.random.default_rng(0)
        obs, _, avail = env.reset(seed=seed)
        out = [obs]
        for _ in range(30):
            obs, _, avail, _, term, trunc, _ = env.step((rng.random(avail.shape) * avail).argmax(-1))
            out.append(obs)
            if term or trunc:
                break
        return np.concatenate(out)

    np.testing.assert_array_equal(run(3), run(3))
    assert not np.array_equal(run(3), run(4))


def test_a_reset_depends_on_its_seed_only():
    """lbforaging keeps the players' positions of the previous episode while it places the new
    ones; the wrapper clears them, so an episode replayed from its seed in any environment (a
    worker process, a fresh one) is the same episode."""
    assert_reset_depends_on_seed_only("lbf", "8x8-2p-2f-coop", n_actions=6, max_cut=30)
