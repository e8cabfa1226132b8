"""BCQ-MA and CQL-MA: BCQ's action filter and its generative model + perturbation, the exact
joint CQL penalty of a linear mixer, learning a separable game, and smoke/resume runs."""

import itertools
import math

import numpy as np
import pytest
import torch

from _baselines_common import (continuous_smoke_data, env_or_skip, fake_smac_dataset, install_fakes,
                               load_script, matrix_dataset, one_thread, resume_is_exact, rollout_dataset,
                               separable_matrix, smoke_resume_eval)

bcq = load_script("bcq")
cql = load_script("cql")
_one_thread = pytest.fixture(autouse=True)(one_thread)


# ===================================================================== BCQ
def test_bcq_never_selects_an_action_below_the_threshold():
    g = torch.Generator().manual_seed(0)
    B, N, K, tau = 512, 3, 6, 0.3
    logits = torch.randn(B, N, K, generator=g) * 2
    q = torch.randn(B, N, K, generator=g)
    avail = torch.rand(B, N, K, generator=g) < 0.7
    avail[..., 0] = True
    a = bcq.bcq_select(q, logits, avail, tau)
    p = torch.softmax(logits.masked_fill(~avail, -1e10), -1)
    ratio = p.gather(-1, a[..., None])[..., 0] / p.max(-1).values
    assert avail.gather(-1, a[..., None]).all()
    assert (ratio >= tau - 1e-6).all()
    # among the allowed actions it is the greedy one
    allowed = avail & (p / p.max(-1, keepdim=True).values >= tau)
    np.testing.assert_allclose(q.gather(-1, a[..., None])[..., 0], q.masked_fill(~allowed, -1e9).max(-1).values)
    # the filter binds: somewhere Q's best available action is too unlikely under the behaviour model
    assert (q.masked_fill(~avail, -1e9).argmax(-1) != a).any()
    # threshold 0 is the plain masked argmax
    assert torch.equal(bcq.bcq_select(q, logits, avail, 0.0), q.masked_fill(~avail, -1e9).argmax(-1))


def test_bcq_filter_blocks_a_high_q_rare_action():
    logits = torch.log(torch.tensor([[0.70, 0.25, 0.05]]))  # ratios 1, 0.36, 0.07
    q = torch.tensor([[0.0, 1.0, 100.0]])
    avail = torch.ones(1, 3, dtype=torch.bool)
    assert bcq.bcq_select(q, logits, avail, 0.3).item() == 1
    assert bcq.bcq_select(q, logits, avail, 0.05).item() == 2
    assert bcq.bcq_select(q, logits, avail, 1.0).item() == 0


def test_perturbation_is_bounded_by_phi_and_stays_in_the_box():
    a = torch.rand(1000, 3) * 2 - 1
    out = bcq.perturb(a, torch.randn(1000, 3) * 10, 0.05)
    assert (out - a).abs().max() <= 0.05 + 1e-6 and out.abs().max() <= 1.0


def test_vae_loss_is_reconstruction_plus_half_kl():
    a = torch.randn(8, 2)
    zero = torch.zeros(8, 4)
    assert bcq.vae_loss(a, a, zero, zero).item() == pytest.approx(0.0, abs=1e-7)
    mean, log_std = torch.full((8, 4), 1.0), torch.full((8, 4), math.log(2.0))
    kl = 0.5 * (1 + 4 - 1 - 2 * math.log(2.0)) * 4
    assert bcq.vae_loss(a, a, mean, log_std).item() == pytest.approx(0.5 * kl, rel=1e-6)


