"""ComaDICE (comadice.py): closed forms, convexity, well-posedness, exact tabular solutions.

Everything here imports the file's own functions; the tabular tests train through
``comadice.update``, the function the training loop calls.
"""

import itertools
import math

import numpy as np
import pytest
import scipy.optimize as so
import torch

import comadice as C

F_LIST = list(C.F_DIVERGENCES)


# ----------------------------------------------------------------- f-divergences
@pytest.mark.parametrize("f", F_LIST)
def test_f_divergence_closed_forms(f):
    y = torch.linspace(-6, 4, 201, dtype=torch.float64)
    w_grid = torch.cat([torch.zeros(1, dtype=torch.float64), torch.logspace(-8, math.log10(60), 30001, dtype=torch.float64)])
    vals = y[:, None] * w_grid[None] - C.f_fn(w_grid, f)[None]  # w y - f(w) on a fine grid of w >= 0
    grid_max, arg = vals.max(1)
    # w* maximises w y - f(w) over w >= 0, and f* is that maximum
    w = C.w_star(y, f)
    assert (w >= 0).all()
    assert (C.f_star(y, f) >= grid_max - 1e-12).all()  # no w >= 0 on the grid does better
    np.testing.assert_allclose(C.f_star(y, f), grid_max, atol=1e-5)
    np.testing.assert_allclose(y * w - C.f_fn(w, f), C.f_star(y, f), atol=1e-12)  # w* attains it
    np.testing.assert_allclose(w, w_grid[arg], rtol=5e-3, atol=5e-3)
    # nothing beats w*: a local search around it does not improve
    for yi, wi in zip(y[::20].tolist(), w[::20].tolist()):
        res = so.minimize_scalar(lambda t: -(t * yi - float(C.f_fn(torch.tensor(t, dtype=torch.float64), f))),
                                 bounds=(0, wi + 10), method="bounded", options=dict(xatol=1e-10))
        assert -res.fun <= float(C.f_star(torch.tensor(yi, dtype=torch.float64), f)) + 1e-9
    # d f*/dy = w* (autograd), including both sides of the soft-chi2 kink at 0
    yy = torch.cat([y, torch.tensor([-1e-9, 0.0, 1e-9], dtype=torch.float64)]).requires_grad_(True)
    (g,) = torch.autograd.grad(C.f_star(yy, f).sum(), yy)
    np.testing.assert_allclose(g.detach(), C.w_star(yy.detach(), f), atol=1e-9)
    # f* is convex: midpoints and second differences
    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(5000, generator=gen, dtype=torch.float64) * 10 - 6, torch.rand(5000, generator=gen, dtype=torch.float64) * 10 - 6
    assert (C.f_star((a + b) / 2, f) <= (C.f_star(a, f) + C.f_star(b, f)) / 2 + 1e-12).all()
    fs = C.f_star(y, f)
    assert (fs[2:] - 2 * fs[1:-1] + fs[:-2] >= -1e-12).all()
    # f is a valid generator: f(1) = 0 and f >= 0
    assert float(C.f_fn(torch.tensor(1.0), f)) == 0.0 and (C.f_fn(w_grid, f) >= 0).all()


def test_soft_chi2_matches_the_reference_inverse():
    """soft-chi2's f'^-1 is e^y for y < 0 and y + 1 otherwise (Appendix B.5); f* is e^y - 1, y + y^2/2."""
    y = torch.tensor([-3.0, -0.5, 0.0, 0.5, 3.0], dtype=torch.float64)
    np.testing.assert_allclose(C.w_star(y, "soft-chi2"), [math.exp(-3), math.exp(-0.5), 1, 1.5, 4])
    np.testing.assert_allclose(C.f_star(y, "soft-chi2"), [math.exp(-3) - 1, math.exp(-0.5) - 1, 0, 0.625, 7.5])


# ------------------------------------------------------------------------ mixer
def _objective(p, q, nu, gamma=0.99, alpha=10.0, f="soft-chi2"):
    """The per-row Eq. 10 objective in the local values nu (one initial state per row)."""
    return (1 - gamma) * C.mix(p, nu) + alpha * C.f_star(C.mix_adv(p, q - nu) / alpha, f)


