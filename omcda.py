"""OMCDA: offline MARL with agent-specific conservative degree allocation.

Docs:       docs/omcda.md (equations, every open choice and why, usage, measured results)
Paper:      "Who Matters Matters: Agent-Specific Conservative Offline MARL" (OMCDA), Sec. 3 and App. E
Reference:  no public code exists. OMCDA builds on OMIGA (github.com/ZhengYinan-AIR/OMIGA, checked
            for network shapes, the V objective and evaluation); nothing here is copied from it.

    python omcda.py --env bridge --task hard --quality mix
    python omcda.py --env mamujoco --task HalfCheetah-6x1 --quality medium
    python omcda.py --env matrix --task penalty_xor --quality d --no-allocation

Per step (Algorithm 1): V^r (Eq. 51) -> V^c (Eq. 25) -> Q^r + return mixer (Eq. 53) -> Q^c +
constraint mixer (Eq. 52) -> policy (Eq. 54) -> influence m, budgets d = m * d_tot (Eqs. 17-20)
-> conservatism levels alpha (Eq. 55) -> Polyak update of the targets. The behaviour policies
pi_b are fitted by behaviour cloning first and then frozen.
"""

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Args:
    # ------------------------------------------- shared fields (docs/architecture.md, the contract)
    env: str = "bridge"
    """environment family: matrix, bridge, mamujoco, rware, smacv1, smacv2"""
    task: str = "hard"
    """task of the family (e.g. hard, penalty_xor, Hopper-3x1, protoss_5_vs_5)"""
    quality: str = "mix"
    """dataset quality in the catalog (e.g. mix, optimal, medium, expert)"""
    dataset: str = ""
    """path of a dataset (native directory or a public format) instead of the catalog's"""
    seed: int = 0
    """random seed (networks, sampling; evaluation episodes start at 1e6 * (seed + 1))"""
    device: str = "auto"
    """torch device: auto (CUDA when present), cpu, cuda, cuda:1, ..."""
    threads: int = 0
    """CPU threads (0: $OMP_NUM_THREADS if set, else the fastest count, measured while training)"""
    precision: str = "fp32"
    """fp32, or bf16: the update's matmuls in bfloat16 under autocast (weights and optimiser stay fp32)"""
    compile: bool = False
    """torch.compile the update step (compiling takes a while first; see docs/architecture.md)"""
    total_steps: int = 1_000_000
    """gradient updates"""
    batch_size: int = 128
    """transitions (sequences for sequence models) per update"""
    eval_every: int = 5_000
    """updates between evaluations (and at the last update); a checkpoint is written at each"""
    eval_episodes: int = 10
    """episodes per evaluation; 0 turns evaluation off (no environment is built)"""
    final_eval_episodes: int = 100
    """episodes of the final evaluation (metrics.json absolute_metrics)"""
    eval_sample: bool = False
    """evaluate by sampling actions from the policy instead of its greedy (argmax / mean) action"""
    eval_episode_limit: int = 0
    """evaluation episode limit (0: matrix 100, bridge 20, else the dataset's)"""
    eval_envs: int = 10
    """environments stepped side by side during evaluation (one batched forward pass)"""
    log_every: int = 1_000
    """updates between TensorBoard scalars (the only host synchronisations of the loop)"""
    track: bool = False
    """log to Weights & Biases as well (pip install 'offline-marl[track]'; the TensorBoard scalars are synced)"""
    wandb_project: str = "offline-marl"
    """Weights & Biases project of --track"""
    capture_video: bool = False
    """record one episode of every evaluation as an mp4 under <run>/videos (MaMuJoCo)"""
    resume: bool = False
    """continue the run in --run-dir (default: the newest of this env/task/quality/seed) from its checkpoint"""
    overwrite: bool = False
    """replace the run in --run-dir (only files this project wrote are removed)"""
    run_dir: str = ""
    """run directory (default: runs/<env>__<task>__<quality>__<algo>__<seed>__<time>)"""
    eval_only: bool = False
    """evaluate --checkpoint and print one JSON line"""
    checkpoint: str = ""
    """checkpoint file or run directory for --eval-only"""
    # ---- OMCDA (Table 5 unless marked) ----
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """Polyak rate of the target networks"""
    expectile: float = 0.7
    """expectile of the V^r regression, Eq. 51"""
    hidden: int = 256
    """hidden width of Q, V and policy networks (two hidden layers)"""
    mix_hidden: int = 64
    """hidden width of the mixer weight networks (one hidden layer, as OMIGA)"""
    lr_return: float = 2e-4
    """Adam lr of Q^r, V^r and the return mixer"""
    lr_constraint: float = 4e-5
    """Adam lr of Q^c, V^c and the constraint mixer"""
    lr_policy: float = 2e-4
    """Adam lr of the policies"""
    lr_alpha: float = 1e-3
    """Adam lr of log alpha_i, Eq. 55. Table 5's 1e-5 moves log alpha by at most ~1e-5 per update, so alpha needs
    ~3e5 updates to travel a factor 20 from alpha_init; 1e-3 gets there in a few thousand (docs/omcda.md)"""
    alpha_init: float = 10.0
    """initial conservatism level alpha_i (unstated; OMIGA's alpha)"""
    alpha_log_range: float = 4.6
    """log alpha_i is clamped to log(alpha_init) +- this (a factor of 100 either way)"""
    d_init: float | None = None
    """initial per-agent conservative degree; default from Table 5: 0.05 expert, 0.1 good, 0.2 otherwise"""
    d_tot: float | None = None
    """total conservative degree; default n_agents * d_init"""
    alloc_floor: float = 0.0
    """share of d_tot split uniformly, m = (1 - floor) softmax + floor / N (0, measured best: docs/omcda.md choice 10;
    a floor keeps every d_i >= floor * d_tot / N, which matters only with many agents)"""
    alloc_normalise: bool = True
    """divide the influences by their mean magnitude before the softmax (False = the paper's raw softmax)"""
    influence_eps: float = 1e-6
    """added to the denominator E[Var(h_i)] of the influence"""
    influence_floor: float = 0.1
    """guard: the influence's denominator E[Var(h_i)] is at least 2 * floor * d_tot / N, the Var(h) of a deviation
    that spends this fraction of the uniform per-agent budget (Var(h) ~ 2 KL near pi_b); 0 = the plain ratio,
    which grows like 1 / |pi_i - pi_b| as pi_i approaches pi_b"""
    kl_noise_std: float = 0.1
    """guard (continuous actions): the KL and the influence compare the policies with independent N(0, std^2) noise
    added to their pre-tanh actions, a lower bound of the exact KL that stays finite when behaviour cloning drives
    pi_b's log-std to its -5 clamp; 0 = the exact KL"""
    exp_cap: float = 10.0
    """Eq. 25 uses exp(z) up to this z and its tangent line above"""
    weight_clip: float = 10.0
    """the exponent of the Eq. 54 policy weights is clamped to [-clip, clip]"""
    grad_clip: float = 1.0
    """gradient-norm clip of every network update (unstated; OMIGA's); 0 = no clipping"""
    bc_steps: int = 20_000
    """behaviour-cloning updates of pi_b before training (unstated)"""
    bc_lr: float = 1e-3
    """Adam lr of behaviour cloning (unstated)"""
    diag_constraint_mixer: bool = True
    """constraint mixer W^c diagonal: agent i's Q^{c,i} mixes only Q_i^c, the variant Eq. 6 holds exactly for and the
    better one measured (docs/omcda.md choice 3); --no-diag-constraint-mixer is the paper's full N x N W^c"""
    no_allocation: bool = False
    """ablation OMCDA-w/o-CDA: d_i = d_tot / N throughout, alpha_i still adaptive"""
    no_decomposition: bool = False
    """ablation OMCDA-w/o-dq: one entangled Q_i, V_i and mixer (OMIGA with alpha_i), allocation kept"""
    random_allocation: bool = False
    """ablation OMCDA-rd: d = Dirichlet(1) * d_tot, drawn once per seed"""


