"""common.collect: the generated Penalty-XOR and Bridge datasets match the original
AlberDICE datasets (docs/datasets.md#the-original-alberdice-datasets: statistics within
sampling error) and replay exactly in the environment, generation is deterministic, and the random and policy-rollout paths work
on any environment."""

import json
import textwrap

import numpy as np
import pytest

from common import OfflineMarlError
from common import collect as collect_module
from common import envs as envs_module
from common.collect import (RECIPES, XOR_SUPPORTS, NoisyPolicy, generate, has_recipe, load_act_fn, main,
                            rollout, uniform_available)
from common.data import DatasetError, OfflineDataset
from common.envs import BRIDGE_GOALS, PAYOFFS, MultiAgentEnv, make_env, make_env_for

BRIDGE_OPTIMAL_RETURNS = (-1.235453, -1.259059, -1.290404)  # one per retreat choice, each 1/3 (docs/datasets.md)
XOR_NAMES = [(task, q) for task in ("penalty_xor", "xor") for q in "abcd"]
GENERATED = [("matrix", t, q) for t, q in XOR_NAMES] + [
    ("matrix", "penalty_xor", "random"), ("bridge", "hard", "optimal"), ("bridge", "hard", "mix"),
    ("bridge", "easy", "random")]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Every small-game recipe, generated once with seed 0."""
    root = tmp_path_factory.mktemp("generated")
    out = {}
    for env, task, q in GENERATED:
        path = generate(env, task, q, root / f"{env}_{task}_{q}", seed=0)
        out[(env, task, q)] = OfflineDataset.load(path)
    return out


def episode_rows(ds, e):
    es = ds.episode_start
    return np.arange(es[e], es[e + 1])


# ---------------------------------------------------------------- statistics
@pytest.mark.parametrize("task, quality", XOR_NAMES)
def test_xor_datasets(data, task, quality):
    ds = data[("matrix", task, quality)]
    support = XOR_SUPPORTS[quality]
    assert ds.n_episodes == 100 and (ds.episode_lengths == 50).all()
    assert ds.meta["env_options"] == {"episode_limit": 50} and ds.meta["source"] == "generated"
    steps = ~ds.last
    assert ds.timeout.sum() == 100 and not ds.terminal.any()  # every episode ends by the 50-step limit
    joint = ds.actions[steps]
    # every joint action lies in the support, each with frequency 1/|support| (4 sigma)
    n = len(joint)
    assert n == 5000
    for a0 in range(2):
        for a1 in range(2):
            f = np.mean((joint[:, 0] == a0) & (joint[:, 1] == a1))
            p = 1 / len(support) if (a0, a1) in support else 0.0
            assert abs(f - p) <= 4 * np.sqrt(p * (1 - p) / n) + 1e-12, ((a0, a1), f, p)
    # consecutive steps are independent: lag-1 correlation of the joint action index ~ 0
    if len(support) > 1:
        idx = (joint[:, 0] * 2 + joint[:, 1]).reshape(100, 50)
        c = np.corrcoef(idx[:, :-1].ravel(), idx[:, 1:].ravel())[0, 1]
        assert abs(c) < 4 / np.sqrt(n)
    # returns: per-step payoff i.i.d. over the support -> mean 50 mu, std sqrt(50 var)
    pay = np.array([PAYOFFS[task][i, j] for i, j in support], np.float64)
    mu, var = pay.mean(), pay.var()
    ret = ds.episode_returns()
    assert abs(ret.mean() - 50 * mu) <= 4 * np.sqrt(50 * var / 100) + 1e-9
    if var == 0:
        assert ret.std() == 0
    else:
        assert 0.75 < ret.std() / np.sqrt(50 * var) < 1.25
    if (task, quality) == ("penalty_xor", "c"):
        assert abs(ret.mean() - 33.33) < 1.4  # original buffer: 33.29 +- 3.38 (theory 33.33 +- 3.33)
    if quality == "d":  # the joint draw over all four is the same as independent agents
        assert abs(np.corrcoef(joint[:, 0], joint[:, 1])[0, 1]) < 4 / np.sqrt(n)


def test_bridge_optimal(data):
    ds = data[("bridge", "hard", "optimal")]
    assert ds.n_episodes == 500 and (ds.episode_lengths == 8).all()
    assert ds.terminal.sum() == 500 and not ds.timeout.any()  # true ends: both agents on their goals
    assert ds.meta["env_options"] == {"episode_limit": 50}
    ret = ds.episode_returns()
    assert np.abs(ret[:, None] - np.array(BRIDGE_OPTIMAL_RETURNS)[None]).min(1).max() < 1e-5
    exact = np.mean(BRIDGE_OPTIMAL_RETURNS)
    assert abs(ret.mean() - exact) < 4 * np.std(BRIDGE_OPTIMAL_RETURNS) / np.sqrt(500)
    assert abs(ret.mean() - -1.262) < 0.004 and abs(ret.std() - 0.0227) < 0.003
    for v in BRIDGE_OPTIMAL_RETURNS:  # each retreat choice about 1/3 of the episodes
        assert abs(np.mean(np.abs(ret - v) < 1e-5) - 1 / 3) < 4 * np.sqrt(2 / 9 / 500)
    starts = ds.episode_start[:-1]
    first = [tuple(a) for a in ds.actions[starts]]
    assert set(first) == {(3, 3), (4, 4)}
    assert abs(first.count((3, 3)) - 250) < 4 * np.sqrt(500 / 4)
    paths = {ds.state[episode_rows(ds, e)][:, [0, 1, 4, 5]].tobytes() for e in range(500)}
    assert len(paths) == 16
    # an agent on its goal records one of the actions that keep it there, each about 1/3 of the time
    steps = ~ds.last
    pos = ds.state[:, [0, 1, 4, 5]].reshape(-1, 2, 2)
    for agent, keep in ((0, (0, 2, 3)), (1, (0, 1, 4))):
        on_goal = steps & (pos[:, agent] == BRIDGE_GOALS[agent]).all(-1)
        acts = ds.actions[on_goal, agent]
        assert set(np.unique(acts)) == set(keep)
        counts = np.array([(acts == a).sum() for a in keep])
        assert np.abs(counts / len(acts) - 1 / 3).max() < 4 * np.sqrt(2 / 9 / len(acts))


def test_bridge_mix(data):
    mix, opt = data[("bridge", "hard", "mix")], data[("bridge", "hard", "optimal")]
    assert mix.n_episodes == 1000 and mix.meta["quality"] == "mix"
    tail = mix.select_episodes(np.arange(500, 1000))
    for k, v in opt.arrays.items():  # episodes 500-999 are the optimal dataset, array for array
        np.testing.assert_array_equal(tail.arrays[k], v, err_msg=k)
    rand = mix.select_episodes(np.arange(500))
    lengths, ret = rand.episode_lengths, rand.episode_returns()
    last_step = rand.episode_start[1:] - 2
    final = rand.state[rand.episode_start[1:] - 1][:, [0, 1, 4, 5]].reshape(-1, 2, 2)
    both_home = (final == BRIDGE_GOALS).all(-1).all(-1)
    # true ends exactly when both agents reached their goals; the rest hit the 50-step limit (stored as timeout)
    np.testing.assert_array_equal(rand.terminal[last_step], both_home)
    np.testing.assert_array_equal(rand.timeout[last_step], ~both_home)
    assert (lengths[~both_home] == 50).all() and lengths.max() == 50
    # uniform random, L = 50: exact (DP) mean -17.5586, std 3.9609, both home 3.50 %; original simulation -17.53 +- 3.94, 3.3 %
    assert abs(ret.mean() - -17.5586) < 4 * 3.9609 / np.sqrt(500)
    assert abs(ret.std() - 3.9609) < 0.5
    assert abs(both_home.mean() - 0.035) < 4 * np.sqrt(0.035 * 0.965 / 500)
    # the whole mix: original buffer -9.464 +- 8.652
    assert abs(mix.episode_returns().mean() - -9.464) < 0.4 and abs(mix.episode_returns().std() - 8.652) < 0.4
    # the random policy records every action uniformly, done agents included
    acts = rand.actions[~rand.last]
    freq = np.bincount(acts.ravel(), minlength=5) / acts.size
    assert np.abs(freq - 0.2).max() < 4 * np.sqrt(0.16 / acts.size)


def test_bridge_cut_to_the_published_episode_limit(data):
    """mix-l20 / optimal-l20: the episodes as the published AlberDICE loader reads them with the Bridge
    config's limit, the first 20 steps of each; the cut ones end by time limit, the rest keep their flags."""
    for q in ("mix", "optimal"):
        full = data[("bridge", "hard", q)]
        cut = collect_module.cut_episodes(full, 20, f"{q}-l20")
        assert cut.n_episodes == full.n_episodes and cut.meta["env_options"]["episode_limit"] == 20
        assert cut.meta["quality"] == f"{q}-l20" and cut.episode_lengths.max() <= 20
        np.testing.assert_array_equal(cut.episode_lengths, np.minimum(full.episode_lengths, 20))
        last_cut, last_full = cut.episode_start[1:] - 2, full.episode_start[1:] - 2
        was_cut = full.episode_lengths > 20
        np.testing.assert_array_equal(cut.timeout[last_cut][was_cut], True)
        np.testing.assert_array_equal(cut.terminal[last_cut][was_cut], False)
        np.testing.assert_array_equal(cut.terminal[last_cut][~was_cut], full.terminal[last_full][~was_cut])
        for e in (0, full.n_episodes - 1):  # the kept steps are the original's, observation for observation
            rc, rf = episode_rows(cut, e), episode_rows(full, e)[: len(episode_rows(cut, e))]
            for k in ("obs", "state", "actions", "reward", "avail"):
                np.testing.assert_array_equal(cut.arrays[k][rc[:-1]], full.arrays[k][rf[:-1]], err_msg=k)
            np.testing.assert_array_equal(cut.obs[rc[-1]], full.obs[rf[-1]])
    assert has_recipe("bridge", "hard", "mix-l20") and has_recipe("bridge", "hard", "optimal-l20")


