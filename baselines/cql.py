"""CQL-MA: conservative Q-learning on a linear weighted value decomposition.

Docs: docs/baselines.md#cql-ma (objective, the exact joint penalty, differences, results).
Papers: A. Kumar, A. Zhou, G. Tucker, S. Levine, "Conservative Q-Learning for Offline
Reinforcement Learning", NeurIPS 2020 (CQL(H), Eq. 4 there); made multi-agent as the OMCDA
paper (ICLR 2025 submission, docs/omcda.md; its Sec. 4 and App. E.3) describes its
CQL-MA baseline: Q_tot(s, a) = sum_i w_i(s) Q_i(o_i, a_i) + b(s), w_i >= 0 (OMCDA Eq. 1).
Reference code: none public for CQL-MA; the CQL parts were checked against the CQL paper.

With a linear mixer the conservative penalty on the *joint* action space factorises exactly
(Eq. C2): log E_{a ~ U(A)} exp Q_tot(s, a) = b(s) + sum_i log E_{a_i ~ U(A_i)} exp(w_i Q_i),
so the joint CQL(H) penalty costs one logsumexp per agent. Discrete actions: DQN-style
targets with the (exact) joint max; continuous: SAC actors, twin critics, importance-sampled
penalty. Agents share weights and see a one-hot id, all in one forward pass.

    python baselines/cql.py --env mamujoco --task Hopper-3x1 --quality medium
    python baselines/cql.py --env bridge --task hard --quality mix --total-steps 50000
"""

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

from common import OfflineMarlError, friendly_errors
from common.runs import Run, eval_only, load_checkpoint, restore_args

ALGO = "cql"


@dataclass
class Args:
    # ------------------------------------------- shared fields (docs/architecture.md, the contract)
    env: str = "mamujoco"
    """environment family: matrix, bridge, mamujoco, rware, smacv1, smacv2"""
    task: str = "Hopper-3x1"
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
    # ---- CQL-MA
    cql_alpha: float | None = None
    """weight of the conservative penalty (Eq. C2/C3); default 1.0 discrete, 5.0 continuous (CQL's MuJoCo value)"""
    gamma: float = 0.99
    """discount"""
    tau: float = 0.005
    """Polyak rate of the target critics and mixers"""
    lr: float = 3e-4
    """Adam learning rate of the critics and mixers (and of the entropy temperature)"""
    actor_lr: float = 1e-4
    """Adam learning rate of the continuous actors"""
    hidden: int = 256
    """width of the two hidden layers of Q_i and pi_i"""
    mixer_hidden: int = 64
    """width of the mixer's hidden layer"""
    grad_clip: float = 10.0
    """gradient-norm clip of every network"""
    penalty_through_mixer: bool = True
    """the penalty's gradient reaches the mixer weights, as Eq. C2 (the penalty of Q_tot) implies; --no-... holds them fixed (before 2026-12-06; on LBF the weights then collapse, docs)"""
    n_action_samples: int = 10
    """continuous: samples per proposal (uniform, pi(.|o), pi(.|o')) in the importance-sampled penalty"""
    target_entropy: float | None = None
    """continuous: SAC entropy target per agent (default -act_dim)"""


# ============================================================== pure functions
def log_mean_exp(x: torch.Tensor, mask: torch.Tensor | None = None, dim: int = -1) -> torch.Tensor:
    """log of the mean of exp(x) along ``dim``, over the entries where ``mask`` is true."""
    if mask is None:
        return torch.logsumexp(x, dim) - math.log(x.shape[dim])
    return torch.logsumexp(x.masked_fill(~mask, float("-inf")), dim) - torch.log(mask.sum(dim).clamp(min=1).to(x.dtype))


def cql_penalty_discrete(q_all: torch.Tensor, actions: torch.Tensor, avail: torch.Tensor, w: torch.Tensor,
                         through_mixer: bool = True) -> torch.Tensor:
    """Eq. C2, the joint CQL(H) penalty of Q_tot in log-mean-exp form, per sample ``[B]``:

        log E_{a ~ U(avail)} exp Q_tot(s, a) - Q_tot(s, a^D)
          = sum_i [ log E_{a_i ~ U(avail_i)} exp(w_i Q_i(o_i, a_i)) - w_i Q_i(o_i, a_i^D) ]

    exact because Q_tot is linear in the Q_i (the bias b(s) cancels). It is 0 when Q is constant
    over the actions and > 0 when Q prefers actions the data did not take. ``q_all [B, N, K]``,
    ``actions [B, N]``, ``avail [B, N, K]``, ``w [B, N]`` (mixer weights, >= 0).

    Its gradient reaches the weights too, as the penalty of Q_tot does. ``through_mixer=False``
    holds them fixed: then it only reshapes the Q_i, with gradient w_i (softmax(w_i Q_i) -
    onehot(a_i^D)), and on LBF the weights collapse (docs: "The penalty's gradient reaches the mixer")."""
    wq = (w if through_mixer else w.detach()).unsqueeze(-1) * q_all
    data = wq.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
    return (log_mean_exp(wq, avail) - data).sum(-1)


