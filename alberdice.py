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
a CQL penalty (Eq. 43/47), and pi_i is extracted by I-projection (Eq. 48; by default with the data
factor written the other way round, E_{pi_{-i}} log pi_i^D(a_i|s, a_{-i}), equal for a consistent joint and
well-posed on narrow data: docs). The data policies pi_i^D (Eq. 44), the autoregressive pi_{-i}^D
(Eq. 45) and pi_i^D(a_i|s, a_{-i}) are pretrained first. Policies act on
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
    total_steps: int = 10_000
    """gradient updates"""
    batch_size: int = 256
    """transitions (sequences for sequence models) per update"""
    eval_every: int = 1_000
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
    alpha_end: float = 0.01
    """if > 0, alpha decays geometrically from --alpha to this value over training (0 = constant;
    the official matrix-game and Bridge configs anneal 5 -> 0.001 over 2e4 / 1.5e5 iterations at lr 1e-4;
    at lr 1e-3 over 1e4 iterations, 0.01 reaches the paper's Bridge return and 0.001 can collapse: docs)"""
    gamma: float = 0.99
    """discount factor"""
    lr: float = 1e-3
    """Adam learning rate of every network (the official code: 1e-4, with ~100x more iterations)"""
    hidden: int = 64
    """width of the two hidden layers of every MLP (the official code: 128)"""
    cql_alpha: float = 0.1
    """weight alpha_CQL of the conservative penalty on e_i (Eq. 43; 0.1 in all the paper's experiments)"""
    pretrain_steps: int = 20_000
    """gradient steps of data-policy pretraining, pi_i^D, pi_{-i}^D and the own-last model (Eqs. 44-45,
    Algorithm 1 line 1); on narrow (expert) data the policy step needs sharp data policies (docs)"""
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
    policy_factorisation: Literal["own-last", "own-first"] = "own-last"
    """how the policy step (Eq. 48) scores agent i's candidate actions under the data's joint policy:
    'own-first' = pi_i^D(a_i|o_i) exp(-KL(pi_{-i} || pi_{-i}^D(.|s, a_i))), Eq. 48 as written, which needs
    pi_{-i}^D after actions a_i the data never took (extrapolated; fails on narrow data: docs); 'own-last' =
    exp(E_{a_{-i} ~ pi_{-i}} log pi_i^D(a_i|s, a_{-i})), the same up to a constant for a consistent joint
    (docs), from a data model of a_i given the others' actions. With --kl-estimator sample, e_i is learnt whole
    and the policy step is Eq. 48 with it (this flag is then unused)"""
    kl_samples: int = 16
    """samples a_{-i} ~ pi_{-i} for the 'policy' KL at the dataset's a_i (nu and e steps); exact enumeration when
    the first N-2 other agents have at most this many joint actions (two agents: always exact)"""
    kl_samples_policy: int = 1
    """the same for the KL at every action a_i in the policy step (Eq. 48), whose cost is K times larger; the
    estimate is unbiased for any number and enters the I-projection linearly (docs)"""
    rho_pool: int = 2560
    """rows drawn uniformly from D at each agent's turn to compute the ratios rho_i on and resample D_rho_i
    from (Algorithm 1 lines 4-6; at least --batch-size; the official code: its batch of 128 episodes x 20 steps
    on Bridge). The cost of an iteration does not depend on the dataset's size; 0 (or a pool at least as large
    as D): rho_i over the whole dataset at every turn, whose cost grows with |D| (docs)"""
    rho_max: float = 0.0
    """clip rho_i at this value before resampling (0 = no clip, as the paper; the official code uses 100)"""
    absorbing_horizon: int = 0
    """episodes that end for real continue in an absorbing state up to this many steps (0 = the episode
    limit the data was recorded with, from its meta, else its longest episode); --data-distribution rows only"""
    data_distribution: Literal["rows", "discounted"] = "rows"
    """d^D, the distribution of the LP's expectations over D. rows: every transition alike, true terminals
    continue in the absorbing state (--absorbing-horizon), time-limit cuts bootstrap (the paper). discounted:
    the behaviour's discounted occupancy of the recorded episodes: every episode alike, its step t
    (1 - gamma) gamma^t, every episode end (terminal or time limit) leads to the absorbing state; the LP's
    flow constraints then hold on the data (docs/alberdice.md, "d^D")"""


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