# -------------------------------------------------------------- exact replay
@pytest.mark.parametrize("name", GENERATED, ids=["/".join(n) for n in GENERATED])
def test_replay_reproduces_dataset(data, name):
    """Replaying each episode's actions in make_env_for(meta) reproduces
    its rewards (to 1e-6), next observations and states (exactly) and end flags,
    and the episode ends exactly at its last step."""
    ds = data[name]
    env = make_env_for(ds.meta)
    assert env.episode_limit == 50
    for e in range(ds.n_episodes):
        rows = episode_rows(ds, e)
        seen = [env.reset()]
        rewards, ends = [], []
        for row in rows[:-1]:
            obs, state, avail, r, term, trunc, _ = env.step(ds.actions[row])
            seen.append((obs, state, avail))
            rewards.append(r)
            ends.append((term, trunc))
        for k, key in enumerate(("obs", "state", "avail")):
            np.testing.assert_array_equal(np.stack([x[k] for x in seen]), ds.arrays[key][rows], err_msg=f"{key} {e}")
        np.testing.assert_allclose(rewards, ds.reward[rows[:-1]], rtol=0, atol=1e-6)
        ends = np.array(ends)
        np.testing.assert_array_equal(ends[:, 0], ds.terminal[rows[:-1]])
        np.testing.assert_array_equal(ends[:, 1], ds.timeout[rows[:-1]])
        assert ends[-1].any() and not ends[:-1].any()  # the episode ends exactly at its last step


