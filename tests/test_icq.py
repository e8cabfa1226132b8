"""ICQ: the implicit-constraint weights, the TD(lambda) critic target on hand-computed episodes,
the non-negative linear mixer, learning a separable game, and smoke runs with save/resume on every
environment family that installs here."""

import math

import numpy as np
import pytest
import torch

from _baselines2_common import (SMOKE_FAMILIES, continuous_bandit, load_script, matrix_data, one_thread,
                                smoke_family)
from common import envs
from common.data import OfflineDataset

icq = load_script("icq")
_one_thread = pytest.fixture(autouse=True)(one_thread)
SMALL = dict(hidden=16, rnn_hidden=8, mixer_hidden=8, batch_size=4)


def test_weights_sum_to_one_over_the_batch_and_prefer_higher_q():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(6, 5, generator=g) * 3
    mask = torch.rand(6, 5, generator=g) < 0.7
    w = icq.icq_weights(q, 2.0, mask)
    assert w.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert (w[~mask] == 0).all() and (w[mask] > 0).all()
    qv, wv = q[mask], w[mask]
    np.testing.assert_allclose(wv, torch.exp(qv / 2) / torch.exp(qv / 2).sum(), rtol=1e-5)  # exp(Q/alpha) / Z
    order = torch.argsort(qv)
    assert (torch.diff(wv[order]) > 0).all()  # a higher Q always gets a higher weight
    # temperature: alpha -> infinity is uniform over the batch, alpha -> 0 picks the best dataset action
    np.testing.assert_allclose(icq.icq_weights(q, 1e9, mask)[mask], torch.full((int(mask.sum()),), 1 / mask.sum()),
                               rtol=1e-5)
    sharp = icq.icq_weights(q, 1e-3, mask)
    assert sharp[mask].argmax() == qv.argmax() and sharp.max().item() == pytest.approx(1.0)
    # per-agent normalisation (the policy weights): each agent's weights sum to one over (batch, time)
    x = torch.randn(3, 4, 2, generator=g)
    m = torch.ones(3, 4, 2, dtype=torch.bool)
    m[0, 0, 1] = False
    np.testing.assert_allclose(icq.icq_weights(x, 0.5, m, dim=(0, 1)).sum((0, 1)), torch.ones(2), rtol=1e-6)


def test_lambda_returns_closed_forms():
    r = torch.tensor([[1.0, 2.0, 3.0]])
    d = torch.tensor([[0.0, 0.0, 1.0]])
    x = torch.tensor([[10.0, 20.0, 30.0]])
    cont = torch.tensor([[1.0, 1.0, 0.0]])
    # lambda = 0: one-step targets; lambda = 1: the Monte-Carlo return of the (terminal) episode
    np.testing.assert_allclose(icq.lambda_returns(r, d, x, cont, 0.9, 0.0), [[1 + 0.9 * 10, 2 + 0.9 * 20, 3]])
    np.testing.assert_allclose(icq.lambda_returns(r, d, x, cont, 0.9, 1.0), [[1 + 0.9 * 2 + 0.81 * 3, 2 + 0.9 * 3, 3]],
                               rtol=1e-6)


def _two_episodes() -> OfflineDataset:
    """Episode A: rewards 1, 2, 3, then a true end; episode B: rewards 4, 5, then the time limit."""
    eps = []
    for rew, term in (([1.0, 2.0, 3.0], True), ([4.0, 5.0], False)):
        T = len(rew)
        eps.append(dict(obs=np.zeros((T + 1, 2, 3), np.float32), state=np.zeros((T + 1, 4), np.float32),
                        actions=np.zeros((T, 2), np.int64), reward=np.array(rew, np.float32), terminated=term))
    return OfflineDataset.from_episodes(eps, dict(env="matrix", task="x", n_actions=2))


def test_td_lambda_target_equals_the_hand_computed_value():
    """gamma = lambda = 1/2. Target critic: Q_tot = 10, 20, 30 at the dataset actions of steps 0, 1, 2;
    policy value V_tot = 100 + k at slot k. With alpha -> infinity every rho is 1:
      A (true end): G2 = 3; G1 = 2 + (30 + (3 - 30)/2)/2 = 10.25; G0 = 1 + (20 + (10.25 - 20)/2)/2 = 8.5625
      B (time limit after step 1, no dataset action at slot 2, so V_tot = 102 bootstraps):
         G1 = 5 + 102/2 = 56; G0 = 4 + (20 + (56 - 20)/2)/2 = 23."""
    ds = _two_episodes().seed(0)
    b = ds.sample_sequences(16)  # whole episodes, padded to 3 steps
    L = b["mask"].shape[1]
    k = torch.arange(L + 1, dtype=torch.float32).expand(16, L + 1)
    y, lm, rho = icq.critic_targets(b, 10.0 * (k + 1), 100.0 + k, False, 1e9, 0.5, 0.5)
    is_a = b["rows"][:, 0] == 0
    assert is_a.any() and (~is_a).any()
    np.testing.assert_allclose(y[is_a], torch.tensor([[8.5625, 10.25, 3.0]]).expand(int(is_a.sum()), 3), rtol=1e-6)
    np.testing.assert_allclose(y[~is_a][:, :2], torch.tensor([[23.0, 56.0]]).expand(int((~is_a).sum()), 2), rtol=1e-6)
    assert (lm[is_a] == 1).all() and (lm[~is_a] == torch.tensor([1.0, 1.0, 0.0])).all()
    np.testing.assert_allclose(rho[:, :L][b["mask"]], torch.ones(int(b["mask"].sum())), rtol=1e-5)