# =============================================================== pure functions
def default_d_init(quality: str) -> float:
    """Table 5: d_i = 0.05 for expert (MaMuJoCo), 0.1 for good (SMAC), 0.2 for every other dataset."""
    return {"expert": 0.05, "good": 0.1}.get(quality, 0.2)


def expectile_loss(u: torch.Tensor, tau: float) -> torch.Tensor:
    """L_2^tau(u) = |tau - 1[u < 0]| u^2, elementwise (Eq. 51, u = Q - V)."""
    return torch.abs(tau - (u < 0).float()) * u.pow(2)


def exp_tangent(z: torch.Tensor, cap: float = 10.0) -> torch.Tensor:
    """exp(z) for z <= cap, its tangent line e^cap (1 + z - cap) above: convex, C^1, finite gradient."""
    e = math.exp(cap)
    return torch.where(z <= cap, torch.exp(torch.clamp(z, max=cap)), e * (1.0 + z - cap))


def eq25_loss(z: torch.Tensor, v_c_mixed: torch.Tensor, cap: float = 10.0) -> torch.Tensor:
    """Elementwise Eq. 25 objective exp(z_i) + V^{c,i}, where z_i already contains -V^{c,i}
    (the term w_i^r V_i^r / alpha_i of Eq. 25 is constant in V^c and is dropped).
    Its derivative in V^{c,i} is 1 - exp(z_i): zero when E_D[exp(z_i)] = 1 (Eq. 24)."""
    return exp_tangent(z, cap) + v_c_mixed