@pytest.mark.parametrize("layers", [1, 2])
def test_mixer_objective_convex_in_local_values(layers):
    torch.manual_seed(layers)
    n, s_dim, rows = 4, 6, 512
    mixer = C.Mixer(s_dim, n, hidden=16, layers=layers, embed=8).double()
    with torch.no_grad():
        for prm in mixer.parameters():
            prm.mul_(3)  # large weights: a strongly curved mixer
        p = mixer(torch.randn(rows, s_dim, dtype=torch.float64))
    q = torch.randn(rows, n, dtype=torch.float64) * 5
    for f in F_LIST:
        for _ in range(4):
            nu1, nu2 = torch.randn(rows, n, dtype=torch.float64) * 5, torch.randn(rows, n, dtype=torch.float64) * 5
            beta = torch.rand(rows, 1, dtype=torch.float64)
            mid = _objective(p, q, beta * nu1 + (1 - beta) * nu2, f=f)
            chord = beta[:, 0] * _objective(p, q, nu1, f=f) + (1 - beta[:, 0]) * _objective(p, q, nu2, f=f)
            assert (mid <= chord + 1e-9).all()
            # M^s is non-decreasing in each local value (Lemma A.1)
            assert (C.mix(p, torch.maximum(nu1, nu2)) >= C.mix(p, nu1) - 1e-12).all()
    if layers == 1:  # the bias-free advantage is q_tot - nu_tot for the one-layer mixer
        nu = torch.randn(rows, n, dtype=torch.float64)
        np.testing.assert_allclose(C.mix_adv(p, q - nu), C.mix(p, q) - C.mix(p, nu), atol=1e-10)


