"""CFCQL: counterfactual conservative Q-learning for offline multi-agent RL.

Docs: docs/baselines.md#cfcql (objective, agent weighting, differences from the reference code).
Paper: J. Shao, Y. Qu, C. Chen, H. Zhang, X. Ji, "Counterfactual Conservative Q Learning for
Offline Multi-agent Reinforcement Learning", NeurIPS 2023 (arXiv 2309.12696).
Reference code checked against: github.com/thu-rllab/CFCQL (`discrete/src/learners/cq_learner.py`,
`continuous/algorithms/maddpg_cc.py`), read for facts only.

A QMIX-style monotonic mixer over per-agent Q_i. The conservative term is computed per agent
in a counterfactual way: agent i's action is swept over its actions (discrete) or sampled
(continuous) while the other agents keep their dataset actions, the mixed Q_tot is pushed down
by a logsumexp over that sweep and pushed up at the dataset joint action; the agents' terms are
mixed with weights lambda_i = softmax_i(temperature x deviation_i), where deviation_i measures
how far agent i's counterfactual (or current) policy is from a learned behaviour policy.
Discrete: greedy Q_i (SMAC setting); continuous: TD3 actors and twin critics (MaMuJoCo setting).
Agents share weights and see a one-hot id, all in one forward pass.

    python baselines/cfcql.py --env smacv1 --task 5m_vs_6m --quality medium --dataset PATH
    python baselines/cfcql.py --env bridge --task hard --quality mix --total-steps 50000
"""

import copy
import hashlib
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from tqdm import tqdm

from common import OfflineMarlError, friendly_errors
from common.runs import Run, eval_only, load_checkpoint, restore_args

ALGO = "cfcql"


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
    total_steps: int = 1_000_000
    """gradient updates"""
    batch_size: int = 128
    """transitions (sequences for sequence models) per update"""
    eval_every: int = 5000
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
    log_every: int = 1000
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
    # ---- CFCQL
    cql_alpha: float | None = None
    """weight of the counterfactual penalty (Eq. F2); default 50 discrete (reference SMAC config), 1 continuous"""
    softmax_temp: float | None = None
    """temperature of the agent weights lambda (Eq. F3); 0 = uniform 1/N; default 5 discrete, 1 continuous"""
    gamma: float = 0.99
    """discount"""
    lr: float | None = None
    """Adam learning rate; default 5e-4 discrete, 3e-4 continuous"""
    hidden: int = 256
    """width of the two hidden layers of Q_i, pi_i and the behaviour model"""
    mixing_embed: int = 32
    """QMIX mixer: width of the mixing layer"""
    hypernet_embed: int = 64
    """QMIX mixer: width of the hypernetworks' hidden layer"""
    grad_clip: float = 10.0
    """gradient-norm clip (critic and mixer; actors use 0.5 as the reference)"""
    target_update_interval: int = 200
    """discrete: copy Q and the mixer into their targets every this many updates (reference: 200)"""
    tau: float = 0.005
    """continuous: Polyak rate of the target critics, mixers and actor"""
    behaviour_steps: int = 10_000
    """updates of the behaviour model (behaviour cloning) before training; it is then frozen"""
    behaviour_cache: bool = True
    """keep the behaviour model in the data cache ($OFFLINE_MARL_DATA/behaviour) and reuse it on the same data
    with the same behaviour settings: it is trained once per dataset"""
    n_action_samples: int = 10
    """continuous: samples of agent i's action per proposal (uniform, pi(.|o), pi(.|o')) in Eq. F2"""
    policy_noise: float = 0.2
    """continuous: std of the Gaussian around the deterministic actor used as the policy proposal"""
    target_noise: float = 0.05
    """continuous: std of the noise added to the target actor's action (TD3 target smoothing)"""
    action_reg: float = 1e-3
    """continuous: weight of the squared-action penalty of the actor loss (reference)"""


# ============================================================== pure functions
def log_mean_exp(x: torch.Tensor, mask: torch.Tensor | None = None, dim: int = -1) -> torch.Tensor:
    """log of the mean of exp(x) along ``dim``, over the entries where ``mask`` is true."""
    if mask is None:
        return torch.logsumexp(x, dim) - math.log(x.shape[dim])
    return torch.logsumexp(x.masked_fill(~mask, float("-inf")), dim) - torch.log(mask.sum(dim).clamp(min=1).to(x.dtype))


