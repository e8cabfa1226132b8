"""OMCDA (omcda.py): closed forms, tabular exactness, allocation, the alpha step, a one-state game,
masks, and smoke runs of the script on every environment family that runs here."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import omcda
from common.runs import load_checkpoint
from common import envs
from common.data import OfflineDataset

torch.set_num_threads(1)


# =================================================================== helpers
def rollout_dataset(env, episodes: int, seed: int = 0, quality: str = "random") -> OfflineDataset:
    """Uniformly random (available) actions in ``env``, as a native dataset."""
    rng = np.random.default_rng(seed)
    eps = []
    for e in range(episodes):
        obs, state, avail = env.reset(seed + e)
        O, S, A, ACT, R = [obs], [state], [avail], [], []
        while True:
            if env.discrete:
                act = np.array([rng.choice(np.flatnonzero(av)) for av in avail])
            else:
                act = rng.uniform(-1, 1, size=(env.n_agents, env.act_dim)).astype(np.float32)
            obs, state, avail, r, term, trunc, _ = env.step(act)
            O.append(obs), S.append(state), A.append(avail), ACT.append(act), R.append(r)
            if term or trunc:
                break
        eps.append(dict(obs=np.stack(O), state=np.stack(S), avail=np.stack(A), actions=np.stack(ACT),
                        reward=np.array(R, np.float32), terminated=term))
    meta = dict(env=env.spec["env"], task=env.spec["task"], quality=quality, discrete=env.discrete,
                env_options=env.spec["options"], source="test rollouts")
    if env.discrete:
        meta["n_actions"] = env.n_actions
    return OfflineDataset.from_episodes(eps, meta)


class StandInSMAC(envs.MultiAgentEnv):
    """A SMAC-shaped stand-in: 3 agents, 6 actions with state-dependent masks (no-op only when
    'dead'), a win flag, early termination. Just enough to exercise the discrete masked path."""

    n_agents, obs_dim, state_dim, discrete, n_actions, episode_limit = 3, 5, 7, True, 6, 8

    def reset(self, seed=None):
        self.rng = np.random.default_rng(seed)
        self.t, self.hp = 0, np.ones(3)
        return self._observe()

    def _observe(self):
        obs = np.concatenate([np.tile(self.hp, (3, 1)), np.eye(3)[:, :2]], 1).astype(np.float32)
        state = np.concatenate([self.hp, [self.t / 8.0], np.zeros(3)]).astype(np.float32)
        avail = np.ones((3, 6), bool)
        avail[:, 0] = self.hp <= 0  # no-op only for dead agents
        avail[self.hp <= 0, 1:] = False
        avail[:, 5] &= self.t % 2 == 0  # an action that is sometimes unavailable
        return obs, state, avail

    def step(self, actions):
        a = np.asarray(actions)
        self.t += 1
        self.hp = self.hp - 0.3 * self.rng.random(3) * (a != 2)
        r = float((a == 3).sum()) * 0.1
        dead = (self.hp <= 0).all()
        return (*self._observe(), r, bool(dead), self.t >= self.episode_limit and not dead, {"won": bool(r > 0.2)})


class StandInContinuous(envs.MultiAgentEnv):
    """A MaMuJoCo-shaped continuous stand-in (2 agents, act_dim 2): reward prefers actions near a target."""

    n_agents, obs_dim, state_dim, discrete, n_actions, act_dim, episode_limit = 2, 4, 5, False, 1, 2, 6

    def reset(self, seed=None):
        self.t, self.x = 0, np.zeros(2, np.float32)
        return self._observe()

    def _observe(self):
        obs = np.stack([np.r_[self.x, self.t / 6.0, i] for i in range(2)]).astype(np.float32)
        return obs, np.r_[self.x, self.t / 6.0, 0.0, 1.0].astype(np.float32), np.ones((2, 1), bool)

    def step(self, actions):
        a = np.asarray(actions, np.float32).reshape(2, 2)
        self.t += 1
        self.x = np.clip(self.x + 0.1 * a[:, 0], -1, 1)
        r = float(-np.square(a - 0.5).sum())
        return (*self._observe(), r, False, self.t >= self.episode_limit, {})


def tiny_args(tmp_path, name, dataset, **kw):
    base = dict(env="x", task="x", quality="random", dataset=str(dataset), hidden=16, mix_hidden=8, bc_steps=10,
                total_steps=20, eval_every=10, eval_episodes=2, final_eval_episodes=2, log_every=5, batch_size=32,
                eval_envs=2, run_dir=str(tmp_path / name), device="cpu")
    base.update(kw)
    return omcda.Args(**base)


def _learner(n=2, discrete=True, **kw):
    args = omcda.Args(hidden=16, mix_hidden=8, **kw)
    return omcda.OMCDA(args, n, 3, 4, discrete, 3, 2, d_tot=0.4)


def tb_scalars(run_dir) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {k: [e.value for e in acc.Scalars(k)] for k in acc.Tags()["scalars"]}


# ============================================================ allocation, Eq. 17/20
def test_allocation_sums_to_d_tot_and_follows_influence():
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        m_tilde = torch.randn(5, generator=g) * torch.rand(1, generator=g) * 100
        for floor, norm in ((0.1, True), (0.0, False), (0.3, True)):
            m, d = omcda.allocate(m_tilde, 1.0, floor, norm)
            assert torch.isclose(d.sum(), torch.tensor(1.0), atol=1e-6)
            assert (d >= 0).all() and (m >= floor / 5 - 1e-7).all()
            sorted_d = d[torch.argsort(m_tilde)]  # the order of d follows the order of m~
            assert (sorted_d[1:] >= sorted_d[:-1]).all()
            if norm:  # strictly: normalised influences do not saturate the softmax
                assert (sorted_d[1:] > sorted_d[:-1]).all()
    # the literal paper form: plain softmax of the influences
    m, _ = omcda.allocate(torch.tensor([0.3, -0.2, 1.0]), 0.6, floor=0.0, normalise=False)
    assert torch.allclose(m, torch.softmax(torch.tensor([0.3, -0.2, 1.0]), 0))


def test_larger_share_to_agent_whose_deviation_raises_v_tot_more():
    """Same deviation from pi_b for both agents; agent 0's local Q varies more (and its mixing weight
    is larger), so moving it along its deviation raises V_tot^r more: it gets the larger d."""
    B, K = 64, 4
    g = torch.Generator().manual_seed(1)
    logp_b = torch.log_softmax(torch.randn(B, 1, K, generator=g), -1).expand(B, 2, K)
    dev = torch.randn(B, 1, K, generator=g).expand(B, 2, K)
    logp = torch.log_softmax(logp_b + dev, -1)
    q = torch.cat([3.0 * dev[:, :1], 0.5 * dev[:, 1:]], 1)  # deviating towards higher Q for both, more for agent 0
    w = torch.tensor([[1.0, 0.8]]).expand(B, 2)
    avail = torch.ones(B, 2, K, dtype=torch.bool)
    m_tilde, _, _ = omcda.influence_discrete(logp, logp_b, q, w, avail)
    _, d = omcda.allocate(m_tilde, 0.4)
    assert m_tilde[0] > m_tilde[1] > 0 and d[0] > d[1] > 0 and torch.isclose(d.sum(), torch.tensor(0.4))
    # the value actually rises faster per unit KL for agent 0 (finite step along the path)
    assert m_tilde[0] / m_tilde[1] > 4


def test_toy_example_of_section_3():
    """Table 1 is missing from the paper; the c = 4 table [[1.3, -0.4], [-1.6, 0.7]] reproduces all
    its stated numbers. At the uniform-allocation solution (0.6, 0.4) for both players, player 1's
    influence is larger, so allocation gives player 1 the larger conservative degree."""
    R = torch.tensor([[1.3, -0.4], [-1.6, 0.7]], dtype=torch.float64)

    def team(p1, p2):  # Eq. 7
        return float(torch.tensor([p1, 1 - p1], dtype=torch.float64) @ R @ torch.tensor([p2, 1 - p2], dtype=torch.float64))

    assert abs(team(0.5, 0.5)) < 1e-12
    assert abs(team(0.6, 0.6) - 0.1) < 1e-12 and abs(team(0.65, 0.55) - 0.15) < 1e-12
    pi = torch.tensor([0.6, 0.4], dtype=torch.float64)
    q1, q2 = R @ pi, R.T @ pi  # each player's expected payoff per own action, the other at (0.6, 0.4)
    logp = pi.log().expand(1, 2, 2)
    logp_b = torch.full((1, 2, 2), math.log(0.5), dtype=torch.float64)
    m_tilde, _, _ = omcda.influence_discrete(logp, logp_b, torch.stack([q1, q2])[None], torch.ones(1, 2, dtype=torch.float64),
                                             torch.ones(1, 2, 2, dtype=torch.bool), eps=0.0)
    assert m_tilde[0].item() == pytest.approx(3.206, abs=1e-3) and m_tilde[1].item() == pytest.approx(0.2466, abs=1e-3)
    _, d = omcda.allocate(m_tilde, 0.4)
    assert d[0] > d[1]


# ================================================================= influence, Eq. 19
def _path(logp, logp_b, t):
    return torch.log_softmax((1 - t) * logp_b + t * logp, -1)


def test_influence_closed_form_matches_finite_difference_and_shadow_price():
    g = torch.Generator().manual_seed(2)
    B, N, K = 32, 3, 5
    logp_b = torch.log_softmax(torch.randn(B, N, K, generator=g, dtype=torch.float64), -1)
    logp = torch.log_softmax(logp_b + torch.randn(B, N, K, generator=g, dtype=torch.float64), -1)
    q = torch.randn(B, N, K, generator=g, dtype=torch.float64)
    w = torch.rand(B, N, generator=g, dtype=torch.float64) + 0.5
    avail = torch.ones(B, N, K, dtype=torch.bool)
    m_tilde, num, den = omcda.influence_discrete(logp, logp_b, q, w, avail, eps=0.0)
    delta = 1e-5  # central finite difference of E[V_tot^r] and E[KL_i] along the geometric path (App. E.2)
    up, lo = _path(logp, logp_b, 1 + delta), _path(logp, logp_b, 1 - delta)
    dv = ((w * (up.exp() * q).sum(-1)).mean(0) - (w * (lo.exp() * q).sum(-1)).mean(0))
    dkl = omcda.categorical_kl(up, logp_b, avail).mean(0) - omcda.categorical_kl(lo, logp_b, avail).mean(0)
    assert torch.allclose(m_tilde, dv / dkl, rtol=1e-6)
    assert torch.allclose(num, dv / (2 * delta), rtol=1e-6) and torch.allclose(den, dkl / (2 * delta), rtol=1e-6)
    # at the regularised optimum pi = pi_b exp(w q / alpha) / Z the influence is alpha (the shadow price)
    alpha = torch.tensor([0.3, 1.0, 4.0], dtype=torch.float64)
    opt = torch.log_softmax(logp_b + w[..., None] * q / alpha[:, None], -1)
    m_opt, _, _ = omcda.influence_discrete(opt, logp_b, q, w, avail, eps=0.0)
    assert torch.allclose(m_opt, alpha, rtol=1e-9)


def test_influence_gaussian_pathwise_matches_score_function():
    """One reparameterised sample per state along the Gaussian geometric path vs the score-function
    ratio E[w Cov(Q, h)] / E[Var(h)] from many samples (tanh-Gaussian, h = log pi - log pi_b)."""
    g = torch.Generator().manual_seed(3)
    S, A, reps = 4, 2, 50_000
    mu, ls = torch.randn(S, 1, A, generator=g) * 0.5, torch.randn(S, 1, A, generator=g) * 0.3 - 0.5
    mu_b, ls_b = mu + 0.4 * torch.randn(S, 1, A, generator=g), ls + 0.3 * torch.randn(S, 1, A, generator=g)
    w = torch.rand(S, 1, generator=g) + 0.5

    def q_fn(a):
        return (torch.sin(3 * a) + a.pow(2)).sum(-1)

    rep = lambda x: x.repeat(reps, 1, 1)  # noqa: E731
    noise = torch.randn(S * reps, 1, A, generator=g)
    m_path, num, den = omcda.influence_gaussian(rep(mu), rep(ls), rep(mu_b), rep(ls_b), q_fn, w.repeat(reps, 1), noise, eps=0.0)
    # score-function reference
    u = mu + ls.exp() * torch.randn(S, reps, A, generator=g)
    logn = lambda u, m, s: (-0.5 * ((u - m) / s.exp()).pow(2) - s).sum(-1)  # noqa: E731
    h = logn(u, mu, ls) - logn(u, mu_b, ls_b)
    qv = q_fn(torch.tanh(u))
    cov = ((qv - qv.mean(1, keepdim=True)) * (h - h.mean(1, keepdim=True))).mean(1)
    var = h.var(1)
    ref = (w[:, 0] * cov).mean() / var.mean()
    assert m_path.item() == pytest.approx(ref.item(), rel=0.05)
    # d KL(pi_t || pi_b) / dt at t = 1 is exactly Var_pi(h) (closed form vs Monte Carlo)
    assert den.item() == pytest.approx(var.mean().item(), rel=0.03)


# ============================================================== Eq. 25 and the V^c loss
def _eq25_fixture(seed=4, N=3, B=256):
    g = torch.Generator().manual_seed(seed)
    W = 0.3 * torch.rand(N, N, generator=g) + 0.7 * torch.eye(N)  # a full, fixed (target) constraint mixer
    b = torch.randn(N, generator=g)
    base = torch.randn(B, N, generator=g)  # w^r (Q^r - V^r) / alpha + Q^{c,i}: frozen inputs
    return W, b, base


@pytest.mark.parametrize("variant", ["tangent", "clamped", "train_bias"])
def test_eq25_frozen_inputs_reaches_log_mean_exp(variant):
    """Eq. 25 with everything but V^c frozen, summed over agents through a full mixer, from a very
    low start (z far above the cap): the minimiser has V^{c,i} = log E_D exp(z_i + V^{c,i}) (Eq. 24).
    With OMIGA's clamp of z inside the loss instead of the tangent line, V^c runs away downwards;
    if the mixer's bias b^c were trained through Eq. 25 (it cancels in z but not in the linear
    term) the loss would be unbounded below and b^c would run away."""
    W, b, base = _eq25_fixture()
    v = torch.full((3,), -40.0, requires_grad=True)
    bias = b.clone().requires_grad_(variant == "train_bias")
    if variant == "train_bias":
        v.data.zero_()

    def loss_fn():
        vmix = W @ v + bias  # V^{c,i}, Eq. 16
        z = base - (W @ v + b)  # a trained bias would cancel between Q^{c,i} and V^{c,i}
        if variant == "clamped":  # above the cap only the linear term acts, and it pushes V^c down
            return (torch.exp(z.clamp(max=10.0)) + vmix).mean(0).sum()
        return omcda.eq25_loss(z, vmix.expand_as(z)).mean(0).sum()

    opt = torch.optim.Adam([v, bias] if variant == "train_bias" else [v], lr=0.5, betas=(0.9, 0.9))
    for _ in range(200):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    vmix = (W @ v + bias).detach()
    if variant == "clamped":
        assert (vmix < -100).all()
        return
    if variant == "train_bias":
        assert (bias < -90).all() and loss_fn().item() < -250
        return
    assert (vmix > -5).all()  # climbed out of the tangent region
    lbfgs = torch.optim.LBFGS([v], max_iter=50, line_search_fn="strong_wolfe")

    def closure():
        lbfgs.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    lbfgs.step(closure)
    vmix = (W @ v + b).detach()
    target = torch.logsumexp(base, 0) - math.log(base.shape[0])  # log E_D exp(z_i + V^{c,i})
    assert torch.allclose(vmix, target, atol=1e-4)
    assert loss_fn().item() == pytest.approx((1 + target).sum().item(), abs=1e-4)  # minimum: sum_i 1 + v*_i


def test_value_losses_leave_the_mixers_alone():
    """Eq. 25's gradient reaches only V^c: the constraint mixer is trained by Eq. 52 alone."""
    ag = _learner()
    assert {id(p) for p in ag.v_c.parameters()} == {id(p) for g in ag.opt_v_c.param_groups for p in g["params"]}
    assert not any(p.requires_grad for p in ag.mix_c_t.parameters())
    for g in ag.opt_q_c.param_groups:  # freeze Eq. 52's step: the mixer must then stay put
        g["lr"] = 0.0
    before = [p.clone() for p in ag.mix_c.parameters()]
    vc_before = [p.clone() for p in ag.v_c.parameters()]
    B = 8
    batch = dict(obs=torch.randn(B, 2, 3), state=torch.randn(B, 4), next_obs=torch.randn(B, 2, 3),
                 next_state=torch.randn(B, 4), reward=torch.randn(B), done=torch.zeros(B),
                 actions=torch.randint(0, 3, (B, 2)), avail=torch.ones(B, 2, 3, dtype=torch.bool))
    ag.update(batch)
    assert all(torch.equal(a, b) for a, b in zip(before, ag.mix_c.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(vc_before, ag.v_c.parameters()))


def test_mixers_are_non_negative_and_diag_switch():
    """Eqs. 13-16: w >= 0; row i of the constraint mixer mixes all agents' values into agent i's
    Q^{c,i} (or only its own with --diag-constraint-mixer)."""
    torch.manual_seed(0)
    s, x = torch.randn(5, 4), torch.randn(5, 3)
    for diag in (False, True):
        mixer = omcda.Mixer(4, 3, 3, 8, diag=diag)
        w, b = mixer(s)
        assert w.shape == (5, 3, 3) and b.shape == (5, 3) and (w >= 0).all()
        off = w[:, ~torch.eye(3, dtype=torch.bool)]
        assert (off == 0).all() if diag else (off > 0).any()
        explicit = torch.stack([sum(w[:, i, j] * x[:, j] for j in range(3)) + b[:, i] for i in range(3)], 1)
        assert torch.allclose(omcda.mix(w, b, x), explicit, atol=1e-6)
    w, b = omcda.Mixer(4, 3, 1, 8)(s)
    assert w.shape == (5, 1, 3) and omcda.mix(w, b, x).shape == (5, 1)


# ============================================================ tabular exactness (N = 1)
def _newton(loss_fn, v, iters=5):
    """Minimiser of a convex, elementwise-separable loss_fn(v [S]) by damped Newton steps from v."""
    for _ in range(iters):
        v = v.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(loss_fn(v), v, create_graph=True)
        (h,) = torch.autograd.grad(g.sum(), v)
        v = v - (g / h).clamp(-1.0, 1.0)
    return v.detach()


@pytest.mark.parametrize("tau", [0.5, 0.7, 0.9])
def test_tabular_fixed_point_is_the_kl_soft_bellman_solution(tau):
    """Iterating Eqs. 51, 25, 53, 52 exactly (N = 1, w = 1, b = 0) gives Q^r + alpha Q^c equal to the
    solution of the KL-regularised soft Bellman equation (Eq. 4/6) for any expectile; adding
    -KL(pi || pi_b) to the Q^c target (Eq. 11 read literally) double-counts and breaks it."""
    rng = np.random.default_rng(5)
    S, K, gamma, alpha = 4, 3, 0.7, 0.7
    P = torch.tensor(rng.dirichlet(np.ones(S), size=(S, K)))
    r = torch.tensor(rng.normal(size=(S, K)))
    pb = torch.tensor(rng.dirichlet(2 * np.ones(K), size=S))
    Qs = torch.zeros(S, K, dtype=torch.float64)
    for _ in range(400):  # soft Bellman: V = alpha log E_pb exp(Q / alpha)
        Qs = r + gamma * P @ (alpha * torch.logsumexp(Qs / alpha + pb.log(), 1))
    results = {}
    for with_kl in (False, True):
        Qr, Qc = torch.zeros(S, K, dtype=torch.float64), torch.zeros(S, K, dtype=torch.float64)
        Vr, Vc = torch.zeros(S, dtype=torch.float64), torch.zeros(S, dtype=torch.float64)
        for _ in range(80):  # each step: exact minimisers of Eqs. 51 and 25 (warm-started Newton)
            Vr = _newton(lambda v: (pb * omcda.expectile_loss(Qr - v[:, None], tau)).sum(), Vr)
            Vc = _newton(lambda v: (pb * omcda.eq25_loss((Qr - Vr[:, None]) / alpha + Qc - v[:, None],
                                                          v[:, None].expand(S, K))).sum(), Vc)
            target_c = Vc
            if with_kl:
                logpi = pb.log() + (Qr - Vr[:, None]) / alpha + Qc - Vc[:, None]  # Eq. 23
                target_c = Vc - (logpi.exp() * (logpi - pb.log())).sum(1)
            Qr, Qc = r + gamma * P @ Vr, gamma * P @ target_c  # Eqs. 53, 52
        results[with_kl] = (Qr + alpha * Qc - Qs).abs().max().item()
        if not with_kl:  # Eq. 24 holds at the fixed point: the Eq. 23 policy is normalised
            pi = pb * torch.exp((Qr - Vr[:, None]) / alpha + Qc - Vc[:, None])
            assert torch.allclose(pi.sum(1), torch.ones(S, dtype=torch.float64), atol=1e-9)
    assert results[False] < 1e-8
    assert results[True] > 1e-2


# =========================================== two agents end to end through OMCDA.update (exact)
# A factorised two-step game: agent i starts in s = 0; action 0 leads to s = 1 ("risky": its actions
# pay +c_i or -c_i), action 1 to s = 2 ("safe": both pay 0); then the episode ends. Team reward
# r_0 + r_1, c = (1, 0.25), uniform behaviour data with every joint action sequence equally often.
# With a diagonal W^c the problem splits per agent and everything has a closed form: the Eq. 23
# policy is the KL-soft-Bellman one, alpha_i solves KL_i = d_i, and the influence and d follow.
FACT_C, FACT_GAMMA, FACT_TAU, FACT_DTOT = (1.0, 0.25), 0.9, 0.7, 0.4
FACT_RHO = np.array([0.5, 0.25, 0.25])  # share of the data's transition rows in s = 0, 1, 2


def factorised_exact(c: float, alpha: float, tau: float = FACT_TAU, gamma: float = FACT_GAMMA) -> dict:
    """One agent's exact quantities at conservatism alpha: the Eq. 23 policy pi [3, 2] (= the
    soft-Bellman policy of Eq. 6), the data-mean KL, and the influence's numerator and denominator."""
    q_r = np.array([[gamma * c * (2 * tau - 1), 0.0], [c, -c], [0.0, 0.0]])  # tau-expectile of {c, -c}: c (2 tau - 1)
    v_risky = alpha * np.log(np.cosh(c / alpha))  # soft value alpha log E_pi_b exp(Q / alpha)
    q_soft = np.array([[gamma * v_risky, 0.0], [c, -c], [0.0, 0.0]])
    h = q_soft / alpha - np.log(np.exp(q_soft / alpha).mean(1, keepdims=True))  # log pi - log pi_b
    pi = 0.5 * np.exp(h)
    hc, qc = h - (pi * h).sum(1, keepdims=True), q_r - (pi * q_r).sum(1, keepdims=True)
    return dict(pi=pi, kl=FACT_RHO @ (pi * h).sum(1), num=FACT_RHO @ (pi * qc * hc).sum(1),
                den=FACT_RHO @ (pi * hc * hc).sum(1))


def factorised_fixed_point(args: omcda.Args, d_tot: float = FACT_DTOT) -> tuple[np.ndarray, np.ndarray]:
    """The exact (d, alpha) of the whole loop: alpha_i with KL_i(alpha_i) = d_i (the alpha step's fixed
    point) and d = allocate(influence(alpha)) (Eqs. 17-20, with the script's floor and guard)."""
    from scipy.optimize import brentq

    d = np.full(2, d_tot / 2)
    floor = 2 * args.influence_floor * d_tot / 2
    for _ in range(100):
        alpha = np.array([math.exp(brentq(lambda la: factorised_exact(c, math.exp(la))["kl"] - di, -6, 8))
                          for c, di in zip(FACT_C, d)])
        if args.no_allocation:
            break
        sol = [factorised_exact(c, a) for c, a in zip(FACT_C, alpha)]
        m_tilde = torch.tensor([s["num"] / max(s["den"], floor) for s in sol], dtype=torch.float64)
        d = 0.5 * d + 0.5 * omcda.allocate(m_tilde, d_tot, args.alloc_floor, args.alloc_normalise)[1].numpy()
    return d, alpha


def factorised_dataset(reps: int = 32) -> OfflineDataset:
    E = 16 * reps
    obs = np.zeros((E, 3, 2, 3), np.float32)
    acts = np.zeros((E, 2, 2), np.int64)
    rew = np.zeros((E, 2), np.float32)
    for e in range(E):
        for i in range(2):
            a0, a1 = (e >> (2 * i)) & 1, (e >> (2 * i + 1)) & 1
            s = 1 if a0 == 0 else 2
            obs[e, 0, i, 0] = obs[e, 1, i, s] = obs[e, 2, i, s] = 1.0
            acts[e, :, i] = a0, a1
            rew[e, 1] += (FACT_C[i] if a1 == 0 else -FACT_C[i]) if s == 1 else 0.0
    return OfflineDataset.from_padded(obs=obs, state=obs.reshape(E, 3, 6), actions=acts, reward=rew,
                                      lengths=np.full(E, 2), terminated=np.ones(E, bool),
                                      meta=dict(env="matrix", task="factorised", discrete=True, n_actions=2))


@pytest.fixture(scope="module")
def factorised_run():
    """OMCDA.update on the factorised game (diagonal W^c, allocation and the alpha step on): the last
    500 updates' mean d, alpha and policies at s = 0, 1, 2."""
    torch.manual_seed(0)
    ds = factorised_dataset().to("cpu").seed(0)
    args = omcda.Args(hidden=32, mix_hidden=16, gamma=FACT_GAMMA, expectile=FACT_TAU, tau=0.1, lr_return=2e-3,
                      lr_constraint=2e-3, lr_policy=2e-3, lr_alpha=5e-3, alpha_init=1.0, bc_lr=3e-3,
                      diag_constraint_mixer=True)
    ag = omcda.OMCDA(args, 2, 3, 6, True, 2, 1, d_tot=FACT_DTOT)
    for _ in range(500):
        ag.bc_update(ds.sample(256))
    obs, av = torch.eye(3)[:, None, :].expand(3, 2, 3), torch.ones(3, 2, 2, dtype=torch.bool)
    d, alpha, pi = [], [], []
    for i in range(3000):
        m = ag.update(ds.sample(256))
        if i >= 2500:
            d.append(m["d"].clone()), alpha.append(m["alpha"].clone())
            with torch.no_grad():
                pi.append(ag.policy(obs, av).exp())
    with torch.no_grad():
        pi_b = ag.behaviour(obs, av).exp()
    mean = lambda xs: torch.stack(xs).mean(0).double().numpy()  # noqa: E731
    return dict(args=args, d=mean(d), alpha=mean(alpha), pi=mean(pi), pi_b=pi_b.double().numpy())


def test_two_agent_update_policy_is_the_exact_soft_bellman_policy(factorised_run):
    """The constraint branch: at its learned alpha_i, each agent's policy is the exact Eq. 23 / Eq. 6
    policy. At s = 0 both actions have the same Q^r up to the expectile, and the preference for the
    risky branch comes from Q^c (the soft value of s = 1 beyond V^r); without the (Q^c - V^c) term of
    the policy weight agent 0 would play action 0 with probability ~0.69 instead of ~0.80."""
    r = factorised_run
    assert np.abs(r["pi_b"] - 0.5).max() < 0.02
    for i, c in enumerate(FACT_C):
        exact = factorised_exact(c, r["alpha"][i])["pi"]
        assert np.abs(r["pi"][:, i] - exact).max() < 0.04, (i, r["pi"][:, i], exact)
    # the test can tell: at the exact alpha, the return branch alone (the constraint term zeroed)
    # gives a policy at s = 0 that is far from the exact one
    alpha0 = factorised_fixed_point(r["args"])[1][0]
    without = 1 / (1 + math.exp(-FACT_GAMMA * FACT_C[0] * (2 * FACT_TAU - 1) / alpha0))
    assert factorised_exact(FACT_C[0], alpha0)["pi"][0, 0] - without > 0.08


def test_two_agent_update_alpha_and_allocation_reach_the_exact_fixed_point(factorised_run):
    """The alpha step and the allocation: the learned alpha_i and d_i match the exact fixed point of
    KL_i(alpha_i) = d_i and d = allocate(influence) (d = (0.257, 0.143), alpha = (0.44, 0.18) here;
    uniform d would be (0.2, 0.2), and alpha has to travel there from alpha_0 = 1)."""
    r = factorised_run
    d_exact, alpha_exact = factorised_fixed_point(r["args"])
    assert d_exact[0] - d_exact[1] > 0.08  # the allocation matters here
    assert np.allclose(r["alpha"], alpha_exact, rtol=0.1), (r["alpha"], alpha_exact)
    assert np.abs(r["d"] - d_exact).max() < 0.015, (r["d"], d_exact)
    assert r["d"].sum() == pytest.approx(FACT_DTOT, abs=1e-5)


# ======================================================================== alpha, Eq. 55
def test_alpha_step_direction_and_clamp():
    ag = _learner(no_allocation=True, lr_alpha=1e-3)  # d = (0.2, 0.2)
    before = ag.alpha.clone()
    kl = torch.tensor([[0.5, 0.05]])  # agent 0 above its budget, agent 1 below
    ag._allocate_and_alpha(kl, torch.zeros(2))
    after = ag.alpha
    assert after[0] > before[0] and after[1] < before[1]
    ag = _learner(no_allocation=True, lr_alpha=0.5)
    for _ in range(200):
        ag._allocate_and_alpha(kl, torch.zeros(2))
    lo, hi = math.exp(ag.lo), math.exp(ag.hi)
    assert ag.alpha[0].item() == pytest.approx(hi, rel=1e-5) and ag.alpha[1].item() == pytest.approx(lo, rel=1e-5)
    assert (ag.alpha > 0).all() and lo == pytest.approx(10 * math.exp(-4.6))


def test_alpha_reaches_kl_equal_d_on_a_bandit():
    """With the policy fixed at its Eq. 23 optimum pi = pi_b exp(q / alpha) / Z, the alpha step
    drives KL(pi || pi_b) to d whenever d < -log pi_b(a*)."""
    q = torch.tensor([1.0, 0.2, -0.5])
    logp_b = torch.log(torch.tensor([0.2, 0.5, 0.3]))
    avail = torch.ones(1, 1, 3, dtype=torch.bool)
    for d in (0.05, 0.3):
        ag = omcda.OMCDA(omcda.Args(hidden=8, mix_hidden=8, lr_alpha=0.05, no_allocation=True), 1, 1, 1, True, 3, 1, d)
        for _ in range(400):
            logp = torch.log_softmax(logp_b + q / ag.alpha[0], -1)[None, None]
            kl = omcda.categorical_kl(logp, logp_b[None, None], avail)
            ag._allocate_and_alpha(kl, torch.zeros(1))
        assert kl.item() == pytest.approx(d, rel=1e-3)


# ======================================================================= guards and switches
def test_grad_clip_zero_means_no_clipping():
    """--grad-clip 0 leaves the gradients alone (clip_grad_norm_(..., 0) would zero them and freeze
    training); a positive value clips the norm to it."""
    for clip, expected in ((0.0, 100.0), (1.0, 1.0)):
        ag = _learner(grad_clip=clip)
        before = [p.detach().clone() for p in ag.v_r.parameters()]
        norm = torch.sqrt(sum((2 * p.detach()).pow(2).sum() for p in ag.v_r.parameters()))
        loss = sum((p * p).sum() for p in ag.v_r.parameters()) * (100.0 / norm)  # its gradient has norm 100
        ag._step(ag.opt_v_r, loss)
        seen = torch.sqrt(sum((p.grad * p.grad).sum() for p in ag.v_r.parameters()))
        assert seen.item() == pytest.approx(expected, rel=1e-4)
        assert any(not torch.equal(a, b) for a, b in zip(before, ag.v_r.parameters()))


def test_influence_guard_bounds_the_ratio_near_pi_b():
    """Along a fixed deviation pi_t ~ pi_b exp(t delta), the plain influence grows like 1/t as pi_t
    approaches pi_b; the guarded one (denominator at least var_floor) stays bounded, tends to 0 with
    t, and equals the plain one once Var(h) exceeds the floor."""
    g = torch.Generator().manual_seed(11)
    B, N, K = 64, 2, 4
    logp_b = torch.log_softmax(torch.randn(B, N, K, generator=g, dtype=torch.float64), -1)
    delta = torch.randn(B, N, K, generator=g, dtype=torch.float64)
    q = delta + 0.5 * torch.randn(B, N, K, generator=g, dtype=torch.float64)
    w, avail = torch.ones(B, N, dtype=torch.float64), torch.ones(B, N, K, dtype=torch.bool)
    ag = _learner()  # d_tot 0.4, N = 2: floor 2 * 0.1 * 0.4 / 2
    assert ag.var_floor == pytest.approx(0.04)
    plain, guarded = {}, {}
    for t in (1.0, 1e-1, 1e-2, 1e-3):
        logp = torch.log_softmax(logp_b + t * delta, -1)
        plain[t], _, den = omcda.influence_discrete(logp, logp_b, q, w, avail, eps=0.0)
        guarded[t], _, _ = omcda.influence_discrete(logp, logp_b, q, w, avail, eps=0.0, var_floor=ag.var_floor)
        if (den >= ag.var_floor).all():
            assert torch.allclose(plain[t], guarded[t])
    assert (den < ag.var_floor).all()  # the smallest deviation is below the floor
    assert torch.allclose(plain[1e-3] / plain[1e-2], torch.full((N,), 10.0, dtype=torch.float64), rtol=0.02)
    assert (plain[1e-3].abs() > 100 * plain[1.0].abs()).all()
    assert (guarded[1e-3].abs() < guarded[1e-2].abs()).all() and (guarded[1e-3].abs() < plain[1.0].abs()).all()
    # end to end (OMCDA._influence_and_kl): a policy that equals pi_b but for a small deviation along Q
    torch.manual_seed(0)
    direction = torch.tensor([1.0, 0.0, -1.0])
    for floor, bounded in ((0.0, False), (0.1, True)):
        ag = _learner(influence_floor=floor)
        ag.policy.load_state_dict(ag.behaviour.state_dict())
        with torch.no_grad():
            ag.policy.body.net[-1].bias.add_(3e-3 * direction)
        obs, av = torch.randn(256, 2, 3), torch.ones(256, 2, 3, dtype=torch.bool)
        _, dist = ag.policy.log_prob(obs, av, torch.zeros(256, 2, dtype=torch.long))
        _, m_tilde, _, _ = ag._influence_and_kl(obs, av, dist, direction.expand(256, 2, 3), torch.ones(256, 2))
        assert ((m_tilde.abs() < 1.0).all() if bounded else (m_tilde > 100).all()), m_tilde


def test_smoothed_kl_is_a_finite_lower_bound():
    """The continuous guard: the KL between the policies with N(0, s^2) noise added to the pre-tanh
    actions is at most the exact KL, tends to it as s -> 0, and stays finite at the -5 log-std clamp."""
    g = torch.Generator().manual_seed(12)
    mu, mu_b = torch.randn(500, 3, generator=g, dtype=torch.float64), torch.randn(500, 3, generator=g, dtype=torch.float64)
    ls, ls_b = -5 + 7 * torch.rand(500, 3, generator=g, dtype=torch.float64), -5 + 7 * torch.rand(500, 3, generator=g, dtype=torch.float64)
    exact = omcda.gaussian_kl(mu, ls, mu_b, ls_b)
    smooth = omcda.gaussian_kl(mu, omcda.smoothed_log_std(ls, 0.1), mu_b, omcda.smoothed_log_std(ls_b, 0.1))
    assert (smooth <= exact + 1e-9).all() and (smooth >= 0).all()
    tiny = omcda.gaussian_kl(mu, omcda.smoothed_log_std(ls, 1e-6), mu_b, omcda.smoothed_log_std(ls_b, 1e-6))
    assert torch.allclose(tiny, exact, rtol=1e-5)
    # pi_b at the clamp, pi a little wider and 0.05 off: the exact KL explodes, the smoothed one does not
    one = torch.ones(1, 1, dtype=torch.float64)
    exact = omcda.gaussian_kl(0.05 * one, -3 * one, 0 * one, -5 * one)
    smooth = omcda.gaussian_kl(0.05 * one, omcda.smoothed_log_std(-3 * one, 0.1), 0 * one,
                               omcda.smoothed_log_std(-5 * one, 0.1))
    assert exact.item() > 50 and smooth.item() < 0.2


def test_alpha_does_not_pin_at_its_clamp_when_bc_collapses_the_log_std():
    """Deterministic continuous data: behaviour cloning drives pi_b's log-std to its -5 clamp. With the
    exact KL, KL(pi || pi_b) stays far above any budget and alpha sits at its upper clamp (1000); with
    the smoothed KL (the default guard) the KL falls below d and alpha comes off the clamp."""
    rng = np.random.default_rng(0)
    E, T = 64, 4
    obs = rng.normal(size=(E, T + 1, 2, 3)).astype(np.float32)
    acts = np.broadcast_to(np.array([0.3, -0.5], np.float32)[None, None, :, None], (E, T, 2, 1)).copy()
    ds = OfflineDataset.from_padded(obs=obs, state=obs.reshape(E, T + 1, 6), actions=acts,
                                    reward=rng.normal(size=(E, T)).astype(np.float32), lengths=np.full(E, T),
                                    terminated=np.ones(E, bool),
                                    meta=dict(env="x", task="det", discrete=False, act_dim=1)).to("cpu").seed(0)
    out = {}
    for noise in (0.0, 0.1):
        torch.manual_seed(0)
        args = omcda.Args(hidden=32, mix_hidden=16, lr_alpha=0.2, bc_lr=3e-3, lr_policy=1e-3, kl_noise_std=noise)
        ag = omcda.OMCDA(args, 2, 3, 6, False, 1, 1, d_tot=0.4)
        for _ in range(1500):
            ag.bc_update(ds.sample(128))
        with torch.no_grad():
            _, log_std_b = ag.behaviour(ds.sample(512)["obs"], None)
        assert log_std_b.min().item() < -4.5  # behaviour cloning ran into the -5 clamp
        kls = []
        for i in range(300):
            m = ag.update(ds.sample(128))
            kls.append(m["kl"])
        out[noise] = (torch.stack(kls[-50:]).mean(0), ag.alpha.clone(), math.exp(ag.hi))
    kl, alpha, hi = out[0.0]
    assert (kl > 5 * 0.2).all() and torch.allclose(alpha, torch.full((2,), hi), rtol=1e-4)
    kl, alpha, hi = out[0.1]
    assert (kl < 0.2).all() and (alpha < 0.9 * hi).all()


# ================================================================================ masks
def test_masks_zero_mass_and_no_contribution():
    g = torch.Generator().manual_seed(6)
    B, N, K = 16, 2, 5
    avail = torch.rand(B, N, K, generator=g) > 0.4
    avail[:, :, 0] = True
    avail[0, 0] = False  # a row with nothing available keeps every action (no NaN)
    logits, logits_b = torch.randn(B, N, K, generator=g), torch.randn(B, N, K, generator=g)
    logp, logp_b = omcda.masked_log_softmax(logits, avail), omcda.masked_log_softmax(logits_b, avail)
    assert torch.isfinite(logp[0, 0]).all() and torch.allclose(logp[0, 0].exp().sum(), torch.tensor(1.0))
    eff = avail | ~avail.any(-1, keepdim=True)
    assert (logp.exp()[~eff] == 0).all() and torch.allclose(logp.exp().sum(-1), torch.ones(B, N))
    q, w = torch.randn(B, N, K, generator=g), torch.rand(B, N, generator=g)
    kl = omcda.categorical_kl(logp, logp_b, avail)
    m1 = omcda.influence_discrete(logp, logp_b, q, w, avail)[0]
    # garbage in the unavailable entries of pi_b's logits and of Q changes nothing
    garbage = torch.where(eff, torch.zeros_like(q), 1e6 * torch.randn(B, N, K, generator=g))
    logp_b2 = omcda.masked_log_softmax(logits_b + garbage, avail)
    assert torch.allclose(omcda.categorical_kl(logp, logp_b2, avail), kl)
    assert torch.allclose(omcda.influence_discrete(logp, logp_b2, q + garbage, w, avail)[0], m1)
    assert torch.isfinite(kl).all() and torch.isfinite(m1).all()
    # a dataset action marked unavailable still has a finite log-likelihood
    pol = omcda.Policy(3, N, 8, True, K, 1)
    act = torch.zeros(B, N, dtype=torch.long)
    av = torch.ones(B, N, K, dtype=torch.bool)
    av[..., 0] = False
    lp, _ = pol.log_prob(torch.randn(B, N, 3), av, act)
    assert torch.isfinite(lp).all()
    # greedy actions are always available
    a = pol.act(torch.randn(B, N, 3), avail)
    assert torch.gather(eff, -1, a[..., None]).all()


# ======================================================= one-state game with a known optimum
def test_one_state_game_improves_and_respects_budgets():
    """A one-step game with additive payoff g_0[a_0] + g_1[a_1] (agent 0's gains 4x agent 1's) and
    uniform behaviour data. The optimum of Eq. 6 is pi_i ~ pi_b exp(w_i q_i / alpha_i); the learned
    policies beat the behaviour policy, each KL stays near its budget d_i, and agent 0, whose
    deviation raises the team value more, is allocated the larger d."""
    torch.manual_seed(0)
    g = np.array([[1.0, 0.0, -1.0], [0.25, 0.0, -0.25]], np.float32)
    rng = np.random.default_rng(0)
    E = 1000
    a = rng.integers(0, 3, size=(E, 1, 2))
    r = g[0][a[:, :, 0]] + g[1][a[:, :, 1]]
    ds = OfflineDataset.from_padded(obs=np.ones((E, 2, 2, 1), np.float32), state=np.ones((E, 2, 1), np.float32),
                                    actions=a, reward=r, lengths=np.ones(E, int), terminated=np.ones(E, bool),
                                    meta=dict(env="matrix", task="toy", discrete=True, n_actions=3)).to("cpu").seed(0)
    args = omcda.Args(hidden=32, mix_hidden=16, lr_return=3e-3, lr_constraint=3e-3, lr_policy=3e-3, lr_alpha=0.03,
                      bc_lr=3e-3)
    ag = omcda.OMCDA(args, 2, 1, 1, True, 3, 1, d_tot=0.4)
    for _ in range(150):
        ag.bc_update(ds.sample(128))
    ones, av = torch.ones(1, 2, 1), torch.ones(1, 2, 3, dtype=torch.bool)
    kls, ds_, values = [], [], []
    for i in range(600):
        m = ag.update(ds.sample(128))
        if i >= 420 and i % 10 == 0:
            with torch.no_grad():
                p, pb = ag.policy(ones, av).exp()[0], ag.behaviour(ones, av).exp()[0]
            kls.append((p * (p.log() - pb.log())).sum(-1))
            ds_.append(m["d"])
            values.append((p * torch.tensor(g)).sum())
    kl, d, value = torch.stack(kls).mean(0), torch.stack(ds_).mean(0), torch.stack(values).mean()
    assert torch.isclose(d.sum(), torch.tensor(0.4)) and d[0] > d[1]
    assert value > 0.5  # behaviour policy: 0; best deterministic: 1.25
    assert torch.allclose(kl, d, rtol=0.3), (kl, d)  # seeds 0-2 gave ratios 0.95-1.11
    p1 = p[0]
    assert p1[0] > p1[1] > p1[2]


# ================================================================= script smoke tests
def _save(ds, tmp_path, name):
    return ds.save(tmp_path / name)


@pytest.fixture(scope="module")
def matrix_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    env = envs.make_env("matrix", "penalty_xor", episode_limit=10)
    return rollout_dataset(env, 20).save(d / "xor")


@pytest.mark.parametrize("flags", [{}, {"no_allocation": True}, {"no_decomposition": True},
                                   {"random_allocation": True}, {"diag_constraint_mixer": False}])
def test_smoke_matrix_with_ablation_switches(tmp_path, matrix_data, flags):
    args = tiny_args(tmp_path, "run", matrix_data, env="matrix", task="penalty_xor", **flags)
    out = omcda.main(args)
    assert math.isfinite(out["return_mean"]) and out["steps"] == 20
    assert sum(out["d"]) == pytest.approx(0.4, rel=1e-5) and all(x > 0 for x in out["d"])
    if flags.get("no_allocation"):
        assert out["d"] == pytest.approx([0.2, 0.2])
    if flags.get("random_allocation"):
        share = np.random.default_rng(0).dirichlet(np.ones(2))
        assert out["d"] == pytest.approx((0.4 * share).tolist(), rel=1e-5)
    sc = tb_scalars(args.run_dir)
    for i in range(2):
        for name in ("d", "alpha", "influence", "influence_raw", "kl"):
            assert len(sc[f"charts/{name}_{i}"]) == 4, name
    assert "losses/policy" in sc and "eval/return_mean" in sc and "losses/bc" in sc
    metrics = json.loads((Path(args.run_dir) / "metrics.json").read_text())
    assert "absolute_metrics" in metrics["matrix"]["penalty_xor__random"]["omcda"]["seed_0"]


def test_smoke_smac_stand_in_with_masks(tmp_path, monkeypatch):
    monkeypatch.setitem(envs.FAMILIES, "smacv1", (lambda task, **o: StandInSMAC(), None))
    ds = rollout_dataset(envs.make_env("smacv1", "standin"), 15, quality="good")
    path = ds.save(tmp_path / "smac")
    args = tiny_args(tmp_path, "run", path, env="smacv1", task="standin", quality="good")
    out = omcda.main(args)
    assert out["d_tot"] == pytest.approx(3 * 0.1)  # Table 5: good -> d_i = 0.1
    assert out["win_rate"] is not None
    act_fn = omcda.load_policy(args.run_dir)
    env = StandInSMAC()
    obs, state, avail = env.reset(0)
    for _ in range(5):
        a = act_fn(obs[None], state[None], avail[None])[0]
        assert avail[np.arange(3), a].all()
        obs, state, avail, *_ = env.step(a)


def test_smoke_continuous_stand_in_and_ablations(tmp_path, monkeypatch):
    monkeypatch.setitem(envs.FAMILIES, "toycont", (lambda task, **o: StandInContinuous(), None))
    path = rollout_dataset(envs.make_env("toycont", "t"), 15, quality="expert").save(tmp_path / "c")
    for flags in ({}, {"no_decomposition": True}, {"random_allocation": True}):
        args = tiny_args(tmp_path, f"run{len(flags)}{list(flags)}", path, env="toycont", task="t", quality="expert", **flags)
        out = omcda.main(args)
        assert math.isfinite(out["return_mean"]) and out["d_tot"] == pytest.approx(2 * 0.05)
        assert all(math.isfinite(x) for x in out["alpha"])
    act = omcda.load_policy(args.run_dir)(np.zeros((3, 2, 4), np.float32), np.zeros((3, 5), np.float32),
                                         np.ones((3, 2, 1), bool))
    assert act.shape == (3, 2, 2) and (np.abs(act) <= 1).all()


def _real_env_or_skip(env, task):
    try:
        return envs.make_env(env, task)
    except envs.EnvError as e:
        pytest.skip(f"{env} is not available here: {e}")


@pytest.mark.parametrize("env_name,task,discrete", [("bridge", "hard", True), ("mamujoco", "Hopper-3x1", False)])
def test_smoke_real_bridge_and_mamujoco(tmp_path, env_name, task, discrete):
    env = _real_env_or_skip(env_name, task)
    assert env.discrete == discrete
    path = rollout_dataset(env, 3).save(tmp_path / "data")
    env.close()
    out = omcda.main(tiny_args(tmp_path, "run", path, env=env_name, task=task, total_steps=10, eval_every=10,
                               final_eval_episodes=1, eval_episodes=1))
    assert math.isfinite(out["return_mean"])


def test_save_resume_matches_uninterrupted_run_and_eval_only(tmp_path, matrix_data, capsys):
    kw = dict(env="matrix", task="penalty_xor", total_steps=30, eval_every=15)
    straight = tiny_args(tmp_path, "straight", matrix_data, **kw)
    omcda.main(straight)
    part = tiny_args(tmp_path, "part", matrix_data, **dict(kw, total_steps=15))
    omcda.main(part)
    resumed = tiny_args(tmp_path, "part", matrix_data, resume=True, **kw)
    out = omcda.main(resumed)
    assert out["steps"] == 30
    a = load_checkpoint(Path(straight.run_dir))
    b = load_checkpoint(Path(part.run_dir))
    assert a["step"] == b["step"] == 30
    for k, v in a["modules"]["model"].items():
        assert torch.equal(v, b["modules"]["model"][k]), k
    res = omcda.main(omcda.Args(eval_only=True, checkpoint=part.run_dir, final_eval_episodes=3, device="cpu"))
    assert res["episodes"] == 3 and json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 30
