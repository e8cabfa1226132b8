"""OptiDICE extended naively to multi-agent RL: one nu(s) on the global state, factorised policies
by weighted behaviour cloning.

Docs:       docs/baselines.md#optidice
Paper:      J. Lee, W. Jeon, B. Lee, J. Pineau, K.-E. Kim, "OptiDICE: Offline Policy Optimization via
            Stationary Distribution Correction Estimation", ICML 2021; the multi-agent extension is
            the one described in AlberDICE (Matsunaga et al., NeurIPS 2023), footnote 7 and App. C
            (Eqs. 26-30), with the log-mean-exp objective of its App. E.1.
Reference:  github.com/dematsunaga/alberdice @ 4d69f0e (pymarl-master/src/learners/optidice_learner.py),
            read to check facts.

    python baselines/optidice.py --env bridge --task hard --quality mix

nu(s) solves the (joint-action) regularised LP of the MMDP through its dual,
    min_nu  alpha * log E_D[exp(e_nu / alpha)] + (1 - gamma) E_{s0}[nu(s0)],
    e_nu(s, a, s') = r(s, a) + gamma * nu(s') - nu(s),
whose optimum gives the correction ratios w*(s, a) = d*(s, a) / d^D(s, a) proportional to
exp(e_nu / alpha) (Eq. 30; the log-mean-exp form fixes nu up to a constant, which the
normalisation of w removes). Each agent's policy then clones the data re-weighted by w
(Eq. 29). The weighted data may be a mixture of coordinated joint behaviours whose factorised
clone picks out-of-distribution joint actions (App. C): the failure AlberDICE addresses.
Discrete and continuous actions.
"""

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

from common import friendly_errors
from common.runs import Run, eval_only, load_checkpoint, restore_args

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


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
    total_steps: int = 5_000
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
    # ---- OptiDICE ----
    alpha: float = 1.0
    """KL-regularisation strength alpha (the AlberDICE paper uses 1 for OptiDICE on GRF and RWARE)"""
    alpha_end: float = 0.1
    """if > 0, alpha decays geometrically from --alpha to this value over training
    (the official matrix-game and Bridge configs anneal 5 -> 0.001)"""
    gamma: float = 0.99
    """discount factor"""
    lr: float = 1e-3
    """Adam learning rate of nu and the policies"""
    hidden: int = 64
    """width of the two hidden layers of nu and of each agent's policy"""
    absorbing_horizon: int = 0
    """episodes that end for real continue in an absorbing state up to this many steps (0 = the episode
    limit the data was recorded with, from its meta, else its longest episode); --data-distribution rows"""
    data_distribution: Literal["rows", "discounted"] = "rows"
    """d^D of the LP. rows: every transition alike, true terminals continued in the absorbing state up to
    --absorbing-horizon, time-limit cuts bootstrap (the paper's practice). discounted: the behaviour's
    discounted occupancy of the recorded episodes: each episode weighs alike, its step t (1 - gamma)
    gamma^t, and every episode's end (true terminal or time limit) leads to the absorbing state, which
    gets the rest (docs/baselines.md#optidice)"""


# ============================================================ pure functions
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