def resampling_weights(log_rho: torch.Tensor, log_prob: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights proportional to rho (for drawing D_rho, Eq. 12) and log rho_bar = log mean rho,
    both computed in log space so that large ratios cannot overflow. ``log_prob`` (the rows' log
    probabilities under d^D, up to a constant; None: every row alike): weights proportional to
    d^D(x) rho(x), rho_bar = E_{d^D}[rho]."""
    if log_prob is not None:
        log_rho_bar = torch.logsumexp(log_rho + log_prob, 0) - torch.logsumexp(log_prob, 0)
        log_rho = log_rho + log_prob
    else:
        log_rho_bar = torch.logsumexp(log_rho, 0) - math.log(log_rho.numel())
    return torch.exp(log_rho - log_rho.max()), log_rho_bar


def absorbing_fraction(dataset, horizon: int) -> float:
    """Share f of absorbing-state rows in D once every episode that ended for real is continued in its
    absorbing state up to ``horizon`` steps (at least one step): the LP of Eqs. 2-3 is an
    infinite-horizon problem, in which a true terminal leads to an absorbing state with reward 0."""
    es = np.asarray(dataset.episode_start)
    terminated = np.asarray(dataset.terminal)[es[1:] - 2]
    n_abs = int(np.maximum(horizon - dataset.episode_lengths, 1)[terminated].sum())
    return n_abs / (n_abs + dataset.n_transitions)


def discounted_occupancy(dataset, gamma: float) -> tuple[np.ndarray, float]:
    """d^D as the behaviour's discounted occupancy (--data-distribution discounted).

    Every episode weighs 1/E (the initial-state term samples episodes alike); its step t carries
    (1 - gamma) gamma^t, and its end, a true terminal or the time limit alike, leads to the absorbing
    state, which gets the remaining gamma^L. Then d^D meets the LP's flow constraints on the data
    exactly (each step's mass is gamma times its predecessor's), so that without reward the optimum
    is the behaviour itself. Returns (probability of every transition, in the order of
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


@dataclass
class Occupancy:
    """--data-distribution discounted on the device: every transition's probability under d^D (in the order
    of ``transition_rows()``) and its log, and 1.0 at every episode's last row (where s' is the absorbing
    state). None in place of one of these: the rows (the paper)."""
    prob: torch.Tensor
    log_prob: torch.Tensor
    ends: torch.Tensor


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
    per agent and an agent that is not being updated receives no gradient (Algorithm 1). They are
    stored ``[out, in]`` (as nn.Linear) and multiplied transposed: on CPU a layer with few outputs
    (the policies' K logits) runs 2-3x faster in that layout than from ``[in, out]``."""

    def __init__(self, n_agents: int, in_dim: int, out_dim: int, hidden: int, out_scale: float = 1.0):
        super().__init__()
        self.n_agents = n_agents
        sizes = [in_dim, hidden, hidden, out_dim]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for k in range(len(sizes) - 1):
            for _ in range(n_agents):
                lin = nn.Linear(sizes[k], sizes[k + 1])  # default PyTorch init, per agent
                w = lin.weight.detach().clone()  # [out, in]
                if k == len(sizes) - 2:
                    w = w * out_scale
                self.weights.append(nn.Parameter(w))
                self.biases.append(nn.Parameter(lin.bias.detach().clone() * (out_scale if k == len(sizes) - 2 else 1)))
        self.n_layers = len(sizes) - 1

    def forward(self, x: torch.Tensor, agents: list[int] | None = None, start: int = 0) -> torch.Tensor:
        """``start=1``: ``x`` is already the first layer's pre-activation ``[M, B, hidden]``, computed by parts
        by the caller (a one-hot input block contributes one row of the weight instead of a matmul)."""
        agents = range(self.n_agents) if agents is None else agents
        if start:
            x = F.relu(x)
        for k in range(start, self.n_layers):
            w, b = self.layer(k, agents)
            x = torch.baddbmm(b.unsqueeze(1), x, w)
            if k < self.n_layers - 1:
                x = F.relu(x)
        return x

    def layer(self, k: int, agents) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights ``[M, in, out]`` (a transposed view) and biases ``[M, out]`` of layer k for the listed agents."""
        N = self.n_agents
        if len(agents) == 1:  # one agent (its best-response update): no copy of the weights
            return self.weights[k * N + agents[0]].t().unsqueeze(0), self.biases[k * N + agents[0]].unsqueeze(0)
        return (torch.stack([self.weights[k * N + a] for a in agents]).transpose(1, 2),  # [M, in, out]
                torch.stack([self.biases[k * N + a] for a in agents]))  # [M, out]


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
        self.others_list = others.tolist()  # the same as Python lists: indexing with them needs no device sync

    def cond_log_probs(self, state: torch.Tensor, own: torch.Tensor, cand: torch.Tensor, avail: torch.Tensor,
                       agents: list[int] | None = None, keep: torch.Tensor | None = None) -> torch.Tensor:
        """log pi^D(. | s, a_i, a_{<p}) over the K actions of every other agent p, for each agent i in ``agents``.

        ``state [B, S]``; ``own [B, A, M]``: A candidate actions a_i per row (1: the dataset's; K: every action);
        ``cand [C, B, M, N-1]``: C candidate joint actions of the others (index order) whose prefixes a_{<p}
        are the inputs (the last other's entry is never an input); ``avail [B, N, K]``.
        ``keep [B, N]`` (optional, the dataset's actions): the other agents' recorded actions count as available.
        Returns ``[M, C, B, A, N-1, K]``. The first layer is computed by parts, exactly as on the
        concatenated input [one-hot p, s, one-hot a_i, one-hot a_{<p}]: s W_s once per row, one weight
        row per one-hot block."""
        agents = list(range(self.N)) if agents is None else list(agents)
        N, K, L = self.N, self.K, self.N - 1
        C, B, A, M, S = cand.shape[0], state.shape[0], own.shape[1], len(agents), state.shape[-1]
        W, bias = self.net.layer(0, agents)  # [M, N + S + K + (N-2)K, H], [M, H]
        H = W.shape[-1]
        m = torch.arange(M, device=state.device)
        oth = self.others[agents]  # [M, L]
        h_id = W[m[:, None], oth] + bias[:, None]  # [M, L, H]: one-hot of the predicted agent, and the bias
        h_s = torch.einsum("bs,msh->mbh", state, W[:, N:N + S])  # [M, B, H]
        h_own = W[:, N + S:N + S + K][m[:, None, None], own.permute(2, 0, 1)]  # [M, B, A, H]
        h1 = (h_s[:, :, None, None] + h_own[:, :, :, None]) + h_id[:, None, None]  # [M, B, A, L, H]
        h1 = h1.unsqueeze(1)  # [M, 1, B, A, L, H]
        if N > 2:
            w_prev = W[:, N + S + K:].reshape(M, N - 2, K, H)
            pre = cand[..., : N - 2].permute(2, 0, 1, 3)  # [M, C, B, N-2]
            g = w_prev[m[:, None, None, None], torch.arange(N - 2, device=state.device), pre]  # [M, C, B, N-2, H]
            prev = torch.zeros(M, C, B, L, H, dtype=g.dtype, device=g.device)
            prev[:, :, :, 1:] = g.cumsum(-2)  # sum over q < p
            h1 = h1 + prev[:, :, :, None]  # [M, C, B, A, L, H]
        else:
            h1 = h1.expand(M, C, B, A, L, H)
        logits = self.net(h1.reshape(M, C * B * A * L, H), agents, start=1).view(M, C, B, A, L, K)
        av = avail[:, oth].permute(1, 0, 2, 3)[:, None, :, None]  # [M, 1, B, 1, L, K]
        if keep is None:
            return masked_log_softmax(logits, av)
        kept = keep[:, oth].permute(1, 0, 2)[:, None, :, None].expand(M, C, B, A, L)
        return masked_log_softmax(logits, av.expand_as(logits), kept)

    def log_prob(self, state: torch.Tensor, actions: torch.Tensor, cand: torch.Tensor, avail: torch.Tensor,
                 agents: list[int] | None = None, keep: bool = False) -> torch.Tensor:
        """log pi_{-i}^D(cand | s, a_i) for each agent i in ``agents`` (default all).

        ``state [B, S]``, ``actions [B, N]`` (a_i is read from here), ``cand [C, B, M, N-1]``: C candidate
        joint actions of the other agents (index order), ``avail [B, N, K]``. With ``keep`` the
        dataset's actions of the other agents count as available. Returns ``[C, B, M]``."""
        agents = list(range(self.N)) if agents is None else list(agents)
        logp = self.cond_log_probs(state, actions[:, agents].unsqueeze(1), cand, avail, agents,
                                   actions if keep else None)[:, :, :, 0]
        return logp.gather(-1, cand.permute(2, 0, 1, 3).unsqueeze(-1)).squeeze(-1).sum(-1).permute(1, 2, 0)


def others_kl(others_logp: torch.Tensor, ar: ARDataPolicy, state: torch.Tensor, actions: torch.Tensor,
              avail: torch.Tensor, i: int, n_samples: int, generator: torch.Generator | None = None,
              all_actions: bool = False) -> torch.Tensor:
    """KL(pi_{-i}(.|s) || pi_{-i}^D(.|s, a_i)) per row ``[B]`` (the expectation over a_{-i} ~ pi_{-i} of
    the log-ratio in Eq. 5), with a_i the dataset action of agent i; with ``all_actions`` for every
    action a_i of agent i, ``[B, K]``. ``others_logp [B, N-1, K]``: the other agents' current (masked)
    log-probabilities, in index order.

    By the chain rule of the KL, with p running over the others in order,
        KL = sum_p E_{a_{<p} ~ pi} [ KL(pi_p(.|o_p) || pi^D(.|s, a_i, a_{<p})) ],
    and each inner KL is a sum over the K actions of agent p (Rao-Blackwellised). Only the prefixes a_{<p}
    of the first N-2 others are random: they are enumerated (exact) when there are at most ``n_samples``
    of them, K^(N-2), else drawn ``n_samples`` times from pi (unbiased). Two agents: exact, one row."""
    N, K = ar.N, ar.K
    B, P = state.shape[0], N - 2  # P: others whose actions are inputs of a later prediction
    dev = state.device
    if K ** P <= n_samples:
        combos = torch.tensor(list(itertools.product(range(K), repeat=P)), dtype=torch.long, device=dev)
        combos = combos.view(K ** P, P)  # [C, P] (one empty prefix when N = 2)
        pre = combos[:, None, :].expand(-1, B, -1)  # [C, B, P]
        lp_pre = others_logp[:, :P].unsqueeze(0).expand(pre.shape[0], -1, -1, -1)
        weight = lp_pre.gather(-1, pre.unsqueeze(-1)).squeeze(-1).sum(-1).exp()  # pi(prefix): [C, B]
    else:
        draws = torch.multinomial(others_logp[:, :P].exp().reshape(B * P, K), n_samples, replacement=True,
                                  generator=generator)
        pre = draws.view(B, P, n_samples).permute(2, 0, 1)  # [C, B, P]
        weight = torch.full(pre.shape[:2], 1.0 / n_samples, device=dev)
    cand = torch.cat([pre, torch.zeros_like(pre[..., :1])], -1)  # the last other's action is never an input
    own = torch.arange(K, device=dev).expand(B, K) if all_actions else actions[:, i:i + 1]
    logq = ar.cond_log_probs(state, own.unsqueeze(-1), cand.unsqueeze(2), avail, [i])[0]  # [C, B, A, N-1, K]
    p = others_logp.exp()  # [B, N-1, K] (0 at unavailable actions, where both log-probabilities are ~-1e10)
    cross = torch.einsum("blk,cbalk->cba", p, logq)  # E_{a_p ~ pi_p} log pi^D(a_p | ...), summed over p
    kl = (p * others_logp).sum((-1, -2)).unsqueeze(-1) - (weight.unsqueeze(-1) * cross).sum(0)  # [B, A]
    return kl if all_actions else kl[:, 0]


class AlberDICE(nn.Module):
    """All networks: policies pi_i(a_i|o_i) and data policies pi_i^D(a_i|o_i) on local observations,
    nu_i(s), e_i(s, .) and the autoregressive pi_{-i}^D on the global state; separate parameters per agent."""

    def __init__(self, n_agents: int, obs_dim: int, state_dim: int, n_actions: int, hidden: int,
                 own_last: bool = True):
        super().__init__()
        self.policy = AgentMLP(n_agents, obs_dim, n_actions, hidden, out_scale=0.01)  # ~uniform at start
        self.data_policy = AgentMLP(n_agents, obs_dim, n_actions, hidden)
        self.ar = ARDataPolicy(n_agents, state_dim, n_actions, hidden)
        self.nu = AgentMLP(n_agents, state_dim, 1, hidden)
        self.nu_absorbing = nn.ParameterList([nn.Parameter(torch.zeros(())) for _ in range(n_agents)])  # nu_i(s_abs)
        self.e = AgentMLP(n_agents, state_dim + n_actions, 1, hidden)  # e_i(s, a_i): input (s, one-hot a_i)
        self.n_actions = n_actions
        # pi_i^D(a_i | s, a_{-i}) for --policy-factorisation own-last: input (s, one-hot a_j of each other j)
        self.own_last = AgentMLP(n_agents, state_dim + (n_agents - 1) * n_actions, n_actions, hidden) \
            if own_last else None

    def policy_logp(self, obs: torch.Tensor, avail: torch.Tensor, agents: list[int] | None = None,
                    keep: torch.Tensor | None = None) -> torch.Tensor:
        """``obs [B, N, o]``, ``avail [B, N, K]`` -> log pi ``[B, M, K]`` for the agents listed; the
        actions ``keep [B, N]`` (the dataset's) count as available."""
        idx = slice(None) if agents is None else agents
        logits = self.policy(per_agent(obs[:, idx]), agents)
        return masked_log_softmax(per_agent(logits), avail[:, idx], None if keep is None else keep[:, idx])

    def e_all(self, state: torch.Tensor, i: int) -> torch.Tensor:
        """e_i(s, a) for every action a: ``state [B, S] -> [B, K]``. The input is (s, one-hot a): the first
        layer is s W_s + W_a[a] + b, computed once per row and once per action, then the K rows go through
        the rest of the network in one batch."""
        B, K, S = state.shape[0], self.n_actions, state.shape[1]
        W, b = self.e.layer(0, [i])
        h1 = (state @ W[0, :S]).unsqueeze(1) + W[0, S:] + b  # [B, K, H]
        return self.e(h1.reshape(1, B * K, -1), [i], start=1).view(B, K)

    def own_last_logp(self, state: torch.Tensor, cand: torch.Tensor, avail: torch.Tensor, i: int,
                      keep: torch.Tensor | None = None) -> torch.Tensor:
        """log pi_i^D(. | s, a_{-i}) ``[C, B, K]`` for C candidate joint actions of the others ``cand [C, B, N-1]``
        (index order); ``avail [B, K]`` are agent i's available actions, ``keep [B]`` (optional) an action that
        counts as available. The first layer by parts: s W_s once per row, one weight row per one-hot block."""
        K, S, C = self.n_actions, state.shape[1], cand.shape[0]
        W, b = self.own_last.layer(0, [i])
        w_oth = W[0, S:].view(-1, K, W.shape[-1])  # [N-1, K, H]
        h1 = (state @ W[0, :S] + b)[None] + w_oth[torch.arange(w_oth.shape[0], device=state.device), cand].sum(-2)
        logits = self.own_last(h1.reshape(1, -1, h1.shape[-1]), [i], start=1).view(C, *state.shape[:1], K)
        return masked_log_softmax(logits, avail.expand(C, -1, -1), None if keep is None else keep.expand(C, -1))

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


def own_last_nll(model: AlberDICE, b: dict) -> torch.Tensor:
    """-log pi_i^D(a_i | s, a_{-i}) on a batch of D, mean over rows and agents (teacher forcing on the data:
    the own-last conditional of --policy-factorisation own-last, fitted like Eq. 45). All agents in one
    batched pass: the first layer by parts as in ``own_last_logp``, the data's a_{-i} as the one-hot block."""
    N, K, S = model.ar.N, model.n_actions, b["state"].shape[1]
    a = b["actions"]
    W, bias = model.own_last.layer(0, range(N))  # [N, in, H], [N, H]
    w_oth = W[:, S:].reshape(N, N - 1, K, W.shape[-1])  # [N, N-1, K, H]
    cand = a[:, model.ar.others].transpose(0, 1)  # [N, B, N-1]: agent i's others' data actions
    rows = w_oth[torch.arange(N, device=a.device)[:, None, None], torch.arange(N - 1, device=a.device), cand]
    h1 = torch.matmul(b["state"], W[:, :S]) + bias[:, None] + rows.sum(-2)  # [N, B, H]
    logits = model.own_last(h1, start=1).transpose(0, 1)  # [B, N, K]
    logp = masked_log_softmax(logits, b["avail"], a)
    return -logp.gather(-1, a.unsqueeze(-1)).mean()


def pretrain_data_policies(model: AlberDICE, dataset, args: Args, run: Run | None, start: int = 0,
                           occ: Occupancy | None = None) -> None:
    """Algorithm 1 line 1: behaviour cloning of pi_i^D (Eq. 44) and pi_{-i}^D (Eq. 45), all agents at once,
    on rows of d^D (``occ``; None: the rows alike); then (``--init-policy-from-data``) the policies start at
    pi_i^D."""
    params = list(model.data_policy.parameters()) + list(model.ar.parameters())
    if model.own_last is not None:
        params += list(model.own_last.parameters())
    opt = torch.optim.Adam(params, lr=args.lr, foreach=True)
    N = dataset.n_agents
    bar = tqdm(range(start, args.pretrain_steps), desc="pretrain data policies", leave=False, dynamic_ncols=True,
               mininterval=2.0, disable=run is None)
    for step in bar:
        b = dataset.sample(args.batch_size, weights=None if occ is None else occ.prob)
        logp = model.data_logp(b["obs"], b["avail"], keep=b["actions"])  # [B, N, K]
        loss_d = -logp.gather(-1, b["actions"].unsqueeze(-1)).mean()  # Eq. 44, mean over agents
        cand = b["actions"][:, model.ar.others].unsqueeze(0)  # [1, B, N, N-1]: teacher forcing on the data
        loss_ar = -model.ar.log_prob(b["state"], b["actions"], cand, b["avail"], keep=True).mean()  # Eq. 45, mean/i
        loss_ol = own_last_nll(model, b) if model.own_last is not None else torch.zeros((), device=logp.device)
        opt.zero_grad(set_to_none=True)
        (loss_d + loss_ar + loss_ol).backward()
        opt.step()
        if run is not None and (step % args.log_every == 0 or step == args.pretrain_steps - 1):
            run.log(step, {"losses/data_policy": loss_d.item(),
                           "losses/ar_data_policy": loss_ar.item() / max(1, N - 1),
                           "losses/own_last_data_policy": loss_ol.item()})
    if args.init_policy_from_data:
        model.policy.load_state_dict(model.data_policy.state_dict())


@torch.no_grad()
def dataset_log_probs(model: AlberDICE, dataset, which: str, chunk: int = 1 << 14,
                      agents: list[int] | None = None) -> torch.Tensor:
    """Over every transition of the dataset (chunked): ``which='policy'`` -> log pi_j(a_j|o_j) ``[T, M]`` for
    the listed agents (default all; computed one agent at a time, so that a column refreshed later is
    bit-identical to a full recomputation); ``which='ar'`` -> log pi_{-i}^D(a_{-i}|s, a_i) for every i ``[T, N]``."""
    rows = dataset.transition_rows()
    agents = list(range(dataset.n_agents)) if agents is None else list(agents)
    out = []
    for lo in range(0, rows.numel(), chunk):
        b = dataset.transitions(rows[lo: lo + chunk])
        if which == "policy":
            out.append(torch.stack([model.policy_logp(b["obs"], b["avail"], [j], keep=b["actions"])[:, 0]
                                    .gather(-1, b["actions"][:, j:j + 1])[:, 0] for j in agents], -1))
        else:
            cand = b["actions"][:, model.ar.others].unsqueeze(0)
            out.append(model.ar.log_prob(b["state"], b["actions"], cand, b["avail"], keep=True)[0])
    return torch.cat(out)


@torch.no_grad()
def kl_term(model: AlberDICE, x: dict, i: int, estimator: str, n_samples: int, gen: torch.Generator | None = None,
            all_actions: bool = False, others_logp: torch.Tensor | None = None) -> torch.Tensor | None:
    """The other agents' KL term of e_hat for agent i on the rows of ``x``: ``[B]`` at the dataset's a_i,
    or (``all_actions``) ``[B, K]`` for every action a_i of agent i ('policy' only; None for 'sample').
    ``others_logp [B, N-1, K]``: the others' log-probabilities at these rows when already computed.

    'policy': KL(pi_{-i}(.|s) || pi_{-i}^D(.|s, a_i)), the expectation under pi_{-i} that Eq. 5 defines.
    'sample': log rho_i(x) = log pi_{-i}(a_{-i}|s) / pi_{-i}^D(a_{-i}|s, a_i) at the dataset's a_{-i} (Eq. 8).
    Both agree in expectation over D_rho_i only where pi_{-i} stays inside the support of
    pi_{-i}^D(.|s, a_i); outside it 'sample' misses the (large) penalty: see docs/alberdice.md."""
    oth = model.ar.others_list[i]
    if others_logp is None:
        others_logp = model.policy_logp(x["obs"], x["avail"], oth, keep=x["actions"])
    if estimator == "policy":
        return others_kl(others_logp, model.ar, x["state"], x["actions"], x["avail"], i, n_samples, gen, all_actions)
    if all_actions:
        return None
    lp = others_logp.gather(-1, x["actions"][:, oth].unsqueeze(-1)).squeeze(-1).sum(-1)  # [B]
    cand = x["actions"][:, oth][None, :, None, :]
    return lp - model.ar.log_prob(x["state"], x["actions"], cand, x["avail"], [i], keep=True)[0, :, 0]


@torch.no_grad()
def own_last_prior(model: AlberDICE, u: dict, i: int, others_logp: torch.Tensor, n_enumerate: int,
                   n_samples: int, gen: torch.Generator | None = None) -> torch.Tensor:
    """E_{a_{-i} ~ pi_{-i}(.|s)} log pi_i^D(a | s, a_{-i}) for every action a of agent i ``[B, K]``: the data factor
    of the policy step with --policy-factorisation own-last (docs/alberdice.md#the-policy-steps-data-factor-own-last).
    ``others_logp [B, N-1, K]``: the others' current log-probabilities. Exact (every joint action of the others,
    weighted by its probability) when they have at most ``n_enumerate`` joint actions, else the mean over
    ``n_samples`` draws (unbiased; it enters the I-projection linearly)."""
    B, L, K = others_logp.shape
    if K ** L <= n_enumerate:
        cand = torch.cartesian_prod(*[torch.arange(K, device=others_logp.device)] * L).view(K ** L, L)  # [C, L]
        logw = others_logp.permute(1, 2, 0)[torch.arange(L, device=cand.device), cand].sum(1)  # [C, B]
        cand = cand[:, None].expand(-1, B, -1)
        w = logw.exp()
    else:
        probs = others_logp.exp().reshape(B * L, K)
        cand = torch.multinomial(probs, n_samples, replacement=True, generator=gen).view(B, L, n_samples)
        cand = cand.permute(2, 0, 1)  # [C, B, L]
        w = torch.full(cand.shape[:2], 1.0 / n_samples, device=cand.device)
    logp = model.own_last_logp(u["state"], cand, u["avail"][:, i], i, u["actions"][:, i])  # [C, B, K]
    return (w.unsqueeze(-1) * logp).sum(0)


def e_values(model: AlberDICE, state: torch.Tensor, i: int, alpha: float, kl_all: torch.Tensor | None) -> torch.Tensor:
    """e_i(s, a) for every action ``[B, K]``. With the 'policy' KL the term -alpha * KL(pi_{-i} || pi_{-i}^D(.|s, a))
    of e_i is known for every a, so only the rest is learnt: e_i = e_psi(s, a) - alpha * KL_i(s, a)."""
    e = model.e_all(state, i)
    return e if kl_all is None else e - alpha * kl_all


def uses_own_last(args: Args) -> bool:
    """The policy step takes the own-last data factor (only with the 'policy' KL, whose e_i = e_psi - alpha KL)."""
    return args.policy_factorisation == "own-last" and args.kl_estimator == "policy"


def uses_pool(args: Args, dataset) -> bool:
    """True when the ratios are computed on a random pool of rows (``--rho-pool`` smaller than the dataset),
    False when on every transition of D."""
    return args.rho_pool > 0 and max(args.rho_pool, args.batch_size) < dataset.n_transitions


@dataclass
class RatioPool:
    """The rows on which the ratios rho_i are computed, with the policies' log-probabilities there, kept
    while valid: after agent i's turn only column i is stale (Algorithm 1: one policy changes per turn).

    Pool (``--rho-pool`` M < |D|): M rows drawn uniformly from D at the start of an iteration and shared by
    the agents' turns (as the official code shares its batch); ``logp [M, N, K]`` (full distributions, also
    used for the others' KL term). Whole dataset: every transition, kept across iterations;
    ``logp [T, N]`` at the dataset actions."""
    pos: torch.Tensor | None  # positions of the pool rows in transition order; None: every transition
    x: dict | None  # the pool's transitions
    logp: torch.Tensor
    stale: set


def new_pool(dataset, args: Args, n_actions: int, occ: Occupancy | None = None) -> RatioPool:
    """Algorithm 1 line 4: the rows x ~ D (d^D: ``occ``; None: the rows alike) on which this iteration's
    ratios are computed."""
    N, dev = dataset.n_agents, dataset.device
    trans = dataset.transition_rows()
    if not uses_pool(args, dataset):
        return RatioPool(None, None, torch.zeros(trans.numel(), N, device=dev), set(range(N)))
    M = max(args.rho_pool, args.batch_size)
    if occ is None:
        pos = torch.randint(0, trans.numel(), (M,), device=trans.device, generator=dataset.generator)
    else:
        pos = torch.multinomial(occ.prob, M, replacement=True, generator=dataset.generator)
    return RatioPool(pos, dataset.transitions(trans[pos]), torch.zeros(M, N, n_actions, device=dev), set(range(N)))


@torch.no_grad()
def refresh_pool(model: AlberDICE, dataset, pool: RatioPool, agents: list[int]) -> None:
    """Recompute the stale columns among ``agents`` (one batched forward of those agents on the pool; on the
    whole dataset one agent at a time, so that a refreshed column is bit-identical to a fresh cache)."""
    stale = sorted(pool.stale.intersection(agents))
    if not stale:
        return
    if pool.x is not None:
        pool.logp[:, stale] = model.policy_logp(pool.x["obs"], pool.x["avail"], stale,
                                                keep=pool.x["actions"]).to(pool.logp.dtype)
    else:
        pool.logp[:, stale] = dataset_log_probs(model, dataset, "policy", agents=stale).to(pool.logp.dtype)
    pool.stale.difference_update(stale)


@torch.no_grad()
def resample(model: AlberDICE, dataset, i: int, args: Args, pool: RatioPool, logp_data_others: torch.Tensor,
             occ: Occupancy | None = None) -> dict:
    """Algorithm 1 lines 5-6 for agent i: the resampled batch D_rho_i (``x``), log rho_bar_i, a uniform batch
    of D for the I-projection (``u``), and the other agents' log-probabilities ``[B, N-1, K]`` at both.

    Pool: rho_i on the M pool rows (log pi_{-i}^D from a table made once after pretraining), B rows drawn
    from the pool with probability proportional to rho_i, rho_bar_i = the pool's mean of rho_i:
    rho_bar_P * mean_{D_rho} f estimates E_D[rho_i f] without bias for every f and every M (docs/alberdice.md),
    at a cost that does not depend on |D|. ``u``: B rows drawn uniformly from the pool.
    Whole dataset: rho_i on every transition; ``x`` drawn from D, ``u`` uniformly from D.
    With ``occ`` (--data-distribution discounted) the pool is drawn from d^D (so the above holds with d^D
    for D), and on the whole dataset ``x`` is drawn with probability proportional to d^D(x) rho_i(x),
    rho_bar_i = E_{d^D}[rho_i], ``u`` from d^D."""
    B = args.batch_size
    oth = model.ar.others_list[i]
    refresh_pool(model, dataset, pool, oth)
    if pool.x is not None:
        P, lp = pool.x, pool.logp[:, oth]  # [M, N-1, K]
        log_rho = lp.gather(-1, P["actions"][:, oth].unsqueeze(-1)).squeeze(-1).sum(-1) \
            - logp_data_others[pool.pos, i]  # Eq. 11
    else:
        log_rho = pool.logp[:, oth].sum(-1) - logp_data_others[:, i]  # Eq. 11
    if args.rho_max > 0:
        log_rho = log_rho.clamp(max=math.log(args.rho_max))
    weights, log_rho_bar = resampling_weights(log_rho, None if occ is None or pool.x is not None else occ.log_prob)
    if pool.x is not None:
        pick = torch.multinomial(weights, B, replacement=True, generator=dataset.generator)
        upick = torch.randint(0, weights.numel(), (B,), device=weights.device, generator=dataset.generator)
        x = {k: P[k][pick] for k in ("obs", "avail", "actions", "state", "next_state", "reward", "done", "rows")}
        u = {k: P[k][upick] for k in ("obs", "avail", "actions", "state")}
        return dict(x=x, x_logp=lp[pick], u=u, u_logp=lp[upick], log_rho_bar=log_rho_bar, weights=weights)
    x = dataset.sample(B, weights=weights)  # drawn with probability proportional to rho_i (Eq. 12)
    u = dataset.sample(B, weights=None if occ is None else occ.prob)
    return dict(x=x, x_logp=model.policy_logp(x["obs"], x["avail"], oth, keep=x["actions"]), u=u,
                u_logp=model.policy_logp(u["obs"], u["avail"], oth, keep=u["actions"]), log_rho_bar=log_rho_bar,
                weights=weights)


def agent_update(model: AlberDICE, opts: dict, dataset, i: int, pool: RatioPool, logp_data_others: torch.Tensor,
                 alpha: float, args: Args, gen: torch.Generator,
                 absorbing_frac: float = 0.0, occ: Occupancy | None = None) -> dict[str, torch.Tensor]:
    """One best-response step of agent i (Algorithm 1 lines 5-7); ``occ``: d^D discounted (None: the rows)."""
    B, g = args.batch_size, args.gamma
    r = resample(model, dataset, i, args, pool, logp_data_others, occ)
    x, log_rho_bar, weights = r["x"], r["log_rho_bar"], r["weights"]
    s0 = dataset.sample_initial(B)  # D_0
    a_i = x["actions"][:, i]
    with torch.no_grad():
        kl = kl_term(model, x, i, args.kl_estimator, args.kl_samples, gen, others_logp=r["x_logp"])
        data_logp_i = model.data_logp(x["obs"], x["avail"], [i])[:, 0]  # [B, K]

    # nu_i: Eq. 31 / 46
    nu_s = model.nu(torch.stack([x["state"], x["next_state"], s0["state"]])[None].flatten(1, 2), [i])[0, :, 0]
    nu, next_nu, nu0 = nu_s.view(3, B)
    nu_abs = model.nu_absorbing[i]
    done = x["done"] if occ is None else torch.index_select(occ.ends, 0, x["rows"])  # s' absorbing
    e_hat = advantage(x["reward"], kl, nu, next_nu, done, alpha, g, nu_abs)
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
    u = r["u"]
    with torch.no_grad():
        if uses_own_last(args):
            # pi_i^D(a) exp(-KL(a)) = exp(E_{pi_{-i}} log pi_i^D(a|s, a_{-i})) x const: e_i = e_psi and that prior
            e_u = model.e_all(u["state"], i)
            data_u = own_last_prior(model, u, i, r["u_logp"], args.kl_samples, args.kl_samples_policy, gen)
        else:
            kl_u = kl_term(model, u, i, args.kl_estimator, args.kl_samples_policy, gen, True,
                           others_logp=r["u_logp"])
            e_u = e_values(model, u["state"], i, alpha, kl_u)
            data_u = model.data_logp(u["obs"], u["avail"], [i])[:, 0]
    logits = model.policy(u["obs"][:, i][None], [i])[0]
    loss_pi = i_projection_loss(logits, e_u, data_u, u["avail"][:, i], alpha).mean()
    opts["policy"].zero_grad(set_to_none=True)
    loss_pi.backward()
    opts["policy"].step()
    return {"nu": loss_nu.detach(), "e_mse": loss_mse.detach(), "e_cql": loss_cql.detach(),
            "policy": loss_pi.detach(), "kl_others": kl.mean(), "log_rho_bar": log_rho_bar.detach(),
            "ess": weights.sum() ** 2 / (weights.pow(2).sum() * weights.numel()), "nu_absorbing": nu_abs.detach()}


def train_iteration(model: AlberDICE, opts: dict, dataset, args: Args, step: int, pool: RatioPool | None,
                    logp_data_others: torch.Tensor, gen: torch.Generator,
                    absorbing_frac: float = 0.0, occ: Occupancy | None = None) -> tuple[RatioPool, list[dict]]:
    """One iteration of Algorithm 1 (lines 3-8): every agent best-responds in turn, each against the
    other agents' current policies. ``pool``: the previous iteration's ratio rows (kept when they are the
    whole dataset; a pool is drawn anew; None: start). Returns the pool and per-agent losses."""
    alpha = alpha_at(args, step)
    N = dataset.n_agents
    if pool is None or pool.x is not None:
        pool = new_pool(dataset, args, model.ar.K, occ)  # line 4
    infos = []
    for i in range(N):
        for _ in range(args.inner_steps):
            infos.append(agent_update(model, opts, dataset, i, pool, logp_data_others, alpha, args, gen,
                                      absorbing_frac, occ))
        pool.stale.add(i)  # only agent i's policy changed during its turn
    return pool, infos


def make_optimizers(model: AlberDICE, lr: float) -> dict:
    """Adam for nu, e and the policies; the per-agent parameters keep per-agent optimizer state."""
    params = {"nu": [*model.nu.parameters(), *model.nu_absorbing.parameters()], "e": model.e.parameters(),
              "policy": model.policy.parameters()}
    # fused: one kernel for the few tensors of the agent that moved (2x faster than foreach on a CPU, measured)
    return {k: torch.optim.Adam(p, lr=lr, fused=True) for k, p in params.items()}


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
    # only the policies act; the checkpoint's other networks (which depend on the run's flags) are not needed
    model.policy.load_state_dict({k.removeprefix("policy."): v for k, v in ck["modules"]["model"].items()
                                  if k.startswith("policy.")})
    model.to(device).eval()
    act_fn = make_act_fn(model.policy, torch.device(device), sample=args.eval_sample if sample is None else sample)
    act_fn.meta, act_fn.args, act_fn.step = ck["meta"], args, ck["step"]
    return act_fn


# ===================================================================== main
def main(args: Args) -> dict:
    if args.eval_only:
        return eval_only(args, "alberdice", load_policy)
    run = Run(args, "alberdice", positive=("alpha", "inner_steps", "kl_samples", "kl_samples_policy"),
              nonneg=("alpha_end", "cql_alpha", "pretrain_steps", "rho_max", "rho_pool", "absorbing_horizon"),
              checks=((args.data_distribution == "rows" or args.absorbing_horizon == 0,
                       "--absorbing-horizon applies to --data-distribution rows only (discounted gives the "
                       "absorbing state the rest of each episode's discounted mass)"),))
    dataset, env = run.load_data(check=check_discrete)
    dataset.to(run.device).seed(args.seed)
    N, K = dataset.n_agents, dataset.n_actions
    dims = dict(n_agents=N, obs_dim=dataset.obs_dim, state_dim=dataset.state_dim, n_actions=K)
    model = AlberDICE(N, dataset.obs_dim, dataset.state_dim, K, args.hidden,
                      own_last=uses_own_last(args)).to(run.device)
    opts = make_optimizers(model, args.lr)
    gen = torch.Generator(device=run.device)  # the KL term's samples of a_{-i}
    gen.manual_seed(args.seed + 1)
    act_fn = make_act_fn(model.policy, run.device, sample=args.eval_sample)
    run.start(dataset, env, act_fn, dims=dims, modules={"model": model}, optimizers=opts, generators={"kl": gen})
    if args.data_distribution == "discounted":  # rows drawn from d^D; every episode end is absorbing
        prob, f_abs = discounted_occupancy(dataset, args.gamma)
        prob = torch.as_tensor(prob, dtype=torch.float32, device=run.device)
        occ = Occupancy(prob, prob.log(), torch.as_tensor(episode_ends(dataset), device=run.device))
    else:
        occ = None
        f_abs = absorbing_fraction(dataset, data_horizon(dataset.meta, dataset, args.absorbing_horizon))
    if not run.progress.get("pretrained"):
        pretrain_data_policies(model, dataset, args, run, occ=occ)
        run.progress["pretrained"] = True
        run.pretraining_done()  # its time is not update time
    logp_data_others = dataset_log_probs(model, dataset, "ar")  # pi_{-i}^D is fixed after pretraining
    pool = None  # the rows whose ratios rho_i an iteration's turns share (train_iteration)
    iteration = run.compile(train_iteration)  # torch.compile with --compile
    while run.training:
        with run.autocast():  # bfloat16 matmuls with --precision bf16
            pool, infos = iteration(model, opts, dataset, args, run.step, pool, logp_data_others, gen, f_abs, occ)
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