def test_implicit_constraint_weights_enter_the_target():
    """Batch = episodes A and B (above), alpha = 10: the five dataset actions have Q_tot 10, 20, 30 (A)
    and 10, 20 (B); rho = 5 exp(Q/10) / (2e + 2e^2 + e^3). A window of the first two steps of A
    (--seq-len 1) bootstraps step 0 from its next dataset action only: G0 = 1 + rho(20) 20 / 2."""
    b = dict(mask=torch.tensor([[True, True, True], [True, True, False]]),
             reward=torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]]),
             done=torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]))
    q = torch.tensor([[10.0, 20.0, 30.0, 0.0], [10.0, 20.0, 0.0, 0.0]])
    v = torch.full((2, 4), 50.0)
    z = 2 * math.e + 2 * math.e ** 2 + math.e ** 3
    rho = [5 * math.exp(x / 10) / z for x in (10.0, 20.0, 30.0)]
    y, _, r = icq.critic_targets(b, q, v, False, 10.0, 0.5, 0.5)
    np.testing.assert_allclose(r[0, :3], rho, rtol=1e-5)
    g2 = 3.0
    g1 = 2 + 0.5 * (rho[2] * 30 + 0.5 * (g2 - rho[2] * 30))
    g0 = 1 + 0.5 * (rho[1] * 20 + 0.5 * (g1 - rho[1] * 20))
    np.testing.assert_allclose(y[0], [g0, g1, g2], rtol=1e-5)
    np.testing.assert_allclose(y[1, :2], [4 + 0.5 * (rho[1] * 20 + 0.5 * (5 + 0.5 * 50 - rho[1] * 20)), 5 + 0.5 * 50],
                               rtol=1e-5)
    # a window of two transitions: the second one only supplies the bootstrap of the first
    w = dict(mask=torch.tensor([[True, True]]), reward=torch.tensor([[1.0, 2.0]]), done=torch.zeros(1, 2))
    y, lm, r = icq.critic_targets(w, torch.tensor([[10.0, 20.0, 0.0]]), torch.zeros(1, 3), True, 10.0, 0.5, 0.5)
    rho_w = 2 * math.exp(2.0) / (math.e + math.e ** 2)
    assert lm.tolist() == [[1.0, 0.0]] and y[0, 0].item() == pytest.approx(1 + 0.5 * rho_w * 20, rel=1e-5)


def test_linear_mixer_is_non_negative_and_the_official_form_is_normalised():
    torch.manual_seed(0)
    s = torch.randn(32, 5)
    for normalised in (False, True):
        mixer = icq.LinearMixer(5, 3, 8, normalised)
        w, b = mixer.weights(s)
        assert (w >= 0).all()
        q = torch.randn(32, 3, requires_grad=True)
        mixer(q, s).sum().backward()
        assert (q.grad >= 0).all()
        np.testing.assert_allclose(mixer(q, s).detach(), (w * q).sum(-1).detach() + b.detach(), rtol=1e-6)
        if normalised:
            np.testing.assert_allclose(w.sum(-1).detach(), torch.ones(32), rtol=1e-6)
            assert (b == 0).all()


def test_learns_the_optimum_of_a_separable_game(monkeypatch, tmp_path):
    """Payoff u0(a0) + u1(a1), u0 = (0, 1), u1 = (0.5, 0): the unique optimum (B, A) pays 1.5 a step;
    the data's uniform behaviour earns 0.75."""
    payoffs = dict(envs.PAYOFFS, separable=np.array([[0.5, 0.0], [1.5, 1.0]], np.float32))
    monkeypatch.setattr(envs, "PAYOFFS", payoffs)
    monkeypatch.setitem(envs.FAMILIES, "matrix", (envs.FAMILIES["matrix"][0], tuple(payoffs)))
    data = matrix_data(tmp_path / "data", [(0, 0), (0, 1), (1, 0), (1, 1)], task="separable", episodes=40)
    s = icq.main(icq.Args(env="matrix", task="separable", quality="test", dataset=str(data), device="cpu",
                          total_steps=150, batch_size=8, hidden=32, rnn_hidden=16, lr_actor=1e-2, lr_critic=5e-3,
                          gamma=0.5, target_update_interval=20, alpha_actor=0.05, eval_every=150, eval_episodes=1,
                          final_eval_episodes=1, eval_envs=1, run_dir=str(tmp_path / "run")))
    assert s["return_per_step"] == pytest.approx(1.5)


def test_continuous_actions_learn_the_best_action_of_a_one_step_game(monkeypatch, tmp_path):
    """Reward -(a_0 - 0.5)^2 - (a_1 + 0.3)^2, data actions uniform on [-1, 1]^2: the best joint
    action returns 0, the data's mean is -0.83."""
    data = continuous_bandit(monkeypatch, tmp_path / "data")
    s = icq.main(icq.Args(env="cbandit", task="one_step", quality="test", dataset=str(data), device="cpu",
                          total_steps=250, batch_size=64, seq_len=1, hidden=32, rnn_hidden=32, lr_actor=3e-3,
                          lr_critic=3e-3, target_update_interval=20, eval_every=250, eval_episodes=1,
                          final_eval_episodes=1, eval_envs=1, run_dir=str(tmp_path / "run")))
    assert s["return_mean"] > -0.02


@pytest.mark.parametrize("family", SMOKE_FAMILIES)
def test_smoke_every_family(family, tmp_path, monkeypatch):
    smoke_family(icq, family, tmp_path, monkeypatch, per_family={"bridge": {"seq_len": 4}, "mamujoco": {"seq_len": 5, "n_baseline_samples": 2}}, **SMALL)