"""baselines/bc.py and baselines/optidice.py: closed forms on Penalty-XOR, continuous BC, smoke, resume."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.runs import load_checkpoint
from common import collect
from common import envs as common_envs
from test_alberdice import FakeSMAC  # the same SMAC stand-in as the AlberDICE smoke tests

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"baselines_{name}", ROOT / "baselines" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the file executes
    spec.loader.exec_module(mod)
    return mod


BC = load_script("bc")
OD = load_script("optidice")
PAYOFF = np.array([[0.0, 1.0], [1.0, -2.0]])
XOR_OBS = torch.tensor([[[0, 1, 0, 1], [0, 1, 0, 1]]], dtype=torch.float32)


def marginals(act_fn) -> np.ndarray:
    """Each agent's action probabilities at the matrix game's observation, ``[2, 2]``."""
    return act_fn.probs(XOR_OBS, torch.ones(1, 2, 2, dtype=torch.bool))[0].numpy()


def train(mod, ds, steps: int, lr: float = 1e-2, alpha: float = 1.0, seed: int = 0, anneal: bool = False):
    """The update of the script's main loop on an in-memory dataset (no run directory).
    ``anneal``: the policy's learning rate decays linearly to 0, so that the final parameters are a
    converged point and not a snapshot of Adam's noise (which depends on the CPU's float kernels)."""
    torch.manual_seed(seed)
    ds = ds.to("cpu").seed(seed)
    policy = mod.Policy(ds.n_agents, ds.obs_dim, ds.discrete, ds.n_actions if ds.discrete else ds.act_dim, 32)
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1 - k / steps) if anneal else None
    nu = OD.Nu(ds.state_dim, 32) if mod is OD else None
    opt_nu = torch.optim.Adam(nu.parameters(), lr=lr) if nu is not None else None
    for _ in range(steps):
        b = ds.sample(256)
        if mod is BC:
            loss = BC.bc_loss(policy(b["obs"]), b["actions"], b["avail"], ds.discrete)
        else:
            s0 = ds.sample_initial(256)
            v = nu(torch.cat([b["state"], b["next_state"], s0["state"]]))
            e = OD.advantage(b["reward"], v[:256], v[256:512], b["done"], 0.99)
            opt_nu.zero_grad()
            OD.nu_loss(e, v[512:], alpha, 0.99).backward()
            opt_nu.step()
            w = OD.correction_weights(e.detach(), alpha)
            loss = OD.weighted_bc_loss(policy(b["obs"]), b["actions"], b["avail"], w, ds.discrete)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
    return policy, nu


def test_bc_on_penalty_xor_b_is_uniform_and_plays_ood_joint_actions():
    """Dataset (b) = {AB, BA}: each agent's marginal is uniform, so BC plays AA and BB (never in the
    data) half of the time (paper Table 6, BC row)."""
    ds = collect.xor_dataset("penalty_xor", "b")
    policy, _ = train(BC, ds, 150)
    p = marginals(BC.make_act_fn(policy, torch.device("cpu")))
    empirical = np.bincount(ds.actions[~ds.last][:, 0], minlength=2) / ds.n_transitions
    np.testing.assert_allclose(p[0], empirical, atol=0.03)
    np.testing.assert_allclose(p, 0.5, atol=0.05)
    joint = np.outer(p[0], p[1])
    assert joint[0, 0] + joint[1, 1] > 0.45


def test_optidice_weighted_bc_matches_closed_form_on_penalty_xor_c():
    """In the one-state matrix game nu cancels from e = r + gamma nu - nu + ... up to a constant, so the
    correction weights are w(a) proportional to exp(r(a) / alpha) and the weighted-BC optimum of each agent
    is the w-weighted marginal of the data: with alpha = 1 on (c) = {AA, AB, BA},
    pi_i(A) = (1 + e) / (1 + 2 e) = 0.578 on equal thirds (the data's counts make it 0.584 and 0.572). A smaller alpha drives both agents to (1/2, 1/2), the
    factorised policy the paper reports (Table 6), which plays the OOD joint action BB a quarter of the time."""
    ds = collect.xor_dataset("penalty_xor", "c")
    a = ds.actions[~ds.last]
    for alpha in (1.0, 0.05):
        policy, _ = train(OD, ds, 250, alpha=alpha)
        p = marginals(OD.make_act_fn(policy, torch.device("cpu")))
        w = np.exp(PAYOFF[a[:, 0], a[:, 1]] / alpha)
        for i in range(2):
            closed = np.bincount(a[:, i], weights=w, minlength=2) / w.sum()
            np.testing.assert_allclose(p[i], closed, atol=0.04)
    assert np.outer(p[0], p[1])[1, 1] > 0.2  # alpha = 0.05: BB, never in the data, a quarter of the time


def test_optidice_nu_objective_is_shift_invariant_with_absorbing_state():
    """The log-mean-exp nu objective with terminals continued in an absorbing state does not change
    when nu (and its absorbing value) shifts by a constant."""
    g = torch.Generator().manual_seed(0)
    r, nu, nu2 = torch.randn(50, generator=g), torch.randn(50, generator=g), torch.randn(50, generator=g)
    nu0, done = torch.randn(10, generator=g), (torch.rand(50, generator=g) < 0.2).float()

    def loss(c):
        e = OD.advantage(r, nu + c, nu2 + c, done, 0.9, torch.tensor(0.3 + c))
        return OD.nu_loss(e, nu0 + c, 0.5, 0.9, torch.tensor(0.3 + c), 0.25).item()

    assert loss(2.5) == pytest.approx(loss(0.0), abs=1e-5)


def tabular_episodes(seed: int = 0, n_states: int = 5, limit: int = 8, episodes: int = 60):
    """Random walks on a small MDP (the state is a one-hot): state n_states - 1 ends the episode for
    real, the others run into the time limit. Returns the dataset and each row's state id."""
    rng = np.random.default_rng(seed)
    E, T = episodes, limit
    ids = np.zeros((E, T + 1), np.int64)
    lengths, terminated = np.full(E, T), np.zeros(E, bool)
    for e in range(E):
        ids[e, 0] = rng.integers(0, 2)
        for t in range(T):
            ids[e, t + 1] = rng.integers(0, n_states) if rng.random() < 0.5 else (ids[e, t] + 1) % n_states
            if ids[e, t + 1] == n_states - 1:
                lengths[e], terminated[e] = t + 1, True
                break
    onehot = np.eye(n_states, dtype=np.float32)[ids]
    from common.data import OfflineDataset

    ds = OfflineDataset.from_padded(obs=onehot[:, :, None], state=onehot, actions=np.zeros((E, T, 1), np.int64),
                                    reward=np.zeros((E, T), np.float32), lengths=lengths, terminated=terminated,
                                    avail=np.ones((E, T + 1, 1, 2), bool),
                                    meta={"env": "toy", "task": "t", "discrete": True, "n_actions": 2})
    return ds, np.asarray(ds.state).argmax(-1)


def flow_residual(ds, state_id: np.ndarray, prob: np.ndarray, f: float, ends: np.ndarray, gamma: float) -> float:
    """Largest violation of the LP's flow constraints by d^D on the data: for every state s,
    sum of d^D over its rows = (1 - gamma) p0(s) + gamma * (d^D of the rows that lead to s), and for the
    absorbing state (1 - gamma) f = gamma * (d^D of the rows that lead to it: those with ``ends``)."""
    rows = ds.transition_rows().numpy()
    n = state_id.max() + 1
    out = np.bincount(state_id[rows], weights=prob, minlength=n)
    first = ds.initial_rows().numpy()
    inflow = (1 - gamma) * np.bincount(state_id[first], minlength=n) / first.size
    inflow += gamma * np.bincount(state_id[rows + 1][ends[rows] == 0], weights=prob[ends[rows] == 0], minlength=n)
    absorbing = (1 - gamma) * f - gamma * prob[ends[rows] > 0].sum()
    return float(max(np.abs(out - inflow).max(), abs(absorbing)))


def test_optidice_discounted_occupancy_meets_the_flow_constraints_and_rows_does_not():
    """--data-distribution discounted makes d^D an occupancy of the data's own process (every episode
    end absorbing): the flow constraints hold on the data to float precision, so that without reward
    the LP's optimum is w = 1, the behaviour. The default (rows: every transition alike, true terminals
    continued to the horizon, time-limit cuts bootstrapping) violates them, which is what tilts the
    weights away from the behaviour on data that mixes terminals and time limits (docs)."""
    import comadice  # the same d^D in ComaDICE's file

    gamma = 0.9
    ds, state_id = tabular_episodes()
    assert 0 < (ds.episode_lengths < 8).sum() < ds.n_episodes  # both kinds of episode end
    prob, f = OD.discounted_occupancy(ds, gamma)
    ends = OD.episode_ends(ds)
    assert prob.sum() + f == pytest.approx(1.0, abs=1e-12)
    assert flow_residual(ds, state_id, prob, f, ends, gamma) < 1e-12
    prob_c, f_c = comadice.discounted_occupancy(ds, gamma)
    np.testing.assert_array_equal(prob_c, prob)
    assert f_c == f and (comadice.episode_ends(ds) == ends).all()

    f_rows = OD.absorbing_fraction(ds, 8)
    uniform = np.full(ds.n_transitions, (1 - f_rows) / ds.n_transitions)
    terminal = np.zeros(ds.n_rows)
    terminal[np.asarray(ds.transition_rows())] = ds.transitions(ds.transition_rows())["done"].numpy()
    assert flow_residual(ds, state_id, uniform, f_rows, terminal, gamma) > 0.01


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bc_continuous_recovers_a_linear_policy(seed):
    """Continuous BC: the Gaussian policy's mean matches a deterministic linear behaviour policy.
    With a constant learning rate the final error after 300 steps ranged 0.015-0.107 over seeds (and
    0.091 on another CPU for seed 0): the NLL sharpens as the std shrinks and Adam keeps the mean
    jittering. With the rate annealed to 0 it was 0.004-0.008 over 8 seeds."""
    rng = np.random.default_rng(0)
    E, T, N, O, A = 40, 10, 2, 3, 2
    obs = rng.normal(size=(E, T + 1, N, O)).astype(np.float32)
    W = rng.normal(size=(N, O, A)) * 0.3
    actions = np.tanh(np.einsum("etno,noa->etna", obs[:, :T], W)).astype(np.float32)
    from common.data import OfflineDataset

    ds = OfflineDataset.from_padded(obs=obs, state=obs[:, :, 0], actions=actions, reward=np.zeros((E, T), np.float32),
                                    lengths=np.full(E, T), terminated=np.ones(E, bool),
                                    meta={"env": "toy", "task": "t", "discrete": False})
    policy, _ = train(BC, ds, 300, seed=seed, anneal=True)
    act = BC.make_act_fn(policy, torch.device("cpu"))
    test_obs = rng.normal(size=(64, N, O)).astype(np.float32)
    pred = act(test_obs, None, np.ones((64, N, 1), bool))
    target = np.tanh(np.einsum("eno,noa->ena", test_obs, W))
    assert np.abs(pred - target).mean() < 0.03


# ------------------------------------------------------------ smoke tests
class FakeContinuous(common_envs.MultiAgentEnv):
    """A continuous stand-in (MaMuJoCo-like): 2 agents, actions in [-1, 1]^2, reward for matching a target."""

    n_agents, obs_dim, state_dim, discrete, act_dim = 2, 3, 4, False, 2

    def __init__(self, episode_limit: int = 6):
        self.episode_limit = episode_limit

    def _observe(self):
        obs = np.stack([np.r_[self.x[i], self.t / 10, i] for i in range(2)]).astype(np.float32)
        return obs, np.r_[self.x, self.t / 10, 1.0].astype(np.float32), np.ones((2, 1), bool)

    def reset(self, seed=None):
        self.t, self.x = 0, np.zeros(2)
        return self._observe()

    def step(self, actions):
        a = np.asarray(actions, dtype=np.float64).reshape(2, 2)
        self.x = self.x + 0.1 * a[:, 0]
        self.t += 1
        return (*self._observe(), float(-np.abs(a - 0.5).sum()), False, self.t >= self.episode_limit, {})


@pytest.fixture
def fake_envs(monkeypatch):
    monkeypatch.setitem(common_envs.FAMILIES, "smacv1", (lambda task, **o: FakeSMAC(**o), None))
    monkeypatch.setitem(common_envs.FAMILIES, "toycont", (lambda task, **o: FakeContinuous(**o), None))


SMOKE_ENVS = {"matrix": ("penalty_xor", 5), "bridge": ("hard", 12), "smacv1": ("3m", 8), "toycont": ("t", 6)}


@pytest.mark.parametrize("script", ["bc", "optidice"])
@pytest.mark.parametrize("name", list(SMOKE_ENVS))
def test_smoke_train_evaluate_resume(tmp_path, fake_envs, script, name):
    """End to end on every env family here (SMAC and continuous stand-ins included): run directory,
    metrics.json, checkpoints; 2 + 2 resumed steps give exactly the parameters of 4 steps;
    --eval-only and load_policy work."""
    mod = BC if script == "bc" else OD
    task, limit = SMOKE_ENVS[name]
    path = collect.random_dataset(name, task, 4, env_options={"episode_limit": limit}, n_envs=2).save(tmp_path / "d")

    def args(**kw):
        base = dict(env=name, task=task, quality="random", dataset=str(path), total_steps=4, batch_size=16,
                    eval_every=2, eval_episodes=2, final_eval_episodes=2, hidden=8, log_every=1, device="cpu",
                    eval_envs=2, run_dir=str(tmp_path / "run"))
        if mod is OD:
            base["alpha_end"] = 0.0  # a decaying alpha depends on total_steps, which the split run changes
        return mod.Args(**{**base, **kw})

    mod.main(args(run_dir=str(tmp_path / "full")))
    mod.main(args(total_steps=2))
    summary = mod.main(args(resume=True))
    assert np.isfinite(summary["return_mean"]) and summary["updates_per_s"] > 0
    a = load_checkpoint(tmp_path / "full")
    b = load_checkpoint(tmp_path / "run")
    assert a["step"] == b["step"] == 4
    for k in a["modules"]["policy"]:
        torch.testing.assert_close(a["modules"]["policy"][k], b["modules"]["policy"][k], rtol=0, atol=0, msg=k)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    entry = metrics[name][f"{task}__random"][script]["seed_0"]
    assert {"step_0", "step_1", "absolute_metrics"} <= set(entry)
    env = common_envs.make_env(name, task, episode_limit=limit)
    obs, state, avail = env.reset(0)
    acts = mod.load_policy(str(tmp_path / "run"))(obs[None], state[None], avail[None])
    if env.discrete:
        assert acts.shape == (1, env.n_agents) and avail[np.arange(env.n_agents), acts[0]].all()
    else:
        assert acts.shape == (1, env.n_agents, env.act_dim) and np.abs(acts).max() <= 1
    out = mod.main(args(eval_only=True, checkpoint=str(tmp_path / "run")))
    assert math.isfinite(out["return_mean"])


def test_optidice_discounted_data_distribution_trains_end_to_end(tmp_path):
    """--data-distribution discounted: the main loop samples d^D and absorbs every episode end."""
    path = collect.random_dataset("bridge", "hard", 6, env_options={"episode_limit": 12}, n_envs=2).save(tmp_path / "d")
    out = OD.main(OD.Args(env="bridge", task="hard", quality="random", dataset=str(path), total_steps=20, batch_size=32,
                          eval_every=20, eval_episodes=2, final_eval_episodes=2, hidden=8, device="cpu", eval_envs=2,
                          data_distribution="discounted", run_dir=str(tmp_path / "run")))
    assert math.isfinite(out["return_mean"])
    assert load_checkpoint(tmp_path / "run")["args"]["data_distribution"] == "discounted"


def test_optidice_refuses_an_absorbing_horizon_with_the_discounted_data_distribution(tmp_path):
    from common import OfflineMarlError

    with pytest.raises(OfflineMarlError, match="--absorbing-horizon applies to --data-distribution rows only"):
        OD.main(OD.Args(data_distribution="discounted", absorbing_horizon=100, run_dir=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()