def counterfactual_joint(own: torch.Tensor, data: torch.Tensor) -> torch.Tensor:
    """The joint inputs of the counterfactual sweep: ``own [B, N, M]`` (agent i's value at its M
    alternatives) and ``data [B, N]`` (every agent's value at the dataset action) give
    ``[B, N, M, N]`` whose entry [b, i, m] is ``data[b]`` with position i replaced by ``own[b, i, m]``."""
    n = data.shape[-1]
    eye = torch.eye(n, dtype=torch.bool, device=data.device)[None, :, None, :]
    return torch.where(eye, own.unsqueeze(-1), data[:, None, None, :])


def counterfactual_q_tot(own: torch.Tensor, data: torch.Tensor, mix: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Eq. F1: Q_tot(s, a_i = alternative m, a_-i = dataset), ``[B, N, M]``. ``mix`` maps
    ``[B, R, N] -> [B, R]`` at the batch's states (the mixer)."""
    b, n, m = own.shape
    return mix(counterfactual_joint(own, data).reshape(b, n * m, n)).reshape(b, n, m)


def cfcql_penalty(cf_q_tot: torch.Tensor, q_tot_data: torch.Tensor, lam: torch.Tensor,
                  mask: torch.Tensor | None = None, log_proposal: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. F2, per sample ``[B]``: sum_i lambda_i log E_{a_i} exp Q_tot(s, a_i, a_-i^D) - Q_tot(s, a^D).

    Discrete: the expectation is uniform over agent i's available actions (``mask [B, N, K]``).
    Continuous: it is importance-sampled with the draws' ``log_proposal [B, N, M]`` relative to
    the uniform density on [-1, 1]^d (pass log_proposal - log U). Log-mean-exp differs from the
    paper's logsumexp (CQL(H)) by log|A_i|, a constant: the same gradients, and 0 when Q_tot
    does not depend on the swept action. With an additive mixer and uniform lambda it is the
    mean over agents of per-agent CQL penalties."""
    x = cf_q_tot if log_proposal is None else cf_q_tot - log_proposal
    return (lam * log_mean_exp(x, mask)).sum(-1) - q_tot_data


def counterfactual_kl(cf_q_tot: torch.Tensor, behaviour_logp: torch.Tensor, avail: torch.Tensor) -> torch.Tensor:
    """Agent i's deviation in the discrete reference: KL(softmax_{a_i} Q_tot(s, a_i, a_-i^D) || beta_i(.|o_i)),
    ``[B, N, K] -> [B, N]``, over the available actions."""
    logmu = masked_log_softmax(cf_q_tot, avail)
    terms = torch.where(avail, logmu.exp() * (logmu - behaviour_logp), torch.zeros_like(logmu))
    return terms.sum(-1)


def agent_weights(deviation: torch.Tensor, temperature: float) -> torch.Tensor:
    """Eq. F3: lambda = softmax over agents of temperature x deviation (no gradient): uniform at 0,
    all weight on the most deviating agent as temperature -> infinity."""
    return torch.softmax(temperature * deviation.detach(), dim=-1)


def with_agent_id(x: torch.Tensor) -> torch.Tensor:
    """Append each agent's one-hot id: ``[..., N, d] -> [..., N, d + N]``."""
    n = x.shape[-2]
    eye = torch.eye(n, device=x.device, dtype=x.dtype).expand(*x.shape[:-1], n)
    return torch.cat([x, eye], dim=-1)


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


def greedy(q_all: torch.Tensor, avail: torch.Tensor) -> torch.Tensor:
    """Per-agent masked argmax (the joint argmax of a monotonic mixer)."""
    return q_all.masked_fill(~avail, float("-inf")).argmax(-1)


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


class QMixer(nn.Module):
    """QMIX: Q_tot = w2(s)^T elu(W1(s)^T q + b1(s)) + V(s) with |W1|, |w2| >= 0 (monotonic in each q_i).
    ``q [B, ..., N]``, ``s [B, S]`` -> ``[B, ...]``."""

    def __init__(self, state_dim: int, n_agents: int, embed: int, hyper: int):
        super().__init__()
        self.n, self.e = n_agents, embed
        self.w1 = nn.Sequential(nn.Linear(state_dim, hyper), nn.ReLU(), nn.Linear(hyper, n_agents * embed))
        self.b1 = nn.Linear(state_dim, embed)
        self.w2 = nn.Sequential(nn.Linear(state_dim, hyper), nn.ReLU(), nn.Linear(hyper, embed))
        self.v = nn.Sequential(nn.Linear(state_dim, embed), nn.ReLU(), nn.Linear(embed, 1))

    def forward(self, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        b, ones = s.shape[0], (1,) * (q.dim() - 2)
        w1 = self.w1(s).abs().view(b, self.n, self.e)
        # one [R, N] @ [N, E] product per state for all R joint inputs of that state (not R products of [1, N])
        qw = torch.bmm(q.reshape(b, -1, self.n), w1).view(*q.shape[:-1], self.e)
        h = F.elu(qw + self.b1(s).view(b, *ones, self.e))
        return (h * self.w2(s).abs().view(b, *ones, self.e)).sum(-1) + self.v(s).view(b, *ones)


class TwinQ(nn.Module):
    """Two continuous critics Q_i^k(o_i, a_i), k = 1, 2: ``[..., N] -> [2, ..., N]``."""

    def __init__(self, inp: int, hidden: int):
        super().__init__()
        self.q = nn.ModuleList([mlp(inp, hidden, 1), mlp(inp, hidden, 1)])

    def forward(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        xa = torch.cat([x, a], dim=-1)
        return torch.stack([q(xa).squeeze(-1) for q in self.q])


class TwinMixer(nn.Module):
    """One QMIX mixer per critic: ``q [2, B, ..., N] -> [2, B, ...]``."""

    def __init__(self, *a):
        super().__init__()
        self.m = nn.ModuleList([QMixer(*a), QMixer(*a)])

    def forward(self, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(q[k], s) for k, m in enumerate(self.m)])


class Actor(nn.Module):
    """Deterministic actor pi_i(o_i) = tanh(.) (TD3, as the reference's MaMuJoCo agents)."""

    def __init__(self, inp: int, act_dim: int, hidden: int):
        super().__init__()
        self.net = mlp(inp, hidden, act_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(x))


class GaussianBehaviour(nn.Module):
    """Continuous behaviour model beta_i(a_i | o_i): tanh-Gaussian fitted by maximum likelihood."""

    def __init__(self, inp: int, act_dim: int, hidden: int):
        super().__init__()
        self.net = mlp(inp, hidden, 2 * act_dim)

    def log_prob(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        mu, log_std = self.net(x).chunk(2, -1)
        return tanh_gaussian_log_prob(mu.clamp(-9, 9), log_std.clamp(-5, 2), a)


def build_networks(args: Args, dims: dict[str, Any]) -> nn.ModuleDict:
    n, obs_in, s = dims["n_agents"], dims["obs_dim"] + dims["n_agents"], dims["state_dim"]
    mix = (s, n, args.mixing_embed, args.hypernet_embed)
    if dims["discrete"]:
        k = dims["n_actions"]
        nets = dict(q=mlp(obs_in, args.hidden, k), mixer=QMixer(*mix), behaviour=mlp(obs_in, args.hidden, k))
        targets = ("q", "mixer")
    else:
        ad = dims["act_dim"]
        nets = dict(q=TwinQ(obs_in + ad, args.hidden), mixer=TwinMixer(*mix), actor=Actor(obs_in, ad, args.hidden),
                    behaviour=GaussianBehaviour(obs_in, ad, args.hidden))
        targets = ("q", "mixer", "actor")
    for t in targets:
        nets[t + "_target"] = copy.deepcopy(nets[t]).requires_grad_(False)
    return nn.ModuleDict(nets)


def make_act_fn(nets: nn.ModuleDict, discrete: bool, device: torch.device):
    """act_fn(obs [E,N,o], state, avail [E,N,K]) -> actions: discrete, greedy in Q; continuous, the
    deterministic TD3 actor."""

    @torch.no_grad()
    def act_fn(obs, state, avail):
        x = with_agent_id(torch.as_tensor(obs, dtype=torch.float32, device=device))
        if discrete:
            return greedy(nets["q"](x), torch.as_tensor(avail, dtype=torch.bool, device=device)).cpu().numpy()
        return nets["actor"](x).cpu().numpy()

    return act_fn


def load_policy(checkpoint: str, device: str = "cpu", sample: bool | None = None):
    """``act_fn(obs [E,N,o], state [E,S], avail [E,N,K]) -> actions`` of a saved run; its
    ``meta`` attribute is the dataset meta (to rebuild the environment). CFCQL acts greedily in Q
    (discrete) or with its deterministic actor (continuous): ``sample`` must not be True."""
    if sample:
        raise OfflineMarlError("CFCQL's policies are deterministic (greedy in Q, or a TD3 actor); there is "
                               "no action distribution to sample")
    ck = load_checkpoint(checkpoint, ALGO)
    args = restore_args(Args, ck["args"])
    nets = build_networks(args, ck["dims"]).to(device)
    nets.load_state_dict(ck["modules"]["nets"])
    act_fn = make_act_fn(nets.eval(), ck["dims"]["discrete"], torch.device(device))
    act_fn.meta, act_fn.args, act_fn.step = ck["meta"], args, ck["step"]
    return act_fn


# ============================================================ behaviour model
BEHAVIOUR_SEED = 0  # the behaviour model's own seed: it depends on the data and its settings, not on --seed
BEHAVIOUR_VERSION = 1  # bump when the behaviour model or its training changes: older cache files are then ignored
BEHAVIOUR_FIELDS = ("obs", "actions", "avail", "last")  # what behaviour cloning reads of the dataset


def behaviour_key(data, beh: nn.Module, args: Args, lr: float, discrete: bool) -> dict[str, Any]:
    """Everything the behaviour model depends on: the data it reads (a digest of its bytes), its shapes
    and its training settings."""
    return {"algo": ALGO, "version": BEHAVIOUR_VERSION, "data": data.fingerprint(BEHAVIOUR_FIELDS),
            "discrete": discrete, "shapes": {k: list(v.shape) for k, v in beh.state_dict().items()},
            "steps": args.behaviour_steps, "batch_size": args.batch_size, "lr": lr, "grad_clip": args.grad_clip,
            "seed": BEHAVIOUR_SEED}


def behaviour_cache_path(key: dict[str, Any]) -> Path:
    """``<data cache>/behaviour/cfcql-<digest of the key>.pt`` (never inside a --dataset folder)."""
    from common.data import data_dir

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return data_dir() / "behaviour" / f"{ALGO}-{digest}.pt"


def fit_behaviour(beh: nn.Module, data, args: Args, lr: float, discrete: bool) -> str:
    """beta_i by behaviour cloning: ``--behaviour-steps`` Adam updates on batches of the data, from the
    fixed ``BEHAVIOUR_SEED`` (initial weights and batches; the run's own random streams are left as they
    were), so the model is a function of the data and these settings only. With ``--behaviour-cache`` it
    is saved under the data cache (atomically; read back with a weights-only load) and later runs on the
    same data with the same settings load it instead of training again. Returns what was done."""
    key = behaviour_key(data, beh, args, lr, discrete) if args.behaviour_cache else None
    path = behaviour_cache_path(key) if key is not None else None
    device = next(beh.parameters()).device
    if path is not None and path.is_file():
        try:
            saved = torch.load(path, map_location=device, weights_only=True)
            if isinstance(saved, dict) and saved.get("key") == key:
                beh.load_state_dict(saved["state_dict"])
                return f"loaded from {path}"
        except Exception:  # unreadable (e.g. cut short): trained again and rewritten
            pass
    run_generator = data.generator
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(BEHAVIOUR_SEED)
        for m in beh.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()
        data.seed(BEHAVIOUR_SEED)
        opt = torch.optim.Adam(beh.parameters(), lr=lr)
        try:
            for _ in tqdm(range(args.behaviour_steps), desc="behaviour model", mininterval=2.0, dynamic_ncols=True):
                b = data.sample(args.batch_size)
                x = with_agent_id(b["obs"])
                if discrete:
                    logp = masked_log_softmax(beh(x), b["avail"], b["actions"])
                    nll = -logp.gather(-1, b["actions"].unsqueeze(-1)).mean()
                else:
                    nll = -beh.log_prob(x, b["actions"]).mean()
                opt.zero_grad(set_to_none=True)
                nll.backward()
                nn.utils.clip_grad_norm_(beh.parameters(), args.grad_clip)
                opt.step()
        finally:
            data.generator = run_generator
    if path is None:
        return f"trained ({args.behaviour_steps} updates)"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        torch.save({"schema": "offline-marl-behaviour/1", "key": key,
                    "state_dict": {k: v.detach().cpu() for k, v in beh.state_dict().items()}}, tmp)
        os.replace(tmp, path)
    except OSError as e:  # a read-only cache: the run goes on without it
        return f"trained ({args.behaviour_steps} updates; not cached: {e.strerror or e})"
    return f"trained ({args.behaviour_steps} updates) and cached at {path}"


# ======================================================================= main
def polyak(target: nn.Module, source: nn.Module, tau: float) -> None:
    with torch.no_grad():
        for pt, p in zip(target.parameters(), source.parameters()):
            pt.lerp_(p, tau)


def dims_of(dataset) -> dict[str, Any]:
    """The dataset's shapes that size the networks."""
    return dict(n_agents=dataset.n_agents, obs_dim=dataset.obs_dim, state_dim=dataset.state_dim,
                discrete=dataset.discrete, n_actions=dataset.n_actions, act_dim=dataset.act_dim)


def main(args: Args) -> dict[str, Any]:
    if args.eval_only:
        return eval_only(args, ALGO, load_policy)
    run = Run(args, ALGO, positive=("n_action_samples", "target_update_interval"),
              nonneg=("cql_alpha", "softmax_temp", "behaviour_steps", "target_noise", "policy_noise", "action_reg"),
              checks=((not args.eval_sample, "--eval-sample: CFCQL's policies are deterministic (greedy in Q, or a "
                       "TD3 actor); there is no action distribution to sample"),))
    data, env = run.load_data()
    device = run.device
    data.to(device).seed(args.seed)
    dims = dims_of(data)
    discrete = dims["discrete"]
    alpha = args.cql_alpha if args.cql_alpha is not None else (50.0 if discrete else 1.0)
    temp = args.softmax_temp if args.softmax_temp is not None else (5.0 if discrete else 1.0)
    lr = args.lr if args.lr is not None else (5e-4 if discrete else 3e-4)
    nets = build_networks(args, dims).to(device)
    groups = {"critic": [*nets["q"].parameters(), *nets["mixer"].parameters()]}
    if not discrete:
        groups["actor"] = list(nets["actor"].parameters())
    opt = {k: torch.optim.Adam(p, lr=lr) for k, p in groups.items()}
    act_fn = make_act_fn(nets, discrete, device)
    run.start(data, env, act_fn, dims=dims, modules={"nets": nets}, optimizers=opt)

    def step_on(key: str, loss: torch.Tensor, clip: float) -> None:
        opt[key].zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(groups[key], clip)
        opt[key].step()

    def behaviour_logp(x: torch.Tensor, avail: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        return masked_log_softmax(nets["behaviour"](x), avail, keep)

    if temp != 0 and not run.progress.get("behaviour_done"):  # beta_i by behaviour cloning (or cached), then frozen
        print(f"{ALGO}: behaviour model {fit_behaviour(nets['behaviour'], data, args, lr, discrete)}", file=sys.stderr)
        run.progress["behaviour_done"] = True
        run.pretraining_done()  # its time is not update time
    nets["behaviour"].requires_grad_(False)
    q, mixer, q_t, mixer_t = nets["q"], nets["mixer"], nets["q_target"], nets["mixer_target"]

    def update_discrete(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, x2, a, s, avail = with_agent_id(b["obs"]), with_agent_id(b["next_obs"]), b["actions"], b["state"], b["avail"]
        with torch.no_grad():  # double-Q target through the target mixer
            a2 = greedy(q(x2), b["next_avail"])
            q2 = q_t(x2).gather(-1, a2.unsqueeze(-1)).squeeze(-1)
            q2 = torch.where(b["next_avail"].any(-1), q2, torch.zeros_like(q2))
            y = b["reward"] + args.gamma * (1.0 - b["done"]) * mixer_t(q2, b["next_state"])
        q_all = q(x)  # [B, N, K]
        q_data = q_all.gather(-1, a.unsqueeze(-1)).squeeze(-1)
        q_tot = mixer(q_data, s)
        td = 0.5 * F.mse_loss(q_tot, y)
        cf = counterfactual_q_tot(q_all, q_data, lambda v: mixer(v, s))  # Eq. F1, [B, N, K]
        if temp == 0:
            lam = torch.full_like(q_data, 1.0 / q_data.shape[-1])
            dev = torch.zeros_like(q_data)
        else:
            dev = counterfactual_kl(cf.detach(), behaviour_logp(x, avail), avail)
            lam = agent_weights(dev, temp)  # Eq. F3
        penalty = cfcql_penalty(cf, q_tot, lam, avail).mean()  # Eq. F2
        step_on("critic", td + alpha * penalty, args.grad_clip)
        return {"losses/td": td.detach(), "losses/cql_penalty": penalty.detach(), "charts/q_tot": q_tot.detach().mean(),
                "charts/lambda_max": lam.max(-1).values.mean(), "charts/deviation": dev.mean()}

    def update_continuous(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, x2, a, s = with_agent_id(b["obs"]), with_agent_id(b["next_obs"]), b["actions"], b["state"]
        actor, actor_t = nets["actor"], nets["actor_target"]
        B, N, d, M = a.shape[0], a.shape[1], a.shape[2], args.n_action_samples
        with torch.no_grad():
            a2 = (actor_t(x2) + args.target_noise * torch.randn_like(a)).clamp(-1.0, 1.0)
            y = b["reward"] + args.gamma * (1.0 - b["done"]) * mixer_t(q_t(x2, a2), b["next_state"]).min(0).values
            # agent i's alternatives: uniform, pi_i(o_i) + noise, pi_i(o'_i) + noise (scored at o_i)
            mu, mu2 = actor(x).unsqueeze(2), actor(x2).unsqueeze(2)
            a_u = torch.rand(B, N, M, d, device=a.device) * 2 - 1
            a_p = (mu + args.policy_noise * torch.randn(B, N, M, d, device=a.device)).clamp(-1, 1)
            a_p2 = (mu2 + args.policy_noise * torch.randn(B, N, M, d, device=a.device)).clamp(-1, 1)
            samples = torch.cat([a_u, a_p, a_p2], dim=2)  # [B, N, 3M, d]
            gauss = -0.5 * ((a_p - mu) / args.policy_noise) ** 2
            gauss2 = -0.5 * ((a_p2 - mu2) / args.policy_noise) ** 2
            norm = -d * (math.log(args.policy_noise) + 0.5 * math.log(2 * math.pi))
            log_prop = torch.cat([torch.full((B, N, M), -d * math.log(2.0), device=a.device),
                                  gauss.sum(-1) + norm, gauss2.sum(-1) + norm], dim=2) + d * math.log(2.0)
            if temp == 0:
                dev = torch.zeros(B, N, device=a.device)
            else:  # deviation of the current actor: -log beta_i(pi_i(o_i) | o_i)
                dev = -nets["behaviour"].log_prob(x, mu.squeeze(2))
            lam = agent_weights(dev, temp)  # Eq. F3
        q_data = q(x, a)  # [2, B, N]
        q_tot = mixer(q_data, s)  # [2, B]
        td = F.mse_loss(q_tot, y.expand_as(q_tot)) * 2
        own = q(x.unsqueeze(2).expand(B, N, 3 * M, -1), samples)  # [2, B, N, 3M]
        penalty = sum(cfcql_penalty(counterfactual_q_tot(own[k], q_data[k], lambda v, k=k: mixer.m[k](v, s)),
                                    q_tot[k], lam, log_proposal=log_prop).mean() for k in range(2))  # Eqs. F1, F2
        step_on("critic", td + alpha * penalty, args.grad_clip)
        # counterfactual policy update (reference default): agent i acts, the others keep the dataset actions
        a_pi = actor(x)
        q_pi = q.q[0](torch.cat([x, a_pi], -1)).squeeze(-1)  # [B, N]
        q_cf = mixer.m[0](counterfactual_joint(q_pi.unsqueeze(-1), q_data[0].detach()).squeeze(2), s)  # [B, N]
        actor_loss = -q_cf.mean() + args.action_reg * a_pi.pow(2).mean()  # TD3 actor step on the F1 counterfactual Q_tot
        step_on("actor", actor_loss, 0.5)
        for t in ("q", "mixer", "actor"):
            polyak(nets[t + "_target"], nets[t], args.tau)
        return {"losses/td": td.detach(), "losses/cql_penalty": penalty.detach(), "losses/actor": actor_loss.detach(),
                "charts/q_tot": q_tot.detach().mean(), "charts/lambda_max": lam.max(-1).values.mean(),
                "charts/deviation": dev.mean()}

    update = update_discrete if discrete else update_continuous
    step = run.compile(update)  # torch.compile with --compile
    while run.training:
        with run.autocast():  # bfloat16 matmuls with --precision bf16
            info = step(data.sample(args.batch_size))
        if discrete and (run.step + 1) % args.target_update_interval == 0:  # hard target update
            q_t.load_state_dict(q.state_dict())
            mixer_t.load_state_dict(mixer.state_dict())
        run.record(info)
    return run.finish()


if __name__ == "__main__":
    with friendly_errors():
        main(tyro.cli(Args))
