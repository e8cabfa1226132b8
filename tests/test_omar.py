"""OMAR: the zeroth-order search, the actor rectification (towards the critic's best sampled action,
and out of a local optimum where the policy gradient stays), the CQL penalties, learning a separable
game with the discrete variant, and smoke runs with save/resume on every environment family."""

import math

import numpy as np
import pytest
import torch

from _baselines2_common import (SMOKE_FAMILIES, continuous_bandit, load_script, matrix_data, one_thread,
                                smoke_family)
from common import envs

omar = load_script("omar")
_one_thread = pytest.fixture(autouse=True)(one_thread)
SMALL = dict(hidden=16, batch_size=8, cql_samples=3, cem_samples=6, cem_elites=2)


def bumps(a: torch.Tensor) -> torch.Tensor:
    """A non-concave critic on [-1, 1]: a local maximum 0.5 at a = -0.3 (wide) and the global
    maximum 1.0 at a = 0.7 (narrower; its slope is nil around a = 0, where the actor starts)."""
    a = a[..., 0]
    return 0.5 * torch.exp(-((a + 0.3) ** 2) / 0.08) + torch.exp(-((a - 0.7) ** 2) / 0.02)


def test_cem_finds_the_maximum_of_a_known_critic():
    target = torch.tensor([0.3, -0.6])
    g = torch.Generator().manual_seed(0)
    a, q = omar.cem_search(lambda s: -((s - target) ** 2).sum(-1), (256,), 2, iters=3, samples=20, elites=5, mu0=0.0,
                           sigma0=2.0, gen=g)
    assert a.shape == (256, 2) and q.shape == (256,)
    dist = (a - target).norm(dim=-1)  # 256 independent searches: most land close to the maximum
    assert dist.median() < 0.1 and (dist < 0.25).float().mean() > 0.8
    np.testing.assert_allclose(q, -((a - target) ** 2).sum(-1), rtol=1e-6)  # the value of the returned action
    assert (a.abs() <= 1).all()
    # the non-concave critic: most searches land on the global maximum, not the wide local one
    a, q = omar.cem_search(bumps, (256,), 1, iters=2, samples=20, elites=5, mu0=0.0, sigma0=2.0, gen=g)
    assert (q > 0.5).float().mean() > 0.75 and ((a[:, 0] - 0.7).abs() < 0.1).float().mean() > 0.75
    a, q = omar.cem_search(bumps, (256,), 1, iters=2, samples=20, elites=5, mu0=0.0, sigma0=2.0, update="softmax",
                           gen=g)
    assert q.mean() > 0.7


def test_rectification_target_is_the_better_of_policy_and_search():
    a_pi, a_cem = torch.tensor([[0.1], [0.2]]), torch.tensor([[0.9], [-0.9]])
    t = omar.rectification_target(a_pi, torch.tensor([1.0, 1.0]), a_cem, torch.tensor([2.0, 0.5]))
    np.testing.assert_allclose(t, [[0.9], [0.2]])


def _train_actor(coe: float, steps: int = 100) -> float:
    """A deterministic actor on one observation, trained with Eq. M4 against the fixed critic ``bumps``."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    actor = omar.Actor(3, 1, 1, 16, discrete=False)
    opt = torch.optim.Adam(actor.parameters(), lr=3e-2)
    x = torch.tensor([[1.0, 0.0, 1.0]])
    for _ in range(steps):
        a_pi = actor(x)
        q_pi = bumps(a_pi)
        with torch.no_grad():
            a_cem, q_cem = omar.cem_search(bumps, (1,), 1, 2, 20, 5, 0.0, 2.0, gen=g)
            target = omar.rectification_target(a_pi, q_pi, a_cem, q_cem)
        loss = omar.omar_actor_loss(q_pi, a_pi, target, coe)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return actor(x).item()


def test_rectification_moves_the_actor_to_the_best_sampled_action_where_the_gradient_stays_local():
    assert abs(_train_actor(coe=0.0) - (-0.3)) < 0.05  # policy gradient alone: the local maximum
    assert abs(_train_actor(coe=0.7) - 0.7) < 0.05  # rectified (the reference's medium setting): the global one
    assert abs(_train_actor(coe=1.0) - 0.7) < 0.05


def test_cql_penalties():
    q_all = torch.tensor([[[1.0, 2.0, 5.0]]])
    avail = torch.tensor([[[True, True, False]]])
    a = torch.tensor([[0]])
    assert omar.cql_penalty_discrete(q_all, a, avail).item() == pytest.approx(math.log(math.e + math.e ** 2) - 1.0)
    # the penalty is non-negative, and zero only when the other available actions are at -infinity
    q_far = torch.tensor([[[3.0, -50.0, 9.0]]])
    assert omar.cql_penalty_discrete(q_far, a, avail).item() == pytest.approx(0.0, abs=1e-6)
    # continuous: with M uniform samples on [-1, 1]^d the estimate is log(2^d mean exp Q) - Q(a^D)
    q_s = torch.tensor([0.0, 1.0, 2.0, 3.0]).view(4, 1, 1)
    logp = torch.full((4, 1, 1), -2 * math.log(2.0))
    expected = math.log(4.0 * sum(math.exp(v) for v in range(4))) - 0.5
    assert omar.cql_penalty_continuous(q_s, logp, torch.tensor([[0.5]])).item() == pytest.approx(expected, rel=1e-6)


def test_discrete_variant_learns_the_optimum_of_a_separable_game(monkeypatch, tmp_path):
    """Payoff u0(a0) + u1(a1), u0 = (0, 1), u1 = (0.5, 0): the optimum (B, A) pays 1.5 a step; with
    every joint action in the data, independent conservative critics rank each agent's actions right."""
    payoffs = dict(envs.PAYOFFS, separable=np.array([[0.5, 0.0], [1.5, 1.0]], np.float32))
    monkeypatch.setattr(envs, "PAYOFFS", payoffs)
    monkeypatch.setitem(envs.FAMILIES, "matrix", (envs.FAMILIES["matrix"][0], tuple(payoffs)))
    data = matrix_data(tmp_path / "data", [(0, 0), (0, 1), (1, 0), (1, 1)], task="separable", episodes=20)
    s = omar.main(omar.Args(env="matrix", task="separable", quality="test", dataset=str(data), device="cpu",
                            total_steps=200, batch_size=64, hidden=32, lr=3e-3, gamma=0.5, eval_every=200,
                            eval_episodes=1, final_eval_episodes=1, eval_envs=1, run_dir=str(tmp_path / "run")))
    assert s["return_per_step"] == pytest.approx(1.5)


def test_continuous_actions_learn_the_best_action_of_a_one_step_game(monkeypatch, tmp_path):
    """Reward -(a_0 - 0.5)^2 - (a_1 + 0.3)^2, data actions uniform on [-1, 1]^2: the best joint
    action returns 0, the data's mean is -0.83."""
    data = continuous_bandit(monkeypatch, tmp_path / "data")
    s = omar.main(omar.Args(env="cbandit", task="one_step", quality="test", dataset=str(data), device="cpu",
                            total_steps=150, batch_size=64, hidden=32, lr=3e-3, eval_every=150, eval_episodes=1,
                            final_eval_episodes=1, eval_envs=1, run_dir=str(tmp_path / "run")))
    assert s["return_mean"] > -0.02


@pytest.mark.parametrize("family", SMOKE_FAMILIES)
def test_smoke_every_family(family, tmp_path, monkeypatch):
    smoke_family(omar, family, tmp_path, monkeypatch, **SMALL)