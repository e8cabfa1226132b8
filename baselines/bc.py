"""Behaviour cloning: each agent imitates its own dataset actions from its local observation.

Docs:       docs/baselines.md#bc
Paper:      the BC baseline of AlberDICE (Matsunaga et al., NeurIPS 2023), Sec. 5: separate policy
            parameters per agent, the same policy network as AlberDICE.
Reference:  github.com/dematsunaga/alberdice @ 4d69f0e (separate-parameter MLP agents), read to check facts.

    python baselines/bc.py --env bridge --task hard --quality optimal
    python baselines/bc.py --env mamujoco --task Hopper-3x1 --quality expert

Discrete actions: a categorical policy per agent over its available actions, trained by
maximum likelihood. Continuous actions: a Gaussian policy per agent (mean tanh-squashed into
[-1, 1], state-dependent log-std), trained by maximum likelihood, acting with its mean.
The joint policy is the product of the agents' policies, which is why BC spreads probability
over out-of-distribution joint actions when the data mixes coordinated behaviours (the Penalty-XOR
dataset {AB, BA} gives uniform individual policies, so AA and BB are played half of the time).
"""

import math
from dataclasses import dataclass

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
    # ---- BC ----
    lr: float = 1e-3
    """Adam learning rate"""
    hidden: int = 64
    """width of the two hidden layers of each agent's policy"""


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


def bc_loss(out: torch.Tensor, actions: torch.Tensor, avail: torch.Tensor, discrete: bool) -> torch.Tensor:
    """Negative log-likelihood of the dataset actions, mean over rows and agents.
    ``out [B, N, K]`` logits (discrete) or ``[B, N, 2A]`` Gaussian parameters (continuous)."""
    if discrete:
        return -masked_log_softmax(out, avail, keep=actions).gather(-1, actions.unsqueeze(-1)).mean()
    return -gaussian_log_prob(out, actions).mean()


# ================================================================= networks
class AgentMLP(nn.Module):
    """One MLP per agent (separate parameters, as the paper's baselines), all agents evaluated with
    one batched matmul per layer: ``[N, B, in] -> [N, B, out]``."""

    def __init__(self, n_agents: int, in_dim: int, out_dim: int, hidden: int, out_scale: float = 1.0):
        super().__init__()
        sizes = [in_dim, hidden, hidden, out_dim]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for k in range(len(sizes) - 1):
            layers = [nn.Linear(sizes[k], sizes[k + 1]) for _ in range(n_agents)]  # default init, per agent
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
    ck = load_checkpoint(checkpoint, "bc")
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
        return eval_only(args, "bc", load_policy)
    run = Run(args, "bc")
    dataset, env = run.load_data()
    dataset.to(run.device).seed(args.seed)
    discrete = dataset.discrete
    n_out = dataset.n_actions if discrete else dataset.act_dim
    dims = dict(n_agents=dataset.n_agents, obs_dim=dataset.obs_dim, discrete=discrete, n_out=n_out)
    policy = Policy(dataset.n_agents, dataset.obs_dim, discrete, n_out, args.hidden).to(run.device)
    opt = torch.optim.Adam(policy.parameters(), lr=args.lr)
    act_fn = make_act_fn(policy, run.device, sample=args.eval_sample)
    run.start(dataset, env, act_fn, dims=dims, modules={"policy": policy}, optimizers={"policy": opt})

    def update(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        loss = bc_loss(policy(b["obs"]), b["actions"], b["avail"], discrete)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"losses/bc": loss.detach()}

    step = run.compile(update)  # torch.compile with --compile
    while run.training:
        with run.autocast():  # bfloat16 matmuls with --precision bf16
            stats = step(dataset.sample(args.batch_size))
        run.record(stats)
    return run.finish()


if __name__ == "__main__":
    with friendly_errors():
        main(tyro.cli(Args))