def mix(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Linear mixing (Eqs. 13-16): out_i = sum_j w_ij x_j + b_i, for w [B, R, N], b [B, R], x [B, N]."""
    return torch.einsum("brn,bn->br", w, x) + b


def masked_log_softmax(logits: torch.Tensor, avail: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """log pi(a) of the categorical policy softmax(logits) restricted to the available actions, ``[..., K]``.

    ``avail [..., K]`` marks the available actions. ``keep [...]`` (optional, one action index per
    row, e.g. the dataset's) counts as available, so its log-probability is finite even where the
    data marks it unavailable. A row with no available action counts as all-available (a
    distribution, never NaN). The softmax is taken with -inf at the unavailable actions; they then
    get the log-probability -1e4, set after the softmax: probability exactly 0 in any float type,
    gradient exactly 0, and the log-ratio of two such entries exactly 0 (never the difference of
    two large rounded numbers, as a finite fill before the softmax would give)."""
    if keep is not None:
        avail = avail.scatter(-1, keep.unsqueeze(-1), True)
    avail = avail | ~avail.any(-1, keepdim=True)
    logp = logits.masked_fill(~avail, float("-inf")).log_softmax(-1)
    return logp.masked_fill(~avail, -1e4)


def categorical_kl(logp: torch.Tensor, logp_b: torch.Tensor, avail: torch.Tensor) -> torch.Tensor:
    """KL(pi || pi_b) per state, an exact sum over the available actions; [..., K] -> [...]."""
    avail = avail | ~avail.any(-1, keepdim=True)
    term = torch.where(avail, logp.exp() * (logp - logp_b), torch.zeros_like(logp))
    return term.sum(-1)


def gaussian_kl(mu: torch.Tensor, log_std: torch.Tensor, mu_b: torch.Tensor, log_std_b: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, s) || N(mu_b, s_b)) of diagonal Gaussians, summed over the last dim. A tanh-Gaussian
    policy has the same KL as its pre-tanh Gaussian (KL is invariant under a bijection)."""
    var, var_b = torch.exp(2 * log_std), torch.exp(2 * log_std_b)
    return (log_std_b - log_std + (var + (mu - mu_b).pow(2)) / (2 * var_b) - 0.5).sum(-1)


def tanh_gaussian_log_prob(mean: torch.Tensor, log_std: torch.Tensor, action: torch.Tensor | None = None,
                           pre_tanh: torch.Tensor | None = None) -> torch.Tensor:
    """log pi(a) of a = tanh(u), u ~ N(mean, exp(log_std)^2) per dimension, summed over the last dimension:

        log pi(a) = sum_d [ log N(u_d; mean_d, exp(log_std_d)^2) - log(1 - tanh(u_d)^2) ],   u = atanh(a),
        log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u))   (exact, and finite for every u).

    Give ``action`` (e.g. the dataset's; clamped to +-(1 - 1e-6) first, so that an action on the
    edge of the box has a finite value and gradient) or the sampled ``pre_tanh`` u itself (exact
    even where tanh(u) rounds to +-1)."""
    u = torch.atanh(action.clamp(-1 + 1e-6, 1 - 1e-6)) if pre_tanh is None else pre_tanh
    log_normal = -0.5 * ((u - mean) / log_std.exp()).pow(2) - log_std - 0.5 * math.log(2 * math.pi)
    log_det = 2 * (math.log(2) - u - F.softplus(-2 * u))
    return (log_normal - log_det).sum(-1)


def smoothed_log_std(log_std: torch.Tensor, noise_std: float) -> torch.Tensor:
    """log-std of a Gaussian with independent N(0, noise_std^2) noise added: 0.5 log(s^2 + noise_std^2).
    The KL between two Gaussians smoothed this way is at most their KL (data-processing inequality) and
    is finite when either standard deviation goes to 0."""
    if noise_std <= 0:
        return log_std
    return 0.5 * torch.log(torch.exp(2 * log_std) + noise_std**2)


def influence_discrete(logp: torch.Tensor, logp_b: torch.Tensor, q: torch.Tensor, w: torch.Tensor,
                       avail: torch.Tensor, eps: float = 1e-6, var_floor: float = 0.0
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Influence m~_i = dE[V_tot^r] / dE[KL_i] (Eqs. 18-20) for categorical policies.

    With V_tot^r(pi) = sum_j w_j E_{pi_j}[Q_j^r] + b and the derivative taken along the geometric
    path pi_t ~ pi_b^(1-t) pi^t at t = 1 (the Fisher-metric reading of Eq. 19's inverse):
        m~_i = E_o[w_i Cov_pi_i(Q_i, h_i)] / (E_o[Var_pi_i(h_i)] + eps),  h_i = log pi_i - log pi_b^i,
    with exact sums over the available actions. Inputs [B, N, K] (w: [B, N]);
    returns m~ [N], the numerator [N] and the denominator [N] (batch means). The ratio grows like
    1/|pi - pi_b| as pi approaches pi_b along any direction; ``var_floor`` > 0 bounds the
    denominator from below (the guard of ``Args.influence_floor``)."""
    avail = avail | ~avail.any(-1, keepdim=True)
    p = torch.where(avail, logp.exp(), torch.zeros_like(logp))
    h = torch.where(avail, logp - logp_b, torch.zeros_like(logp))
    q = torch.where(avail, q, torch.zeros_like(q))
    hc = h - (p * h).sum(-1, keepdim=True)
    qc = q - (p * q).sum(-1, keepdim=True)
    num = (w * (p * qc * hc).sum(-1)).mean(0)
    den = (p * hc * hc).sum(-1).mean(0)
    return num / (den.clamp(min=var_floor) + eps), num, den


def influence_gaussian(mu: torch.Tensor, log_std: torch.Tensor, mu_b: torch.Tensor, log_std_b: torch.Tensor,
                       q_fn: Callable[[torch.Tensor], torch.Tensor], w: torch.Tensor, noise: torch.Tensor,
                       eps: float = 1e-6, var_floor: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The same influence for tanh-Gaussian policies (App. E.2: reparameterised, one sample per state).

    The geometric path between two Gaussians is Gaussian (precisions interpolate):
    prec_t = (1-t)/s_b^2 + t/s^2, mean_t = ((1-t) mu_b/s_b^2 + t mu/s^2) / prec_t, and the tanh
    Jacobians cancel in h. One sample a(t) = tanh(mean_t + noise / sqrt(prec_t)) per state gives
    dE[w Q(a(t))]/dt by autograd, and dKL(pi_t || pi_b)/dt (= Var_pi(h) at t = 1) is exact in
    closed form. mu, log_std, ... [B, N, A]; q_fn(actions [B, N, A]) -> [B, N]; w [B, N]."""
    n = mu.shape[-2]
    t = torch.ones(n, 1, device=mu.device, dtype=mu.dtype, requires_grad=True)  # one t per agent
    prec, prec_b = torch.exp(-2 * log_std), torch.exp(-2 * log_std_b)
    prec_t = (1 - t) * prec_b + t * prec
    mean_t = ((1 - t) * prec_b * mu_b + t * prec * mu) / prec_t
    a = torch.tanh(mean_t + noise * prec_t.rsqrt())
    value = (w * q_fn(a)).sum()
    kl = gaussian_kl(mean_t, -0.5 * torch.log(prec_t), mu_b, log_std_b).sum()
    num = torch.autograd.grad(value, t, retain_graph=True)[0].squeeze(-1) / mu.shape[0]
    den = torch.autograd.grad(kl, t)[0].squeeze(-1) / mu.shape[0]
    return num / (den.clamp(min=var_floor) + eps), num, den


def allocate(m_tilde: torch.Tensor, d_tot: float, floor: float = 0.0, normalise: bool = True
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eqs. 17 and 20: m = softmax over agents of the influences, d_i = m_i d_tot.

    With ``normalise`` the influences (in reward units) are divided by their mean magnitude first,
    and ``floor`` of the budget is split uniformly: m = (1 - floor) softmax(z) + floor / N, so every
    d_i > 0. ``normalise=False, floor=0`` is the paper's literal softmax. Returns (m, d), both [N]."""
    z = m_tilde / (m_tilde.abs().mean() + 1e-8) if normalise else m_tilde
    m = (1 - floor) * torch.softmax(z, -1) + floor / m_tilde.shape[-1]
    return m, m * d_tot


# ===================================================================== networks
def mlp(inp: int, hidden: int, out: int, layers: int = 2) -> nn.Sequential:
    mods: list[nn.Module] = []
    for i in range(layers):
        mods += [nn.Linear(inp if i == 0 else hidden, hidden), nn.ReLU()]
    return nn.Sequential(*mods, nn.Linear(hidden, out))


class AgentNet(nn.Module):
    """One MLP shared by all agents: input own observation + one-hot agent id (+ own action);
    all agents in one forward pass. Output [B, N, out] (``squeeze`` drops out == 1)."""

    def __init__(self, obs_dim: int, n_agents: int, hidden: int, out: int = 1, act_dim: int = 0, squeeze: bool = True):
        super().__init__()
        self.net = mlp(obs_dim + n_agents + act_dim, hidden, out)
        self.register_buffer("ids", torch.eye(n_agents))
        self.squeeze = squeeze and out == 1

    def forward(self, obs: torch.Tensor, act: torch.Tensor | None = None) -> torch.Tensor:
        parts = [obs, self.ids.expand(*obs.shape[:-1], -1)] + ([act] if act is not None else [])
        y = self.net(torch.cat(parts, -1))
        return y.squeeze(-1) if self.squeeze else y


class Mixer(nn.Module):
    """Non-negative state-dependent mixing weights and a bias (Eqs. 13-16): W(s) = |f_w(s)| of shape
    [rows, N] and b(s) of shape [rows]; a 64-unit ReLU hypernetwork on the global state. rows = 1 is
    the return mixer (w^r, b^r); rows = N is the constraint mixer (row i = w^{c,i}, b^{c,i}),
    optionally diagonal."""

    def __init__(self, state_dim: int, n_agents: int, rows: int, hidden: int, diag: bool = False):
        super().__init__()
        self.n, self.rows, self.diag = n_agents, rows, diag
        self.trunk = nn.Sequential(nn.Linear(state_dim, hidden), nn.ReLU())
        self.w = nn.Linear(hidden, n_agents if diag else rows * n_agents)
        self.b = nn.Linear(hidden, rows)

    def forward(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.trunk(state)
        w = self.w(h).abs()
        w = torch.diag_embed(w) if self.diag else w.view(-1, self.rows, self.n)
        return w, self.b(h)


class Policy(nn.Module):
    """pi_i(a_i | o_i) for all agents at once: a masked categorical (discrete) or a tanh-Gaussian
    (continuous; mean clamped to +-9, log-std to [-5, 2] as in OMIGA)."""

    def __init__(self, obs_dim: int, n_agents: int, hidden: int, discrete: bool, n_actions: int, act_dim: int):
        super().__init__()
        self.discrete = discrete
        self.body = AgentNet(obs_dim, n_agents, hidden, out=n_actions if discrete else 2 * act_dim, squeeze=False)

    def forward(self, obs: torch.Tensor, avail: torch.Tensor):
        """Discrete: log-probabilities [B, N, K]; continuous: (mean, log_std) [B, N, A] pre-tanh."""
        y = self.body(obs)
        if self.discrete:
            return masked_log_softmax(y, avail)
        mu, log_std = y.chunk(2, -1)
        return mu.clamp(-9.0, 9.0), log_std.clamp(-5.0, 2.0)

    def log_prob(self, obs: torch.Tensor, avail: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """log pi_i(a_i | o_i) of given actions [B, N], and the distribution parameters. A discrete
        dataset action marked unavailable is treated as available, so its log-probability is finite."""
        if self.discrete:
            avail = avail.scatter(-1, actions.unsqueeze(-1), True)
            logp = self(obs, avail)
            return logp.gather(-1, actions.unsqueeze(-1)).squeeze(-1), logp
        mu, log_std = self(obs, avail)
        return tanh_gaussian_log_prob(mu, log_std, actions), (mu, log_std)

    @torch.no_grad()
    def act(self, obs: torch.Tensor, avail: torch.Tensor, deterministic: bool = True,
            gen: torch.Generator | None = None) -> torch.Tensor:
        if self.discrete:
            logp = self(obs, avail)
            if deterministic:
                return logp.argmax(-1)
            p = logp.exp()
            return torch.multinomial(p.reshape(-1, p.shape[-1]), 1, generator=gen).view(p.shape[:-1])
        mu, log_std = self(obs, avail)
        noise = torch.randn(mu.shape, generator=gen, device=mu.device, dtype=mu.dtype)
        return torch.tanh(mu if deterministic else mu + log_std.exp() * noise)


# ===================================================================== learner
_ADAM: dict[str, Any] = {"fused": True}  # one fused kernel per optimiser (3x faster on a CPU)


def _frozen_copy(net: nn.Module) -> nn.Module:
    """A target network: a copy whose parameters move only by Polyak averaging."""
    t = copy.deepcopy(net)
    for p in t.parameters():
        p.requires_grad_(False)
    return t


class OMCDA(nn.Module):
    """All networks, optimisers and the update of Algorithm 1 (also used by the tests)."""

    def __init__(self, args: Args, n_agents: int, obs_dim: int, state_dim: int, discrete: bool,
                 n_actions: int = 1, act_dim: int = 1, d_tot: float = 0.4):
        super().__init__()
        self.args, self.n, self.discrete, self.d_tot = args, n_agents, discrete, float(d_tot)
        H, N = args.hidden, n_agents
        q_out, q_act = (n_actions, 0) if discrete else (1, act_dim)

        def q_net():
            return AgentNet(obs_dim, N, H, out=q_out, act_dim=q_act, squeeze=not discrete)

        # return part (with --no-decomposition: the single entangled Q_i, V_i and mixer)
        self.q_r, self.v_r = q_net(), AgentNet(obs_dim, N, H)
        self.mix_r = Mixer(state_dim, N, 1, args.mix_hidden)
        self.q_r_t, self.v_r_t, self.mix_r_t = _frozen_copy(self.q_r), _frozen_copy(self.v_r), _frozen_copy(self.mix_r)
        self.opt_v_r = torch.optim.Adam(self.v_r.parameters(), args.lr_return, **_ADAM)
        self.opt_q_r = torch.optim.Adam([*self.q_r.parameters(), *self.mix_r.parameters()], args.lr_return, **_ADAM)
        if not args.no_decomposition:  # constraint part
            self.q_c, self.v_c = q_net(), AgentNet(obs_dim, N, H)
            self.mix_c = Mixer(state_dim, N, N, args.mix_hidden, diag=args.diag_constraint_mixer)
            self.q_c_t, self.v_c_t, self.mix_c_t = _frozen_copy(self.q_c), _frozen_copy(self.v_c), _frozen_copy(self.mix_c)
            self.opt_v_c = torch.optim.Adam(self.v_c.parameters(), args.lr_constraint, **_ADAM)
            self.opt_q_c = torch.optim.Adam([*self.q_c.parameters(), *self.mix_c.parameters()], args.lr_constraint, **_ADAM)
        self.policy = Policy(obs_dim, N, H, discrete, n_actions, act_dim)
        self.behaviour = Policy(obs_dim, N, H, discrete, n_actions, act_dim)
        self.opt_pi = torch.optim.Adam(self.policy.parameters(), args.lr_policy, **_ADAM)
        self.opt_bc = torch.optim.Adam(self.behaviour.parameters(), args.bc_lr, **_ADAM)
        # conservatism levels alpha_i = exp(l_i) (Eq. 55) and budgets d_i (Eq. 17)
        self.log_alpha = nn.Parameter(torch.full((N,), math.log(args.alpha_init)))
        self.opt_alpha = torch.optim.Adam([self.log_alpha], args.lr_alpha, **_ADAM)
        self.register_buffer("d", torch.full((N,), self.d_tot / N))
        self.register_buffer("m", torch.full((N,), 1.0 / N))
        if args.random_allocation:  # OMCDA-rd: one Dirichlet(1) draw per seed
            share = np.random.default_rng(args.seed).dirichlet(np.ones(N))
            self.d.copy_(torch.as_tensor(share * self.d_tot, dtype=torch.float32))
            self.m.copy_(torch.as_tensor(share, dtype=torch.float32))
        self.var_floor = 2.0 * args.influence_floor * self.d_tot / N  # guard of the influence's denominator
        self.lo = math.log(args.alpha_init) - args.alpha_log_range
        self.hi = math.log(args.alpha_init) + args.alpha_log_range

    # ------------------------------------------------------------------ helpers
    def _step(self, opt: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if self.args.grad_clip > 0:  # 0 = no clipping (clip_grad_norm_ with 0 would zero every gradient)
            params = [p for g in opt.param_groups for p in g["params"]]
            nn.utils.clip_grad_norm_(params, self.args.grad_clip, foreach=True)
        opt.step()

    def _q(self, net: AgentNet, obs: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Q_i(o_i, a_i) [B, N] and, for discrete actions, Q_i(o_i, .) [B, N, K]."""
        if self.discrete:
            q_all = net(obs)
            return q_all.gather(-1, actions.unsqueeze(-1)).squeeze(-1), q_all
        return net(obs, actions), None

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        names = ["opt_v_r", "opt_q_r", "opt_pi", "opt_bc", "opt_alpha"]
        names += [] if self.args.no_decomposition else ["opt_v_c", "opt_q_c"]
        return {k: getattr(self, k) for k in names}

    @property
    def alpha(self) -> torch.Tensor:
        return self.log_alpha.detach().exp()

    # ------------------------------------------------------ behaviour cloning
    def bc_update(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """One maximum-likelihood step of the behaviour policies pi_b^i (frozen afterwards)."""
        logp, _ = self.behaviour.log_prob(batch["obs"], batch["avail"], batch["actions"])
        loss = -logp.mean(0).sum()
        self._step(self.opt_bc, loss)
        return loss.detach()

    # ------------------------------------------------------------------ update
    def update(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One iteration of Algorithm 1. Returns detached scalars/vectors for logging."""
        if self.args.no_decomposition:
            return self._update_entangled(batch)
        a = self.args
        obs, state, act, avail = batch["obs"], batch["state"], batch["actions"], batch["avail"]
        not_done = 1.0 - batch["done"]
        alpha = self.alpha  # [N]
        with torch.no_grad():  # target values at the dataset joint action
            q_r_t, q_r_all_t = self._q(self.q_r_t, obs, act)
            q_c_t, _ = self._q(self.q_c_t, obs, act)
            w_r_t = self.mix_r_t(state)[0][:, 0]  # w_i^r(s) [B, N]
            w_c_t, b_c_t = self.mix_c_t(state)  # W^c [B, N, N], b^c [B, N]
            q_c_mix_t = mix(w_c_t, b_c_t, q_c_t)  # Q^{c,i} [B, N], Eq. 14

        # Eq. 51: V_i^r by expectile regression on the local target Q_i^r
        v_r = self.v_r(obs)
        loss_v_r = expectile_loss(q_r_t - v_r, a.expectile).mean(0).sum()
        self._step(self.opt_v_r, loss_v_r)
        v_r = v_r.detach()

        # Eq. 25: V_i^c; gradients reach only the V^c network (target mixer, alpha, w^r, V^r detached)
        v_c = self.v_c(obs)
        v_c_mix = mix(w_c_t, b_c_t, v_c)  # V^{c,i}, Eq. 16
        z = w_r_t * (q_r_t - v_r) / alpha + (q_c_mix_t - v_c_mix)
        loss_v_c = eq25_loss(z, v_c_mix, a.exp_cap).mean(0).sum()
        self._step(self.opt_v_c, loss_v_c)

        # Eq. 53: Q_i^r and the return mixer against r + gamma V_tot^r(o') (target V^r and mixer)
        with torch.no_grad():
            w2, b2 = self.mix_r_t(batch["next_state"])
            v_tot_next = mix(w2, b2, self.v_r_t(batch["next_obs"]))[:, 0]  # Eq. 15
            y_r = batch["reward"] + a.gamma * not_done * v_tot_next
        q_r, _ = self._q(self.q_r, obs, act)
        w_r, b_r = self.mix_r(state)
        q_tot = mix(w_r, b_r, q_r)[:, 0]  # Eq. 13
        loss_q_r = (q_tot - y_r).pow(2).mean()
        self._step(self.opt_q_r, loss_q_r)

        # Eq. 52: Q_i^c and the constraint mixer against gamma V^{c,i}(o') (no KL term: see docs)
        with torch.no_grad():
            w2, b2 = self.mix_c_t(batch["next_state"])
            y_c = a.gamma * not_done.unsqueeze(-1) * mix(w2, b2, self.v_c_t(batch["next_obs"]))
        q_c, _ = self._q(self.q_c, obs, act)
        w_c, b_c = self.mix_c(state)
        loss_q_c = (mix(w_c, b_c, q_c) - y_c).pow(2).mean(0).sum()
        self._step(self.opt_q_c, loss_q_c)

        # Eq. 54: weighted behaviour cloning with weights exp(z_i) (exponent clamped)
        z = z.detach()
        weight = torch.exp(z.clamp(-a.weight_clip, a.weight_clip))
        logp_a, dist = self.policy.log_prob(obs, avail, act)
        loss_pi = -(weight * logp_a).mean(0).sum()
        self._step(self.opt_pi, loss_pi)

        kl, m_tilde, num, den = self._influence_and_kl(obs, avail, dist, q_r_all_t, w_r_t)
        self._allocate_and_alpha(kl, m_tilde)
        self._polyak()
        return dict(loss_v_r=loss_v_r.detach(), loss_v_c=loss_v_c.detach(), loss_q_r=loss_q_r.detach(),
                    loss_q_c=loss_q_c.detach(), loss_policy=loss_pi.detach(), v_r=v_r.mean(), v_c=v_c.detach().mean(),
                    q_tot=q_tot.detach().mean(), z_max=z.max(), weight_mean=weight.mean(), kl=kl.mean(0),
                    m_tilde=m_tilde, cov=num, var=den, d=self.d.clone(), m=self.m.clone(), alpha=self.alpha)

    def _update_entangled(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """OMCDA-w/o-dq (App. F.1): one entangled Q_i, V_i and mixer, i.e. OMIGA with a per-agent
        alpha_i; V_i by the OMIGA objective exp(z_i) + w_i V_i / alpha_i with z_i = w_i (Q_i - V_i) / alpha_i,
        the influence from the entangled Q_i; allocation and the alpha step as in OMCDA."""
        a = self.args
        obs, state, act, avail = batch["obs"], batch["state"], batch["actions"], batch["avail"]
        alpha = self.alpha
        with torch.no_grad():
            q_t, q_all_t = self._q(self.q_r_t, obs, act)
            w_t = self.mix_r_t(state)[0][:, 0]
        v = self.v_r(obs)
        z = w_t * (q_t - v) / alpha
        loss_v = (exp_tangent(z, a.exp_cap) + w_t * v / alpha).mean(0).sum()
        self._step(self.opt_v_r, loss_v)
        with torch.no_grad():
            w2, b2 = self.mix_r_t(batch["next_state"])
            y = batch["reward"] + a.gamma * (1 - batch["done"]) * mix(w2, b2, self.v_r_t(batch["next_obs"]))[:, 0]
        q, _ = self._q(self.q_r, obs, act)
        w, b = self.mix_r(state)
        q_tot = mix(w, b, q)[:, 0]
        loss_q = (q_tot - y).pow(2).mean()
        self._step(self.opt_q_r, loss_q)
        z = z.detach()
        weight = torch.exp(z.clamp(-a.weight_clip, a.weight_clip))
        logp_a, dist = self.policy.log_prob(obs, avail, act)
        loss_pi = -(weight * logp_a).mean(0).sum()
        self._step(self.opt_pi, loss_pi)
        kl, m_tilde, num, den = self._influence_and_kl(obs, avail, dist, q_all_t, w_t)
        self._allocate_and_alpha(kl, m_tilde)
        self._polyak()
        return dict(loss_v_r=loss_v.detach(), loss_q_r=loss_q.detach(), loss_policy=loss_pi.detach(),
                    v_r=v.detach().mean(), q_tot=q_tot.detach().mean(), z_max=z.max(), weight_mean=weight.mean(),
                    kl=kl.mean(0), m_tilde=m_tilde, cov=num, var=den, d=self.d.clone(), m=self.m.clone(),
                    alpha=self.alpha)

    def _influence_and_kl(self, obs, avail, dist, q_all_t, w_t):
        """Per-state forward KL(pi_i || pi_b^i) [B, N] and the influence m~ [N] (Eqs. 19-20), from
        this iteration's policy forward pass (before its Adam step) and the target Q^r."""
        with torch.no_grad():
            dist_b = self.behaviour(obs, avail)
        if self.discrete:
            logp = dist.detach()
            with torch.no_grad():
                kl = categorical_kl(logp, dist_b, avail)
                m_tilde, num, den = influence_discrete(logp, dist_b, q_all_t, w_t, avail, self.args.influence_eps,
                                                       self.var_floor)
            return kl, m_tilde, num, den
        # guard: both pre-tanh Gaussians smoothed by N(0, kl_noise_std^2), for the KL and the influence alike
        mu, mu_b = dist[0].detach(), dist_b[0]
        log_std = smoothed_log_std(dist[1].detach(), self.args.kl_noise_std)
        log_std_b = smoothed_log_std(dist_b[1], self.args.kl_noise_std)
        kl = gaussian_kl(mu, log_std, mu_b, log_std_b)
        m_tilde, num, den = influence_gaussian(mu, log_std, mu_b, log_std_b, lambda x: self.q_r_t(obs, x),
                                               w_t, torch.randn_like(mu), self.args.influence_eps, self.var_floor)
        return kl, m_tilde.detach(), num.detach(), den.detach()

    def _allocate_and_alpha(self, kl: torch.Tensor, m_tilde: torch.Tensor) -> None:
        a = self.args
        if not (a.no_allocation or a.random_allocation):  # Eqs. 17, 20; recomputed every step
            m, d = allocate(m_tilde, self.d_tot, a.alloc_floor, a.alloc_normalise)
            self.m.copy_(m)
            self.d.copy_(d)
        # Eq. 55 over l_i = log alpha_i: the gradient d_i - KL_i raises alpha_i when KL_i > d_i
        loss_alpha = (self.log_alpha * (self.d - kl.mean(0)).detach()).sum()
        self.opt_alpha.zero_grad(set_to_none=True)
        loss_alpha.backward()
        self.opt_alpha.step()
        with torch.no_grad():
            self.log_alpha.clamp_(self.lo, self.hi)

    @torch.no_grad()
    def _polyak(self) -> None:
        pairs = [(self.q_r, self.q_r_t), (self.v_r, self.v_r_t), (self.mix_r, self.mix_r_t)]
        if not self.args.no_decomposition:
            pairs += [(self.q_c, self.q_c_t), (self.v_c, self.v_c_t), (self.mix_c, self.mix_c_t)]
        for net, tgt in pairs:
            torch._foreach_lerp_(list(tgt.parameters()), list(net.parameters()), self.args.tau)


# ============================================================ policy interface
def make_act_fn(policy: Policy, device: torch.device, deterministic: bool = True) -> Callable:
    """act_fn(obs [E, N, o], state [E, S], avail [E, N, K]) -> actions, for common.envs.evaluate;
    sampled actions draw from the act_fn's own generator, which ``evaluate`` reseeds."""
    gen = torch.Generator(device=device)

    def act_fn(obs, state, avail):
        o = torch.as_tensor(np.asarray(obs), dtype=torch.float32, device=device)
        av = torch.as_tensor(np.asarray(avail), dtype=torch.bool, device=device)
        return policy.act(o, av, deterministic, gen).cpu().numpy()

    @torch.no_grad()
    def probs(obs, avail):  # the action probabilities [E, N, K] (discrete): the exact returns of the matrix games
        o = torch.as_tensor(np.asarray(obs), dtype=torch.float32, device=device)
        return policy(o, torch.as_tensor(np.asarray(avail), dtype=torch.bool, device=device)).exp()

    act_fn.reseed = gen.manual_seed
    if policy.discrete:
        act_fn.probs = probs
    return act_fn


def load_policy(checkpoint: str, device: str = "cpu", sample: bool | None = None) -> Callable:
    """The trained joint policy of a checkpoint (file or run directory) as an ``act_fn``;
    ``sample=None`` keeps the run's --eval-sample choice."""
    from common.runs import load_checkpoint, restore_args

    ck = load_checkpoint(checkpoint, "omcda")
    dims, args = ck["dims"], restore_args(Args, ck["args"])
    policy = Policy(dims["obs_dim"], dims["n_agents"], args.hidden, dims["discrete"], dims["n_actions"],
                    dims["act_dim"]).to(device)
    policy.load_state_dict({k[len("policy."):]: v for k, v in ck["modules"]["model"].items()
                            if k.startswith("policy.")})
    policy.eval()
    act_fn = make_act_fn(policy, torch.device(device), not (args.eval_sample if sample is None else sample))
    act_fn.meta, act_fn.args, act_fn.step = ck["meta"], args, ck["step"]
    return act_fn


# ======================================================================= main
def _scalars(m: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    """TensorBoard names for the update's outputs (the per-agent curves are the paper's Fig. 3)."""
    out = {f"losses/{k[5:]}": v for k, v in m.items() if k.startswith("loss_")}
    for k in ("v_r", "v_c", "q_tot", "z_max", "weight_mean"):
        if k in m:
            out[f"charts/{k}"] = m[k]
    per_agent = {"d": "d", "alpha": "alpha", "m": "influence", "m_tilde": "influence_raw", "kl": "kl"}
    for key, name in per_agent.items():
        for i in range(n):
            out[f"charts/{name}_{i}"] = m[key][i]
    return out


def main(args: Args) -> dict[str, Any]:
    from tqdm import tqdm

    from common.runs import Run, eval_only

    if args.eval_only:
        return eval_only(args, "omcda", load_policy)
    run = Run(args, "omcda", positive=("alpha_init", "exp_cap", "weight_clip", "influence_eps"),
              nonneg=("bc_steps", "alpha_log_range", "d_init", "d_tot"), unit=("expectile", "alloc_floor"),
              checks=((not (args.no_allocation and args.random_allocation),
                       "--no-allocation and --random-allocation exclude each other; pass one"),))
    ds, env = run.load_data()
    ds.to(run.device).seed(args.seed)
    N = ds.n_agents
    d_init = args.d_init if args.d_init is not None else default_d_init(args.quality)
    d_tot = args.d_tot if args.d_tot is not None else N * d_init
    dims = dict(n_agents=N, obs_dim=ds.obs_dim, state_dim=ds.state_dim, discrete=ds.discrete,
                n_actions=ds.n_actions, act_dim=ds.act_dim, d_tot=d_tot)
    agent = OMCDA(args, N, ds.obs_dim, ds.state_dim, ds.discrete, ds.n_actions, ds.act_dim, d_tot).to(run.device)
    act_fn = make_act_fn(agent.policy, run.device, not args.eval_sample)
    run.start(ds, env, act_fn, dims=dims, modules={"model": agent}, optimizers=agent.optimizers())
    if not run.progress.get("bc_done"):  # pi_b by behaviour cloning, then frozen
        for i in tqdm(range(args.bc_steps), desc="behaviour cloning", mininterval=2, leave=False):
            loss = agent.bc_update(ds.sample(args.batch_size))
            if (i + 1) % args.log_every == 0 or i + 1 == args.bc_steps:
                run.log(i + 1, {"losses/bc": loss.item()})
        run.progress["bc_done"] = True
        run.pretraining_done()  # its time is not update time
    for p in agent.behaviour.parameters():
        p.requires_grad_(False)
    step = run.compile(agent.update)  # torch.compile with --compile
    while run.training:
        with run.autocast():  # bfloat16 matmuls with --precision bf16
            stats = step(ds.sample(args.batch_size))
        run.record(_scalars(stats, N))
    return run.finish({"d_tot": d_tot, "d": agent.d.tolist(), "alpha": agent.alpha.tolist(),
                       "influence": agent.m.tolist()})


if __name__ == "__main__":
    import tyro

    from common import friendly_errors

    with friendly_errors():
        main(tyro.cli(Args))
