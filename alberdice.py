"""AlberDICE: alternating best-response stationary distribution correction estimation.

Docs:       docs/alberdice.md
Paper:      D. E. Matsunaga, J. Lee, J. Yoon, S. Leonardos, P. Abbeel, K.-E. Kim, "AlberDICE: Addressing
            Out-Of-Distribution Joint Actions in Offline Multi-Agent RL via Alternating Stationary
            Distribution Correction Estimation", NeurIPS 2023 (Sec. 3, App. E, App. J.1).
Reference:  github.com/dematsunaga/alberdice @ 4d69f0e (pymarl-master/src/learners/alberdice_learner.py),
            read to check facts; the differences are listed in the docs page.

    python alberdice.py --env bridge --task hard --quality optimal

Each agent i in turn (Algorithm 1) computes a best response to the other agents' current
policies pi_{-i}: importance ratios rho_i (Eq. 11) resample the data into D_rho_i (Eq. 12),
nu_i(s) minimises the log-mean-exp objective (Eq. 31), e_i(s, a_i) regresses the advantage with
a CQL penalty (Eq. 43/47), and pi_i is extracted by I-projection (Eq. 48). The data policies
pi_i^D (Eq. 44) and the autoregressive pi_{-i}^D (Eq. 45) are pretrained first. Policies act on
each agent's local observation (App. J.1); nu_i, e_i and pi_{-i}^D see the global state.
Discrete actions only (see ``check_discrete``).
"""

import itertools
import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from tqdm import tqdm

from common import OfflineMarlError, friendly_errors
from common.runs import Run, eval_only, load_checkpoint, restore_args



@dataclass
class Args:
    # ------------------------------------------- shared fields (docs/architecture.md, the contract)
    env: str = "bridge"
    """environment family: matrix, bridge, mamujoco, rware, smacv1, smacv2"""
    task: str = "hard"
    """task of the family (e.g. hard, penalty_xor, Hopper-3x1, protoss_5_vs_5)"""
    quality: str = "optimal"
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
    total_steps: int = 2_000
    """gradient updates"""
    batch_size: int = 256
    """transitions (sequences for sequence models) per update"""
    eval_every: int = 500
    """updates between evaluations (and at the last update); a checkpoint is written at each"""
    eval_episodes: int = 100
    """episodes per evaluation; 0 turns evaluation off (no environment is built)"""
    final_eval_episodes: int = 500
    """episodes of the final evaluation (metrics.json absolute_metrics)"""
    eval_sample: bool = True
    """evaluate by sampling actions from the policy instead of its greedy (argmax / mean) action"""
    eval_episode_limit: int = 0
    """evaluation episode limit (0: matrix 100, bridge 20, else the dataset's)"""
    eval_envs: int = 10
    """environments stepped side by side during evaluation (one batched forward pass)"""
    log_every: int = 200
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
    # ---- AlberDICE ----
    alpha: float = 1.0
    """KL-regularisation strength alpha of the regularised LP (Eq. 2)"""
    alpha_end: float = 0.1
    """if > 0, alpha decays geometrically from --alpha to this value over training (0 = constant;
    the official matrix-game and Bridge configs anneal 5 -> 0.001 over ~3e5 iterations)"""
    gamma: float = 0.99
    """discount factor"""
    lr: float = 1e-3
    """Adam learning rate of every network (the official code: 1e-4, with ~100x more iterations)"""
    hidden: int = 64
    """width of the two hidden layers of every MLP (the official code: 128)"""
    cql_alpha: float = 0.1
    """weight alpha_CQL of the conservative penalty on e_i (Eq. 43; 0.1 in all the paper's experiments)"""
    pretrain_steps: int = 2_000
    """gradient steps of data-policy pretraining, pi_i^D and pi_{-i}^D (Eqs. 44-45, Algorithm 1 line 1)"""
    inner_steps: int = 1
    """gradient steps of one agent before the next agent's turn (Algorithm 1 line 7; the paper and the
    official code use 1; more steps move each turn closer to an exact best response)"""
    init_policy_from_data: bool = True
    """start each pi_i at the pretrained pi_i^D (the optimum of Eq. 48 while e carries no information)
    instead of near-uniform; the I-projection is mode seeking and cannot leave a saturated mode outside
    the data quickly (docs)"""
    kl_estimator: Literal["policy", "sample"] = "policy"
    """estimate of the other agents' KL term in e_hat: 'policy' = KL(pi_{-i}(.|s) || pi_{-i}^D(.|s,a_i))
    over a_{-i} ~ pi_{-i} (sound; the official code samples it too); 'sample' = log rho_i(x) at the
    dataset's a_{-i}, literally Eq. 8 (biased when pi_{-i} leaves the data's support; docs)"""
    kl_samples: int = 16
    """samples a_{-i} ~ pi_{-i} for the 'policy' KL; exact enumeration when n_actions^(N-1) <= this"""
    rho_refresh: int = 1
    """agent turns between recomputations of the ratios rho over the whole dataset (1 = at every turn,
    exactly Algorithm 1 line 5; larger values save time on big datasets with slightly stale weights)"""
    rho_max: float = 0.0
    """clip rho_i at this value before resampling (0 = no clip, as the paper; the official code uses 100)"""
    absorbing_horizon: int = 0
    """episodes that end for real continue in an absorbing state up to this many steps (0 = the episode
    limit the data was recorded with, from its meta, else its longest episode)"""


