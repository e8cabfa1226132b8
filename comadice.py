"""ComaDICE: offline cooperative multi-agent RL with stationary distribution shift regularisation.

Docs:      docs/comadice.md (method, losses, implementation details, differences, results)
Paper:     T. V. Bui, T. H. Nguyen, T. Mai. "ComaDICE: Offline Cooperative Multi-Agent Reinforcement
           Learning with Stationary Distribution Shift Regularization". ICLR 2025.
Reference: github.com/vietbt/ComaDICE (commit 3c290e0), read to check facts; nothing is copied.

    python comadice.py --env bridge --task hard --quality mix
    python comadice.py --env mamujoco --task Hopper-3x1 --quality medium
    python comadice.py --env smacv2 --task protoss_5_vs_5 --alpha 10

One file: arguments, f-divergences, the mixer, the three losses (Eqs. 9, 10, 11), networks,
the training loop, evaluation and checkpoints. The (nu, theta) step of the paper's Eq. 10 is
unbounded below as written; this file uses the well-posed version derived in the docs
(section "Well-posedness"): the mixer is learned by the Q regression (Eq. 9), the advantage
mixes without a bias, and the nu gradient carries the gamma * nu_tot(s') path of Eq. 5.
"""

import copy
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal, Sequence

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
    total_steps: int = 200_000
    """gradient updates"""
    batch_size: int = 128
    """transitions (sequences for sequence models) per update"""
    eval_every: int = 5_000
    """updates between evaluations (and at the last update); a checkpoint is written at each"""
    eval_episodes: int = 32
    """episodes per evaluation; 0 turns evaluation off (no environment is built)"""
    final_eval_episodes: int = 100
    """episodes of the final evaluation (metrics.json absolute_metrics)"""
    eval_sample: bool = False
    """evaluate by sampling actions from the policy instead of its greedy (argmax / mean) action"""
    eval_episode_limit: int = 0
    """evaluation episode limit (0: matrix 100, bridge 20, else the dataset's)"""
    eval_envs: int = 8
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
    # ------------------------------------------------------------ ComaDICE (Table 4)
    alpha: float = 10.0
    """regularisation strength alpha of the f-divergence (Eq. 1)"""
    f_divergence: Literal["soft-chi2", "chi2", "kl"] = "soft-chi2"
    """f of the f-divergence (Appendix B.5)"""
    gamma: float = 0.99
    """discount factor"""
    tau: float = 0.005
    """target network update rate (nu and the mixer, used in the Q target of Eq. 9)"""
    lr: float = 1e-4
    """Adam learning rate of every network"""
    hidden: int = 256
    """width of the two hidden layers of nu_i, q_i and pi_i (shared by agents, one-hot id appended)"""
    mixer_hidden: int = 64
    """hidden width of the hypernetwork that maps the global state to the mixing weights"""
    mixer_layers: Literal[1, 2] = 1
    """1: M[x] = W.x + b (the paper's default); 2: a convex two-layer mixer (non-negative weights, ELU)"""
    mixer_embed: int = 32
    """width of the two-layer mixer's hidden layer"""
    grad_clip: float = 1.0
    """gradient-norm clip of each optimiser (0 = off)"""
    # ---------------------------------------- the reference code's choices (docs: Differences)
    reference_code: bool = False
    """apply the reference code's choices below (SMAC: return-to-go, no terminals; discrete: clip 2; MaMuJoCo: a/4)"""
    nu_loss: Literal["dice", "reference"] = "dice"
    """dice: the well-posed Eq. 10 of this file; reference: the reference code's per-agent nu step"""
    policy_weights: Literal["global", "per-agent"] = "global"
    """global: w*(A_tot) of Eq. 11; per-agent: sum_i w*(W_i (q_i - nu_i)) with a learnable offset (reference)"""
    weight_clip: float = 0.0
    """clip the BC weights at this value (0 = off; the reference code uses 2 for discrete actions)"""
    return_to_go: bool = False
    """train on the undiscounted return-to-go instead of the reward (the reference code on SMAC)"""
    action_scale: float = 1.0
    """divide dataset actions by this before fitting and multiply actions by it when acting (reference MaMuJoCo: 4)"""
    ignore_terminal: bool = False
    """bootstrap at true terminal steps too (the reference code on SMAC, whose done flag never fires)"""
    # ------------------------------------------------ d^D (docs: "d^D and the absorbing state")
    data_distribution: Literal["rows", "discounted"] = "rows"
    """d^D of Eqs. 9-11. rows: every transition alike, true terminals bootstrap 0, time-limit cuts
    bootstrap nu_tot(s') (the paper). discounted: the behaviour's discounted occupancy of the recorded
    episodes: each episode weighs alike, its step t (1 - gamma) gamma^t, and every episode's end (true
    terminal or time limit) leads to an absorbing state with a learnt value, which gets the rest"""