def test_continuous_bcq_acts_in_the_support_of_the_data_even_when_q_prefers_elsewhere():
    """The VAE learns where the behaviour acts (around +0.5); the perturbation moves a sample by at
    most phi; so even a critic that prefers -1 gets actions near +0.5."""
    torch.manual_seed(0)
    dims = dict(n_agents=2, obs_dim=3, state_dim=3, discrete=False, act_dim=2)
    args = bcq.Args(hidden=64, seed=0)
    nets = bcq.build_networks(args, dims)
    opt = torch.optim.Adam(nets["vae"].parameters(), lr=3e-3)
    for _ in range(300):
        x = bcq.with_agent_id(torch.randn(64, 2, 3))
        a = (0.5 + 0.05 * torch.randn(64, 2, 2)).clamp(-1, 1)
        recon, mean, log_std = nets["vae"](x, a)
        loss = bcq.vae_loss(recon, a, mean, log_std)
        opt.zero_grad()
        loss.backward()
        opt.step()

    class PrefersMinusOne(torch.nn.Module):
        def forward(self, x, a):
            return torch.stack([-(a + 1).pow(2).sum(-1)] * 2)

    nets["q"] = PrefersMinusOne()
    act = bcq.make_act_fn(nets, args, discrete=False, device=torch.device("cpu"))
    actions = act(np.random.randn(16, 2, 3).astype(np.float32), None, None)
    assert actions.shape == (16, 2, 2)
    assert actions.min() > 0.25 and actions.max() < 0.75


def test_bcq_discrete_does_not_extrapolate_to_unseen_actions(tmp_path):
    """Dataset (a) of Penalty-XOR contains only (A, B): BCQ keeps to it and earns 1 a step."""
    data = matrix_dataset(tmp_path / "data", [(0, 1)])
    s = bcq.main(bcq.Args(env="matrix", task="penalty_xor", quality="test", dataset=str(data), device="cpu",
                          total_steps=100, batch_size=32, hidden=32, eval_every=100, eval_episodes=1,
                          final_eval_episodes=1, eval_envs=1, run_dir=str(tmp_path / "run")))
    assert s["return_per_step"] == pytest.approx(1.0)


@pytest.mark.parametrize("algo", ["bcq", "cql"])
def test_learns_the_optimum_of_a_separable_game(algo, monkeypatch, tmp_path):
    mod = {"bcq": bcq, "cql": cql}[algo]
    separable_matrix(monkeypatch)
    data = matrix_dataset(tmp_path / "data", [(0, 0), (0, 1), (1, 0), (1, 1)], task="separable")
    s = mod.main(mod.Args(env="matrix", task="separable", quality="test", dataset=str(data), device="cpu",
                          total_steps=200, batch_size=64, hidden=64, lr=3e-3, gamma=0.5, eval_every=300,
                          eval_episodes=1, final_eval_episodes=1, eval_envs=1, run_dir=str(tmp_path / "run")))
    assert s["return_per_step"] == pytest.approx(1.5)  # behaviour policy: 0.75 a step


# ===================================================================== CQL
def test_cql_penalty_is_zero_for_constant_q_and_positive_when_q_prefers_unseen_actions():
    B, N, K = 4, 3, 5
    avail = torch.ones(B, N, K, dtype=torch.bool)
    avail[0, 1, 3:] = False
    a = torch.zeros(B, N, dtype=torch.long)
    w = torch.rand(B, N) + 0.1
    const = torch.full((B, N, K), 2.5)
    np.testing.assert_allclose(cql.cql_penalty_discrete(const, a, avail, w), torch.zeros(B), atol=1e-6)
    prefers_other = torch.zeros(B, N, K)
    prefers_other[..., 1:] = 1.0  # the data took action 0
    assert (cql.cql_penalty_discrete(prefers_other, a, avail, w) > 0.1).all()
    prefers_data = -prefers_other
    assert (cql.cql_penalty_discrete(prefers_data, a, avail, w) < 0).all()


