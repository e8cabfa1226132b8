"""ICQ-MA: implicit constraint Q-learning for offline multi-agent RL.

Docs: docs/baselines.md#icq (objective, the TD(lambda) target, differences from the reference code).
Paper: Y. Yang, X. Ma, C. Li, Z. Zheng, Q. Zhang, G. Huang, J. Yang, Q. Zhao, "Believe What You
See: Implicit Constraint Approach for Offline Multi-Agent Reinforcement Learning", NeurIPS 2021
(arXiv 2106.03400).
Reference code checked against: github.com/YiqinYang/ICQ (`ICQ-MA/`: SMAC; `ICQ/`: the
single-agent continuous version), read for facts only.

The learned policy is kept inside the data by never evaluating an action the dataset does not
contain: the policy that maximises Q under a KL constraint to the behaviour policy mu is
pi*(a|s) = mu(a|s) exp(Q(s,a)/alpha) / Z(s), so expectations under pi* are expectations under mu
(i.e. over dataset actions) re-weighted by exp(Q/alpha)/Z, with Z estimated on the batch. The
critic is Q_tot(s, a) = sum_i w_i(s) Q_i(s, o_i, a_i) + b(s) with w_i >= 0, trained on TD(lambda)
targets whose bootstraps are dataset next actions weighted that way (Eq. I2-I3); each agent's
policy is the weighted behaviour cloning of Eq. I4, in which the linear mixer turns the joint
weight exp(Q_tot/alpha) into one factor per agent. Discrete (recurrent GRU policies over whole
episodes or windows, the SMAC setting) and continuous (tanh-Gaussian policies) actions; agents
share weights and see a one-hot id, all in one forward pass.

    python baselines/icq.py --env smacv1 --task 5m_vs_6m --quality medium --dataset PATH
    python baselines/icq.py --env bridge --task hard --quality mix --total-steps 20000
    python baselines/icq.py --env mamujoco --task Hopper-3x1 --quality medium --seq-len 20
"""

import copy
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

from common import OfflineMarlError, friendly_errors
from common.runs import Run, eval_only, load_checkpoint, restore_args

ALGO = "icq"


@dataclass
class Args:
    # ------------------------------------------- shared fields (docs/architecture.md, the contract)
    env: str = "smacv1"
    """environment family: matrix, bridge, mamujoco, rware, smacv1, smacv2"""
    task: str = "5m_vs_6m"
    """task of the family (e.g. hard, penalty_xor, Hopper-3x1, protoss_5_vs_5)"""
    quality: str = "medium"
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
    total_steps: int = 100_000
    """gradient updates"""
    batch_size: int = 32
    """transitions (sequences for sequence models) per update"""
    eval_every: int = 2000
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
    log_every: int = 500
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
    # ---- ICQ
    alpha_critic: float = 1000.0
    """temperature alpha of the critic's implicit-constraint weights exp(Q_tot/alpha)/Z (Eq. I2; reference: 1000)"""
    alpha_actor: float = 0.1
    """temperature alpha of the policy weights exp(w_i A_i/alpha)/Z_i (Eq. I4; reference: 0.1)"""
    gamma: float = 0.99
    """discount"""
    td_lambda: float = 0.75
    """lambda of the TD(lambda) critic target (Eq. I3; the reference hard-codes 0.75)"""
    seq_len: int | None = None
    """transitions per training sequence; None: whole episodes for a recurrent policy when the longest
    has at most 200 steps (the reference's SMAC setting), else windows of 20"""
    policy: Literal["auto", "gru", "mlp"] = "auto"
    """policy body: a GRU over each agent's history (reference) or an MLP on the current observation;
    auto: gru for discrete actions, mlp for continuous"""
    hidden: int = 256
    """width of the two hidden layers of the critic Q_i (reference: 256)"""
    rnn_hidden: int = 64
    """width of the policy (GRU state or MLP layers; reference: 64)"""
    mixer_hidden: int = 32
    """width of the mixer's hidden layer (reference: 32)"""
    lr_actor: float = 5e-4
    """learning rate of the policy (reference: 5e-4)"""
    lr_critic: float = 1e-4
    """learning rate of the critic and the mixer (reference: 1e-4)"""
    target_update_interval: int = 200
    """copy the critic and mixer into their targets every this many updates"""
    grad_clip: float = 10.0
    """gradient-norm clip of the critic and the policy (pymarl default: 10)"""
    official_mixer: bool = False
    """reference mixer: weights normalised to sum to one and no state bias b(s)"""
    official_policy_weights: bool = False
    """reference policy weights: w_i(s) multiplies the normalised weight instead of scaling the exponent"""
    n_baseline_samples: int = 4
    """continuous: policy samples that estimate each agent's baseline E_{a~pi_i} Q_i"""


