"""AlberDICE (alberdice.py): closed forms, estimators, Penalty-XOR convergence, smoke, save and resume."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch

import alberdice as A
from common.runs import load_checkpoint
from common import OfflineMarlError
from common import collect
from common import envs as common_envs
from common.data import OfflineDataset

# ---------------------------------------------------------------- fixtures
def random_dataset(N=3, K=3, S=5, O=4, episodes=20, T=6, seed=0) -> OfflineDataset:
    """Random discrete episodes with some unavailable actions (local obs differ from the state)."""
    rng = np.random.default_rng(seed)
    avail = rng.random((episodes, T + 1, N, K)) < 0.7
    avail[..., 0] = True
    logits = np.where(avail[:, :T], rng.normal(size=(episodes, T, N, K)), -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    actions = (p.cumsum(-1) > rng.random((episodes, T, N, 1))).argmax(-1)
    return OfflineDataset.from_padded(
        obs=rng.normal(size=(episodes, T + 1, N, O)).astype(np.float32),
        state=rng.normal(size=(episodes, T + 1, S)).astype(np.float32), actions=actions,
        reward=rng.normal(size=(episodes, T)).astype(np.float32), lengths=rng.integers(1, T + 1, size=episodes),
        terminated=rng.random(episodes) < 0.5, avail=avail,
        meta={"env": "toy", "task": "t", "quality": "q", "discrete": True, "n_actions": K})


# ------------------------------------------------- Proposition E.1 (tabular)
def test_proposition_e1_exp_and_log_mean_exp_objectives():
    """Minimisers of Eq. 14 and Eq. 31 differ by a constant and reach the same value (Prop. E.1), here
    with true terminals continued in an absorbing state; Eq. 31 is shift invariant (Lemma E.2) and a
    lower bound of Eq. 14 (Lemma E.3). The shift is C* = alpha/(1-gamma) (log y - 1), y = rho_bar E[exp(e/alpha)]:
    Eq. 14 is minimal along the shift direction where y = e (the paper's Lemma E.3/E.4 write y = 1)."""
    from scipy.optimize import minimize

    rng = np.random.default_rng(0)
    S, T, alpha, gamma, f_abs = 5, 300, 0.7, 0.9, 0.2
    s, s2, s0 = (torch.as_tensor(rng.integers(0, S, n)) for n in (T, T, 40))
    r = torch.as_tensor(rng.normal(size=T))
    kl = torch.as_tensor(rng.random(T))
    done = torch.as_tensor((rng.random(T) < 0.1).astype(np.float64))
    log_rho_bar = math.log(0.6)

    def objective(fn):
        def f(x):  # x = (nu(s) for the S states, nu(s_abs))
            x = torch.tensor(x, requires_grad=True)
            nu, nu_abs = x[:S], x[S]
            e = A.advantage(r, kl, nu[s], nu[s2], done, alpha, gamma, nu_abs)
            loss = fn(e, nu[s0], alpha, gamma, log_rho_bar, nu_abs, f_abs)
            loss.backward()
            return loss.item(), x.grad.numpy().copy()
        return f

    f_exp, f_lme = objective(A.nu_loss_exp), objective(A.nu_loss_log_mean_exp)
    opt = dict(method="BFGS", jac=True, options={"gtol": 1e-10, "maxiter": 10_000})
    res_exp = minimize(f_exp, np.zeros(S + 1), **opt)
    res_lme = minimize(f_lme, rng.normal(size=S + 1), **opt)
    assert np.abs(f_exp(res_exp.x)[1]).max() < 1e-6 and np.abs(f_lme(res_lme.x)[1]).max() < 1e-6
    assert res_exp.fun == pytest.approx(res_lme.fun, abs=1e-8)
    assert np.ptp(res_exp.x - res_lme.x) < 1e-5  # nu* - nu~* is a constant (absorbing value included)
    assert f_lme(res_lme.x + 3.7)[0] == pytest.approx(res_lme.fun, abs=1e-9)  # Lemma E.2
    for _ in range(5):  # Lemma E.3: L >= L~ everywhere
        x = rng.normal(size=S + 1) * 2
        assert f_exp(x)[0] >= f_lme(x)[0] - 1e-12
    x = torch.as_tensor(res_lme.x)
    e = A.advantage(r, kl, x[:S][s], x[:S][s2], done, alpha, gamma, x[S])
    log_y = A._log_y(e, alpha, gamma, log_rho_bar, x[S], f_abs).item()
    c_star = alpha / (1 - gamma) * (log_y - 1)
    assert f_exp(res_lme.x + c_star)[0] == pytest.approx(res_exp.fun, abs=1e-8)
    np.testing.assert_allclose(res_lme.x + c_star, res_exp.x, atol=1e-5)
    # without the absorbing state (terminals simply not bootstrapped) the shift invariance is lost
    e0 = A.advantage(r, kl, x[:S][s], x[:S][s2], done, alpha, gamma, 0.0)
    e1 = A.advantage(r, kl, x[:S][s] + 1, x[:S][s2] + 1, done, alpha, gamma, 0.0)
    assert abs(A.nu_loss_log_mean_exp(e0, x[:S][s0], alpha, gamma).item()
               - A.nu_loss_log_mean_exp(e1, x[:S][s0] + 1, alpha, gamma).item()) > 1e-3


# ------------------------------------------------ importance resampling
def test_importance_resampling_is_unbiased():
    """rho_bar * (mean over D_rho) equals the importance-weighted mean over D (Eq. 12 vs Eq. 10)."""
    ds = random_dataset(episodes=40, seed=1).to("cpu").seed(0)
    g = torch.Generator().manual_seed(0)
    log_rho = 1.5 * torch.randn(ds.n_transitions, generator=g) + 3.0  # large ratios: computed in log space
    weights, log_rho_bar = A.resampling_weights(log_rho)
    assert log_rho_bar.item() == pytest.approx(math.log(log_rho.double().exp().mean().item()), rel=1e-5)
    f = ds.transitions(ds.transition_rows())["reward"].double()
    target = (log_rho.double().exp() * f).mean().item()  # E_D[rho f]
    n = 200_000
    x = ds.sample(n, weights=weights)["reward"].double()
    rho_bar = math.exp(log_rho_bar.item())
    est = rho_bar * x.mean().item()
    se = rho_bar * x.std().item() / math.sqrt(n)
    assert abs(est - target) < 4 * se
    # resampling is not the same as uniform sampling: the estimate without rho would be far off
    assert abs(rho_bar * f.mean().item() - target) > 10 * se


def sharpen(model: A.AlberDICE, policy: float = 30.0, ar: float = 10.0) -> None:
    """Scale the last layers so that the policies and pi_{-i}^D are far from uniform (ratios spread out)."""
    N, L = model.policy.n_agents, model.policy.n_layers - 1
    with torch.no_grad():
        for j in range(N):
            model.policy.weights[L * N + j].mul_(policy)
            model.ar.net.weights[L * N + j].mul_(ar)


def test_pool_resampling_is_unbiased():
    """Algorithm 1 lines 4-6 with a pool (``new_pool``, ``resample``): M rows drawn uniformly from D, B rows
    resampled from them with probability proportional to rho_i, rho_bar = the pool's mean of rho_i. Over
    pools and draws, rho_bar_P * mean_{D_rho} f is an unbiased estimate of E_D[rho_i f] (the whole dataset's
    ratios) even for a pool of 16 rows out of ~170, where the self-normalised mean alone is visibly biased."""
    torch.manual_seed(0)
    ds = random_dataset(N=3, K=3, episodes=50, seed=2).to("cpu").seed(0)
    model = A.AlberDICE(3, ds.obs_dim, ds.state_dim, 3, 8)
    sharpen(model)
    args = A.Args(batch_size=8, rho_pool=16)
    assert A.uses_pool(args, ds)
    lpo = A.dataset_log_probs(model, ds, "ar")
    i = 2
    rho = A.log_importance_ratios(A.dataset_log_probs(model, ds, "policy"), lpo)[:, i].double().exp()
    f_all = ds.transitions(ds.transition_rows())["reward"].double()
    target = (rho * f_all).mean().item()  # E_D[rho f]
    assert rho.max() / rho.mean() > 5  # the ratios are far from uniform
    est, snis = [], []
    for _ in range(6000):
        r = A.resample(model, ds, i, args, A.new_pool(ds, args, 3), lpo)
        f = r["x"]["reward"].double().mean().item()
        est.append(math.exp(r["log_rho_bar"].item()) * f)
        snis.append(f)
    est, snis = np.array(est), np.array(snis)
    se = est.std() / math.sqrt(len(est))
    assert abs(est.mean() - target) < 4 * se, (est.mean(), target, se)
    # the resampled rows alone estimate E_D[rho f] / E_D[rho] only up to the O(1/M) bias of self-normalisation
    se_snis = snis.std() / math.sqrt(len(snis))
    assert abs(snis.mean() - target / rho.mean().item()) > 4 * se_snis


def test_iteration_cost_does_not_grow_with_the_dataset():
    """FLOPs (every matmul, forward and backward) and rows through the networks of one iteration are the
    same on a dataset and on one 10x larger, with a pool; with the ratios over the whole dataset
    (--rho-pool 0) they grow with it (so the count sees dataset-sized work)."""
    from torch.utils.flop_counter import FlopCounterMode

    def cost(episodes: int, rho_pool: int) -> tuple[int, int]:
        torch.manual_seed(0)
        ds = random_dataset(N=3, K=3, episodes=episodes, seed=3).to("cpu").seed(0)
        args = A.Args(batch_size=32, rho_pool=64, hidden=16, pretrain_steps=0)
        args.rho_pool = rho_pool
        model = A.AlberDICE(3, ds.obs_dim, ds.state_dim, 3, args.hidden)
        opts = A.make_optimizers(model, args.lr)
        lpo = A.dataset_log_probs(model, ds, "ar")  # once, after pretraining
        gen = torch.Generator().manual_seed(0)
        cache, _ = A.train_iteration(model, opts, ds, args, 0, None, lpo, gen)  # (warms the whole-data cache)
        rows = [0]
        hooks = [m.register_forward_pre_hook(lambda mod, inp: rows.__setitem__(0, rows[0] + inp[0].shape[-2]))
                 for m in model.modules() if isinstance(m, A.AgentMLP)]
        with FlopCounterMode(display=False) as fc:
            A.train_iteration(model, opts, ds, args, 1, cache, lpo, gen)
        for h in hooks:
            h.remove()
        return fc.get_total_flops(), rows[0]

    small, large = cost(100, 64), cost(1000, 64)
    assert small == large and small[0] > 0
    whole_small, whole_large = cost(100, 0), cost(1000, 0)
    assert whole_large[0] > 2 * whole_small[0] and whole_large[1] > 2 * whole_small[1]


def brute_ar_log_prob(ar: A.ARDataPolicy, state, actions, others_actions, avail, i):
    """log pi_{-i}^D(a_{-i}|s, a_i) built one agent at a time (an independent reading of Eq. 45's inputs)."""
    N, K = ar.N, ar.K
    others = [j for j in range(N) if j != i]
    total = torch.zeros(state.shape[0])
    for p, j in enumerate(others):
        prev = torch.zeros(state.shape[0], max(N - 2, 0) * K)
        for q in range(p):
            prev[:, q * K:(q + 1) * K] = torch.nn.functional.one_hot(others_actions[:, q], K).float()
        x = torch.cat([torch.nn.functional.one_hot(torch.full((state.shape[0],), j), N).float(), state,
                       torch.nn.functional.one_hot(actions[:, i], K).float(), prev], -1)
        logits = ar.net(x[None], [i])[0]
        logp = A.masked_log_softmax(logits, avail[:, j])
        total = total + logp.gather(-1, others_actions[:, p:p + 1])[:, 0]
    return total


def test_importance_ratios_and_autoregressive_inputs():
    """log rho_i (Eq. 11) from the batched networks equals a one-agent-at-a-time computation."""
    torch.manual_seed(0)
    ds = random_dataset(N=3, K=3).to("cpu")
    model = A.AlberDICE(3, ds.obs_dim, ds.state_dim, 3, 16)
    b = ds.transitions(ds.transition_rows())
    log_rho = A.log_importance_ratios(A.dataset_log_probs(model, ds, "policy"), A.dataset_log_probs(model, ds, "ar"))
    lp = torch.stack([A.masked_log_softmax(model.policy(b["obs"][:, j][None], [j])[0], b["avail"][:, j])
                      .gather(-1, b["actions"][:, j:j + 1])[:, 0] for j in range(3)], -1)
    for i in range(3):
        others = [j for j in range(3) if j != i]
        with torch.no_grad():
            expect = lp[:, others].sum(-1) - brute_ar_log_prob(model.ar, b["state"], b["actions"],
                                                               b["actions"][:, others], b["avail"], i)
        torch.testing.assert_close(log_rho[:, i], expect, rtol=1e-5, atol=1e-5)
    clipped = A.log_importance_ratios(lp, A.dataset_log_probs(model, ds, "ar"), rho_max=1.0)
    assert clipped.max() <= 1e-6


def test_others_kl_exact_and_monte_carlo():
    """KL(pi_{-i} || pi_{-i}^D(.|s, a_i)): the chain-rule form equals the brute-force sum over every joint
    action of the others, at the dataset's a_i and for every a_i; with fewer samples than the K^(N-2)
    prefixes it is a Monte-Carlo estimate, unbiased."""
    torch.manual_seed(0)
    ds = random_dataset(N=3, K=3).to("cpu")
    model = A.AlberDICE(3, ds.obs_dim, ds.state_dim, 3, 16)
    with torch.no_grad():  # peaked distributions, so that the KL depends on the sampled prefix
        for k in (3 * 2 + j for j in range(3)):
            model.ar.net.weights[k].mul_(30)
            model.policy.weights[k].mul_(300)
    b = ds.transitions(ds.transition_rows()[:12])
    logp = model.policy_logp(b["obs"], b["avail"]).detach()
    i, others = 1, [0, 2]
    lpo = logp[:, others]

    def brute(actions):
        kl = torch.zeros(12)
        for combo in itertools.product(range(3), repeat=2):
            c = torch.tensor(combo).expand(12, 2)
            lp_c = sum(logp[:, j].gather(-1, c[:, q:q + 1])[:, 0] for q, j in enumerate(others))
            lpd = brute_ar_log_prob(model.ar, b["state"], actions, c, b["avail"], i)
            kl += torch.where(lp_c > -1e9, lp_c.exp() * (lp_c - lpd), torch.zeros(()))
        return kl

    with torch.no_grad():
        exact = A.others_kl(lpo, model.ar, b["state"], b["actions"], b["avail"], i, n_samples=3)
        torch.testing.assert_close(exact, brute(b["actions"]), rtol=1e-4, atol=1e-5)
        exact_all = A.others_kl(lpo, model.ar, b["state"], b["actions"], b["avail"], i, 3, all_actions=True)
        for a in range(3):
            acts = b["actions"].clone()
            acts[:, i] = a
            torch.testing.assert_close(exact_all[:, a], brute(acts), rtol=1e-4, atol=1e-5)
        g = torch.Generator().manual_seed(0)
        mc = torch.stack([A.others_kl(lpo, model.ar, b["state"], b["actions"], b["avail"], i, 2, g)
                          for _ in range(400)])  # 2 < 3 prefixes: Monte Carlo
    assert mc.std(0).max() > 0.1  # it is random
    se = mc.std(0) / math.sqrt(400)
    assert ((mc.mean(0) - exact).abs() < 4 * se + 1e-5).all()


def test_own_last_nll_is_the_data_log_likelihood_of_every_agent():
    """The pretraining loss of pi_i^D(a_i | s, a_{-i}), all agents in one batched pass, equals the mean
    over agents and rows of the network's log-likelihood on its concatenated input [s, onehot(a_{-i})]
    (2, 3 and 4 agents), and its gradient reaches every agent's weights."""
    torch.manual_seed(0)
    for N in (2, 3, 4):
        ds = random_dataset(N=N, K=3).to("cpu")
        model = A.AlberDICE(N, ds.obs_dim, ds.state_dim, 3, 16)
        b = ds.transitions(ds.transition_rows()[:20])
        direct = []
        for i in range(N):
            others = [j for j in range(N) if j != i]
            x = torch.cat([b["state"], torch.nn.functional.one_hot(b["actions"][:, others], 3).flatten(1).float()], -1)
            lp = A.masked_log_softmax(model.own_last(x[None], [i])[0], b["avail"][:, i], b["actions"][:, i])
            direct.append(-lp.gather(-1, b["actions"][:, i:i + 1]).mean())
        loss = A.own_last_nll(model, b)
        torch.testing.assert_close(loss, torch.stack(direct).mean(), rtol=1e-5, atol=1e-6)
        loss.backward()
        assert all(model.own_last.weights[i].grad.abs().sum() > 0 for i in range(N))


def test_own_last_prior_exact_and_monte_carlo():
    """E_{a_{-i} ~ pi_{-i}} log pi_i^D(. | s, a_{-i}) (the own-last data factor of the policy step): the batched
    form equals the brute-force sum over every joint action of the others (2 and 3 agents), and with fewer
    than K^(N-1) allowed enumerations it is a Monte-Carlo estimate, unbiased."""
    torch.manual_seed(0)
    for N in (2, 3):
        ds = random_dataset(N=N, K=3).to("cpu")
        model = A.AlberDICE(N, ds.obs_dim, ds.state_dim, 3, 16)
        with torch.no_grad():  # peaked distributions, so that the prior depends on the others' actions
            for k in (2 * N + j for j in range(N)):
                model.own_last.weights[k].mul_(5)
                model.policy.weights[k].mul_(20)
        b = ds.transitions(ds.transition_rows()[:12])
        logp = model.policy_logp(b["obs"], b["avail"], keep=b["actions"]).detach()
        i = 1
        others = [j for j in range(N) if j != i]
        brute = torch.zeros(12, 3)
        with torch.no_grad():
            for combo in itertools.product(range(3), repeat=N - 1):
                c = torch.tensor(combo).expand(12, N - 1)
                w = sum(logp[:, j].gather(-1, c[:, q:q + 1])[:, 0] for q, j in enumerate(others)).exp()
                x = torch.cat([b["state"], torch.nn.functional.one_hot(c, 3).flatten(1).float()], -1)
                logits = model.own_last(x[None], [i])[0]  # the network on its concatenated input
                lp = A.masked_log_softmax(logits, b["avail"][:, i], b["actions"][:, i])
                brute += w[:, None] * lp
            exact = A.own_last_prior(model, b, i, logp[:, others], n_enumerate=16, n_samples=1)
            torch.testing.assert_close(exact, brute, rtol=1e-4, atol=1e-4)
            g = torch.Generator().manual_seed(0)
            mc = torch.stack([A.own_last_prior(model, b, i, logp[:, others], 0, 2, g) for _ in range(400)])
        assert mc.std(0).max() > 0.1  # it is random
        se = mc.std(0) / math.sqrt(400)
        avail = exact > -100  # an unavailable action of agent i is -1e4 in every draw
        assert ((mc.mean(0) - exact).abs() < 4 * se + 1e-4)[avail].all()


def test_policy_factorisations_agree_on_a_consistent_joint():
    """log pi_i^D(a|s) - KL(pi_{-i} || pi_{-i}^D(.|s, a)) = E_{pi_{-i}} log pi_i^D(a|s, a_{-i}) + const (docs,
    "The policy step's data factor"): on a one-state game whose data has full support and correlated agents
    (joint [[0.4, 0.1], [0.2, 0.3]]), both factorisations, from their separately fitted data models, prefer
    agent 1's actions by the same margin for partner policies far from the data's."""
    torch.manual_seed(0)
    env = common_envs.make_env("matrix", "penalty_xor", episode_limit=50)
    support = [(0, 0)] * 4 + [(0, 1)] + [(1, 0)] * 2 + [(1, 1)] * 3
    eps = collect.rollout(env, collect.JointSupportPolicy(support, np.random.default_rng(0)), 200, seed=0)
    ds = collect.episodes_to_dataset(env, eps, "joint", {}).to("cpu").seed(0)
    args = xor_args(pretrain_steps=1000, batch_size=512, lr=1e-2)
    model = A.AlberDICE(2, 4, 4, 2, args.hidden)
    A.pretrain_data_policies(model, ds, args, None)
    P = np.array([[0.4, 0.1], [0.2, 0.3]])
    b = ds.transitions(ds.transition_rows()[:1])
    for p_a in (0.05, 0.5, 0.95):
        set_policy(model, 1, [p_a, 1 - p_a])
        with torch.no_grad():
            lpo = model.policy_logp(b["obs"], b["avail"], [1], keep=b["actions"])
            first = model.data_logp(b["obs"], b["avail"], [0])[:, 0] \
                - A.kl_term(model, b, 0, "policy", 16, all_actions=True, others_logp=lpo)
            last = A.own_last_prior(model, b, 0, lpo, 16, 1)
        pi2 = np.array([p_a, 1 - p_a])
        exact = [np.log(P[a].sum()) - (pi2 * np.log(pi2 / (P[a] / P[a].sum()))).sum()
                 for a in (0, 1)]  # log P_1(a) - KL(pi_2 || P(.|a)), from the true joint
        margin = exact[0] - exact[1]
        assert abs((first[0, 0] - first[0, 1]).item() - margin) < 0.1, (p_a, first, margin)
        assert abs((last[0, 0] - last[0, 1]).item() - margin) < 0.1, (p_a, last, margin)


# -------------------------------------- the KL term: paper-literal vs sound
def xor_args(**kw) -> A.Args:
    base = dict(batch_size=128, hidden=16, lr=3e-2, pretrain_steps=100, alpha=0.1, alpha_end=0.0, total_steps=16,
                inner_steps=10)  # the Penalty-XOR configuration of docs/alberdice.md
    return A.Args(**{**base, **kw})


def pretrained(quality: str, seed: int, args: A.Args):
    torch.manual_seed(seed)
    ds = collect.xor_dataset("penalty_xor", quality, seed=seed).to("cpu").seed(seed)
    model = A.AlberDICE(2, 4, 4, 2, args.hidden)
    A.pretrain_data_policies(model, ds, args, None)
    return ds, model


def set_policy(model: A.AlberDICE, agent: int, probs) -> None:
    """Make agent's policy output ``probs`` for every observation."""
    with torch.no_grad():
        last = model.policy.n_layers - 1
        model.policy.weights[last * 2 + agent].zero_()
        model.policy.biases[last * 2 + agent].copy_(torch.log(torch.tensor(probs)))


def test_kl_estimators_on_penalty_xor_b():
    """Dataset (b) = {AB, BA}, agent 2 plays A with probability 0.8. The reduced-MDP advantage of
    agent 1 (Eq. 5) favours B (-> BA, optimal); the per-sample log rho of Eq. 8, averaged over the
    resampled data, favours A (-> AA, never in the data): it cannot see the KL of the joint actions
    that leave the data's support. The 'policy' estimator (default) is the sound one."""
    args = xor_args()
    ds, model = pretrained("b", 0, args)
    set_policy(model, 0, [0.5, 0.5])
    set_policy(model, 1, [0.8, 0.2])
    x = ds.transitions(ds.transition_rows())
    lp = A.dataset_log_probs(model, ds, "policy")
    rho = A.log_importance_ratios(lp, A.dataset_log_probs(model, ds, "ar"))[:, 0].exp()
    a1 = x["actions"][:, 0]
    prefs = {}
    for est in ("policy", "sample"):
        e = x["reward"] - 1.0 * A.kl_term(model, x, 0, est, 16)  # alpha = 1
        # E_{D_rho}[e_hat | a_1] with exact resampling weights (nu is constant in this one-state game)
        prefs[est] = [((rho * e)[a1 == a].sum() / rho[a1 == a].sum()).item() for a in (0, 1)]
    assert prefs["policy"][1] > prefs["policy"][0] + 1.0
    assert prefs["sample"][0] > prefs["sample"][1]


# ----------------------------------------------- Penalty-XOR convergence
def train_xor(quality: str, seed: int, **kw) -> np.ndarray:
    args = xor_args(**kw)
    ds, model = pretrained(quality, seed, args)
    opts = A.make_optimizers(model, args.lr)
    lpo = A.dataset_log_probs(model, ds, "ar")
    gen = torch.Generator().manual_seed(seed)
    log_rho = None
    for step in range(args.total_steps):
        log_rho, _ = A.train_iteration(model, opts, ds, args, step, log_rho, lpo, gen)
    obs = torch.tensor([[0, 1, 0, 1]] * 2, dtype=torch.float32)[None]
    p = A.make_act_fn(model.policy, torch.device("cpu")).probs(obs, torch.ones(1, 2, 2, dtype=torch.bool))[0]
    return np.outer(p[0].numpy(), p[1].numpy())


@pytest.mark.parametrize("quality", ["a", "b", "c", "d"])
def test_penalty_xor_converges_to_one_optimal_joint_action(quality):
    """AlberDICE puts >= 0.9 of its joint probability on AB or on BA for every dataset and seed
    (the paper's Table 6: the only algorithm that is deterministic and optimal on all four)."""
    for seed in (0, 1):
        joint = train_xor(quality, seed)
        assert max(joint[0, 1], joint[1, 0]) >= 0.9, f"dataset {quality} seed {seed}: joint policy {joint.round(3)}"


# ------------------------------------------------------------ smoke tests
class FakeSMAC(common_envs.MultiAgentEnv):
    """A SMAC stand-in: 3 agents, local observations different from the state, changing
    availability masks, a winner."""

    n_agents, obs_dim, state_dim, discrete, n_actions = 3, 5, 7, True, 4

    def __init__(self, episode_limit: int = 8):
        self.episode_limit = episode_limit

    def _observe(self):
        avail = np.ones((3, 4), bool)
        avail[:, 2 + (self.t % 2)] = False  # one attack action unavailable, alternating
        obs = np.stack([np.r_[self.pos[i], self.t, i, self.pos.sum(), 1.0] for i in range(3)]).astype(np.float32)
        return obs, np.r_[self.pos, self.t, 0.0, 0.0, 0.0].astype(np.float32), avail

    def reset(self, seed=None):
        self.t, self.pos = 0, np.zeros(3)
        return self._observe()

    def step(self, actions):
        a = np.asarray(actions)
        self.pos = self.pos + (a == 1) - (a == 0)
        self.t += 1
        won = bool((self.pos >= 2).all())
        return (*self._observe(), float((a == 1).mean()), won, self.t >= self.episode_limit and not won, {"won": won})


@pytest.fixture
def fake_smac(monkeypatch):
    monkeypatch.setitem(common_envs.FAMILIES, "smacv1", (lambda task, **o: FakeSMAC(**o), None))
    return common_envs.make_env("smacv1", "3m")


def smoke_args(tmp_path, path, env, task, **kw) -> A.Args:
    base = dict(env=env, task=task, quality="random", dataset=str(path), total_steps=4, batch_size=32, eval_every=2,
                eval_episodes=2, final_eval_episodes=2, pretrain_steps=3, hidden=8, log_every=1, rho_pool=32,
                device="cpu", eval_envs=2, run_dir=str(tmp_path / "run"),
                alpha_end=0.0)  # a decaying alpha depends on total_steps, which the split run changes
    return A.Args(**{**base, **kw})


# task, data episode limit; the matrix data (30 transitions) has the ratios over the whole dataset, the others a pool
SMOKE_ENVS = {"matrix": ("penalty_xor", 5), "bridge": ("hard", 12), "smacv1": ("3m", 8)}


@pytest.mark.parametrize("name", ["matrix", "bridge", "smacv1"])
def test_smoke_train_evaluate_resume(tmp_path, name, fake_smac):
    """Runs end to end (run directory, metrics.json, checkpoints); training 2 + resumed 2 iterations
    gives exactly the parameters of 4 uninterrupted iterations; --eval-only and load_policy work."""
    task, limit = SMOKE_ENVS[name]
    path = collect.random_dataset(name, task, 6, env_options={"episode_limit": limit}, n_envs=2).save(tmp_path / "data")
    env = common_envs.make_env(name, task, episode_limit=limit)
    full = A.main(smoke_args(tmp_path, path, name, task, run_dir=str(tmp_path / "full")))
    assert set(full) >= {"return_mean", "updates_per_s"} and ("joint_policy" in full) == (name == "matrix")
    A.main(smoke_args(tmp_path, path, name, task, total_steps=2))
    A.main(smoke_args(tmp_path, path, name, task, resume=True))
    a = load_checkpoint(tmp_path / "full")
    b = load_checkpoint(tmp_path / "run")
    assert a["step"] == b["step"] == 4
    for k in a["modules"]["model"]:
        torch.testing.assert_close(a["modules"]["model"][k], b["modules"]["model"][k], rtol=0, atol=0, msg=k)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    seed_entry = metrics[name][f"{task}__random"]["alberdice"]["seed_0"]
    assert {"step_0", "step_1", "absolute_metrics"} <= set(seed_entry)
    assert (tmp_path / "run" / "done.json").is_file()
    act = A.load_policy(str(tmp_path / "run"))
    obs, state, avail = env.reset(0)
    acts = act(obs[None], state[None], avail[None])
    assert acts.shape == (1, env.n_agents) and avail[np.arange(env.n_agents), acts[0]].all()
    out = A.main(smoke_args(tmp_path, path, name, task, eval_only=True, checkpoint=str(tmp_path / "run")))
    assert np.isfinite(out["return_mean"])


def test_refuses_continuous_actions(tmp_path):
    rng = np.random.default_rng(0)
    OfflineDataset.from_padded(
        obs=rng.normal(size=(3, 5, 2, 3)).astype(np.float32), state=rng.normal(size=(3, 5, 4)).astype(np.float32),
        actions=rng.uniform(-1, 1, size=(3, 4, 2, 2)).astype(np.float32), reward=np.zeros((3, 4), np.float32),
        lengths=np.full(3, 4), terminated=np.ones(3, bool), meta={"env": "toy", "task": "t", "discrete": False},
    ).save(tmp_path / "continuous")
    args = A.Args(env="toy", task="t", quality="q", dataset=str(tmp_path / "continuous"), device="cpu",
                  run_dir=str(tmp_path / "run"))
    with pytest.raises(OfflineMarlError, match="discrete actions only"):
        A.main(args)


def test_greedy_evaluation_takes_the_most_probable_available_action():
    torch.manual_seed(0)
    policy = A.AgentMLP(3, 4, 5, 16)
    obs = np.random.default_rng(0).normal(size=(6, 3, 4)).astype(np.float32)
    avail = np.random.default_rng(1).random((6, 3, 5)) < 0.6
    avail[..., 0] = True
    greedy = A.make_act_fn(policy, torch.device("cpu"), sample=False)
    p = greedy.probs(obs, avail).numpy()
    a = greedy(obs, None, avail)
    assert (a == p.argmax(-1)).all() and avail[np.arange(6)[:, None], np.arange(3), a].all()
    sampled = A.make_act_fn(policy, torch.device("cpu"))
    sampled.reseed(0)
    draws = np.stack([sampled(obs, None, avail) for _ in range(200)])
    assert avail[np.arange(6)[:, None], np.arange(3), draws].all() and len(np.unique(draws)) > 1


# ------------------------------------------- --data-distribution discounted
def test_discounted_data_distribution_makes_the_behaviour_optimal_without_reward():
    """--data-distribution discounted: d^D the behaviour's discounted occupancy of the recorded episodes
    (every end absorbing; the same d^D as OptiDICE's and ComaDICE's files). With zero reward, rho = 1 and
    no KL (the policies at the data's), nu = 0 (absorbing value 0 too) is a stationary point of Eq. 31, so by
    convexity its minimum, and the optimum is the behaviour. With the rows (true terminals continued to the
    horizon, time-limit cuts bootstrapping nu(s'); the paper's practice) it is not. Exact: gamma = 1/2 makes
    every probability dyadic, so a batch that repeats each row 2^(T - t) times has d^D as its mean."""
    import comadice
    from test_bc_optidice import tabular_episodes

    gamma, alpha, T = 0.5, 1.0, 8
    ds, sid = tabular_episodes(limit=T)
    rows = ds.transition_rows()
    prob, share = A.discounted_occupancy(ds, gamma)
    prob_c, share_c = comadice.discounted_occupancy(ds, gamma)
    np.testing.assert_array_equal(prob, prob_c)
    assert share == share_c and (A.episode_ends(ds) == comadice.episode_ends(ds)).all()
    start = np.repeat(np.asarray(ds.episode_start)[:-1], ds.episode_lengths)
    reps = 2 ** (T - (rows.numpy() - start))
    np.testing.assert_allclose(prob / prob.sum(), reps / reps.sum(), rtol=1e-12)
    first = torch.as_tensor(sid[ds.initial_rows()])

    def grad_at_zero(batch_rows, done, absorbing_frac):
        table = torch.zeros(sid.max() + 1, dtype=torch.float64, requires_grad=True)
        nu_abs = torch.zeros((), dtype=torch.float64, requires_grad=True)
        s, s2 = torch.as_tensor(sid[batch_rows]), torch.as_tensor(sid[batch_rows + 1])
        e_hat = A.advantage(torch.zeros(len(batch_rows), dtype=torch.float64), torch.zeros((), dtype=torch.float64),
                            table[s], table[s2], done, alpha, gamma, nu_abs)
        A.nu_loss_log_mean_exp(e_hat, table[first], alpha, gamma, 0.0, nu_abs, absorbing_frac).backward()
        return max(table.grad.abs().max().item(), nu_abs.grad.abs().item())

    ends = torch.as_tensor(A.episode_ends(ds), dtype=torch.float64)
    batch = torch.repeat_interleave(rows, torch.as_tensor(reps))
    assert grad_at_zero(batch, ends[batch], share) < 1e-12
    terminal = ds.transitions(rows)["done"].double()
    assert grad_at_zero(rows, terminal, A.absorbing_fraction(ds, T)) > 1e-3


def test_resampling_under_the_discounted_data_distribution_estimates_its_expectation():
    """The whole-dataset path with d^D discounted: rows drawn with probability proportional to
    d^D(x) rho(x) and rho_bar = E_{d^D}[rho] make rho_bar * mean_{D_rho} f an estimate of E_{d^D}[rho f]
    (exactly, in expectation over the draw); the pool path draws its rows from d^D."""
    ds = random_dataset(episodes=40, seed=1).to("cpu").seed(0)
    prob, _ = A.discounted_occupancy(ds, 0.9)
    p = torch.as_tensor(prob)
    g = torch.Generator().manual_seed(0)
    log_rho = 1.5 * torch.randn(ds.n_transitions, generator=g, dtype=torch.float64) + 3.0
    weights, log_rho_bar = A.resampling_weights(log_rho, p.log())
    f = ds.transitions(ds.transition_rows())["reward"].double()
    target = (p * log_rho.exp() * f).sum() / p.sum()  # E_{d^D}[rho f]
    est = math.exp(log_rho_bar.item()) * (weights * f).sum() / weights.sum()  # the draw's expectation
    assert est.item() == pytest.approx(target.item(), rel=1e-10)
    assert math.exp(log_rho_bar.item()) == pytest.approx(((p * log_rho.exp()).sum() / p.sum()).item(), rel=1e-10)
    # the pool: its rows follow d^D (early steps of every episode over-represented against the rows)
    occ = A.Occupancy(p.float(), p.float().log(), torch.as_tensor(A.episode_ends(ds)))
    args = A.Args(batch_size=8, rho_pool=ds.n_transitions - 1)
    assert A.uses_pool(args, ds)
    first = np.mean([A.new_pool(ds, args, 3, occ).x["first"].float().mean().item() for _ in range(100)])
    expect = (p * ds.transitions(ds.transition_rows())["first"].double()).sum().item() / p.sum().item()
    assert first == pytest.approx(expect, abs=0.01)
    assert abs(expect - ds.n_episodes / ds.n_transitions) > 0.05


def test_discounted_data_distribution_trains_and_resumes(tmp_path):
    """--data-distribution discounted end to end (a pool, and the whole dataset): 2 + resumed 2 iterations
    give exactly the parameters of 4; --absorbing-horizon with it is refused before the run starts."""
    path = collect.random_dataset("bridge", "hard", 6, env_options={"episode_limit": 12}, n_envs=2).save(tmp_path / "data")
    for pool in (32, 0):
        kw = dict(data_distribution="discounted", rho_pool=pool)
        A.main(smoke_args(tmp_path, path, "bridge", "hard", run_dir=str(tmp_path / f"full{pool}"), **kw))
        A.main(smoke_args(tmp_path, path, "bridge", "hard", total_steps=2, run_dir=str(tmp_path / f"r{pool}"), **kw))
        A.main(smoke_args(tmp_path, path, "bridge", "hard", resume=True, run_dir=str(tmp_path / f"r{pool}"), **kw))
        a, b = load_checkpoint(tmp_path / f"full{pool}"), load_checkpoint(tmp_path / f"r{pool}")
        assert a["args"]["data_distribution"] == "discounted" and a["step"] == b["step"] == 4
        for k in a["modules"]["model"]:
            torch.testing.assert_close(a["modules"]["model"][k], b["modules"]["model"][k], rtol=0, atol=0, msg=k)
    with pytest.raises(OfflineMarlError, match="--absorbing-horizon applies to --data-distribution rows only"):
        A.main(smoke_args(tmp_path, path, "bridge", "hard", data_distribution="discounted", absorbing_horizon=50,
                          run_dir=str(tmp_path / "refused")))
    assert not (tmp_path / "refused").exists()


def test_discounted_data_distribution_reaches_the_update(monkeypatch):
    """The wiring of --data-distribution discounted in one best-response step: on data cut only by the time
    limit (no true terminal) the rows never end an episode for the advantage, d^D ends one at every
    episode's last row; and the whole-dataset path draws its I-projection rows from d^D."""
    rng = np.random.default_rng(0)
    E, T, N, K = 30, 5, 2, 3
    ds = OfflineDataset.from_padded(
        obs=rng.normal(size=(E, T + 1, N, 4)).astype(np.float32), state=rng.normal(size=(E, T + 1, 5)).astype(np.float32),
        actions=rng.integers(0, K, size=(E, T, N)), reward=np.zeros((E, T), np.float32), lengths=np.full(E, T),
        terminated=np.zeros(E, bool), meta={"env": "toy", "task": "t", "discrete": True, "n_actions": K}).seed(0)
    prob, f = A.discounted_occupancy(ds, 0.5)
    p = torch.as_tensor(prob, dtype=torch.float32)
    occ = A.Occupancy(p, p.log(), torch.as_tensor(A.episode_ends(ds)))
    model = A.AlberDICE(N, ds.obs_dim, ds.state_dim, K, 8)
    args = A.Args(batch_size=4000, rho_pool=0, gamma=0.5)
    lpo = A.dataset_log_probs(model, ds, "ar")
    seen = []
    real = A.advantage
    monkeypatch.setattr(A, "advantage", lambda *a: seen.append(a[4].clone()) or real(*a))
    gen = torch.Generator().manual_seed(0)
    for o in (None, occ):
        A.agent_update(model, A.make_optimizers(model, 1e-3), ds, 0, A.new_pool(ds, args, K, o), lpo, 1.0, args,
                       gen, f if o else 0.0, o)
    assert seen[0].sum() == 0 and 0 < seen[1].mean() < 1
    # rows drawn with d^D x rho: the last rows (step 4 of 5) are rare under d^D (gamma^4 / sum), not 1/5
    assert seen[1].mean().item() == pytest.approx(0.5 ** 4 / sum(0.5 ** t for t in range(T)), abs=0.03)
    u = A.resample(model, ds, 0, args, A.new_pool(ds, args, K, occ), lpo, occ)["u"]
    assert u["first"].float().mean().item() == pytest.approx(1 / sum(0.5 ** t for t in range(T)), abs=0.03)