def test_cql_penalty_is_the_exact_joint_penalty_of_the_mixed_q():
    """sum_i [LME(w_i Q_i) - w_i Q_i^D] equals log E_{a ~ U(joint avail)} exp Q_tot(s, a) - Q_tot(s, a^D)."""
    torch.manual_seed(1)
    N, K, S = 3, 4, 5
    mixer = cql.LinearMixer(S, N, 8)
    s, q_all = torch.randn(1, S), torch.randn(1, N, K) * 2
    avail = torch.ones(1, N, K, dtype=torch.bool)
    avail[0, 0, 2] = avail[0, 2, 0] = False
    a = torch.tensor([[1, 3, 2]])
    w, _ = mixer.weights(s)
    fast = cql.cql_penalty_discrete(q_all, a, avail, w)
    joint = [j for j in itertools.product(range(K), repeat=N) if all(avail[0, i, j[i]] for i in range(N))]
    q_tot = torch.stack([mixer(q_all[0, torch.arange(N), torch.tensor(j)][None], s)[0] for j in joint])
    brute = torch.logsumexp(q_tot, 0) - math.log(len(joint)) - mixer(q_all.gather(-1, a[..., None])[..., 0], s)[0]
    assert fast.item() == pytest.approx(brute.item(), rel=1e-5)