# ============================================================ pure functions
NEG = -1e10  # e-value of an unavailable action in the CQL log-sum-exp: finite, so no row gives -inf


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


def alpha_at(args: Args, step: int) -> float:
    """alpha at iteration ``step``: constant, or geometric decay to ``alpha_end``."""
    if args.alpha_end <= 0:
        return args.alpha
    return args.alpha * (args.alpha_end / args.alpha) ** (step / max(1, args.total_steps))


def log_importance_ratios(logp_pi: torch.Tensor, logp_data_others: torch.Tensor, rho_max: float = 0.0) -> torch.Tensor:
    """log rho_i(x) for every agent (Eq. 11): sum_{j != i} log pi_j(a_j|o_j) - log pi_{-i}^D(a_{-i}|s, a_i).

    ``logp_pi [T, N]`` are the current policies' log-probabilities of the dataset actions,
    ``logp_data_others [T, N]`` the autoregressive data policy's log pi_{-i}^D for each i."""
    log_rho = (logp_pi.sum(-1, keepdim=True) - logp_pi) - logp_data_others
    if rho_max > 0:
        log_rho = log_rho.clamp(max=math.log(rho_max))
    return log_rho


def resampling_weights(log_rho: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights proportional to rho (for drawing D_rho, Eq. 12) and log rho_bar = log mean rho,
    both computed in log space so that large ratios cannot overflow."""
    m = log_rho.max()
    log_rho_bar = torch.logsumexp(log_rho, 0) - math.log(log_rho.numel())
    return torch.exp(log_rho - m), log_rho_bar


def absorbing_fraction(dataset, horizon: int) -> float:
    """Share f of absorbing-state rows in D once every episode that ended for real is continued in its
    absorbing state up to ``horizon`` steps (at least one step): the LP of Eqs. 2-3 is an
    infinite-horizon problem, in which a true terminal leads to an absorbing state with reward 0."""
    es = np.asarray(dataset.episode_start)
    terminated = np.asarray(dataset.terminal)[es[1:] - 2]
    n_abs = int(np.maximum(horizon - dataset.episode_lengths, 1)[terminated].sum())
    return n_abs / (n_abs + dataset.n_transitions)


def _log_y(e_hat, alpha, gamma, log_rho_bar, nu_absorbing, absorbing_frac):
    """log y, y = rho_bar * mean_{D_rho} exp(e_hat / alpha) over D extended with its absorbing rows
    (share f, rho = 1, e_hat = -(1 - gamma) * nu_absorbing: reward 0 and a self-loop)."""
    log_y = log_rho_bar + torch.logsumexp(e_hat / alpha, 0) - math.log(e_hat.numel())
    if absorbing_frac > 0:
        log_y = torch.logaddexp(log_y + math.log1p(-absorbing_frac),
                                math.log(absorbing_frac) - (1 - gamma) * torch.as_tensor(nu_absorbing) / alpha)
    return log_y


def nu_loss_log_mean_exp(e_hat: torch.Tensor, nu_init: torch.Tensor, alpha: float, gamma: float,
                         log_rho_bar: torch.Tensor | float = 0.0, nu_absorbing: torch.Tensor | float = 0.0,
                         absorbing_frac: float = 0.0) -> torch.Tensor:
    """Eq. 31 / 46: alpha * log(rho_bar * mean_{D_rho} exp(e_hat / alpha)) + (1 - gamma) * mean nu(s_0)."""
    log_y = _log_y(e_hat, alpha, gamma, log_rho_bar, nu_absorbing, absorbing_frac)
    return alpha * log_y + (1 - gamma) * nu_init.mean()


def nu_loss_exp(e_hat: torch.Tensor, nu_init: torch.Tensor, alpha: float, gamma: float,
                log_rho_bar: torch.Tensor | float = 0.0, nu_absorbing: torch.Tensor | float = 0.0,
                absorbing_frac: float = 0.0) -> torch.Tensor:
    """Eq. 14: rho_bar * alpha * mean_{D_rho} exp(e_hat / alpha - 1) + (1 - gamma) * mean nu(s_0)
    (same minimum as Eq. 31; the minimisers differ by a constant: Proposition E.1)."""
    log_y = _log_y(e_hat, alpha, gamma, log_rho_bar, nu_absorbing, absorbing_frac)
    return alpha * torch.exp(log_y - 1) + (1 - gamma) * nu_init.mean()


def advantage(reward: torch.Tensor, kl_term: torch.Tensor, nu: torch.Tensor, next_nu: torch.Tensor,
              done: torch.Tensor, alpha: float, gamma: float, nu_absorbing: torch.Tensor | float = 0.0) -> torch.Tensor:
    """e_hat(s, a_i, a_{-i}, s') = r - alpha * KL-term + gamma * nu(s') - nu(s) (Eq. 8); after a true
    terminal s' is the absorbing state, whose value is ``nu_absorbing``."""
    next_nu = torch.where(done > 0, torch.as_tensor(nu_absorbing, dtype=next_nu.dtype), next_nu)
    return reward - alpha * kl_term + gamma * next_nu - nu


def cql_penalty(e_all: torch.Tensor, avail: torch.Tensor, data_probs: torch.Tensor) -> torch.Tensor:
    """R_CQL(e_i) of Eq. 43 per row: logsumexp_a e_i(s, a) - E_{a ~ pi_i^D} e_i(s, a) (available actions)."""
    return torch.logsumexp(e_all.masked_fill(~avail, NEG), -1) - (data_probs * e_all).sum(-1)


def i_projection_loss(logits: torch.Tensor, e_all: torch.Tensor, log_data: torch.Tensor, avail: torch.Tensor,
                      alpha: float) -> torch.Tensor:
    """Eq. 48 per row: sum_a pi_i(a|o) * (-e_i(s, a) + alpha * log(pi_i(a|o) / pi_i^D(a|o)))."""
    logp = masked_log_softmax(logits, avail)
    return (logp.exp() * (-e_all + alpha * (logp - log_data))).sum(-1)


# ================================================================= networks
class AgentMLP(nn.Module):
    """One MLP per agent (separate parameters), evaluated for several agents with one batched
    matmul per layer: input ``[M, B, in]`` for the agents listed in ``agents`` (default: all),
    output ``[M, B, out]``. The weights are kept per agent, so an optimizer keeps separate state
    per agent and an agent that is not being updated receives no gradient (Algorithm 1)."""

    def __init__(self, n_agents: int, in_dim: int, out_dim: int, hidden: int, out_scale: float = 1.0):
        super().__init__()
        self.n_agents = n_agents
        sizes = [in_dim, hidden, hidden, out_dim]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for k in range(len(sizes) - 1):
            for _ in range(n_agents):
                lin = nn.Linear(sizes[k], sizes[k + 1])  # default PyTorch init, per agent
                w = lin.weight.detach().t().contiguous()  # [in, out]
                if k == len(sizes) - 2:
                    w = w * out_scale
                self.weights.append(nn.Parameter(w))
                self.biases.append(nn.Parameter(lin.bias.detach().clone() * (out_scale if k == len(sizes) - 2 else 1)))
        self.n_layers = len(sizes) - 1

    def forward(self, x: torch.Tensor, agents: list[int] | None = None) -> torch.Tensor:
        agents = range(self.n_agents) if agents is None else agents
        N = self.n_agents
        for k in range(self.n_layers):
            if len(agents) == 1:  # one agent (its best-response update): no copy of the weights
                w, b = self.weights[k * N + agents[0]].unsqueeze(0), self.biases[k * N + agents[0]].unsqueeze(0)
            else:
                w = torch.stack([self.weights[k * N + a] for a in agents])  # [M, in, out]
                b = torch.stack([self.biases[k * N + a] for a in agents])  # [M, out]
            x = torch.baddbmm(b.unsqueeze(1), x, w)
            if k < self.n_layers - 1:
                x = F.relu(x)
        return x


def per_agent(x: torch.Tensor) -> torch.Tensor:
    """``[B, N, ...] -> [N, B, ...]`` (agents first, as AgentMLP takes them)."""
    return x.transpose(0, 1)


class ARDataPolicy(nn.Module):
    """Autoregressive data policy pi_{-i}^D(a_{-i} | s, a_i) = prod_j pi^D(a_j | s, a_i, a_{<j}) (Eq. 45),
    one network per agent i. Predicting agent j (the others in index order), its input is
    [one-hot j, s, one-hot a_i, one-hot actions of the others before j (zeros after)]: its size
    N + S + K + (N-2) K grows linearly with the number of agents."""

    def __init__(self, n_agents: int, state_dim: int, n_actions: int, hidden: int):
        super().__init__()
        N, K = n_agents, n_actions
        self.N, self.K = N, K
        self.net = AgentMLP(N, N + state_dim + K + (N - 2) * K, K, hidden)
        others = torch.tensor([[j for j in range(N) if j != i] for i in range(N)], dtype=torch.long).view(N, N - 1)
        self.register_buffer("others", others, persistent=False)  # [N, N-1]
        # prev[p, q] = 1 when the q-th other agent comes before the p-th one
        self.register_buffer("prev", torch.tril(torch.ones(N - 1, max(N - 2, 0)), diagonal=-1), persistent=False)

    def log_prob(self, state: torch.Tensor, actions: torch.Tensor, cand: torch.Tensor, avail: torch.Tensor,
                 agents: list[int] | None = None, keep: bool = False) -> torch.Tensor:
        """log pi_{-i}^D(cand | s, a_i) for each agent i in ``agents`` (default all).

        ``state [B, S]``, ``actions [B, N]`` (a_i is read from here), ``cand [C, B, M, N-1]``: C candidate
        joint actions of the other agents (index order), ``avail [B, N, K]``. With ``keep`` the
        dataset's actions of the other agents count as available. Returns ``[C, B, M]``."""
        agents = list(range(self.N)) if agents is None else list(agents)
        N, K = self.N, self.K
        C, B, M = cand.shape[0], state.shape[0], len(agents)
        oth = self.others[agents]  # [M, N-1]
        ident = F.one_hot(oth, N).float().expand(C, B, M, N - 1, N)
        st = state[None, :, None, None, :].expand(C, B, M, N - 1, state.shape[-1])
        own = F.one_hot(actions[:, agents], K).float()[None, :, :, None, :].expand(C, B, M, N - 1, K)
        oh = F.one_hot(cand, K).float()  # [C, B, M, N-1, K]
        prev = (oh[:, :, :, None, : N - 2, :] * self.prev[:, :, None]).flatten(-2)  # [C, B, M, N-1, (N-2)K]
        x = torch.cat([ident, st, own, prev], -1)
        x = x.permute(2, 0, 1, 3, 4).reshape(M, C * B * (N - 1), -1)
        logits = self.net(x, agents).view(M, C, B, N - 1, K).permute(1, 2, 0, 3, 4)
        av = avail[:, oth]  # [B, M, N-1, K]
        kept = actions[:, oth].expand(C, B, M, N - 1) if keep else None
        logp = masked_log_softmax(logits, av.unsqueeze(0).expand_as(logits), kept)
        return logp.gather(-1, cand.unsqueeze(-1)).squeeze(-1).sum(-1)


def others_kl(policy_logp: torch.Tensor, ar: ARDataPolicy, state: torch.Tensor, actions: torch.Tensor,
              avail: torch.Tensor, i: int, n_samples: int, generator: torch.Generator | None = None,
              all_actions: bool = False) -> torch.Tensor:
    """KL(pi_{-i}(.|s) || pi_{-i}^D(.|s, a_i)) per row ``[B]`` (the expectation over a_{-i} ~ pi_{-i} of
    the log-ratio in Eq. 5), with a_i the dataset action of agent i; with ``all_actions`` for every
    action a_i of agent i, ``[B, K]``.

    Exact (enumerating every joint action of the others) when there are at most ``n_samples`` of
    them, else a Monte-Carlo mean over ``n_samples`` draws a_{-i} ~ prod_{j != i} pi_j(.|o_j).
    ``policy_logp [B, N, K]`` are the current policies' (masked) log-probabilities."""
    N, K = ar.N, ar.K
    B = state.shape[0]
    oth = ar.others[i]  # [N-1]
    lp = policy_logp[:, oth]  # [B, N-1, K]
    if K ** (N - 1) <= n_samples:
        cand = torch.tensor(list(itertools.product(range(K), repeat=N - 1)), device=state.device)  # [C, N-1]
        cand = cand[:, None, :].expand(-1, B, -1)  # [C, B, N-1]
        lp_c = lp.unsqueeze(0).expand(cand.shape[0], -1, -1, -1)
        logp_others = lp_c.gather(-1, cand.unsqueeze(-1)).squeeze(-1).sum(-1)
        weight = logp_others.exp()  # pi_{-i}(cand|s): exact expectation
    else:
        draws = torch.multinomial(lp.exp().reshape(B * (N - 1), K), n_samples, replacement=True, generator=generator)
        cand = draws.view(B, N - 1, n_samples).permute(2, 0, 1)  # [C, B, N-1]
        logp_others = lp.unsqueeze(0).expand(n_samples, -1, -1, -1).gather(-1, cand.unsqueeze(-1)).squeeze(-1).sum(-1)
        weight = torch.full_like(logp_others, 1.0 / n_samples)
    if not all_actions:
        logp_data = ar.log_prob(state, actions, cand.unsqueeze(2), avail, agents=[i])[..., 0]  # [C, B]
        return (weight * (logp_others - logp_data)).sum(0)
    own = actions.unsqueeze(1).repeat(1, K, 1)  # [B, K, N]: every action of agent i
    own[:, :, i] = torch.arange(K, device=state.device)
    logp_data = ar.log_prob(state.repeat_interleave(K, 0), own.view(B * K, N),
                            cand.repeat_interleave(K, 1).unsqueeze(2), avail.repeat_interleave(K, 0),
                            agents=[i]).view(-1, B, K)  # [C, B, K]
    return (weight.unsqueeze(-1) * (logp_others.unsqueeze(-1) - logp_data)).sum(0)


class AlberDICE(nn.Module):
    """All networks: policies pi_i(a_i|o_i) and data policies pi_i^D(a_i|o_i) on local observations,
    nu_i(s), e_i(s, .) and the autoregressive pi_{-i}^D on the global state; separate parameters per agent."""

    def __init__(self, n_agents: int, obs_dim: int, state_dim: int, n_actions: int, hidden: int):
        super().__init__()
        self.policy = AgentMLP(n_agents, obs_dim, n_actions, hidden, out_scale=0.01)  # ~uniform at start
        self.data_policy = AgentMLP(n_agents, obs_dim, n_actions, hidden)
        self.ar = ARDataPolicy(n_agents, state_dim, n_actions, hidden)
        self.nu = AgentMLP(n_agents, state_dim, 1, hidden)
        self.nu_absorbing = nn.ParameterList([nn.Parameter(torch.zeros(())) for _ in range(n_agents)])  # nu_i(s_abs)
        self.e = AgentMLP(n_agents, state_dim + n_actions, 1, hidden)  # e_i(s, a_i): input (s, one-hot a_i)
        self.register_buffer("eye", torch.eye(n_actions), persistent=False)

    def policy_logp(self, obs: torch.Tensor, avail: torch.Tensor, agents: list[int] | None = None,
                    keep: torch.Tensor | None = None) -> torch.Tensor:
        """``obs [B, N, o]``, ``avail [B, N, K]`` -> log pi ``[B, M, K]`` for the agents listed; the
        actions ``keep [B, N]`` (the dataset's) count as available."""
        idx = slice(None) if agents is None else agents
        logits = self.policy(per_agent(obs[:, idx]), agents)
        return masked_log_softmax(per_agent(logits), avail[:, idx], None if keep is None else keep[:, idx])

    def e_all(self, state: torch.Tensor, i: int) -> torch.Tensor:
        """e_i(s, a) for every action a: ``state [B, S] -> [B, K]`` (one batched forward of the K inputs)."""
        B, K = state.shape[0], self.eye.shape[0]
        x = torch.cat([state.unsqueeze(1).expand(B, K, -1), self.eye.expand(B, K, K)], -1)
        return self.e(x.view(1, B * K, -1), [i]).view(B, K)

    def data_logp(self, obs: torch.Tensor, avail: torch.Tensor, agents: list[int] | None = None,
                  keep: torch.Tensor | None = None) -> torch.Tensor:
        idx = slice(None) if agents is None else agents
        logits = self.data_policy(per_agent(obs[:, idx]), agents)
        return masked_log_softmax(per_agent(logits), avail[:, idx], None if keep is None else keep[:, idx])


# ============================================================ training parts
def check_discrete(dataset) -> None:
    if not dataset.discrete:
        raise OfflineMarlError(
            "alberdice.py supports discrete actions only, as the paper: with continuous actions the ratios "
            "rho_i, the autoregressive data policy and the e_i(s, a_i) head would need densities the paper "
            "does not define; use baselines/bc.py or another continuous-action algorithm for this dataset")
    if dataset.n_agents < 2:
        raise OfflineMarlError("alberdice.py needs at least two agents (it best-responds to the other agents)")


def pretrain_data_policies(model: AlberDICE, dataset, args: Args, run: Run | None, start: int = 0) -> None:
    """Algorithm 1 line 1: behaviour cloning of pi_i^D (Eq. 44) and pi_{-i}^D (Eq. 45), all agents at once;
    then (``--init-policy-from-data``) the policies start at pi_i^D."""
    params = list(model.data_policy.parameters()) + list(model.ar.parameters())
    opt = torch.optim.Adam(params, lr=args.lr, foreach=True)
    N = dataset.n_agents
    bar = tqdm(range(start, args.pretrain_steps), desc="pretrain data policies", leave=False, dynamic_ncols=True,
               mininterval=2.0, disable=run is None)
    for step in bar:
        b = dataset.sample(args.batch_size)
        logp = model.data_logp(b["obs"], b["avail"], keep=b["actions"])  # [B, N, K]
        loss_d = -logp.gather(-1, b["actions"].unsqueeze(-1)).mean()  # Eq. 44, mean over agents
        cand = b["actions"][:, model.ar.others].unsqueeze(0)  # [1, B, N, N-1]: teacher forcing on the data
        loss_ar = -model.ar.log_prob(b["state"], b["actions"], cand, b["avail"], keep=True).mean()  # Eq. 45, mean/i
        opt.zero_grad(set_to_none=True)
        (loss_d + loss_ar).backward()
        opt.step()
        if run is not None and (step % args.log_every == 0 or step == args.pretrain_steps - 1):
            run.log(step, {"losses/data_policy": loss_d.item(),
                           "losses/ar_data_policy": loss_ar.item() / max(1, N - 1)})
    if args.init_policy_from_data:
        model.policy.load_state_dict(model.data_policy.state_dict())


@torch.no_grad()
def dataset_log_probs(model: AlberDICE, dataset, which: str, chunk: int = 1 << 14) -> torch.Tensor:
    """Over every transition of the dataset (chunked): ``which='policy'`` -> log pi_j(a_j|o_j) ``[T, N]``;
    ``which='ar'`` -> log pi_{-i}^D(a_{-i}|s, a_i) for every i ``[T, N]``."""
    rows = dataset.transition_rows()
    out = []
    for lo in range(0, rows.numel(), chunk):
        b = dataset.transitions(rows[lo: lo + chunk])
        if which == "policy":
            lp = model.policy_logp(b["obs"], b["avail"], keep=b["actions"])
            out.append(lp.gather(-1, b["actions"].unsqueeze(-1)).squeeze(-1))
        else:
            cand = b["actions"][:, model.ar.others].unsqueeze(0)
            out.append(model.ar.log_prob(b["state"], b["actions"], cand, b["avail"], keep=True)[0])
    return torch.cat(out)


@torch.no_grad()
def kl_term(model: AlberDICE, x: dict, i: int, estimator: str, n_samples: int, gen: torch.Generator | None = None,
            all_actions: bool = False) -> torch.Tensor | None:
    """The other agents' KL term of e_hat for agent i on the rows of ``x``: ``[B]`` at the dataset's a_i,
    or (``all_actions``) ``[B, K]`` for every action a_i of agent i ('policy' only; None for 'sample').

    'policy': KL(pi_{-i}(.|s) || pi_{-i}^D(.|s, a_i)), the expectation under pi_{-i} that Eq. 5 defines.
    'sample': log rho_i(x) = log pi_{-i}(a_{-i}|s) / pi_{-i}^D(a_{-i}|s, a_i) at the dataset's a_{-i} (Eq. 8).
    Both agree in expectation over D_rho_i only where pi_{-i} stays inside the support of
    pi_{-i}^D(.|s, a_i); outside it 'sample' misses the (large) penalty: see docs/alberdice.md."""
    if estimator == "policy":
        logp_all = model.policy_logp(x["obs"], x["avail"])
        return others_kl(logp_all, model.ar, x["state"], x["actions"], x["avail"], i, n_samples, gen, all_actions)
    if all_actions:
        return None
    lp = model.policy_logp(x["obs"], x["avail"], keep=x["actions"]).gather(-1, x["actions"].unsqueeze(-1)).squeeze(-1)
    cand = x["actions"][:, model.ar.others[i]][None, :, None, :]
    logp_data = model.ar.log_prob(x["state"], x["actions"], cand, x["avail"], [i], keep=True)[0, :, 0]
    return (lp.sum(-1) - lp[:, i]) - logp_data


def e_values(model: AlberDICE, state: torch.Tensor, i: int, alpha: float, kl_all: torch.Tensor | None) -> torch.Tensor:
    """e_i(s, a) for every action ``[B, K]``. With the 'policy' KL the term -alpha * KL(pi_{-i} || pi_{-i}^D(.|s, a))
    of e_i is known for every a, so only the rest is learnt: e_i = e_psi(s, a) - alpha * KL_i(s, a)."""
    e = model.e_all(state, i)
    return e if kl_all is None else e - alpha * kl_all


def agent_update(model: AlberDICE, opts: dict, dataset, i: int, log_rho: torch.Tensor, alpha: float, args: Args,
                 gen: torch.Generator, absorbing_frac: float = 0.0) -> dict[str, torch.Tensor]:
    """One best-response step of agent i (Algorithm 1 lines 4-7)."""
    B, g = args.batch_size, args.gamma
    weights, log_rho_bar = resampling_weights(log_rho[:, i])
    x = dataset.sample(B, weights=weights)  # D_rho_i: drawn with probability proportional to rho_i (Eq. 12)
    s0 = dataset.sample_initial(B)  # D_0
    a_i = x["actions"][:, i]
    with torch.no_grad():
        kl = kl_term(model, x, i, args.kl_estimator, args.kl_samples, gen)
        data_logp_i = model.data_logp(x["obs"], x["avail"], [i])[:, 0]  # [B, K]

    # nu_i: Eq. 31 / 46
    nu_s = model.nu(torch.stack([x["state"], x["next_state"], s0["state"]])[None].flatten(1, 2), [i])[0, :, 0]
    nu, next_nu, nu0 = nu_s.view(3, B)
    nu_abs = model.nu_absorbing[i]
    e_hat = advantage(x["reward"], kl, nu, next_nu, x["done"], alpha, g, nu_abs)
    loss_nu = nu_loss_log_mean_exp(e_hat, nu0, alpha, g, log_rho_bar, nu_abs, absorbing_frac)
    opts["nu"].zero_grad(set_to_none=True)
    loss_nu.backward()
    opts["nu"].step()

    # e_i: MSE to e_hat on D_rho plus the CQL penalty (Eq. 43 / 47). With the 'policy' KL, e_i = e_psi - alpha KL
    # (e_values): (e_i(s, a_i) - e_hat)^2 = (e_psi(s, a_i) - (e_hat + alpha KL))^2, and CQL acts on the learnt e_psi
    e_net = model.e_all(x["state"], i)  # e_psi(s, .) [B, K]
    target = (e_hat + alpha * kl if args.kl_estimator == "policy" else e_hat).detach()
    loss_mse = (e_net.gather(-1, a_i.unsqueeze(-1)).squeeze(-1) - target).pow(2).mean()
    loss_cql = cql_penalty(e_net, x["avail"][:, i], data_logp_i.exp()).mean()
    loss_e = loss_mse + args.cql_alpha * loss_cql
    opts["e"].zero_grad(set_to_none=True)
    loss_e.backward()
    opts["e"].step()

    # pi_i: I-projection on states of D (Eq. 48; local observation o_i, App. J.1 Eq. 50)
    u = dataset.sample(B)
    with torch.no_grad():
        e_u = e_values(model, u["state"], i, alpha, kl_term(model, u, i, args.kl_estimator, args.kl_samples, gen, True))
        data_u = model.data_logp(u["obs"], u["avail"], [i])[:, 0]
    logits = model.policy(u["obs"][:, i][None], [i])[0]
    loss_pi = i_projection_loss(logits, e_u, data_u, u["avail"][:, i], alpha).mean()
    opts["policy"].zero_grad(set_to_none=True)
    loss_pi.backward()
    opts["policy"].step()
    return {"nu": loss_nu.detach(), "e_mse": loss_mse.detach(), "e_cql": loss_cql.detach(),
            "policy": loss_pi.detach(), "kl_others": kl.mean(), "log_rho_bar": log_rho_bar.detach(),
            "ess": weights.sum() ** 2 / (weights.pow(2).sum() * weights.numel()), "nu_absorbing": nu_abs.detach()}


def train_iteration(model: AlberDICE, opts: dict, dataset, args: Args, step: int, log_rho: torch.Tensor | None,
                    logp_data_others: torch.Tensor, gen: torch.Generator,
                    absorbing_frac: float = 0.0) -> tuple[torch.Tensor, list[dict]]:
    """One iteration of Algorithm 1 (lines 3-8): every agent best-responds in turn, each against the
    other agents' current policies. Returns the (possibly refreshed) log rho and per-agent losses."""
    alpha = alpha_at(args, step)
    N = dataset.n_agents
    infos = []
    for i in range(N):
        # line 5: rho_i with the current pi_{-i}, which stays fixed during agent i's turn
        if log_rho is None or (step * N + i) % args.rho_refresh == 0:
            log_rho = log_importance_ratios(dataset_log_probs(model, dataset, "policy"), logp_data_others, args.rho_max)
        for _ in range(args.inner_steps):
            infos.append(agent_update(model, opts, dataset, i, log_rho, alpha, args, gen, absorbing_frac))
    return log_rho, infos


def make_optimizers(model: AlberDICE, lr: float) -> dict:
    """Adam for nu, e and the policies; the per-agent parameters keep per-agent optimizer state."""
    params = {"nu": [*model.nu.parameters(), *model.nu_absorbing.parameters()], "e": model.e.parameters(),
              "policy": model.policy.parameters()}
    return {k: torch.optim.Adam(p, lr=lr, foreach=True) for k, p in params.items()}


# ======================================================== policy and evaluation
def make_act_fn(policy: AgentMLP, device: torch.device, sample: bool = True):
    """act_fn(obs [E,N,o], state, avail [E,N,K]) -> actions [E, N], sampled (as the paper evaluates)
    or, with ``sample=False``, the most probable available action.
    ``act_fn.probs(obs, avail)`` returns the action probabilities ``[E, N, K]``."""
    gen = torch.Generator(device=device)  # reseeded by common.envs.evaluate

    @torch.no_grad()
    def probs(obs, avail):
        obs = torch.as_tensor(np.asarray(obs), dtype=torch.float32, device=device)
        avail = torch.as_tensor(np.asarray(avail), dtype=torch.bool, device=device)
        logits = per_agent(policy(per_agent(obs)))
        return masked_log_softmax(logits, avail).exp()

    def act_fn(obs, state, avail):
        p = probs(obs, avail)
        E, N, K = p.shape
        if not sample:
            return p.argmax(-1).cpu().numpy()
        return torch.multinomial(p.reshape(E * N, K), 1, generator=gen).view(E, N).cpu().numpy()

    act_fn.probs = probs
    act_fn.reseed = gen.manual_seed
    return act_fn


def load_policy(checkpoint: str, device: str = "cpu", sample: bool | None = None):
    """The trained joint policy of a checkpoint (file or run directory) as ``act_fn``;
    ``sample=None`` keeps the run's --eval-sample choice."""
    ck = load_checkpoint(checkpoint, "alberdice")
    d, args = ck["dims"], restore_args(Args, ck["args"])
    model = AlberDICE(d["n_agents"], d["obs_dim"], d["state_dim"], d["n_actions"], args.hidden)
    model.load_state_dict(ck["modules"]["model"])
    model.to(device).eval()
    act_fn = make_act_fn(model.policy, torch.device(device), sample=args.eval_sample if sample is None else sample)
    act_fn.meta, act_fn.args, act_fn.step = ck["meta"], args, ck["step"]
    return act_fn


# ===================================================================== main
def main(args: Args) -> dict:
    if args.eval_only:
        return eval_only(args, "alberdice", load_policy)
    run = Run(args, "alberdice", positive=("alpha", "inner_steps", "kl_samples", "rho_refresh"),
              nonneg=("alpha_end", "cql_alpha", "pretrain_steps", "rho_max", "absorbing_horizon"))
    dataset, env = run.load_data(check=check_discrete)
    dataset.to(run.device).seed(args.seed)
    N, K = dataset.n_agents, dataset.n_actions
    dims = dict(n_agents=N, obs_dim=dataset.obs_dim, state_dim=dataset.state_dim, n_actions=K)
    model = AlberDICE(N, dataset.obs_dim, dataset.state_dim, K, args.hidden).to(run.device)
    opts = make_optimizers(model, args.lr)
    gen = torch.Generator(device=run.device)  # the KL term's samples of a_{-i}
    gen.manual_seed(args.seed + 1)
    act_fn = make_act_fn(model.policy, run.device, sample=args.eval_sample)
    run.start(dataset, env, act_fn, dims=dims, modules={"model": model}, optimizers=opts, generators={"kl": gen})
    if not run.progress.get("pretrained"):
        pretrain_data_policies(model, dataset, args, run)
        run.progress["pretrained"] = True
        run.checkpoint()
    logp_data_others = dataset_log_probs(model, dataset, "ar")  # pi_{-i}^D is fixed after pretraining
    f_abs = absorbing_fraction(dataset, data_horizon(dataset.meta, dataset, args.absorbing_horizon))
    log_rho = None
    iteration = run.compile(train_iteration)  # torch.compile with --compile
    while run.training:
        with run.autocast():  # bfloat16 matmuls with --precision bf16
            log_rho, infos = iteration(model, opts, dataset, args, run.step, log_rho, logp_data_others, gen, f_abs)
        run.record({f"losses/{k}": torch.stack([d[k] for d in infos]).mean() for k in infos[0]}
                   | {"charts/alpha": alpha_at(args, run.step)})
    return run.finish()


def data_horizon(meta: dict, dataset, override: int = 0) -> int:
    """Episode limit the data was recorded with: ``override``, else the meta's, else the longest episode."""
    limit = override or meta.get("env_options", {}).get("episode_limit") or meta.get("episode_limit")
    return int(limit or dataset.episode_lengths.max())


if __name__ == "__main__":
    with friendly_errors():
        main(tyro.cli(Args))