def cql_penalty_continuous(wq_samples: torch.Tensor, log_proposal: torch.Tensor, wq_data: torch.Tensor,
                           act_dim: int) -> torch.Tensor:
    """Eq. C3, the continuous joint penalty, per sample ``[...]`` (summed over agents):

        sum_i [ log E_{a_i ~ U[-1,1]^d} exp(w_i Q_i(o_i, a_i)) - w_i Q_i(o_i, a_i^D) ],

    the expectation importance-sampled from the M draws a_i^(j) of proposals with log-densities
    ``log_proposal``: log (1/M) sum_j exp(w_i Q_i(a^(j))) U(a^(j)) / p_j(a^(j)), U = 2^-d.
    ``wq_samples [..., N, M]``, ``log_proposal [..., N, M]``, ``wq_data [..., N]``; the mixer weights
    detached or not, as in Eq. C2."""
    log_u = -act_dim * math.log(2.0)
    lme = torch.logsumexp(wq_samples + log_u - log_proposal, dim=-1) - math.log(wq_samples.shape[-1])
    return (lme - wq_data).sum(-1)


def with_agent_id(x: torch.Tensor) -> torch.Tensor:
    """Append each agent's one-hot id: ``[..., N, d] -> [..., N, d + N]``."""
    n = x.shape[-2]
    eye = torch.eye(n, device=x.device, dtype=x.dtype).expand(*x.shape[:-1], n)
    return torch.cat([x, eye], dim=-1)


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


def greedy(q_all: torch.Tensor, avail: torch.Tensor) -> torch.Tensor:
    """Per-agent masked argmax: the joint argmax of a linear mixer with w_i >= 0."""
    return q_all.masked_fill(~avail, float("-inf")).argmax(-1)


# =================================================================== networks
def mlp(inp: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inp, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, out))