def test_cql_penalty_gradient_with_and_without_the_mixer():
    """The detached form (--no-penalty-through-mixer): w_i (softmax(w_i Q_i) - onehot(a_i^D)) into
    Q_i, none into the weights, none into the level of any Q_i; the default form also reaches w."""
    torch.manual_seed(0)
    q_all = torch.randn(5, 2, 3, requires_grad=True)
    w = (torch.rand(5, 2) + 0.5).requires_grad_(True)
    a = torch.randint(0, 3, (5, 2))
    avail = torch.ones(5, 2, 3, dtype=torch.bool)
    cql.cql_penalty_discrete(q_all, a, avail, w, through_mixer=False).sum().backward()
    assert w.grad is None
    expected = w.detach()[..., None] * (torch.softmax(w.detach()[..., None] * q_all.detach(), -1)
                                        - torch.nn.functional.one_hot(a, 3))
    np.testing.assert_allclose(q_all.grad, expected, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(q_all.grad.sum(-1), torch.zeros(5, 2), atol=1e-6)
    cql.cql_penalty_discrete(q_all, a, avail, w).sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_cql_penalty_through_the_mixer_keeps_the_utilities_conservative(tmp_path):
    """LBF expert data (100 scripted episodes), 1,500 updates of each form. With the mixer weights
    held fixed inside the penalty, the TD term answers the penalty's growing action gaps by shrinking
    w: the state-only bias b(s) takes the value, the Q_i blow up and the penalty's pull on Q_tot
    (w_i^2 (softmax - onehot)) fades, so the greedy actions drift from the data's. Through the mixer
    (Eq. C2 as written, the default) w stays large (docs/baselines.md#cql-ma; measured on the
    full data: greedy return 0.085 -> 0.435)."""
    pytest.importorskip("lbforaging")
    from common import collect

    ds = collect.family_dataset("lbf", "8x8-2p-2f-coop", "expert", episodes=100, workers=1)
    ds.save(tmp_path / "data")
    a = ds.arrays
    x = cql.with_agent_id(torch.as_tensor(np.asarray(a["obs"]), dtype=torch.float32))
    state = torch.as_tensor(np.asarray(a["state"]), dtype=torch.float32)
    avail, act = torch.as_tensor(np.asarray(a["avail"])).bool(), torch.as_tensor(np.asarray(a["actions"])).long()
    out = {}
    for through in (False, True):
        run = tmp_path / f"run_{through}"
        cql.main(cql.Args(env="lbf", task="8x8-2p-2f-coop", quality="expert", dataset=str(tmp_path / "data"),
                          device="cpu", total_steps=1500, eval_every=1500, eval_episodes=0, hidden=64,
                          penalty_through_mixer=through, run_dir=str(run)))
        ck = cql.load_checkpoint(str(run), cql.ALGO)
        nets = cql.build_networks(cql.restore_args(cql.Args, ck["args"]), ck["dims"])
        nets.load_state_dict(ck["modules"]["nets"])
        with torch.no_grad():
            q, (w, _) = nets["q"](x), nets["mixer"].weights(state)
        agree = (cql.greedy(q, avail) == act).float().mean().item()
        out[through] = (w.mean().item(), q.abs().mean().item(), agree)
    (w_fixed, q_fixed, agree_fixed), (w_through, q_through, agree_through) = out[False], out[True]
    # measured: w 0.03 / 11.7, |Q| 17 / 0.3, agreement 0.53 / 0.70 (seeds 0 and 1 alike)
    assert w_fixed < 0.2 and q_fixed > 5.0, out
    assert w_through > 1.0 and q_through < 2.0, out
    assert agree_through > agree_fixed + 0.08, out
    assert cql.Args().penalty_through_mixer  # the default


def test_continuous_penalty_importance_sampling():
    d, M = 1, 20000
    u = torch.rand(1, 1, M, d) * 2 - 1
    log_u = torch.full((1, 1, M), -d * math.log(2.0))
    # constant Q with uniform samples: exactly zero
    assert cql.cql_penalty_continuous(torch.full((1, 1, M), 3.0), log_u, torch.tensor([[3.0]]), d).item() == \
        pytest.approx(0.0, abs=1e-5)
    # Q(a) = c a: log E_U exp(c a) = log(sinh c / c); estimated from uniform or from a Gaussian proposal
    c = 2.0
    exact = math.log(math.sinh(c) / c)
    est_u = cql.cql_penalty_continuous(c * u[..., 0], log_u, torch.tensor([[0.0]]), d).item()
    normal = torch.distributions.Normal(0.3, 0.6)  # proposal: this normal truncated to [-1, 1]
    g = normal.sample((3 * M,))
    g = g[g.abs() < 1][:M].view(1, 1, M, d)
    log_g = normal.log_prob(g)[..., 0] - math.log(normal.cdf(torch.tensor(1.0)) - normal.cdf(torch.tensor(-1.0)))
    est_g = cql.cql_penalty_continuous(c * g[..., 0], log_g, torch.tensor([[0.0]]), d).item()
    assert est_u == pytest.approx(exact, abs=0.02) and est_g == pytest.approx(exact, abs=0.03)


# ================================================================== smoke runs
@pytest.mark.parametrize("algo", ["bcq", "cql"])
def test_smoke_matrix(algo, tmp_path):
    mod = {"bcq": bcq, "cql": cql}[algo]
    smoke_resume_eval(mod, tmp_path, matrix_dataset(tmp_path / "data", [(0, 1), (1, 0)]), "matrix", "penalty_xor")


@pytest.mark.parametrize("algo", ["bcq", "cql"])
def test_smoke_smac_standin(algo, monkeypatch, tmp_path):
    mod = {"bcq": bcq, "cql": cql}[algo]
    install_fakes(monkeypatch)
    smoke_resume_eval(mod, tmp_path, fake_smac_dataset(tmp_path / "data"), "smacv1", "3m")


@pytest.mark.parametrize("algo", ["bcq", "cql"])
def test_smoke_bridge(algo, tmp_path):
    env_or_skip("bridge", "hard")
    mod = {"bcq": bcq, "cql": cql}[algo]
    smoke_resume_eval(mod, tmp_path, rollout_dataset(tmp_path / "data", "bridge", "hard"), "bridge", "hard")


@pytest.mark.parametrize("algo", ["bcq", "cql"])
def test_smoke_mamujoco_and_exact_resume(algo, monkeypatch, tmp_path):
    mod = {"bcq": bcq, "cql": cql}[algo]
    data, env, task = continuous_smoke_data(tmp_path, monkeypatch)
    smoke_resume_eval(mod, tmp_path / "smoke", data, env, task, n_action_samples=3)
    resume_is_exact(mod, tmp_path / "resume", data, env, task, n_action_samples=3)


@pytest.mark.parametrize("algo", ["bcq", "cql"])
def test_smoke_rware(algo, tmp_path):
    env_or_skip("rware", "tiny-2ag")
    mod = {"bcq": bcq, "cql": cql}[algo]
    data = rollout_dataset(tmp_path / "data", "rware", "tiny-2ag", episodes=2, episode_limit=20)
    smoke_resume_eval(mod, tmp_path, data, "rware", "tiny-2ag")