def gaussian_log_prob(out: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """log N(a; tanh(mu), exp(log_std)^2) summed over action dimensions; ``out [..., 2A]`` = (mu, log_std)."""
    mu, log_std = out.chunk(2, dim=-1)
    log_std = log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)
    z = (actions - torch.tanh(mu)) / log_std.exp()
    return (-0.5 * z.pow(2) - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


def alpha_at(args: Args, step: int) -> float:
    if args.alpha_end <= 0:
        return args.alpha
    return args.alpha * (args.alpha_end / args.alpha) ** (step / max(1, args.total_steps))


def absorbing_fraction(dataset, horizon: int) -> float:
    """Share f of absorbing-state rows in D once every episode that ended for real is continued in its
    absorbing state (reward 0) up to ``horizon`` steps (at least one): the LP is infinite-horizon."""
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
    is w = 1, the behaviour itself. Returns (probability of every transition, in the order of
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


def data_horizon(meta: dict, dataset, override: int = 0) -> int:
    """Episode limit the data was recorded with: ``override``, else the meta's, else the longest episode."""
    limit = override or meta.get("env_options", {}).get("episode_limit") or meta.get("episode_limit")
    return int(limit or dataset.episode_lengths.max())


def advantage(reward: torch.Tensor, nu: torch.Tensor, next_nu: torch.Tensor, done: torch.Tensor,
              gamma: float, nu_absorbing: torch.Tensor | float = 0.0) -> torch.Tensor:
    """e_nu(s, a, s') = r + gamma * nu(s') - nu(s) (Eq. 27/30); after a true terminal s' is the
    absorbing state, whose value is ``nu_absorbing``."""
    next_nu = torch.where(done > 0, torch.as_tensor(nu_absorbing, dtype=next_nu.dtype), next_nu)
    return reward + gamma * next_nu - nu


def nu_loss(e: torch.Tensor, nu_init: torch.Tensor, alpha: float, gamma: float,
            nu_absorbing: torch.Tensor | float = 0.0, absorbing_frac: float = 0.0) -> torch.Tensor:
    """alpha * log mean_D exp(e / alpha) + (1 - gamma) * mean nu(s0): Eq. 26 with the closed-form w
    (Eq. 27) in the numerically stable log-mean-exp form (AlberDICE App. E.1). D includes its
    absorbing rows (share f, e = -(1 - gamma) * nu_absorbing), so nu is determined up to a constant."""
    log_y = torch.logsumexp(e / alpha, 0) - math.log(e.numel())
    if absorbing_frac > 0:
        log_y = torch.logaddexp(log_y + math.log1p(-absorbing_frac),
                                math.log(absorbing_frac) - (1 - gamma) * torch.as_tensor(nu_absorbing) / alpha)
    return alpha * log_y + (1 - gamma) * nu_init.mean()


def correction_weights(e: torch.Tensor, alpha: float) -> torch.Tensor:
    """w(s, a) proportional to exp(e / alpha) (Eq. 30), normalised to mean 1 over the batch."""
    return torch.softmax(e / alpha, 0) * e.numel()


def weighted_bc_loss(out: torch.Tensor, actions: torch.Tensor, avail: torch.Tensor, w: torch.Tensor,
                     discrete: bool) -> torch.Tensor:
    """Eq. 29: -mean_D[w * sum_i log pi_i(a_i|o_i)], the factorised policies cloning the weighted data."""
    if discrete:
        logp = masked_log_softmax(out, avail, keep=actions).gather(-1, actions.unsqueeze(-1)).squeeze(-1)  # [B, N]
    else:
        logp = gaussian_log_prob(out, actions)
    return -(w.unsqueeze(-1) * logp).sum(-1).mean()


# ================================================================= networks
class AgentMLP(nn.Module):
    """One MLP per agent (separate parameters), all agents evaluated with one batched matmul per
    layer: ``[N, B, in] -> [N, B, out]``. With ``n_agents=1`` it is a plain MLP (nu)."""

    def __init__(self, n_agents: int, in_dim: int, out_dim: int, hidden: int, out_scale: float = 1.0):
        super().__init__()
        sizes = [in_dim, hidden, hidden, out_dim]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for k in range(len(sizes) - 1):
            layers = [nn.Linear(sizes[k], sizes[k + 1]) for _ in range(n_agents)]
            scale = out_scale if k == len(sizes) - 2 else 1.0
            self.weights.append(nn.Parameter(torch.stack([l.weight.detach().t() for l in layers]) * scale))
            self.biases.append(nn.Parameter(torch.stack([l.bias.detach() for l in layers]).unsqueeze(1) * scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for k, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(b, x, w)
            if k < len(self.weights) - 1:
                x = F.relu(x)
        return x


class Policy(nn.Module):
    """Decentralised policies pi_i(a_i|o_i) with separate parameters per agent."""

    def __init__(self, n_agents: int, obs_dim: int, discrete: bool, n_out: int, hidden: int):
        super().__init__()
        self.discrete = discrete
        self.net = AgentMLP(n_agents, obs_dim, n_out if discrete else 2 * n_out, hidden, out_scale=0.01)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        """``obs [B, N, o] -> [B, N, out]``."""
        return self.net(obs.transpose(0, 1)).transpose(0, 1)


class Nu(nn.Module):
    """nu(s): one network on the global state, shared by all agents (the naive extension), and the
    value of the absorbing state that follows a true terminal."""

    def __init__(self, state_dim: int, hidden: int):
        super().__init__()
        self.net = AgentMLP(1, state_dim, 1, hidden)
        self.absorbing = nn.Parameter(torch.zeros(()))

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return self.net(state.unsqueeze(0))[0, :, 0]


# ======================================================== policy and evaluation
def make_act_fn(policy: Policy, device: torch.device, sample: bool = True):
    """act_fn(obs [E,N,o], state, avail [E,N,K]) -> actions; ``act_fn.probs`` gives discrete action
    probabilities; sampled actions draw from the act_fn's own generator, which ``evaluate`` reseeds."""
    gen = torch.Generator(device=device)

    @torch.no_grad()
    def probs(obs, avail):
        obs = torch.as_tensor(np.asarray(obs), dtype=torch.float32, device=device)
        avail = torch.as_tensor(np.asarray(avail), dtype=torch.bool, device=device)
        return masked_log_softmax(policy(obs), avail).exp()

    @torch.no_grad()
    def act_fn(obs, state, avail):
        if not policy.discrete:
            out = policy(torch.as_tensor(np.asarray(obs), dtype=torch.float32, device=device))
            return torch.tanh(out.chunk(2, dim=-1)[0]).cpu().numpy()
        p = probs(obs, avail)
        if not sample:
            return p.argmax(-1).cpu().numpy()
        E, N, K = p.shape
        return torch.multinomial(p.reshape(E * N, K), 1, generator=gen).view(E, N).cpu().numpy()

    act_fn.probs = probs
    act_fn.reseed = gen.manual_seed
    return act_fn


def load_policy(checkpoint: str, device: str = "cpu", sample: bool | None = None):
    """The trained joint policy of a checkpoint (file or run directory) as ``act_fn``;
    ``sample=None`` keeps the run's --eval-sample choice."""
    ck = load_checkpoint(checkpoint, "optidice")
    d, args = ck["dims"], restore_args(Args, ck["args"])
    policy = Policy(d["n_agents"], d["obs_dim"], d["discrete"], d["n_out"], args.hidden)
    policy.load_state_dict(ck["modules"]["policy"])
    policy.to(device).eval()
    act_fn = make_act_fn(policy, torch.device(device), sample=args.eval_sample if sample is None else sample)
    act_fn.meta, act_fn.args, act_fn.step = ck["meta"], args, ck["step"]
    return act_fn


# ===================================================================== main
def main(args: Args) -> dict:
    if args.eval_only:
        return eval_only(args, "optidice", load_policy)
    run = Run(args, "optidice", positive=("alpha",), nonneg=("alpha_end", "absorbing_horizon"),
              checks=((args.data_distribution == "rows" or args.absorbing_horizon == 0,
                       "--absorbing-horizon applies to --data-distribution rows only (discounted gives the "
                       "absorbing state the rest of each episode's discounted mass)"),))
    dataset, env = run.load_data()
    dataset.to(run.device).seed(args.seed)
    discrete = dataset.discrete
    n_out = dataset.n_actions if discrete else dataset.act_dim
    dims = dict(n_agents=dataset.n_agents, obs_dim=dataset.obs_dim, state_dim=dataset.state_dim, discrete=discrete,
                n_out=n_out)
    policy = Policy(dataset.n_agents, dataset.obs_dim, discrete, n_out, args.hidden).to(run.device)
    nu = Nu(dataset.state_dim, args.hidden).to(run.device)
    opt_pi = torch.optim.Adam(policy.parameters(), lr=args.lr)
    opt_nu = torch.optim.Adam(nu.parameters(), lr=args.lr)
    act_fn = make_act_fn(policy, run.device, sample=args.eval_sample)
    if args.data_distribution == "discounted":  # sample rows from d^D; every episode end is absorbing
        prob, f_abs = discounted_occupancy(dataset, args.gamma)
        row_prob = torch.as_tensor(prob, dtype=torch.float32, device=run.device)
        ends = torch.as_tensor(episode_ends(dataset), device=run.device)
    else:
        row_prob, ends = None, None
        f_abs = absorbing_fraction(dataset, data_horizon(dataset.meta, dataset, args.absorbing_horizon))
    B = args.batch_size
    run.start(dataset, env, act_fn, dims=dims, modules={"policy": policy, "nu": nu},
              optimizers={"policy": opt_pi, "nu": opt_nu})

    def update(b: dict[str, torch.Tensor], s0: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
        v = nu(torch.cat([b["state"], b["next_state"], s0["state"]]))
        done = b["done"] if ends is None else torch.index_select(ends, 0, b["rows"])
        e = advantage(b["reward"], v[:B], v[B:2 * B], done, args.gamma, nu.absorbing)
        loss_nu = nu_loss(e, v[2 * B:], alpha, args.gamma, nu.absorbing, f_abs)  # Eq. 26 (log-mean-exp)
        opt_nu.zero_grad(set_to_none=True)
        loss_nu.backward()
        opt_nu.step()

        w = correction_weights(e.detach(), alpha)  # Eq. 30
        loss_pi = weighted_bc_loss(policy(b["obs"]), b["actions"], b["avail"], w, discrete)  # Eq. 29
        opt_pi.zero_grad(set_to_none=True)
        loss_pi.backward()
        opt_pi.step()
        return {"losses/nu": loss_nu.detach(), "losses/policy": loss_pi.detach(), "charts/alpha": alpha,
                "charts/w_max": w.max(), "charts/w_ess": w.sum() ** 2 / w.pow(2).sum() / B}

    step = run.compile(update)  # torch.compile with --compile
    while run.training:
        with run.autocast():  # bfloat16 matmuls with --precision bf16
            stats = step(dataset.sample(B, weights=row_prob), dataset.sample_initial(B), alpha_at(args, run.step))
        run.record(stats)
    return run.finish()


if __name__ == "__main__":
    with friendly_errors():
        main(tyro.cli(Args))