# --------------------------------------------------------------- determinism
def test_same_seed_same_arrays(tmp_path, data):
    for env, task, q in (("bridge", "hard", "optimal"), ("matrix", "xor", "c")):
        again = OfflineDataset.load(generate(env, task, q, tmp_path / f"{q}0", seed=0))
        for k, v in data[(env, task, q)].arrays.items():
            np.testing.assert_array_equal(again.arrays[k], v, err_msg=k)
        other = OfflineDataset.load(generate(env, task, q, tmp_path / f"{q}1", seed=1))
        assert not np.array_equal(other.actions, again.actions)
        assert other.meta["provenance"]["seed"] == 1
        assert other.meta["provenance"]["command"].startswith("python -m common.collect recipe ")


def test_recipes_and_errors(tmp_path):
    assert has_recipe("bridge", "hard", "mix") and has_recipe("matrix", "xor", "a")
    assert not has_recipe("bridge", "easy", "optimal") and not has_recipe("bridge", "hard", "medium")
    assert all(len(k) == 3 for k in RECIPES)
    with pytest.raises(DatasetError, match="bridge/hard/optimal"):
        generate("bridge", "hard", "medium", tmp_path / "x")


# ------------------------------------------------------------ random, any env
def test_random_cli_on_matrix_and_bridge(tmp_path):
    for env, task, K in (("matrix", "xor", 2), ("bridge", "easy", 5)):
        out = tmp_path / env
        argv = ["random", "--env", env, "--task", task, "--episodes", "40", "--seed", "3",
                "--env-options", "episode_limit=6", "--out", str(out)]
        main(argv)
        ds = OfflineDataset.load(out)
        assert ds.n_episodes == 40 and ds.n_actions == K and ds.episode_lengths.max() <= 6
        m = ds.meta
        assert m["quality"] == "random" and m["source"] == "generated" and m["env_options"] == {"episode_limit": 6}
        assert m["provenance"]["command"] == "python -m common.collect " + " ".join(argv)
        assert m["provenance"]["seed"] == 3
        acts = ds.actions[~ds.last]
        freq = np.bincount(acts.ravel(), minlength=K) / acts.size
        assert np.abs(freq - 1 / K).max() < 4 * np.sqrt((1 / K) * (1 - 1 / K) / acts.size)