# =================================================================== f-divergences
# f(w), its conjugate f*(y) = max_{w >= 0} w y - f(w), and the maximiser w*(y) = max(0, f'^-1(y))
# (Prop. 4.1, Appendix B.5). soft-chi2 is the default.
#   soft-chi2: f = w log w - w + 1 (w < 1), (w - 1)^2 / 2 (w >= 1); w* = e^y (y < 0), y + 1; f* = e^y - 1, y + y^2/2
#   chi2:      f = (w - 1)^2 / 2;                     w* = max(0, y + 1); f* = y + y^2/2 (y >= -1), -1/2
#   kl:        f = w log w - w + 1;                   w* = e^y;           f* = e^y - 1
F_DIVERGENCES = ("soft-chi2", "chi2", "kl")


def f_fn(w: torch.Tensor, f: str) -> torch.Tensor:
    """The generator f(w) of the f-divergence, for w >= 0."""
    kl = torch.xlogy(w, w) - w + 1
    chi2 = 0.5 * (w - 1) ** 2
    if f == "kl":
        return kl
    if f == "chi2":
        return chi2
    if f == "soft-chi2":
        return torch.where(w < 1, kl, chi2)
    raise ValueError(f"unknown f-divergence {f!r}; choose one of {F_DIVERGENCES}")


def w_star(y: torch.Tensor, f: str) -> torch.Tensor:
    """w*(y) = max(0, f'^-1(y)): the ratio that maximises w y - f(w) over w >= 0 (Prop. 4.1)."""
    if f == "kl":
        return torch.exp(y)
    if f == "chi2":
        return torch.clamp(y + 1, min=0)
    if f == "soft-chi2":
        return torch.where(y < 0, torch.exp(y.clamp(max=0)), y + 1)
    raise ValueError(f"unknown f-divergence {f!r}; choose one of {F_DIVERGENCES}")


def f_star(y: torch.Tensor, f: str) -> torch.Tensor:
    """f*(y) = max_{w >= 0} w y - f(w), the convex conjugate on w >= 0; d f*/dy = w*(y)."""
    if f == "kl":
        return torch.expm1(y)
    if f == "chi2":
        return torch.where(y < -1, torch.full_like(y, -0.5), y + 0.5 * y * y)
    if f == "soft-chi2":
        return torch.where(y < 0, torch.expm1(y.clamp(max=0)), y + 0.5 * y * y)
    raise ValueError(f"unknown f-divergence {f!r}; choose one of {F_DIVERGENCES}")


# =========================================================================== mixer
# M^s[x] mixes the agents' local values x [..., N] into one global value with weights that a
# hypernetwork computes from the global state s (Sec. 4.2, 5). Its parameters for a batch of
# states are a tuple: one layer (W [.., N], b [..]), two layers (W1 [.., N, E], b1 [.., E],
# W2 [.., E], b2 [..]). Weights are non-negative (absolute values) and the two-layer mixer uses
# ELU, which is convex and non-decreasing: Theorem 4.2's conditions, so M^s is convex and
# non-decreasing in x.