# ============================================================== pure functions
def icq_weights(x: torch.Tensor, alpha: float, mask: torch.Tensor,
                dim: int | tuple[int, ...] | None = None) -> torch.Tensor:
    """The implicit-constraint weights exp(x/alpha)/Z with Z estimated on the batch: a softmax of
    x/alpha over the entries where ``mask`` is true (along ``dim``, default all of them). They are
    non-negative, zero where ``mask`` is false, sum to one over the batch and grow with x."""
    dims = tuple(range(x.dim())) if dim is None else (dim if isinstance(dim, tuple) else (dim,))
    z = (x / alpha).masked_fill(~mask, float("-inf"))
    z = z - z.amax(dim=dims, keepdim=True).clamp(min=-1e30)  # stable; an all-masked slice stays -inf
    e = torch.exp(z)
    return e / e.sum(dim=dims, keepdim=True).clamp(min=1e-30)


def lambda_returns(reward: torch.Tensor, done: torch.Tensor, boot: torch.Tensor, cont: torch.Tensor,
                   gamma: float, lam: float) -> torch.Tensor:
    """TD(lambda) targets G_t on sequences ``[B, L]`` (Eq. I3), computed backwards:

        G_t = r_t + gamma (1 - done_t) [ X_{t+1} + lambda cont_{t+1} (G_{t+1} - X_{t+1}) ]

    ``boot [B, L]`` holds X_{t+1}, the (weighted) bootstrap value of the next step of transition t;
    ``cont [B, L]`` is 1 where the *next* transition t+1 is itself a training target, so the
    lambda-return continues through it, and 0 where it stops (the sequence or episode ends), which
    leaves the one-step target r_t + gamma (1 - done_t) X_{t+1}."""
    L = reward.shape[1]
    out = torch.zeros_like(reward)
    g_next = torch.zeros_like(reward[:, 0])
    for t in range(L - 1, -1, -1):  # a loop over time, not agents
        x = boot[:, t]
        out[:, t] = reward[:, t] + gamma * (1.0 - done[:, t]) * (x + lam * cont[:, t] * (g_next - x))
        g_next = out[:, t]
    return out


def critic_targets(b: dict[str, torch.Tensor], qtot_t: torch.Tensor, vtot_t: torch.Tensor, windowed: bool,
                   alpha: float, gamma: float, lam: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The critic's TD(lambda) targets on a batch of ``OfflineDataset.sample_sequences`` (Eq. I2-I3).

    ``qtot_t [B, L+1]`` is the target Q_tot at each slot's dataset action (slot L and padding: any
    value), ``vtot_t [B, L+1]`` the target value of the policy at each slot. The bootstrap of a
    transition is its next step's dataset action, weighted: X = rho Q_tot with rho = n softmax(Q_tot /
    alpha) over the batch's n dataset actions (the implicit constraint, mean rho = 1). An episode cut
    by its time limit has no next dataset action: there X = V_tot (its value under the policy); a
    true end does not bootstrap. With ``windowed`` the last transition of every window only supplies
    the bootstrap of the one before and gets no target. Returns the targets ``[B, L]``, the loss mask
    ``[B, L]`` and rho ``[B, L+1]``."""
    mask = b["mask"]
    has_act = torch.cat([mask, torch.zeros_like(mask[:, :1])], 1)  # [B, L+1] the slot has a dataset action
    loss_mask = mask.float().clone()
    if windowed:
        loss_mask[:, -1] = 0.0
    cont = torch.cat([loss_mask[:, 1:], torch.zeros_like(loss_mask[:, :1])], 1)  # next step has a target
    rho = icq_weights(qtot_t, alpha, has_act) * has_act.sum()
    x_boot = torch.where(has_act, rho * qtot_t, vtot_t)
    y = lambda_returns(b["reward"], b["done"], x_boot[:, 1:], cont, gamma, lam)
    return y, loss_mask, rho


def with_agent_id(x: torch.Tensor) -> torch.Tensor:
    """Append each agent's one-hot id: ``[..., N, d] -> [..., N, d + N]``."""
    n = x.shape[-2]
    eye = torch.eye(n, device=x.device, dtype=x.dtype).expand(*x.shape[:-1], n)
    return torch.cat([x, eye], dim=-1)