class FakeContinuous(MultiAgentEnv):
    """A tiny continuous-action environment (3 agents, 2-D actions) whose state
    records the last joint action, to check the continuous paths."""

    n_agents, obs_dim, state_dim, discrete, n_actions, act_dim = 3, 2, 6, False, 1, 2

    def __init__(self, task, episode_limit=5):
        self.episode_limit, self._t = episode_limit, 0

    def reset(self, seed=None):
        self._t = 0
        return np.zeros((3, 2), np.float32), np.zeros(6, np.float32), np.ones((3, 1), bool)

    def step(self, actions):
        a = np.asarray(actions, np.float32)
        assert a.shape == (3, 2) and np.abs(a).max() <= 1
        self._t += 1
        return a.copy(), a.reshape(-1), np.ones((3, 1), bool), float(a.sum()), False, self._t >= self.episode_limit, {}


@pytest.fixture
def fake_family(monkeypatch):
    monkeypatch.setitem(envs_module.FAMILIES, "fakecont", (lambda task, **o: FakeContinuous(task, **o), None))


def test_random_continuous(tmp_path, fake_family):
    main(["random", "--env", "fakecont", "--task", "t", "--episodes", "30", "--out", str(tmp_path / "c")])
    ds = OfflineDataset.load(tmp_path / "c")
    assert not ds.discrete and ds.actions.shape[1:] == (3, 2) and ds.avail.shape[1:] == (3, 1)
    acts = ds.actions[~ds.last]
    assert np.abs(acts).max() <= 1 and abs(acts.mean()) < 0.1 and abs(acts.var() - 1 / 3) < 0.05
    np.testing.assert_allclose(ds.state[1:][~ds.last[:-1]], acts.reshape(-1, 6))  # what the env saw


# ----------------------------------------------------------- policy rollouts
FAKE_ALGO = textwrap.dedent('''
    """A stand-in algorithm file: its checkpoint is a JSON file with one joint action."""
    import json
    import numpy as np

    def load_policy(checkpoint, device="cpu"):
        joint = np.array(json.load(open(checkpoint))["joint"])

        def act(obs, state, avail):
            return np.tile(joint, (obs.shape[0], 1))

        return act
''')