class LinearMixer(nn.Module):
    """x_tot = sum_i w_i(s) x_i + b(s), w_i = |.| >= 0, from one ReLU layer on the state (OMCDA Eq. 1)."""

    def __init__(self, state_dim: int, n_agents: int, hidden: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(state_dim, hidden), nn.ReLU())
        self.w = nn.Linear(hidden, n_agents)
        self.b = nn.Linear(hidden, 1)

    def weights(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(s)
        return self.w(h).abs(), self.b(h).squeeze(-1)

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        w, b = self.weights(s)
        return (w * x).sum(-1) + b


class TwinQ(nn.Module):
    """Two continuous critics Q_i^k(o_i, a_i), k = 1, 2: ``[..., N] -> [2, ..., N]``."""

    def __init__(self, inp: int, hidden: int):
        super().__init__()
        self.q = nn.ModuleList([mlp(inp, hidden, 1), mlp(inp, hidden, 1)])

    def forward(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        xa = torch.cat([x, a], dim=-1)
        return torch.stack([q(xa).squeeze(-1) for q in self.q])


class TwinMixer(nn.Module):
    """One linear mixer per critic: weights ``[2, B, N]``, biases ``[2, B]``."""

    def __init__(self, state_dim: int, n_agents: int, hidden: int):
        super().__init__()
        self.m = nn.ModuleList([LinearMixer(state_dim, n_agents, hidden) for _ in range(2)])

    def weights(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w, b = zip(*(m.weights(s) for m in self.m))
        return torch.stack(w), torch.stack(b)


class GaussianActor(nn.Module):
    """tanh-Gaussian pi_i(a_i | o_i); mean clamped to +-9, log-std to [-5, 2]."""

    def __init__(self, inp: int, act_dim: int, hidden: int):
        super().__init__()
        self.net = mlp(inp, hidden, 2 * act_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, log_std = self.net(x).chunk(2, dim=-1)
        return mu.clamp(-9.0, 9.0), log_std.clamp(-5.0, 2.0)

    def sample(self, x: torch.Tensor, n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A reparameterised action and its log-density (tanh change of variables), ``[..., d], [...]``;
        with ``n``, n draws per input from one forward pass, ``[..., n, d], [..., n]``."""
        mu, log_std = self(x)
        if n is not None:
            mu, log_std = (t.unsqueeze(-2).expand(*t.shape[:-1], n, t.shape[-1]) for t in (mu, log_std))
        u = mu + log_std.exp() * torch.randn_like(mu)
        return torch.tanh(u), tanh_gaussian_log_prob(mu, log_std, pre_tanh=u)

    def mode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self(x)[0])


class Temperature(nn.Module):
    def __init__(self):
        super().__init__()
        self.log_alpha = nn.Parameter(torch.zeros(()))


def build_networks(args: Args, dims: dict[str, Any]) -> nn.ModuleDict:
    n, obs_in, s = dims["n_agents"], dims["obs_dim"] + dims["n_agents"], dims["state_dim"]
    if dims["discrete"]:
        nets = dict(q=mlp(obs_in, args.hidden, dims["n_actions"]), mixer=LinearMixer(s, n, args.mixer_hidden))
    else:
        ad = dims["act_dim"]
        nets = dict(q=TwinQ(obs_in + ad, args.hidden), mixer=TwinMixer(s, n, args.mixer_hidden),
                    actor=GaussianActor(obs_in, ad, args.hidden), temperature=Temperature())
    nets["q_target"], nets["mixer_target"] = copy.deepcopy(nets["q"]), copy.deepcopy(nets["mixer"])
    nets["q_target"].requires_grad_(False)
    nets["mixer_target"].requires_grad_(False)
    return nn.ModuleDict(nets)


def make_act_fn(nets: nn.ModuleDict, discrete: bool, device: torch.device, sample: bool = False):
    """act_fn(obs [E,N,o], state, avail [E,N,K]) -> actions: discrete, greedy in Q; continuous, the SAC
    actor's mode, or (``sample``) a draw from it with the act_fn's own generator (reseeded by evaluate)."""
    gen = torch.Generator(device)  # reseeded by common.envs.evaluate

    @torch.no_grad()
    def act_fn(obs, state, avail):
        x = with_agent_id(torch.as_tensor(obs, dtype=torch.float32, device=device))
        if discrete:
            return greedy(nets["q"](x), torch.as_tensor(avail, dtype=torch.bool, device=device)).cpu().numpy()
        if not sample:
            return nets["actor"].mode(x).cpu().numpy()
        mu, log_std = nets["actor"](x)
        return torch.tanh(mu + log_std.exp() * torch.randn(mu.shape, generator=gen, device=device)).cpu().numpy()

    act_fn.reseed = gen.manual_seed
    return act_fn


def load_policy(checkpoint: str, device: str = "cpu", sample: bool | None = None):
    """``act_fn(obs [E,N,o], state [E,S], avail [E,N,K]) -> actions`` of a saved run (``sample=None``:
    the run's --eval-sample); ``meta`` is the dataset meta (to rebuild the environment)."""
    ck = load_checkpoint(checkpoint, ALGO)
    args = restore_args(Args, ck["args"])
    nets = build_networks(args, ck["dims"]).to(device)
    nets.load_state_dict(ck["modules"]["nets"])
    act_fn = make_act_fn(nets.eval(), ck["dims"]["discrete"], torch.device(device),
                         args.eval_sample if sample is None else sample)
    act_fn.meta, act_fn.args, act_fn.step = ck["meta"], args, ck["step"]
    return act_fn


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
    run = Run(args, ALGO, positive=("n_action_samples", "actor_lr"), nonneg=("cql_alpha",))
    data, env = run.load_data()
    if args.eval_sample and data.discrete:
        raise OfflineMarlError("--eval-sample: with discrete actions CQL-MA acts greedily on its Q-function; "
                               "it has no action distribution to sample")
    device = run.device
    data.to(device).seed(args.seed)
    dims = dims_of(data)
    discrete = dims["discrete"]
    cql_alpha = args.cql_alpha if args.cql_alpha is not None else (1.0 if discrete else 5.0)
    nets = build_networks(args, dims).to(device)
    critic_params = [*nets["q"].parameters(), *nets["mixer"].parameters()]
    opt = {"critic": torch.optim.Adam(critic_params, lr=args.lr)}
    if not discrete:
        opt["actor"] = torch.optim.Adam(nets["actor"].parameters(), lr=args.actor_lr)
        opt["temperature"] = torch.optim.Adam(nets["temperature"].parameters(), lr=args.lr)
        target_entropy = args.target_entropy if args.target_entropy is not None else -float(dims["act_dim"])
    q, mixer, q_t, mixer_t = nets["q"], nets["mixer"], nets["q_target"], nets["mixer_target"]

    def critic_step(loss: torch.Tensor) -> None:
        opt["critic"].zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(critic_params, args.grad_clip)
        opt["critic"].step()

    def update_discrete(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, x2, a = with_agent_id(b["obs"]), with_agent_id(b["next_obs"]), b["actions"]
        with torch.no_grad():  # Eq. C1 target: the joint max of a monotone linear mixer is the per-agent max
            q2 = q_t(x2).masked_fill(~b["next_avail"], float("-inf")).max(-1).values
            q2 = torch.where(b["next_avail"].any(-1), q2, torch.zeros_like(q2))
            y = b["reward"] + args.gamma * (1.0 - b["done"]) * mixer_t(q2, b["next_state"])
        q_all = q(x)
        w, bias = mixer.weights(b["state"])
        q_tot = (w * q_all.gather(-1, a.unsqueeze(-1)).squeeze(-1)).sum(-1) + bias
        td = F.mse_loss(q_tot, y)
        penalty = cql_penalty_discrete(q_all, a, b["avail"], w, args.penalty_through_mixer).mean()  # Eq. C2
        critic_step(td + cql_alpha * penalty)
        polyak(q_t, q, args.tau)
        polyak(mixer_t, mixer, args.tau)
        return {"losses/td": td.detach(), "losses/cql_penalty": penalty.detach(), "charts/q_tot": q_tot.detach().mean()}

    def update_continuous(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, x2, a, s = with_agent_id(b["obs"]), with_agent_id(b["next_obs"]), b["actions"], b["state"]
        actor, temp = nets["actor"], nets["temperature"]
        B, N, d, M = a.shape[0], a.shape[1], a.shape[2], args.n_action_samples
        with torch.no_grad():  # Eq. C1 target: min over the two mixed target critics at a' ~ pi(.|o')
            a2, _ = actor.sample(x2)
            w2, b2 = mixer_t.weights(b["next_state"])
            y = b["reward"] + args.gamma * (1.0 - b["done"]) * ((w2 * q_t(x2, a2)).sum(-1) + b2).min(0).values
            # proposals of the penalty: uniform, pi(.|o) and pi(.|o'), M draws each, all scored at o
            a_pi, logp_pi = actor.sample(x, M)  # M draws from one forward pass per observation
            a_pi2, logp_pi2 = actor.sample(x2, M)
            a_u = torch.rand(B, N, M, d, device=a.device) * 2 - 1
            samples = torch.cat([a_u, a_pi, a_pi2], dim=2)  # [B, N, 3M, d]
            log_prop = torch.cat([torch.full((B, N, M), -d * math.log(2.0), device=a.device), logp_pi, logp_pi2], dim=2)
        w, bias = mixer.weights(s)  # [2, B, N], [2, B]
        q_data = q(x, a)  # [2, B, N]
        q_tot = (w * q_data).sum(-1) + bias
        td = F.mse_loss(q_tot, y.expand_as(q_tot)) * 2
        q_samp = q(x.unsqueeze(2).expand(B, N, 3 * M, -1), samples)  # [2, B, N, 3M]
        wd = w if args.penalty_through_mixer else w.detach()  # Eq. C3, through the mixer as in Eq. C2
        penalty = cql_penalty_continuous(wd.unsqueeze(-1) * q_samp, log_prop, wd * q_data, d).mean() * 2
        critic_step(td + cql_alpha * penalty)
        # actor (SAC): maximise min_k Q_tot^k(s, a ~ pi) - alpha_ent sum_i log pi_i
        a_new, logp = actor.sample(x)
        q_new = ((w.detach() * q(x, a_new)).sum(-1) + bias.detach()).min(0).values
        alpha_ent = temp.log_alpha.exp().detach()
        actor_loss = (alpha_ent * logp.sum(-1) - q_new).mean()
        opt["actor"].zero_grad(set_to_none=True)
        actor_loss.backward()
        nn.utils.clip_grad_norm_(actor.parameters(), args.grad_clip)
        opt["actor"].step()
        temp_loss = -(temp.log_alpha * (logp.detach() + target_entropy)).mean()
        opt["temperature"].zero_grad(set_to_none=True)
        temp_loss.backward()
        opt["temperature"].step()
        polyak(q_t, q, args.tau)
        polyak(mixer_t, mixer, args.tau)
        return {"losses/td": td.detach(), "losses/cql_penalty": penalty.detach(), "losses/actor": actor_loss.detach(),
                "charts/q_tot": q_tot.detach().mean(), "charts/alpha_entropy": alpha_ent,
                "charts/entropy": -logp.detach().mean()}

    update = update_discrete if discrete else update_continuous
    act_fn = make_act_fn(nets, discrete, device, args.eval_sample)
    run.start(data, env, act_fn, dims=dims, modules={"nets": nets}, optimizers=opt)
    step = run.compile(update)  # torch.compile with --compile
    while run.training:
        with run.autocast():  # bfloat16 matmuls with --precision bf16
            stats = step(data.sample(args.batch_size))
        run.record(stats)
    return run.finish()


if __name__ == "__main__":
    with friendly_errors():
        main(tyro.cli(Args))