def masked_logits(logits: torch.Tensor, avail: torch.Tensor) -> torch.Tensor:
    """Unavailable actions get a logit of -1e10 (zero probability)."""
    return logits.masked_fill(~avail, -1e10)


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


# =================================================================== networks
def mlp(inp: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inp, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, out))


class Critic(nn.Module):
    """Q_i(s, o_i, a_i) on [state, o_i, one-hot i] (reference input): discrete -> one value per
    action; continuous -> the action is an input and the output one value."""

    def __init__(self, inp: int, n_actions: int, act_dim: int, hidden: int, discrete: bool):
        super().__init__()
        self.discrete = discrete
        self.net = mlp(inp, hidden, n_actions) if discrete else mlp(inp + act_dim, hidden, 1)

    def all_actions(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def forward(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        if self.discrete:
            return self.net(x).gather(-1, a.unsqueeze(-1)).squeeze(-1)
        return self.net(torch.cat([x, a], dim=-1)).squeeze(-1)


class LinearMixer(nn.Module):
    """Q_tot = sum_i w_i(s) Q_i + b(s), w_i = |.| >= 0 (Eq. I1). ``normalised`` is the reference
    form: w_i / sum_j w_j and no bias."""

    def __init__(self, state_dim: int, n_agents: int, hidden: int, normalised: bool):
        super().__init__()
        self.normalised = normalised
        self.body = nn.Sequential(nn.Linear(state_dim, hidden), nn.ReLU())
        self.w = nn.Linear(hidden, n_agents)
        self.b = nn.Linear(hidden, 1)

    def weights(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(s)
        w = self.w(h).abs()
        if self.normalised:
            return w / w.sum(-1, keepdim=True).clamp(min=1e-8), torch.zeros_like(w[..., 0])
        return w, self.b(h).squeeze(-1)

    def forward(self, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        w, b = self.weights(s)
        return (w * q).sum(-1) + b


class Policy(nn.Module):
    """pi_i(a_i | tau_i): Linear-ReLU, then a GRU over the agent's history (or a Linear-ReLU), then
    a head: masked categorical logits, or a tanh-Gaussian (mean clamped to +-9, log-std to [-5, 2])."""

    def __init__(self, inp: int, n_actions: int, act_dim: int, hidden: int, discrete: bool, recurrent: bool):
        super().__init__()
        self.discrete, self.recurrent, self.hidden = discrete, recurrent, hidden
        self.fc = nn.Sequential(nn.Linear(inp, hidden), nn.ReLU())
        self.core = nn.GRU(hidden, hidden, batch_first=True) if recurrent else nn.Sequential(
            nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, n_actions if discrete else 2 * act_dim)

    def unroll(self, x: torch.Tensor) -> torch.Tensor:
        """Head outputs for sequences ``x [B, T, N, inp] -> [B, T, N, out]`` (hidden state zero at t=0)."""
        B, T, N, _ = x.shape
        h = self.fc(x)
        if self.recurrent:
            h = self.core(h.permute(0, 2, 1, 3).reshape(B * N, T, -1))[0].reshape(B, N, T, -1).permute(0, 2, 1, 3)
        else:
            h = self.core(h)
        return self.head(h)

    def step(self, x: torch.Tensor, h: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One step for acting: ``x [E, N, inp]``, GRU state ``h [E, N, hidden]`` (or None)."""
        z = self.fc(x)
        if self.recurrent:
            E, N, _ = z.shape
            out, h = self.core(z.reshape(E * N, 1, -1), h.reshape(1, E * N, -1).contiguous())
            z, h = out.reshape(E, N, -1), h.reshape(E, N, -1)
        else:
            z = self.core(z)
        return self.head(z), h

    def gauss(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, log_std = out.chunk(2, dim=-1)
        return mu.clamp(-9.0, 9.0), log_std.clamp(-5.0, 2.0)


def recurrent(args: Args, discrete: bool) -> bool:
    return args.policy == "gru" or (args.policy == "auto" and discrete)


def build_networks(args: Args, dims: dict[str, Any]) -> nn.ModuleDict:
    n, disc, o, s = dims["n_agents"], dims["discrete"], dims["obs_dim"], dims["state_dim"]
    k, ad = dims.get("n_actions", 1), dims.get("act_dim", 1)
    nets = nn.ModuleDict(dict(
        critic=Critic(s + o + n, k, ad, args.hidden, disc),
        mixer=LinearMixer(s, n, args.mixer_hidden, args.official_mixer),
        policy=Policy(o + n, k, ad, args.rnn_hidden, disc, recurrent(args, disc)),
    ))
    for name in ("critic", "mixer"):
        nets[name + "_target"] = copy.deepcopy(nets[name]).requires_grad_(False)
    return nets


def critic_input(obs: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """[s, o_i, one-hot i] for every agent: ``[..., N, S + o + N]``."""
    n = obs.shape[-2]
    return torch.cat([state.unsqueeze(-2).expand(*state.shape[:-1], n, state.shape[-1]), with_agent_id(obs)], -1)


class ActFn:
    """A stateful ``act_fn(obs [E,N,o], state [E,S], avail [E,N,K]) -> actions`` for evaluation:
    it keeps each environment's GRU state and ``reset(mask [E])`` clears it at episode starts."""

    def __init__(self, policy: Policy, device: torch.device, sample: bool, meta: dict[str, Any] | None = None):
        self.policy, self.device, self.sample, self.meta = policy, device, sample, meta
        self.gen = torch.Generator(device)  # reseeded by common.envs.evaluate
        self.h: torch.Tensor | None = None

    def reseed(self, seed: int) -> None:
        self.gen.manual_seed(seed)

    def reset(self, mask) -> None:
        if self.h is not None:
            m = torch.as_tensor(mask, dtype=torch.bool, device=self.device)
            if m.shape[0] == self.h.shape[0]:
                self.h[m] = 0.0
            else:
                self.h = None

    @torch.no_grad()
    def __call__(self, obs, state, avail):
        x = with_agent_id(torch.as_tensor(obs, dtype=torch.float32, device=self.device))
        av = torch.as_tensor(avail, dtype=torch.bool, device=self.device)
        if self.policy.recurrent and (self.h is None or self.h.shape[:2] != x.shape[:2]):
            self.h = torch.zeros(*x.shape[:2], self.policy.hidden, device=self.device)
        out, self.h = self.policy.step(x, self.h)
        if self.policy.discrete:
            logits = masked_logits(out, av)
            if not self.sample:
                return logits.argmax(-1).cpu().numpy()
            flat = torch.softmax(logits, -1).reshape(-1, logits.shape[-1])
            return torch.multinomial(flat, 1, generator=self.gen).reshape(logits.shape[:-1]).cpu().numpy()
        mu, log_std = self.policy.gauss(out)
        if self.sample:
            mu = mu + log_std.exp() * torch.randn(mu.shape, device=self.device, generator=self.gen)
        return torch.tanh(mu).cpu().numpy()


def load_policy(checkpoint: str, device: str = "cpu", sample: bool | None = None) -> ActFn:
    """``act_fn(obs [E,N,o], state [E,S], avail [E,N,K]) -> actions`` of a saved run (stateful: it
    has ``reset(mask)``; ``sample``: sampled actions, None: as the run was evaluated); its ``meta``
    attribute is the dataset meta (to rebuild the environment)."""
    ck = load_checkpoint(checkpoint, ALGO)
    args = restore_args(Args, ck["args"])
    nets = build_networks(args, ck["dims"]).to(device)
    nets.load_state_dict(ck["modules"]["nets"])
    act_fn = ActFn(nets["policy"].eval(), torch.device(device), args.eval_sample if sample is None else sample,
                   ck["meta"])
    act_fn.args, act_fn.step = args, ck["step"]
    return act_fn


# ======================================================================= main
def dims_of(dataset) -> dict[str, Any]:
    """The dataset's shapes that size the networks."""
    return dict(n_agents=dataset.n_agents, obs_dim=dataset.obs_dim, state_dim=dataset.state_dim,
                discrete=dataset.discrete, n_actions=dataset.n_actions, act_dim=dataset.act_dim)


def main(args: Args) -> dict[str, Any]:
    if args.eval_only:
        return eval_only(args, ALGO, load_policy)
    run = Run(args, ALGO, positive=("target_update_interval",), nonneg=("weight_clip",))
    data, env = run.load_data()
    device = run.device
    data.to(device).seed(args.seed)
    dims = dims_of(data)
    disc = dims["discrete"]
    seq_len = args.seq_len
    if seq_len is None:
        seq_len = 0 if recurrent(args, disc) and int(data.episode_lengths.max()) <= 200 else 20
    if seq_len < 0:
        raise OfflineMarlError(f"--seq-len must be positive (or omitted for the automatic choice), got {seq_len}")
    nets = build_networks(args, dims).to(device)
    critic, mixer, policy = nets["critic"], nets["mixer"], nets["policy"]
    critic_t, mixer_t = nets["critic_target"], nets["mixer_target"]
    critic_params = [*critic.parameters(), *mixer.parameters()]
    opt = {"critic": torch.optim.Adam(critic_params, lr=args.lr_critic),
           "policy": torch.optim.Adam(policy.parameters(), lr=args.lr_actor)}
    gen = torch.Generator(device).manual_seed(args.seed + 1)  # the continuous baseline's policy samples

    def update(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # slots k = 0..L of the sequence (L transitions + the observation after the last one)
        obs, state, avail = b["obs"], b["state"], b["avail"]
        L = b["mask"].shape[1]
        act = torch.cat([b["actions"], torch.zeros_like(b["actions"][:, :1])], 1)  # [B, L+1, N(, A)]
        xc = critic_input(obs, state)  # [B, L+1, N, S+o+N]
        xp = with_agent_id(obs)
        pout = policy.unroll(xp)  # [B, L+1, N, out], with gradient (policy step below)

        with torch.no_grad():
            # target Q_i at the dataset actions [B, L+1, N], and (the observation after a time-limit cut
            # has no dataset action) the value under pi instead; discrete: one pass gives both
            if disc:
                q_all_t = critic_t.all_actions(xc)  # [B, L+1, N, K]
                q_t = q_all_t.gather(-1, act.unsqueeze(-1)).squeeze(-1)
                pi = torch.softmax(masked_logits(pout.detach(), avail), -1)
                v_i = (pi * q_all_t).sum(-1)
            else:
                q_t = critic_t(xc, act)
                mu, _ = policy.gauss(pout.detach())
                v_i = critic_t(xc, torch.tanh(mu))
            qtot_t = mixer_t(q_t, state)  # [B, L+1]
            vtot_t = mixer_t(v_i, state)
            # Eq. I2-I3: TD(lambda) over the dataset's own next actions, weighted by exp(Q_tot/alpha)/Z
            y, loss_mask, rho = critic_targets(b, qtot_t, vtot_t, bool(seq_len), args.alpha_critic, args.gamma,
                                               args.td_lambda)

        # critic step: Q_tot(s_t, a_t) regressed on the TD(lambda) target. Discrete: the pass over all
        # actions also gives the policy step its baseline below (detached), so the critic runs once
        if disc:
            q_all = critic.all_actions(xc[:, :L])  # [B, L, N, K]
            q_taken = q_all.gather(-1, act[:, :L].unsqueeze(-1)).squeeze(-1)
        else:
            q_taken = critic(xc[:, :L], act[:, :L])
        qtot = mixer(q_taken, state[:, :L])
        n_loss = loss_mask.sum().clamp(min=1.0)
        critic_loss = (((qtot - y) ** 2) * loss_mask).sum() / n_loss  # Eq. I3

        # policy step (Eq. I4): weighted behaviour cloning with weights exp(w_i A_i / alpha) / Z_i
        with torch.no_grad():
            w_mix, _ = mixer.weights(state[:, :L])  # [B, L, N]
            q_a = q_taken.detach()  # Q_i at the dataset actions, before this update's critic step
            if disc:
                pi = torch.softmax(masked_logits(pout[:, :L].detach(), avail[:, :L]), -1)
                adv = q_a - (pi * q_all.detach()).sum(-1)  # counterfactual baseline E_{pi_i} Q_i
            else:
                mu, log_std = policy.gauss(pout[:, :L].detach())
                M = args.n_baseline_samples
                eps = torch.randn((M,) + mu.shape, device=mu.device, generator=gen)
                a_pi = torch.tanh(mu + log_std.exp() * eps)
                adv = q_a - critic(xc[:, :L].expand(M, *xc[:, :L].shape), a_pi).mean(0)
            m3 = (loss_mask > 0).unsqueeze(-1).expand_as(adv)
            if args.official_policy_weights:
                omega = w_mix * icq_weights(adv, args.alpha_actor, m3, dim=(0, 1)) * n_loss
            else:
                omega = icq_weights(w_mix * adv, args.alpha_actor, m3, dim=(0, 1)) * n_loss
        if disc:
            logp = masked_log_softmax(pout[:, :L], avail[:, :L], keep=act[:, :L])
            logp = logp.gather(-1, act[:, :L].unsqueeze(-1)).squeeze(-1)
        else:
            mu, log_std = policy.gauss(pout[:, :L])
            logp = tanh_gaussian_log_prob(mu, log_std, act[:, :L])
        policy_loss = -((omega * logp).sum(-1) * loss_mask).sum() / n_loss  # Eq. I4

        for loss, key, params in ((critic_loss, "critic", critic_params), (policy_loss, "policy", policy.parameters())):
            opt[key].zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, args.grad_clip)
            opt[key].step()
        return {"losses/critic": critic_loss.detach(), "losses/policy": policy_loss.detach(),
                "charts/q_tot": (qtot.detach() * loss_mask).sum() / n_loss,
                "charts/target": (y * loss_mask).sum() / n_loss, "charts/rho_max": rho.max(),
                "charts/omega_max": omega.max(), "charts/mixer_w_mean": w_mix.mean()}

    act_fn = ActFn(policy, device, args.eval_sample)
    sample_len = None if seq_len == 0 else seq_len + 1
    run.start(data, env, act_fn, dims=dims, modules={"nets": nets}, optimizers=opt, generators={"policy": gen})
    step = run.compile(update)  # torch.compile with --compile
    while run.training:
        with run.autocast():  # bfloat16 matmuls with --precision bf16
            info = step(data.sample_sequences(args.batch_size, sample_len))
        if (run.step + 1) % args.target_update_interval == 0:  # hard target update
            critic_t.load_state_dict(critic.state_dict())
            mixer_t.load_state_dict(mixer.state_dict())
        run.record(info)
    return run.finish()


if __name__ == "__main__":
    with friendly_errors():
        main(tyro.cli(Args))