def test_policy_rollout_with_fake_algorithm_file(tmp_path):
    algo = tmp_path / "fake_algo.py"
    algo.write_text(FAKE_ALGO)
    ckpt = tmp_path / "ckpt.json"
    ckpt.write_text(json.dumps({"joint": [3, 4]}))
    base = ["policy", "--env", "bridge", "--task", "hard", "--algo", str(algo), "--checkpoint", str(ckpt),
            "--episodes", "12", "--n-envs", "4", "--env-options", "episode_limit=7"]
    main(base + ["--out", str(tmp_path / "greedy")])
    ds = OfflineDataset.load(tmp_path / "greedy")
    assert ds.n_episodes == 12 and (ds.episode_lengths == 7).all() and ds.timeout.sum() == 12
    assert (ds.actions[~ds.last] == [3, 4]).all()
    assert ds.meta["quality"] == "policy" and ds.meta["provenance"]["algo"] == str(algo)
    # (Right, Left) from the start is a head-on swap: nobody ever moves
    assert (ds.state[:, [0, 1, 4, 5]] == [1, 2, 1, 3]).all()
    # epsilon = 1: every action is redrawn uniformly
    main(base + ["--noise", "1.0", "--episodes", "60", "--out", str(tmp_path / "noisy")])
    acts = OfflineDataset.load(tmp_path / "noisy").actions
    acts = acts[~OfflineDataset.load(tmp_path / "noisy").last]
    freq = np.bincount(acts.ravel(), minlength=5) / acts.size
    assert np.abs(freq - 0.2).max() < 4 * np.sqrt(0.16 / acts.size)
    # deterministic given the seed
    main(base + ["--noise", "1.0", "--episodes", "60", "--out", str(tmp_path / "noisy2")])
    np.testing.assert_array_equal(OfflineDataset.load(tmp_path / "noisy2").actions,
                                  OfflineDataset.load(tmp_path / "noisy").actions)


def test_policy_errors(tmp_path):
    with pytest.raises(OfflineMarlError, match="no checkpoint"):
        load_act_fn(tmp_path / "missing.pt", tmp_path / "a.py")
    (tmp_path / "c.pt").write_text("x")
    with pytest.raises(OfflineMarlError, match="not a file"):
        load_act_fn(tmp_path / "c.pt", tmp_path / "a.py")
    (tmp_path / "a.py").write_text("x = 1\n")
    with pytest.raises(OfflineMarlError, match="load_policy"):
        load_act_fn(tmp_path / "c.pt", tmp_path / "a.py")
    env = make_env("bridge", "hard")
    with pytest.raises(OfflineMarlError, match=r"needs \[2, 2\] integers"):
        rollout(env, lambda o, s, a: np.zeros((2, 3), np.int64), 2, n_envs=2, progress=False)
    with pytest.raises(OfflineMarlError, match="KEY=VALUE"):
        main(["random", "--env", "bridge", "--task", "hard", "--env-options", "episode_limit", "--out",
              str(tmp_path / "o")])


class CountingPolicy:
    """Stateful: counts the episodes it was reset for and acts (stay, stay)."""

    def __init__(self):
        self.resets = 0

    def reset(self, mask):
        self.resets += int(np.sum(mask))

    def __call__(self, obs, state, avail):
        return np.zeros(obs.shape[:2], np.int64)


def test_rollout_resets_stateful_policies_and_keeps_order():
    env = make_env("bridge", "hard", episode_limit=3)
    pol = CountingPolicy()
    eps = rollout(env, pol, 10, n_envs=4, progress=False)
    assert pol.resets == 10 and len(eps) == 10 and all(len(e["reward"]) == 3 for e in eps)


def test_noise_helpers():
    rng = np.random.default_rng(0)
    avail = np.zeros((2000, 2, 4), bool)
    avail[:, 0, [1, 3]] = True
    avail[:, 1, 2] = True
    a = uniform_available(avail, rng)
    assert set(np.unique(a[:, 0])) == {1, 3} and (a[:, 1] == 2).all()
    assert abs((a[:, 0] == 1).mean() - 0.5) < 0.05
    zero = lambda obs, state, avail: np.zeros(obs.shape[:2] + (3,), np.float32)
    noisy = NoisyPolicy(zero, 0.5, discrete=False, rng=rng)
    x = noisy(np.zeros((4000, 2, 1)), None, None)
    assert x.dtype == np.float32 and np.abs(x).max() <= 1
    assert abs(x.mean()) < 0.02 and 0.44 < x.std() < 0.49  # N(0, 0.5) clipped to [-1, 1]: std 0.467
    with pytest.raises(OfflineMarlError):
        NoisyPolicy(zero, 1.5, discrete=True, rng=rng)
