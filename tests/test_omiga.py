"""OMIGA: the implicit local value objective, its global-to-local equivalence, the exp(A/alpha)
policy weights, learning a separable game, and smoke/resume runs on every family here."""

import itertools
import math

import numpy as np
import pytest
import torch

from _baselines_common import (continuous_smoke_data, env_or_skip, fake_smac_dataset, install_fakes,
                               load_script, matrix_dataset, one_thread, resume_is_exact, rollout_dataset,
                               separable_matrix, smoke_resume_eval)

omiga = load_script("omiga")
_one_thread = pytest.fixture(autouse=True)(one_thread)


def test_weights_reduce_to_exp_advantage():
    q, v = torch.tensor([[3.0, -1.0], [0.5, 2.0]]), torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    w = torch.ones_like(q)
    np.testing.assert_allclose(omiga.omiga_policy_weights(q, v, w, alpha=2.0), torch.exp((q - v) / 2.0), rtol=1e-6)
    # the mixer weight scales the advantage; the exponent is clipped like the reference code's
    w2 = torch.full_like(q, 3.0)
    np.testing.assert_allclose(omiga.omiga_policy_weights(q, v, w2, alpha=2.0), torch.exp(3.0 * (q - v) / 2.0), rtol=1e-6)
    big = omiga.omiga_policy_weights(torch.tensor([100.0]), torch.tensor([0.0]), torch.tensor([1.0]), 1.0, clip=10.0)
    assert big.item() == pytest.approx(math.exp(10.0))


def test_exp_linear_is_exp_then_tangent():
    z = torch.tensor([-3.0, 0.0, 2.0, 2.5, 7.0], requires_grad=True)
    y = omiga.exp_linear(z, 2.0)
    np.testing.assert_allclose(y[:3].detach(), torch.exp(z[:3]).detach(), rtol=1e-6)
    np.testing.assert_allclose(y[3:].detach(), [math.exp(2) * 1.5, math.exp(2) * 6.0], rtol=1e-6)
    y.sum().backward()
    np.testing.assert_allclose(z.grad, [math.exp(-3), 1.0, math.exp(2), math.exp(2), math.exp(2)], rtol=1e-6)