def test_mixer_with_negative_weights_is_not_convex():
    """Theorem 4.2 needs non-negative weights: a two-layer mixer with a negative outer weight
    makes the objective concave where the local advantage is negative."""
    one = torch.ones(1, dtype=torch.float64)
    p = (torch.ones(1, 1, 1, dtype=torch.float64), torch.zeros(1, 1, dtype=torch.float64),
         -torch.ones(1, 1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
    q = torch.zeros(1, 1, dtype=torch.float64)
    nu1, nu2 = 1.0 * one.view(1, 1), 3.0 * one.view(1, 1)
    mid = _objective(p, q, (nu1 + nu2) / 2)
    chord = (_objective(p, q, nu1) + _objective(p, q, nu2)) / 2
    assert float(mid - chord) > 1e-3
    # the same weights made non-negative are convex again
    p_abs = tuple(t.abs() for t in p)
    assert float(_objective(p_abs, q, (nu1 + nu2) / 2) - (_objective(p_abs, q, nu1) + _objective(p_abs, q, nu2)) / 2) <= 0


# -------------------------------------------------------------------- policies
def test_tanh_gaussian_log_prob():
    torch.manual_seed(0)
    mean, log_std = torch.randn(64, 3, dtype=torch.float64), torch.rand(64, 3, dtype=torch.float64) - 1
    a = torch.rand(64, 3, dtype=torch.float64) * 1.9 - 0.95
    dist = torch.distributions.TransformedDistribution(torch.distributions.Normal(mean, log_std.exp()),
                                                       [torch.distributions.TanhTransform()])
    np.testing.assert_allclose(C.tanh_gaussian_log_prob(mean, log_std, a), dist.log_prob(a).sum(-1), rtol=1e-9)
    # a density on (-1, 1): integrates to 1 (1-D)
    x = torch.linspace(-1 + 1e-12, 1 - 1e-12, 400001, dtype=torch.float64)
    for m, ls in [(0.0, 0.0), (1.5, -1.0), (-2.0, 0.5)]:
        dens = C.tanh_gaussian_log_prob(torch.full((len(x), 1), m, dtype=torch.float64),
                                        torch.full((len(x), 1), ls, dtype=torch.float64), x[:, None]).exp()
        assert abs(float(torch.trapezoid(dens, x)) - 1) < 1e-3
    # dataset actions exactly at +-1 (clipped before atanh): finite value and gradient
    mean = torch.zeros(2, 1, requires_grad=True)
    lp = C.tanh_gaussian_log_prob(mean, torch.zeros(2, 1), torch.tensor([[1.0], [-1.0]]))
    lp.sum().backward()
    assert torch.isfinite(lp).all() and torch.isfinite(mean.grad).all()


def test_masked_softmax_and_policy_log_prob():
    pol = C.Policy(obs_dim=3, n_agents=2, discrete=True, n_actions=4, act_dim=1, hidden=(8,))
    obs = torch.randn(5, 2, 3)
    avail = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool).expand(5, 2, 4)
    logp = C.masked_log_softmax(pol.net(obs), avail)
    probs = logp.exp()
    assert torch.allclose(probs.sum(-1), torch.ones(5, 2)) and (probs[~avail] < 1e-30).all()
    # greedy and sampled actions are always available
    for det in (True, False):
        a = pol.act(obs, avail, deterministic=det)
        assert avail.gather(-1, a.unsqueeze(-1)).all()
    # a single available action has log-prob 0; a dataset action marked unavailable stays finite
    lp = pol.log_prob(obs, avail, torch.tensor([[0, 3]]).expand(5, 2))
    assert torch.allclose(lp[:, 1], torch.zeros(5), atol=1e-6)
    assert torch.isfinite(pol.log_prob(obs, avail, torch.tensor([[1, 0]]).expand(5, 2))).all()


# ---------------------------------------------------------------- well-posedness
def _one_state_game(gamma=0.99, alpha=10.0):
    """A one-state repeated 2x2 game, uniform dataset, q frozen at fixed local values."""
    torch.manual_seed(0)
    mixer = C.Mixer(state_dim=1, n_agents=2, hidden=8)
    state = torch.ones(4, 1)
    q = torch.tensor([[0.0, 1.0], [0.0, -2.0], [1.0, 1.0], [1.0, -2.0]])  # q_i(a_i) for the 4 joint actions
    return mixer, state, q


def test_literal_eq10_drifts_without_bound_ours_does_not():
    gamma, alpha, f = 0.99, 10.0, "soft-chi2"
    mixer, state, q = _one_state_game()

    # the literal reading: (1 - gamma) M[nu] + E[alpha f*(M[q - nu] / alpha)], minimised in nu AND theta
    lit_mixer = C.Mixer(1, 2, hidden=8)
    lit_mixer.load_state_dict(mixer.state_dict())
    nu_lit = torch.zeros(1, 2, requires_grad=True)
    opt = torch.optim.Adam([nu_lit, *lit_mixer.parameters()], lr=5e-2)

    def literal(p, nu, shift=0.0):
        return ((1 - gamma) * (C.mix([t[:1] for t in p], nu) + shift).mean()
                + (alpha * C.f_star((C.mix(p, q - nu) + shift) / alpha, f)).mean())

    biases, losses = [], []
    for it in range(600):
        loss = literal(lit_mixer(state), nu_lit)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if it % 200 == 199:
            biases.append(float(lit_mixer(state[:1])[1].detach()))
            losses.append(float(loss.detach()))
    # the mixer bias keeps falling at a steady rate, and the objective with it
    assert biases[2] < biases[1] - 5 < biases[0] - 10 and losses[2] < losses[1] < losses[0]
    # there is no bottom: along the bias alone the objective goes to -infinity
    with torch.no_grad():
        along = [float(literal(lit_mixer(state), nu_lit, -t)) for t in (0, 1e2, 1e4, 1e6)]
    assert along[3] < along[2] < along[1] < along[0] and along[3] < -1e3

    # ours: the nu step of comadice.nu_loss (the mixer is an input, not a variable)
    p = [t.detach() for t in mixer(state)]

    def run_ours(not_done):  # noqa: D401
        nu = torch.zeros(1, 2, requires_grad=True)
        opt = torch.optim.Adam([nu], lr=5e-2)
        trace = []
        for it in range(600):
            if it == 400:
                opt.param_groups[0]["lr"] = 3e-3
            nu4 = nu.expand(4, 2)
            loss, adv = C.nu_loss(p, p, [t[:1] for t in p], q, nu4, nu4, nu, not_done, gamma, alpha, f)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if it % 200 == 199:
                trace.append((float(C.mix([t[:1] for t in p], nu.detach())), float(C.w_star(adv / alpha, f).mean()),
                              float(nu.detach().abs().max())))
        return trace

    trace = run_ours(torch.ones(4))
    assert abs(trace[2][0] - trace[1][0]) < 2e-3 and trace[2][2] < 10  # nu_tot converged, nu bounded
    assert abs(trace[2][1] - 1) < 2e-3  # E_D[w*] = 1: the flow constraint of the one-state game


# ------------------------------------------------------------ tabular exactness
S, N, K = 3, 2, 2
JOINT = list(itertools.product(range(K), repeat=N))


def _onehot(i, n):
    v = np.zeros(n, np.float32)
    v[i] = 1
    return v


def _obs(s):  # agent i sees a one-hot of (i, s): the networks without hidden layers are tabular
    return np.stack([_onehot(i * S + s, N * S) for i in range(N)])


def _game(seed=1):
    """Random 3-state game, agent 0 steers (P(s'|s, a_0), in quarters), additive reward
    r = r_0(s, a_0) + r_1(s, a_1): q_tot = r + gamma E[nu_tot(s')] is exactly W.q + b."""
    rng = np.random.default_rng(seed)
    r_i = rng.uniform(-1, 1, size=(N, S, K))
    quarters = np.stack([[rng.multinomial(4, np.ones(S) / S) for _ in range(K)] for _ in range(S)])  # [S, K, S]
    rew = np.array([[sum(r_i[i, s, a[i]] for i in range(N)) for a in JOINT] for s in range(S)])  # [S, J]
    trans = np.array([[quarters[s, a[0]] / 4 for a in JOINT] for s in range(S)])  # [S, J, S]
    return rew, trans, quarters


def _dual(rew, trans, d, p0, gamma, alpha, f):
    """Minimise the DICE dual (Prop. 4.1) in nu_tot with scipy; returns (nu_tot, w*)."""
    ft = lambda y: C.f_star(torch.from_numpy(y), f).numpy()  # noqa: E731
    wt = lambda y: C.w_star(torch.from_numpy(y), f).numpy()  # noqa: E731

    def fun(v):
        adv = rew + gamma * trans @ v - v[:, None]
        w = wt(adv / alpha)
        grad = (1 - gamma) * p0 + gamma * np.einsum("sj,sj,sjx->x", d, w, trans) - (d * w).sum(1)
        return (1 - gamma) * p0 @ v + (d * alpha * ft(adv / alpha)).sum(), grad

    v = so.minimize(fun, np.zeros(len(p0)), jac=True, method="BFGS", options=dict(gtol=1e-12)).x
    return v, wt((rew + gamma * trans @ v - v[:, None]) / alpha)


def _primal(rew, trans, d, p0, gamma, alpha, f):
    """The regularised LP, Eqs. 2-3, solved directly over rho(s, a) >= 0 with scipy."""
    n_s, n_j = d.shape
    f_np = lambda w: C.f_fn(torch.from_numpy(w), f).numpy()  # noqa: E731
    a_eq = np.zeros((n_s, n_s * n_j))
    for x in range(n_s):
        a_eq[x] = (np.eye(n_s)[x][:, None] * np.ones(n_j) - gamma * trans[:, :, x]).ravel()
    cons = {"type": "eq", "fun": lambda r: a_eq @ r - (1 - gamma) * p0, "jac": lambda r: a_eq}

    def neg(r):
        w = np.maximum(r, 1e-300) / d.ravel()
        val = rew.ravel() @ r - alpha * d.ravel() @ f_np(w)
        return -val

    res = so.minimize(neg, d.ravel().copy(), method="SLSQP", constraints=[cons], bounds=[(0, None)] * (n_s * n_j),
                      options=dict(ftol=1e-14, maxiter=1000))
    assert res.success, res.message
    return res.x.reshape(n_s, n_j)


def _batch(quarters, rew, cnt, cnt0):
    """Every (s, a, s') in exact proportion d(s, a) P(s'|s, a): a uniform mean over these rows
    is the exact expectation under the dataset distribution."""
    rows = [(s, j, s2) for s in range(S) for j in range(len(JOINT)) for s2 in range(S)
            for _ in range(int(cnt[s, j] * quarters[s, JOINT[j][0], s2]))]
    t = lambda x, **kw: torch.tensor(np.stack(x) if isinstance(x[0], np.ndarray) else x, **kw)  # noqa: E731
    b = len(rows)
    batch = dict(obs=t([_obs(s) for s, _, _ in rows]), state=t([_onehot(s, S) for s, _, _ in rows]),
                 actions=t([list(JOINT[j]) for _, j, _ in rows]), reward=t([rew[s, j] for s, j, _ in rows], dtype=torch.float32),
                 next_obs=t([_obs(s2) for _, _, s2 in rows]), next_state=t([_onehot(s2, S) for _, _, s2 in rows]),
                 done=torch.zeros(b), first=torch.zeros(b, dtype=torch.bool), avail=torch.ones(b, N, K, dtype=torch.bool))
    init_rows = [s for s in range(S) for _ in range(int(cnt0[s]))]
    init = dict(obs=t([_obs(s) for s in init_rows]), state=t([_onehot(s, S) for s in init_rows]))
    return batch, init


def test_tabular_training_reaches_the_dice_optimum():
    """comadice.update (Eq. 9 + the well-posed Eq. 10 + Eq. 11) with tabular nu_i, q_i, pi_i and the
    hypernetwork mixer converges to the DICE optimum that scipy finds independently, and the policy
    pi = w* d / sum_a w* d is the solution of the regularised LP (Eqs. 2-3)."""
    gamma, alpha, f = 0.9, 1.0, "soft-chi2"
    rew, trans, quarters = _game()
    rng = np.random.default_rng(2)
    cnt, cnt0 = rng.integers(1, 5, size=(S, len(JOINT))), np.array([2, 1, 1])
    d, p0 = cnt / cnt.sum(), cnt0 / cnt0.sum()
    nu_star, w_opt = _dual(rew, trans, d, p0, gamma, alpha, f)
    rho_lp = _primal(rew, trans, d, p0, gamma, alpha, f)
    np.testing.assert_allclose(w_opt * d, rho_lp, atol=2e-5)  # strong duality: w* d is the LP's rho

    torch.manual_seed(0)
    batch, init = _batch(quarters, rew, cnt, cnt0)
    args = C.Args(gamma=gamma, alpha=alpha, f_divergence=f, tau=0.2, grad_clip=0.0)
    dims = dict(n_agents=N, obs_dim=N * S, state_dim=S, discrete=True, n_actions=K, act_dim=1)
    model = C.ComaDICE(dims, hidden=(), mixer_hidden=16)
    opts = model.optimizers(1e-2)
    for _ in range(500):
        C.update(model, opts, batch, init, args)
    with torch.no_grad():
        states = torch.eye(S)
        obs = torch.tensor(np.stack([_obs(s) for s in range(S)]))
        nu_tot = C.mix(model.mixer(states), model.nu(obs).squeeze(-1)).numpy()
        s_idx = np.repeat(np.arange(S), len(JOINT))
        acts = torch.tensor([list(a) for a in JOINT] * S)
        adv = C.mix_adv(model.mixer(states[s_idx]), model.local_q(model.q, obs[s_idx], acts) - model.nu(obs[s_idx]).squeeze(-1))
        w = C.w_star(adv / alpha, f).numpy().reshape(S, -1)
    np.testing.assert_allclose(nu_tot, nu_star, atol=2e-3)
    np.testing.assert_allclose(w, w_opt, atol=2e-3)
    pi_lp = rho_lp / rho_lp.sum(1, keepdims=True)
    np.testing.assert_allclose(w * d / (w * d).sum(1, keepdims=True), pi_lp, atol=2e-3)


def test_large_alpha_gives_the_behaviour_policy():
    """With data from the behaviour policy's own occupancy, pi* -> mu as alpha grows."""
    gamma, f = 0.9, "soft-chi2"
    rew, trans, _ = _game(seed=3)
    rng = np.random.default_rng(3)
    mu = rng.dirichlet(np.ones(len(JOINT)), size=S)  # behaviour policy over joint actions
    p0 = np.array([0.5, 0.3, 0.2])
    p_mu = np.einsum("sj,sjx->sx", mu, trans)
    d_s = (1 - gamma) * np.linalg.solve(np.eye(S) - gamma * p_mu.T, p0)  # occupancy of mu
    d = d_s[:, None] * mu
    gaps = []
    for alpha in (0.3, 3.0, 30.0, 300.0, 3000.0):
        _, w = _dual(rew, trans, d, p0, gamma, alpha, f)
        pi = w * d / (w * d).sum(1, keepdims=True)
        gaps.append(np.abs(pi - mu).max())
    assert all(a > b for a, b in zip(gaps, gaps[1:])) and gaps[-1] < 1e-3 and gaps[0] > 0.1


def test_proposition_4_3_local_weighted_bc():
    """The product of the local weighted-BC optima maximises the global weighted BC (Eq. 8) over
    factorised policies, and the training code's Eq. 11 reaches those local optima."""
    rng = np.random.default_rng(0)
    n_s, n_a = 4, 3
    obs_of = [lambda s: s % 2, lambda s: s // 2]  # each agent sees a different half of the state
    joint = list(itertools.product(range(n_a), repeat=2))
    d = rng.dirichlet(np.ones(n_s * len(joint))).reshape(n_s, len(joint))
    w = rng.uniform(0, 3, size=(n_s, len(joint)))
    # local optima: pi_i(a_i | o_i) proportional to sum over (s, a) with o_i(s) = o_i, a_i of d w
    local = np.zeros((2, 2, n_a))
    for s in range(n_s):
        for j, a in enumerate(joint):
            for i in range(2):
                local[i, obs_of[i](s), a[i]] += d[s, j] * w[s, j]
    local /= local.sum(-1, keepdims=True)

    def global_wbc(pis):  # E_D[w log prod_i pi_i(a_i | o_i)]
        return sum(d[s, j] * w[s, j] * sum(np.log(pis[i][obs_of[i](s), a[i]]) for i in range(2))
                   for s in range(n_s) for j, a in enumerate(joint))

    best = global_wbc(local)

    def neg(theta):
        logits = theta.reshape(2, 2, n_a)
        return -global_wbc(np.exp(logits - np.log(np.exp(logits).sum(-1, keepdims=True))))

    for seed in range(3):
        res = so.minimize(neg, np.random.default_rng(seed).normal(size=2 * 2 * n_a), method="BFGS", options=dict(gtol=1e-10))
        assert -res.fun <= best + 1e-9 and abs(-res.fun - best) < 1e-6
    for _ in range(200):
        assert global_wbc(rng.dirichlet(np.ones(n_a), size=(2, 2))) <= best + 1e-12

    # Eq. 11 in comadice (policy_loss + Policy.log_prob) on the exact distribution finds the local optima
    rows = [(s, j) for s in range(n_s) for j in range(len(joint))]
    obs = torch.tensor(np.stack([[_onehot(2 * i + obs_of[i](s), 4) for i in range(2)] for s, _ in rows]))
    acts = torch.tensor([list(joint[j]) for _, j in rows])
    weights = torch.tensor([d[s, j] * w[s, j] * len(rows) for s, j in rows], dtype=torch.float32)
    pol = C.Policy(obs_dim=4, n_agents=2, discrete=True, n_actions=n_a, act_dim=1, hidden=())
    opt = torch.optim.Adam(pol.parameters(), lr=0.1)
    avail = torch.ones(len(rows), 2, n_a, dtype=torch.bool)
    for _ in range(600):
        loss = C.policy_loss(weights, pol.log_prob(obs, avail, acts))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        o = torch.tensor(np.stack([[_onehot(2 * i + k, 4) for i in range(2)] for k in range(2)]))
        learned = torch.log_softmax(pol.net(o), -1).exp().numpy()  # [o, agent, a]
    np.testing.assert_allclose(learned.transpose(1, 0, 2), local, atol=2e-3)


# ------------------------------------------------------- the reference code's nu step
@pytest.mark.parametrize("f", F_LIST)
def test_reference_nu_loss_has_the_reference_gradients(f):
    """nu_loss_reference is written from the reference code's maths: its gradients in nu and lambda
    equal those of (1 - gamma) mean_first(nu) - alpha E[sg f(w)] + E[w (sg e - lambda)] + lambda,
    with w = w*((e - lambda) / alpha) and e = W (q - nu), the form the reference code evaluates."""
    torch.manual_seed(0)
    gamma, alpha = 0.99, 3.0
    w, q = torch.rand(64, 3, dtype=torch.float64) + 0.1, torch.randn(64, 3, dtype=torch.float64) * 4
    first = torch.rand(64) < 0.2
    grads = []
    for form in ("ours", "reference"):
        nu = (torch.randn(64, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 4).requires_grad_()
        lam = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
        if form == "ours":
            loss, _ = C.nu_loss_reference(w, q, nu, first, lam, gamma, alpha, f)
        else:
            e = w * (q - nu)
            ww = C.w_star((e - lam) / alpha, f)
            loss = ((1 - gamma) * nu[first].mean() - (alpha * C.f_fn(ww, f)).detach().mean()
                    + (ww * (e.detach() - lam)).mean() + lam)
        grads.append(torch.autograd.grad(loss, [nu, lam]))
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_per_agent_weights_and_their_offset():
    e = torch.tensor([[-10.0, 0.0, 30.0], [5.0, -2.0, 0.5]])
    lam = torch.tensor(0.0, requires_grad=True)
    weights, loss_lam = C.per_agent_weights(e, lam, alpha=10.0, f="soft-chi2", clip=2.0)
    raw = C.w_star(e / 10.0, "soft-chi2")
    np.testing.assert_allclose(weights, raw.clamp(max=2).sum(-1))  # clipped per agent, then summed
    (g,) = torch.autograd.grad(loss_lam, lam)
    assert float(g) == pytest.approx(1 - float(raw.mean()))  # the offset sees the unclipped weights


def test_discounted_data_distribution_makes_the_behaviour_optimal_without_reward():
    """--data-distribution discounted: with d^D the behaviour's discounted occupancy of the recorded
    episodes (every end absorbing), nu = 0 (absorbing value 0 too) is a stationary point of the
    well-posed Eq. 10 when the reward is zero, so by convexity it is the minimum and w* = 1 on every
    row: the behaviour itself. With d^D = the rows (the paper's practice; true terminals bootstrap 0,
    time-limit cuts bootstrap nu(s')) it is not. Exact: gamma = 1/2 makes every probability dyadic,
    so a batch that repeats each row 2^(T - t) times has d^D as its uniform mean."""
    from test_bc_optidice import tabular_episodes

    gamma, alpha, f, T = 0.5, 1.0, "soft-chi2", 8
    ds, sid = tabular_episodes(limit=T)
    rows = ds.transition_rows()
    start = np.repeat(np.asarray(ds.episode_start)[:-1], ds.episode_lengths)
    prob, share = C.discounted_occupancy(ds, gamma)
    reps = 2 ** (T - (rows.numpy() - start))
    np.testing.assert_allclose(prob / prob.sum(), reps / reps.sum(), rtol=1e-12)
    first = ds.initial_rows()

    def grad_at_zero(batch_rows, not_done, absorbing):
        table = torch.zeros(sid.max() + 1, dtype=torch.float64, requires_grad=True)
        nu_abs = torch.zeros((), dtype=torch.float64, requires_grad=True) if absorbing else None
        s, s2 = torch.as_tensor(sid[batch_rows]), torch.as_tensor(sid[batch_rows + 1])
        nu, nu_next, nu_init = table[s][:, None], table[s2][:, None], table[torch.as_tensor(sid[first])][:, None]
        with torch.no_grad():  # q at its Bellman target (Eq. 9 solved), reward 0
            q = gamma * (not_done * table[s2] + (1 - not_done) * (nu_abs if absorbing else 0.0))
        p = (torch.ones(len(batch_rows), 1, dtype=torch.float64), torch.zeros(len(batch_rows), dtype=torch.float64))
        p0 = (torch.ones(len(first), 1, dtype=torch.float64), torch.zeros(len(first), dtype=torch.float64))
        loss, adv = C.nu_loss(p, p, p0, q[:, None], nu, nu_next, nu_init, not_done, gamma, alpha, f,
                              nu_abs, share if absorbing else 0.0)
        loss.backward()
        g = table.grad.abs().max().item()
        return max(g, nu_abs.grad.abs().item()) if absorbing else g

    ends = torch.as_tensor(C.episode_ends(ds), dtype=torch.float64)
    batch = torch.repeat_interleave(rows, torch.as_tensor(reps))
    assert grad_at_zero(batch, 1 - ends[batch], absorbing=True) < 1e-12
    terminal = ds.transitions(rows)["done"].double()
    assert grad_at_zero(rows, 1 - terminal, absorbing=False) > 1e-3