def mix(p: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """M^s[x]: [..., N] -> [...]."""
    if len(p) == 2:
        w, b = p
        return (w * x).sum(-1) + b
    w1, b1, w2, b2 = p
    h = F.elu((x.unsqueeze(-1) * w1).sum(-2) + b1)
    return (w2 * h).sum(-1) + b2


def mix_adv(p: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The bias-free mixer M^s[x] - M^s[0] used for advantages: A_tot = mix_adv(p, q - nu).

    One layer: W.x, which equals M[q] - M[nu] = q_tot - nu_tot. Two layers: still convex and
    non-decreasing in x, and 0 at x = 0 (docs: Well-posedness)."""
    if len(p) == 2:
        return (p[0] * x).sum(-1)
    w1, b1, w2, _ = p
    h = F.elu((x.unsqueeze(-1) * w1).sum(-2) + b1) - F.elu(b1)
    return (w2 * h).sum(-1)


class Mixer(nn.Module):
    """Hypernetwork on the global state that returns the mixing parameters for ``mix``."""

    def __init__(self, state_dim: int, n_agents: int, hidden: int = 64, layers: int = 1, embed: int = 32):
        super().__init__()
        self.n_agents, self.layers, self.embed = n_agents, int(layers), embed
        self.body = nn.Sequential(nn.Linear(state_dim, hidden), nn.ReLU())
        if self.layers == 1:
            self.head = nn.Linear(hidden, n_agents + 1)  # W (N) and b (1)
        elif self.layers == 2:
            self.head = nn.Linear(hidden, n_agents * embed + 2 * embed + 1)  # W1, b1, W2, b2
        else:
            raise ValueError(f"mixer_layers must be 1 or 2, got {layers}")

    def forward(self, state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.head(self.body(state))
        n, e = self.n_agents, self.embed
        if self.layers == 1:
            return out[..., :n].abs(), out[..., n]
        w1 = out[..., : n * e].abs().unflatten(-1, (n, e))
        b1 = out[..., n * e: n * e + e]
        w2 = out[..., n * e + e: n * e + 2 * e].abs()
        return w1, b1, w2, out[..., -1]


# ======================================================================== losses
def q_loss(p: Sequence[torch.Tensor], q: torch.Tensor, nu: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 9: (A_tot(s, a) + nu_tot(s) - [r + gamma (1 - done) nu_tot(s')])^2, trained in q and the mixer.

    A_tot + nu_tot = M[q - nu] - M[0] + M[nu], which is W.q + b for the one-layer mixer (nu cancels).
    ``target`` comes from the target nu and target mixer; ``nu`` is held fixed."""
    nu = nu.detach()
    q_tot = mix_adv(p, q - nu) + mix(p, nu)
    return F.mse_loss(q_tot, target)


def nu_loss(p: Sequence[torch.Tensor], p_next: Sequence[torch.Tensor], p_init: Sequence[torch.Tensor],
            q: torch.Tensor, nu: torch.Tensor, nu_next: torch.Tensor, nu_init: torch.Tensor,
            not_done: torch.Tensor, gamma: float, alpha: float, f: str, nu_abs: torch.Tensor | None = None,
            share: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 10, well posed: (1 - gamma) E_{s0}[M^{s0}[nu(s0)]] + E_D[alpha f*(A_tot / alpha)] in nu.

    A_tot = M^s[q - nu] - M^s[0] (value of Eq. 10 without the mixer bias). Its gradient also
    carries gamma (1 - done) d nu_tot(s') because q_tot stands for r + gamma E[nu_tot(s')] (Eq. 5):
    with q at its Bellman target this is the exact gradient of the DICE dual (Prop. 4.1), whose
    minimiser gives the optimal w*. The mixer and q are inputs here, not variables (they are
    detached): theta is learned by Eq. 9. Returns (loss, A_tot detached)."""
    p, p_next, p_init = ([t.detach() for t in pp] for pp in (p, p_next, p_init))
    adv = mix_adv(p, q.detach() - nu)
    nu_next_tot = mix(p_next, nu_next)
    adv_grad = adv + gamma * not_done * (nu_next_tot - nu_next_tot.detach())  # same value, Eq. 5's gradient path
    if nu_abs is None:
        return (1 - gamma) * mix(p_init, nu_init).mean() + (alpha * f_star(adv_grad / alpha, f)).mean(), adv.detach()
    # --data-distribution discounted: an episode's end leads to the absorbing state (value nu_abs, share f of d^D)
    adv_grad = adv_grad + gamma * (1 - not_done) * (nu_abs - nu_abs.detach())
    loss = ((1 - gamma) * mix(p_init, nu_init).mean() + (1 - share) * (alpha * f_star(adv_grad / alpha, f)).mean()
            + absorbing_term(nu_abs, share, gamma, alpha, f))
    return loss, adv.detach()


def nu_loss_reference(w: torch.Tensor, q: torch.Tensor, nu: torch.Tensor, first: torch.Tensor, lam: torch.Tensor,
                      gamma: float, alpha: float, f: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference code's nu step, written from its maths (same gradients in nu and lambda).

    Per agent and unmixed: e_i = W_i (q_i - nu_i) (W, q fixed), y_i = (e_i - lambda) / alpha;
    loss = (1 - gamma) mean_{first rows, agents} nu_i + E[alpha f(w*(y_i))] + lambda (1 - E[w*(y_i)]),
    the last factor held fixed. Its gradient in nu is that of alpha f(w*), not alpha f* (docs)."""
    e = w.detach() * (q.detach() - nu)
    y = (e - lam) / alpha
    ww = w_star(y, f)
    first = first.unsqueeze(-1).expand_as(nu).float()
    init = (nu * first).sum() / first.sum().clamp(min=1)  # 0 when no first row is in the batch
    loss = (1 - gamma) * init + (alpha * f_fn(ww, f)).mean() + lam * (1 - ww.detach().mean())
    return loss, e.detach()


def absorbing_term(nu_abs: torch.Tensor, share: float, gamma: float, alpha: float, f: str) -> torch.Tensor:
    """The absorbing state's part of Eq. 10 with --data-distribution discounted: its share f of d^D,
    reward 0 and a self-loop, so A = gamma nu_abs - nu_abs: f * alpha f*(-(1 - gamma) nu_abs / alpha)."""
    return share * alpha * f_star(-(1 - gamma) * nu_abs / alpha, f)


def discounted_occupancy(dataset, gamma: float) -> tuple[np.ndarray, float]:
    """d^D as the behaviour's discounted occupancy (--data-distribution discounted).

    Every episode weighs 1/E (as the initial states are drawn); its step t carries (1 - gamma) gamma^t,
    and its end, a true terminal or the time limit alike, leads to the absorbing state, which gets the
    remaining gamma^L. The flow constraints of the LP then hold on the data exactly, so that without
    reward the optimum is w = 1, the behaviour. Returns (probability of every transition, in the order of
    ``transition_rows()``, summing to 1 - f; the absorbing share f)."""
    lengths = np.asarray(dataset.episode_lengths).astype(np.int64)
    t = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    prob = (1 - gamma) * gamma ** t.astype(np.float64) / lengths.size
    return prob, float(np.mean(gamma ** lengths.astype(np.float64)))


def episode_ends(dataset) -> np.ndarray:
    """1.0 at the row of every episode's last transition, ``[n_rows]`` (index with a batch's ``rows``)."""
    ends = np.zeros(dataset.n_rows, np.float32)
    ends[np.asarray(dataset.episode_start)[1:] - 2] = 1.0
    return ends


def global_weights(adv: torch.Tensor, alpha: float, f: str, clip: float = 0.0) -> torch.Tensor:
    """w_tot* = max(0, f'^-1(A_tot / alpha)) (Sec. 4.3), optionally clipped at ``clip``."""
    w = w_star(adv / alpha, f)
    return w.clamp(max=clip) if clip > 0 else w


def per_agent_weights(e: torch.Tensor, lam: torch.Tensor, alpha: float, f: str,
                      clip: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference code's BC weight: sum_i w*((e_i - lambda_e) / alpha) over agents, each clipped.

    Returns (weights [B], loss of the offset lambda_e, whose gradient 1 - E[w*] centres E[w*] on 1)."""
    w = w_star((e - lam.detach()) / alpha, f)
    loss_lam = lam * (1 - w.mean())  # the unclipped weights, as in the reference code
    return (w.clamp(max=clip) if clip > 0 else w).sum(-1), loss_lam


def policy_loss(weights: torch.Tensor, log_prob: torch.Tensor) -> torch.Tensor:
    """Eq. 11, local weighted BC: -E_D[w_tot*(s, a) sum_i log pi_i(a_i | o_i)] (weights fixed)."""
    return -(weights.detach().unsqueeze(-1) * log_prob).mean()


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


# ====================================================================== networks
class LocalNet(nn.Module):
    """An MLP shared by all agents; agent i reads [x_i, one_hot(i)]: [..., N, in] -> [..., N, out].

    All agents go through one forward pass (the agent axis is a batch axis)."""

    def __init__(self, in_dim: int, out_dim: int, n_agents: int, hidden: Sequence[int] = (256, 256)):
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim + n_agents
        for h in hidden:
            layers += [nn.Linear(d, h), nn.ReLU()]
            d = h
        layers.append(nn.Linear(d, out_dim))
        self.net = nn.Sequential(*layers)
        self.register_buffer("ids", torch.eye(n_agents), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, self.ids.expand(*x.shape[:-1], -1)], -1))


class Policy(nn.Module):
    """Local policies pi_i(a_i | o_i), shared weights + agent id. Discrete: softmax over the
    available actions; continuous: tanh-squashed Gaussian (mean clamped to +-9, log-std to [-5, 2])."""

    def __init__(self, obs_dim: int, n_agents: int, discrete: bool, n_actions: int, act_dim: int,
                 hidden: Sequence[int] = (256, 256), action_scale: float = 1.0):
        super().__init__()
        self.discrete, self.act_dim, self.action_scale = discrete, act_dim, float(action_scale)
        self.net = LocalNet(obs_dim, n_actions if discrete else 2 * act_dim, n_agents, hidden)

    def _gaussian(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, log_std = self.net(obs).chunk(2, dim=-1)
        return mean.clamp(-9, 9), log_std.clamp(-5, 2)

    def log_prob(self, obs: torch.Tensor, avail: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """log pi_i(a_i | o_i), [B, N]. A dataset action marked unavailable is kept available."""
        if self.discrete:
            logp = masked_log_softmax(self.net(obs), avail, keep=actions)
            return logp.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
        mean, log_std = self._gaussian(obs)
        return tanh_gaussian_log_prob(mean, log_std, actions / self.action_scale)

    @torch.no_grad()
    def act(self, obs: torch.Tensor, avail: torch.Tensor, deterministic: bool = True,
            gen: torch.Generator | None = None) -> torch.Tensor:
        if self.discrete:
            logits = self.net(obs).masked_fill(~avail, -1e9)
            if deterministic:
                return logits.argmax(-1)
            p = torch.softmax(logits, -1)
            return torch.multinomial(p.reshape(-1, p.shape[-1]), 1, generator=gen).view(p.shape[:-1])
        mean, log_std = self._gaussian(obs)
        noise = torch.randn(mean.shape, generator=gen, device=mean.device, dtype=mean.dtype)
        u = mean if deterministic else mean + log_std.exp() * noise
        return (self.action_scale * torch.tanh(u)).clamp(-1, 1)


class ComaDICE(nn.Module):
    """Local nu_i(o_i) and q_i(o_i, a_i), the state-conditioned mixer, the local policies, the
    target copies of nu and the mixer (for the Q target), and the reference code's offsets lambda_v, lambda_e."""

    def __init__(self, dims: dict[str, Any], hidden: Sequence[int] = (256, 256), mixer_hidden: int = 64,
                 mixer_layers: int = 1, mixer_embed: int = 32, action_scale: float = 1.0, absorbing: bool = False):
        super().__init__()
        n, o, s = dims["n_agents"], dims["obs_dim"], dims["state_dim"]
        self.discrete, self.action_scale = bool(dims["discrete"]), float(action_scale)
        self.nu = LocalNet(o, 1, n, hidden)
        if self.discrete:  # q_i(o_i, .) for every action
            self.q = LocalNet(o, dims["n_actions"], n, hidden)
        else:  # q_i(o_i, a_i)
            self.q = LocalNet(o + dims["act_dim"], 1, n, hidden)
        self.mixer = Mixer(s, n, mixer_hidden, mixer_layers, mixer_embed)
        self.policy = Policy(o, n, self.discrete, dims["n_actions"], dims["act_dim"], hidden, action_scale)
        self.lambda_v = nn.Parameter(torch.zeros(()))
        self.lambda_e = nn.Parameter(torch.zeros(()))
        # nu_tot of the absorbing state (--data-distribution discounted) and its target copy
        self.nu_absorbing = nn.Parameter(torch.zeros(())) if absorbing else None
        self.register_buffer("nu_absorbing_target", torch.zeros(()) if absorbing else None)
        for name in ("nu", "mixer"):
            target = copy.deepcopy(getattr(self, name)).requires_grad_(False)
            setattr(self, name + "_target", target)

    def local_q(self, net: nn.Module, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """q_i(o_i, a_i) of the taken actions, [B, N]."""
        if self.discrete:
            return net(obs).gather(-1, actions.unsqueeze(-1)).squeeze(-1)
        return net(torch.cat([obs, actions / self.action_scale], -1)).squeeze(-1)

    def optimizers(self, lr: float) -> dict[str, torch.optim.Optimizer]:
        """Adam for q and the mixer (Eq. 9), for nu (Eq. 10), for the policies (Eq. 11)."""
        return {"q": _adam([*self.q.parameters(), *self.mixer.parameters()], lr),
                "nu": _adam([*self.nu.parameters(), self.lambda_v]
                            + ([self.nu_absorbing] if self.nu_absorbing is not None else []), lr),
                "policy": _adam([*self.policy.parameters(), self.lambda_e], lr)}


def _adam(params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    try:  # the fused kernel: one call per step (CPU and CUDA, torch >= 2.4)
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.Adam(params, lr=lr)


def _step(opt: torch.optim.Optimizer, loss: torch.Tensor, clip: float) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip > 0:
        params = [p for g in opt.param_groups for p in g["params"] if p.dim() > 0]  # the offsets are not clipped
        torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()


def update(model: ComaDICE, opts: dict[str, torch.optim.Optimizer], batch: dict[str, torch.Tensor],
           init: dict[str, torch.Tensor], args: Args, share: float = 0.0) -> dict[str, torch.Tensor]:
    """One update: the Q step (Eq. 9), the nu step (Eq. 10), the policy step (Eq. 11), targets.

    Returns detached statistics (tensors: no host synchronisation here)."""
    gamma, alpha, f = args.gamma, args.alpha, args.f_divergence
    obs, actions, n_b = batch["obs"], batch["actions"], batch["obs"].shape[0]
    not_done = torch.ones_like(batch["done"]) if args.ignore_terminal else 1.0 - batch["done"]

    # Eq. 9: q and the mixer regress A_tot + nu_tot on r + gamma (1 - done) nu_tot(s') (target networks)
    with torch.no_grad():
        target = batch["reward"] + gamma * not_done * mix(model.mixer_target(batch["next_state"]),
                                                          model.nu_target(batch["next_obs"]).squeeze(-1))
        if model.nu_absorbing is not None:  # --data-distribution discounted: an end bootstraps the absorbing value
            target = target + gamma * (1 - not_done) * model.nu_absorbing_target
    p_all = model.mixer(torch.cat([batch["state"], batch["next_state"], init["state"]]))  # one pass, 3 uses
    sizes = [n_b, n_b, init["state"].shape[0]]
    p, p_next, p_init = zip(*(t.split(sizes) for t in p_all))  # mixer parameters at s, s', s0
    q = model.local_q(model.q, obs, actions)
    nu_all = model.nu(torch.cat([obs, batch["next_obs"], init["obs"]])).squeeze(-1)
    nu, nu_next, nu_init = nu_all.split(sizes)
    loss_q = q_loss(p, q, nu, target)
    _step(opts["q"], loss_q, args.grad_clip)

    # Eq. 10: nu (the mixer and q as they were at the start of this update; not trained here)
    if args.nu_loss == "dice":
        loss_nu, adv = nu_loss(p, p_next, p_init, q, nu, nu_next, nu_init, not_done, gamma, alpha, f,
                               model.nu_absorbing, share)
        w_nu = w_star(adv / alpha, f)
    else:
        loss_nu, adv = nu_loss_reference(p[0], q, nu, batch["first"], model.lambda_v, gamma, alpha, f)
        w_nu = w_star((adv - model.lambda_v.detach()) / alpha, f)
    _step(opts["nu"], loss_nu, args.grad_clip)

    # Eq. 11: local weighted BC; w* from this update's A_tot (before the steps above)
    if args.policy_weights == "global":
        weights = global_weights(adv if args.nu_loss == "dice" else mix_adv(p, (q - nu).detach()).detach(),
                                 alpha, f, args.weight_clip)
        loss_lam = torch.zeros((), device=obs.device)
    else:
        e = (p[0] * (q - nu)).detach()
        weights, loss_lam = per_agent_weights(e, model.lambda_e, alpha, f, args.weight_clip)
    loss_pi = policy_loss(weights, model.policy.log_prob(obs, batch["avail"], actions))
    _step(opts["policy"], loss_pi + loss_lam, args.grad_clip)

    with torch.no_grad():
        for name in ("nu", "mixer"):
            for tp, sp in zip(getattr(model, name + "_target").parameters(), getattr(model, name).parameters()):
                tp.lerp_(sp, args.tau)
        if model.nu_absorbing is not None:
            model.nu_absorbing_target.lerp_(model.nu_absorbing, args.tau)
        extra = {} if model.nu_absorbing is None else {"charts/nu_absorbing": model.nu_absorbing.detach()}
        return {**extra, "losses/q": loss_q.detach(), "losses/nu": loss_nu.detach(), "losses/policy": loss_pi.detach(),
                "charts/w_mean": w_nu.mean(), "charts/w_max": w_nu.max(),
                "charts/w_small_frac": (w_nu < 1e-2).float().mean(),
                "charts/bc_weight_mean": weights.mean(), "charts/bc_weight_max": weights.max(),
                "charts/adv_mean": adv.mean(), "charts/adv_std": adv.std(),
                "charts/nu_tot_init": mix(p_init, nu_init.detach()).mean(), "charts/q_target_mean": target.mean(),
                "charts/lambda_v": model.lambda_v.detach(), "charts/lambda_e": model.lambda_e.detach()}


# ======================================================================= training
def apply_reference_code(args: Args, env: str, discrete: bool) -> Args:
    """--reference-code: every choice of the reference code that this file offers as a flag."""
    if not args.reference_code:
        return args
    return dataclasses.replace(
        args, nu_loss="reference", policy_weights="per-agent", weight_clip=2.0 if discrete else 0.0,
        return_to_go=env in ("smacv1", "smacv2"), ignore_terminal=env in ("smacv1", "smacv2"),
        action_scale=4.0 if env == "mamujoco" else 1.0)


def make_act_fn(policy: Policy, device: torch.device, deterministic: bool):
    """``act_fn(obs [E, N, o], state [E, S], avail [E, N, K]) -> actions`` for ``common.envs.evaluate``;
    sampled actions draw from the act_fn's own generator, which ``evaluate`` reseeds."""
    gen = torch.Generator(device=device)

    def act_fn(obs, state, avail):
        o = torch.as_tensor(np.asarray(obs), dtype=torch.float32, device=device)
        a = torch.as_tensor(np.asarray(avail), dtype=torch.bool, device=device)
        return policy.act(o, a, deterministic, gen).cpu().numpy()

    act_fn.reseed = gen.manual_seed
    return act_fn


def dims_of(dataset) -> dict[str, Any]:
    """The dataset's shapes that size the networks."""
    return dict(n_agents=dataset.n_agents, obs_dim=dataset.obs_dim, state_dim=dataset.state_dim,
                discrete=dataset.discrete, n_actions=dataset.n_actions, act_dim=dataset.act_dim)


def build_model(dims: dict[str, Any], args: Args) -> ComaDICE:
    return ComaDICE(dims, (args.hidden, args.hidden), args.mixer_hidden, args.mixer_layers,
                    args.mixer_embed, args.action_scale, absorbing=args.data_distribution == "discounted")


def main(args: Args) -> dict[str, Any]:
    from common import OfflineMarlError
    from common.runs import Run, eval_only

    if args.eval_only:
        return eval_only(args, "comadice", load_policy)
    run = Run(args, "comadice", positive=("alpha", "action_scale", "mixer_embed"), nonneg=("weight_clip",),
              checks=((args.mixer_layers == 1 or not (args.reference_code or args.nu_loss == "reference"
                                                     or args.policy_weights == "per-agent"),
                       "the reference code's nu step and weights need the one-layer mixer (--mixer-layers 1)"),
                      (args.data_distribution == "rows" or not (args.reference_code or args.ignore_terminal
                                                                or args.nu_loss == "reference"),
                       "--data-distribution discounted goes with the dice nu step and the data's terminals "
                       "(not with --reference-code, --nu-loss reference or --ignore-terminal)")))
    dataset, env = run.load_data()
    args = run.args = apply_reference_code(args, dataset.meta.get("env", args.env), dataset.discrete)
    if args.policy_weights == "per-agent" and args.mixer_layers != 1:
        raise OfflineMarlError("--policy-weights per-agent needs the one-layer mixer (--mixer-layers 1)")
    if args.return_to_go:
        dataset = dataset.with_reward(dataset.returns_to_go(1.0), "undiscounted return-to-go (ComaDICE reference code)")
    dataset.to(run.device).seed(args.seed)
    dims = dims_of(dataset)
    model = build_model(dims, args).to(run.device)
    opts = model.optimizers(args.lr)
    act_fn = make_act_fn(model.policy, run.device, not args.eval_sample)
    run.start(dataset, env, act_fn, dims=dims, modules={"model": model}, optimizers=opts)
    # divergence: a Q target or nu_tot far beyond what a return of this data can be (|r| <= r_max a step, plus
    # alpha for the f-divergence terms, over 1 - gamma; 10x slack: runs that learn stay 40x below it on LBF)
    r_max = float(np.abs(np.asarray(dataset.arrays["reward"])).max(initial=0.0))
    value_bound = 10.0 * (r_max + args.alpha) / (1.0 - args.gamma)
    run.bound({"charts/q_target_mean": value_bound, "charts/nu_tot_init": value_bound})
    row_prob, ends, share = None, None, 0.0
    if args.data_distribution == "discounted":  # rows drawn from d^D; every episode's end is absorbing
        prob, share = discounted_occupancy(dataset, args.gamma)
        row_prob = torch.as_tensor(prob, dtype=torch.float32, device=run.device)
        ends = torch.as_tensor(episode_ends(dataset), device=run.device)
    step = run.compile(update)  # torch.compile with --compile
    while run.training:
        with run.autocast():  # bfloat16 matmuls with --precision bf16
            batch = dataset.sample(args.batch_size, weights=row_prob)
            if ends is not None:
                batch["done"] = torch.index_select(ends, 0, batch["rows"])
            stats = step(model, opts, batch, dataset.sample_initial(args.batch_size), args, share)
        run.record(stats)
    return run.finish()


# ==================================================================== evaluation
def load_policy(checkpoint: str, device: str = "cpu", sample: bool | None = None):
    """``act_fn(obs, state, avail) -> actions`` of a saved ComaDICE policy (for ``common.collect``
    and ``--eval-only``); ``sample=None`` keeps the run's --eval-sample choice."""
    from common.runs import load_checkpoint, restore_args

    ck = load_checkpoint(checkpoint, "comadice")
    args = restore_args(Args, ck["args"])
    model = build_model(ck["dims"], args).to(device)
    model.load_state_dict(ck["modules"]["model"])
    model.eval()
    act_fn = make_act_fn(model.policy, torch.device(device), not (args.eval_sample if sample is None else sample))
    act_fn.meta, act_fn.args, act_fn.step = ck["meta"], args, ck["step"]
    return act_fn


if __name__ == "__main__":
    import tyro

    from common import friendly_errors

    with friendly_errors():
        main(tyro.cli(Args))