def _minimise(loss_fn, v):
    opt = torch.optim.LBFGS([v], lr=1, max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    opt.step(closure)
    return v.detach()


def test_global_to_local_equivalence_on_a_tabular_game():
    """Minimising Eq. O3 per agent on the data of a product behaviour policy gives V_i whose mix
    sum_i w_i V_i + b is the global reverse-KL regularised value alpha log E_mu exp(Q_tot / alpha),
    and the product of the local policies mu_i exp(w_i (Q_i - V_i)/alpha) is the global optimum."""
    torch.manual_seed(0)
    N, K, alpha = 3, 3, 2.0
    counts = torch.tensor([[1, 2, 3], [2, 2, 1], [4, 1, 1]], dtype=torch.float64)  # behaviour mu_i = counts / sum
    mu = counts / counts.sum(1, keepdim=True)
    Q = torch.randn(N, K, dtype=torch.float64) * 3
    w = torch.tensor([0.5, 1.5, 2.0], dtype=torch.float64)
    b = 0.7
    # dataset rows: every joint action repeated prod_i counts_i(a_i) times (= the product behaviour policy)
    rows = [a for a in itertools.product(range(K), repeat=N) for _ in range(int(np.prod([counts[i, a[i]] for i in range(N)])))]
    A = torch.tensor(rows)
    q = Q[torch.arange(N), A]  # [B, N]
    v = torch.zeros(N, dtype=torch.float64, requires_grad=True)
    v_star = _minimise(lambda: omiga.omiga_v_loss(q, v.expand_as(q), w.expand_as(q), alpha, z_max=50.0), v)
    closed = alpha / w * torch.log((mu * torch.exp(w[:, None] * Q / alpha)).sum(1))
    np.testing.assert_allclose(v_star, closed, rtol=1e-6, atol=1e-8)
    joint = list(itertools.product(range(K), repeat=N))
    q_tot = torch.stack([(w * Q[torch.arange(N), torch.tensor(a)]).sum() + b for a in joint])
    mu_joint = torch.stack([mu[torch.arange(N), torch.tensor(a)].prod() for a in joint])
    v_tot = alpha * torch.log((mu_joint * torch.exp(q_tot / alpha)).sum())
    assert (w * v_star).sum().item() + b == pytest.approx(v_tot.item(), rel=1e-8)
    # local policies: normalised, and their product is pi*(a) = mu(a) exp((Q_tot - V_tot)/alpha)
    weights = omiga.omiga_policy_weights(Q, v_star[:, None], w[:, None], alpha, clip=50.0)
    pi_local = mu * weights
    np.testing.assert_allclose(pi_local.sum(1), torch.ones(N, dtype=torch.float64), rtol=1e-6)
    pi_prod = torch.stack([pi_local[torch.arange(N), torch.tensor(a)].prod() for a in joint])
    np.testing.assert_allclose(pi_prod, mu_joint * torch.exp((q_tot - v_tot) / alpha), rtol=1e-6)


def test_v_objective_gradient_goes_to_v_only_and_official_form_has_the_same_stationary_point():
    q = torch.tensor([[1.0, 2.0], [3.0, 0.0]], dtype=torch.float64)
    w = torch.tensor([[1.0, 0.5], [1.0, 0.5]], dtype=torch.float64)
    v = torch.zeros(2, dtype=torch.float64, requires_grad=True)
    ours = _minimise(lambda: omiga.omiga_v_loss(q, v.expand_as(q), w, 1.0), v).clone()
    # E_D exp(z) = 1 at the minimiser: the reference loss (a positive rescaling) is stationary there too
    z = omiga.omiga_exponent(q, ours.expand_as(q), w, 1.0)
    np.testing.assert_allclose(torch.exp(z).mean(0), torch.ones(2, dtype=torch.float64), rtol=1e-6)
    v2 = ours.clone().requires_grad_(True)
    omiga.omiga_v_loss(q, v2.expand_as(q), w, 1.0, official=True).backward()
    np.testing.assert_allclose(v2.grad, torch.zeros(2, dtype=torch.float64), atol=1e-8)
    # gradients reach V only: Q and w are inputs from target networks
    qq, ww = q.clone().requires_grad_(True), w.clone().requires_grad_(True)
    omiga.omiga_v_loss(qq.detach(), v2.expand_as(q), ww.detach(), 1.0).backward()
    assert qq.grad is None and ww.grad is None


def test_learns_the_optimum_of_a_separable_game(monkeypatch, tmp_path):
    separable_matrix(monkeypatch)
    data = matrix_dataset(tmp_path / "data", [(0, 0), (0, 1), (1, 0), (1, 1)], task="separable")
    torch.manual_seed(0)
    s = omiga.main(omiga.Args(env="matrix", task="separable", quality="test", dataset=str(data), device="cpu",
                              total_steps=200, batch_size=64, hidden=64, lr=3e-3, alpha=1.0, gamma=0.5,
                              eval_every=300, eval_episodes=1, final_eval_episodes=1, eval_envs=1,
                              run_dir=str(tmp_path / "run")))
    assert s["return_per_step"] == pytest.approx(1.5)  # behaviour policy: 0.75 a step


def test_smoke_matrix(tmp_path):
    data = matrix_dataset(tmp_path / "data", [(0, 1), (1, 0)])
    smoke_resume_eval(omiga, tmp_path, data, "matrix", "penalty_xor", eval_sample=True)


def test_smoke_smac_standin_with_return_to_go(monkeypatch, tmp_path):
    install_fakes(monkeypatch)
    smoke_resume_eval(omiga, tmp_path, fake_smac_dataset(tmp_path / "data"), "smacv1", "3m", return_to_go=True)


def test_smoke_bridge(tmp_path):
    env_or_skip("bridge", "hard")
    smoke_resume_eval(omiga, tmp_path, rollout_dataset(tmp_path / "data", "bridge", "hard"), "bridge", "hard")


def test_smoke_mamujoco_and_exact_resume(monkeypatch, tmp_path):
    data, env, task = continuous_smoke_data(tmp_path, monkeypatch)
    smoke_resume_eval(omiga, tmp_path / "smoke", data, env, task, mixer_input="obs")
    resume_is_exact(omiga, tmp_path / "resume", data, env, task)


def test_smoke_rware(tmp_path):
    env_or_skip("rware", "tiny-2ag")
    data = rollout_dataset(tmp_path / "data", "rware", "tiny-2ag", episodes=2, episode_limit=20)
    smoke_resume_eval(omiga, tmp_path, data, "rware", "tiny-2ag")
