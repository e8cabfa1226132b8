"""OMAR: offline multi-agent RL with actor rectification.

Docs: docs/baselines.md#omar (objective, the discrete variant, differences from the reference code).
Paper: L. Pan, L. Huang, T. Ma, H. Xu, "Plan Better Amid Conservatism: Offline Multi-Agent
Reinforcement Learning with Actor Rectification", ICML 2022 (arXiv 2111.11188).
Reference code checked against: github.com/ling-pan/OMAR (`algorithms/maddpg.py`, `main.py`), read
for facts only.

Every agent learns on its own (independent learning, the other agents are part of the
environment): twin critics Q_i(o_i, a_i) with a CQL penalty (Eq. M1-M2) and a deterministic actor
whose policy gradient is mixed with a pull towards the best action a zeroth-order optimiser finds
on the critic (Eq. M3-M4): a few rounds of the cross-entropy method, sampling actions from a
Gaussian and refitting it to the best ("elite") samples. The rectification keeps the actor from
getting stuck in a poor local optimum of the non-concave conservative critic. Continuous actions as
in the paper's experiments; for discrete actions (the paper's SMAC results, AlberDICE's and
ComaDICE's baselines) the critic has one output per action, the conservative penalty is the exact
logsumexp over the available actions, and the optimiser's search is exact (docs: "the discrete
variant"). Agents share weights and see a one-hot id, all in one forward pass.

    python baselines/omar.py --env mamujoco --task Hopper-3x1 --quality medium
    python baselines/omar.py --env bridge --task hard --quality mix --total-steps 20000
"""

import copy
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro

from common import friendly_errors
from common.runs import Run, eval_only, load_checkpoint, restore_args

ALGO = "omar"


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
    total_steps: int = 100_000
    """gradient updates"""
    batch_size: int = 256
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
    # ---- OMAR
    omar_coe: float = 0.7
    """tau of Eq. M4: weight of the rectification term; 1 - tau weighs the policy gradient
    (reference HalfCheetah: random 1.0, medium-replay 0.9, medium 0.7, expert 0.5)"""
    cql_alpha: float = 1.0
    """weight of the CQL penalty (Eq. M2; reference HalfCheetah: random 1, medium-replay 5, medium 1, expert 5)"""
    gamma: float = 0.99
    """discount"""
    tau: float = 0.005
    """Polyak rate of the target critics and actor"""
    lr: float = 3e-4
    """Adam learning rate of critics and actor (reference MaMuJoCo: 3e-4)"""
    hidden: int = 256
    """width of the two hidden layers of critics and actor (reference MaMuJoCo: 256)"""
    grad_clip: float = 0.5
    """gradient-norm clip of critics and actor (reference: 0.5)"""
    cql_samples: int = 10
    """continuous: actions drawn per source (uniform, pi(o) + noise, pi(o') + noise) for the CQL logsumexp"""
    cql_noise: float = 0.2
    """continuous: std of the Gaussian noise around the policy's actions in the CQL samples"""
    cem_iters: int = 2
    """rounds of the cross-entropy search (reference MaMuJoCo: 2)"""
    cem_samples: int = 20
    """actions sampled per round (reference MaMuJoCo: 20)"""
    cem_elites: int = 5
    """elite samples the Gaussian is refitted to (reference MaMuJoCo: 5)"""
    cem_mu: float = 0.0
    """initial mean of the search Gaussian (reference: 0)"""
    cem_sigma: float = 2.0
    """initial std of the search Gaussian (reference: 2)"""
    cem_update: Literal["elite", "softmax"] = "elite"
    """refit to the elites' mean and std (reference MaMuJoCo), or to the exp(Q)-weighted mean (reference MPE)"""
    action_l2: float = 1e-3
    """weight of the actor's action-magnitude penalty mean(pi(o)^2) (reference: 1e-3; continuous)"""


# ============================================================== pure functions
def with_agent_id(x: torch.Tensor) -> torch.Tensor:
    """Append each agent's one-hot id: ``[..., N, d] -> [..., N, d + N]``."""
    n = x.shape[-2]
    eye = torch.eye(n, device=x.device, dtype=x.dtype).expand(*x.shape[:-1], n)
    return torch.cat([x, eye], dim=-1)


def masked_logits(logits: torch.Tensor, avail: torch.Tensor) -> torch.Tensor:
    """Unavailable actions get a logit of -1e10 (zero probability)."""
    return logits.masked_fill(~avail, -1e10)


def cem_search(q_fn, shape: tuple[int, ...], act_dim: int, iters: int, samples: int, elites: int, mu0: float,
               sigma0: float, update: str = "elite", gen: torch.Generator | None = None,
               device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The zeroth-order optimiser of Eq. M3: maximise ``q_fn(a) -> [samples, *shape]`` over actions
    ``a [samples, *shape, act_dim]`` in [-1, 1] by the cross-entropy method. Round k draws ``samples``
    actions from N(mu, sigma^2) (clipped to [-1, 1]); with ``update="elite"`` the best ``elites`` of
    them (pooled with the previous round's elites) refit mu and sigma; with ``"softmax"`` mu becomes
    the exp(Q)-weighted mean and sigma the root-mean-square deviation from it. Returns the best
    action found in the last round's pool ``[*shape, act_dim]`` and its value ``[*shape]``."""
    mu = torch.full((*shape, act_dim), float(mu0), device=device)
    sigma = torch.full((*shape, act_dim), float(sigma0), device=device)
    pool_a = pool_q = None
    for k in range(iters):
        a = (mu + sigma * torch.randn((samples, *shape, act_dim), device=device, generator=gen)).clamp(-1.0, 1.0)
        q = q_fn(a)  # [S, *shape]
        if update == "elite":
            if pool_a is not None:  # keep the previous elites in the running
                a, q = torch.cat([a, pool_a]), torch.cat([q, pool_q])
            top = q.topk(min(elites, q.shape[0]), dim=0).indices  # [E, *shape]
            pool_a = a.gather(0, top.unsqueeze(-1).expand(*top.shape, act_dim))
            pool_q = q.gather(0, top)
            mu = pool_a.mean(0)
            if pool_a.shape[0] > 1:
                sigma = pool_a.std(0)
        else:
            w = torch.softmax(q, dim=0).unsqueeze(-1)
            mu = (w * a).sum(0)
            sigma = ((a - mu) ** 2).mean(0).sqrt()
            pool_a, pool_q = a, q
    best = pool_q.argmax(0)  # [*shape]
    return (pool_a.gather(0, best[None, ..., None].expand(1, *best.shape, act_dim))[0],
            pool_q.gather(0, best[None])[0])


def rectification_target(a_pi: torch.Tensor, q_pi: torch.Tensor, a_cem: torch.Tensor,
                         q_cem: torch.Tensor) -> torch.Tensor:
    """Eq. M3's target: the optimiser's best action where the critic rates it above the policy's own
    action, else the policy's action (so the pull never points to a worse action)."""
    return torch.where((q_cem > q_pi).unsqueeze(-1), a_cem, a_pi).detach()


def omar_actor_loss(q_pi: torch.Tensor, a_pi: torch.Tensor, target: torch.Tensor, coe: float) -> torch.Tensor:
    """Eq. M4: (1 - tau) (-Q_i(o_i, pi_i(o_i))) + tau ||pi_i(o_i) - a_hat_i||^2, averaged over the batch
    and the agents (continuous: squared distance per action dimension, as the reference's MSE)."""
    return (1.0 - coe) * (-q_pi.mean()) + coe * F.mse_loss(a_pi, target)


def cql_penalty_continuous(q_samples: torch.Tensor, logp: torch.Tensor, q_data: torch.Tensor) -> torch.Tensor:
    """Eq. M2 with sampled actions: log sum_j exp(Q(o, a_j) - log p(a_j)) - Q(o, a^D), mean over the
    batch and agents. ``q_samples, logp [M, ...]`` (importance-sampled estimate of log int exp Q)."""
    return (torch.logsumexp(q_samples - logp, dim=0) - q_data).mean()


def cql_penalty_discrete(q_all: torch.Tensor, a: torch.Tensor, avail: torch.Tensor) -> torch.Tensor:
    """Eq. M2 exactly: log sum_{a available} exp Q_i(o_i, a) - Q_i(o_i, a_i^D), mean over batch and agents."""
    lse = torch.logsumexp(q_all.masked_fill(~avail, float("-inf")), dim=-1)
    return (lse - q_all.gather(-1, a.unsqueeze(-1)).squeeze(-1)).mean()


# =================================================================== networks
def mlp(inp: int, hidden: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(inp, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, out))


class TwinCritic(nn.Module):
    """Two critics Q_i^1, Q_i^2: continuous (o_i, a_i) -> 1; discrete o_i -> one value per action."""

    def __init__(self, inp: int, n_actions: int, act_dim: int, hidden: int, discrete: bool):
        super().__init__()
        self.discrete = discrete
        out, extra = (n_actions, 0) if discrete else (1, act_dim)
        self.q1, self.q2 = mlp(inp + extra, hidden, out), mlp(inp + extra, hidden, out)

    def forward(self, x: torch.Tensor, a: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Continuous: values at ``a``; discrete: all actions' values (``a`` unused)."""
        if self.discrete:
            return self.q1(x), self.q2(x)
        xa = torch.cat([x, a], dim=-1)
        return self.q1(xa).squeeze(-1), self.q2(xa).squeeze(-1)

    def first(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self.q1(torch.cat([x, a], dim=-1)).squeeze(-1)


class Actor(nn.Module):
    """pi_i(o_i): continuous -> tanh action in [-1, 1] (last layer initialised small, as the
    reference); discrete -> logits of a categorical over the available actions."""

    def __init__(self, inp: int, n_actions: int, act_dim: int, hidden: int, discrete: bool):
        super().__init__()
        self.discrete = discrete
        self.net = mlp(inp, hidden, n_actions if discrete else act_dim)
        if not discrete:
            nn.init.uniform_(self.net[-1].weight, -3e-3, 3e-3)

    def forward(self, x: torch.Tensor, avail: torch.Tensor | None = None) -> torch.Tensor:
        out = self.net(x)
        if self.discrete:
            return torch.softmax(masked_logits(out, avail), -1)  # the action probabilities
        return torch.tanh(out)


def build_networks(args: Args, dims: dict[str, Any]) -> nn.ModuleDict:
    n, disc = dims["n_agents"], dims["discrete"]
    inp = dims["obs_dim"] + n
    k, ad = dims.get("n_actions", 1), dims.get("act_dim", 1)
    nets = nn.ModuleDict(dict(critic=TwinCritic(inp, k, ad, args.hidden, disc),
                              actor=Actor(inp, k, ad, args.hidden, disc)))
    for name in ("critic", "actor"):
        nets[name + "_target"] = copy.deepcopy(nets[name]).requires_grad_(False)
    return nets


def make_act_fn(actor: Actor, device: torch.device, sample: bool = False):
    """act_fn(obs [E,N,o], state, avail [E,N,K]) -> actions: discrete, the argmax or (``sample``) a draw
    with the act_fn's own generator (reseeded by common.envs.evaluate); continuous, the deterministic actor."""
    gen = torch.Generator(device)

    @torch.no_grad()
    def act_fn(obs, state, avail):
        x = with_agent_id(torch.as_tensor(obs, dtype=torch.float32, device=device))
        if actor.discrete:
            probs = actor(x, torch.as_tensor(avail, dtype=torch.bool, device=device))
            if not sample:
                return probs.argmax(-1).cpu().numpy()
            flat = probs.reshape(-1, probs.shape[-1])
            return torch.multinomial(flat, 1, generator=gen).reshape(probs.shape[:-1]).cpu().numpy()
        return actor(x).cpu().numpy()

    act_fn.reseed = gen.manual_seed
    return act_fn


def load_policy(checkpoint: str, device: str = "cpu", sample: bool | None = None):
    """``act_fn(obs [E,N,o], state [E,S], avail [E,N,K]) -> actions`` of a saved run (``sample``:
    sampled discrete actions; None: as the run was evaluated); its ``meta`` attribute is the dataset
    meta (to rebuild the environment)."""
    ck = load_checkpoint(checkpoint, ALGO)
    args = restore_args(Args, ck["args"])
    nets = build_networks(args, ck["dims"]).to(device)
    nets.load_state_dict(ck["modules"]["nets"])
    act_fn = make_act_fn(nets["actor"].eval(), torch.device(device), args.eval_sample if sample is None else sample)
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
    run = Run(args, ALGO, unit=("omar_coe",))
    data, env = run.load_data()
    device = run.device
    data.to(device).seed(args.seed)
    dims = dims_of(data)
    disc = dims["discrete"]
    nets = build_networks(args, dims).to(device)
    critic, actor, critic_t, actor_t = nets["critic"], nets["actor"], nets["critic_target"], nets["actor_target"]
    opt = {"critic": torch.optim.Adam(critic.parameters(), lr=args.lr),
           "actor": torch.optim.Adam(actor.parameters(), lr=args.lr)}
    gen = torch.Generator(device).manual_seed(args.seed + 1)  # CQL and CEM samples
    ad = dims.get("act_dim", 1)

    def step_on(key: str, loss: torch.Tensor, module: nn.Module) -> None:
        opt[key].zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(module.parameters(), args.grad_clip)
        opt[key].step()

    def update_continuous(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, x2, a = with_agent_id(b["obs"]), with_agent_id(b["next_obs"]), b["actions"]
        # Eq. M1: clipped double-Q target with the target actor
        with torch.no_grad():
            q1_t, q2_t = critic_t(x2, actor_t(x2))
            y = (b["reward"][:, None] + args.gamma * (1.0 - b["done"][:, None]) * torch.min(q1_t, q2_t))
        q1, q2 = critic(x, a)
        td = F.mse_loss(q1, y) + F.mse_loss(q2, y)
        # Eq. M2: CQL over uniform actions and noisy policy actions at o and o' (importance-sampled)
        M, sd = args.cql_samples, args.cql_noise
        with torch.no_grad():
            shape = (M,) + a.shape
            a_unif = torch.rand(shape, device=device, generator=gen) * 2 - 1
            logp_unif = torch.full(shape[:-1], -ad * math.log(2.0), device=device)
            noise = sd * torch.randn((2,) + shape, device=device, generator=gen)
            a_cur = (actor(x).expand(shape) + noise[0]).clamp(-1, 1)
            a_nxt = (actor(x2).expand(shape) + noise[1]).clamp(-1, 1)
            logp_noise = (-0.5 * (noise / sd) ** 2 - math.log(sd) - 0.5 * math.log(2 * math.pi)).sum(-1)
            a_s = torch.cat([a_unif, a_cur, a_nxt])
            logp_s = torch.cat([logp_unif, logp_noise[0], logp_noise[1]])
        qs1, qs2 = critic(x.expand(3 * M, *x.shape), a_s)
        cql = cql_penalty_continuous(qs1, logp_s, q1) + cql_penalty_continuous(qs2, logp_s, q2)
        critic_loss = td + args.cql_alpha * cql  # Eq. M1 + M2
        step_on("critic", critic_loss, critic)
        # Eq. M3-M4: actor towards the best of {pi(o), CEM search on Q_i^1}, mixed with the policy gradient
        a_pi = actor(x)
        q_pi = critic.first(x, a_pi)
        with torch.no_grad():
            a_cem, q_cem = cem_search(lambda s: critic.first(x.expand(s.shape[0], *x.shape), s), a.shape[:-1], ad,
                                      args.cem_iters, args.cem_samples, args.cem_elites, args.cem_mu, args.cem_sigma,
                                      args.cem_update, gen, device)
            target = rectification_target(a_pi, q_pi, a_cem, q_cem)
        actor_loss = omar_actor_loss(q_pi, a_pi, target, args.omar_coe) + args.action_l2 * (a_pi ** 2).mean()  # Eq. M4
        step_on("actor", actor_loss, actor)
        return {"losses/td": td.detach(), "losses/cql": cql.detach(), "losses/actor": actor_loss.detach(),
                "charts/q_data": q1.detach().mean(), "charts/q_pi": q_pi.detach().mean(),
                "charts/cem_better": (q_cem > q_pi.detach()).float().mean()}

    def update_discrete(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, x2, a, av, av2 = (with_agent_id(b["obs"]), with_agent_id(b["next_obs"]), b["actions"], b["avail"],
                             b["next_avail"])
        # Eq. M1 (discrete): expected value of the target actor's policy under the clipped double-Q target
        with torch.no_grad():
            q1_t, q2_t = critic_t(x2)
            v = (actor_t(x2, av2) * torch.min(q1_t, q2_t)).sum(-1)
            y = b["reward"][:, None] + args.gamma * (1.0 - b["done"][:, None]) * v
        q1_all, q2_all = critic(x)
        q1 = q1_all.gather(-1, a.unsqueeze(-1)).squeeze(-1)
        q2 = q2_all.gather(-1, a.unsqueeze(-1)).squeeze(-1)
        td = F.mse_loss(q1, y) + F.mse_loss(q2, y)
        cql = cql_penalty_discrete(q1_all, a, av) + cql_penalty_discrete(q2_all, a, av)  # Eq. M2, exact
        critic_loss = td + args.cql_alpha * cql  # Eq. M1 + M2
        step_on("critic", critic_loss, critic)
        # Eq. M3-M4: the optimiser's search is exhaustive over the available actions
        probs = actor(x, av)
        with torch.no_grad():
            q_new = critic.q1(x)  # Q_i^1 after the critic step, as in the continuous case
            a_hat = F.one_hot(q_new.masked_fill(~av, float("-inf")).argmax(-1), probs.shape[-1]).float()
        q_pi = (probs * q_new).sum(-1)
        # Eq. M4 with the policy's probability vector in place of the continuous action (discrete variant)
        actor_loss = (1.0 - args.omar_coe) * (-q_pi.mean()) + args.omar_coe * ((probs - a_hat) ** 2).sum(-1).mean()
        step_on("actor", actor_loss, actor)
        return {"losses/td": td.detach(), "losses/cql": cql.detach(), "losses/actor": actor_loss.detach(),
                "charts/q_data": q1.detach().mean(), "charts/q_pi": q_pi.detach().mean(),
                "charts/pi_hat": (probs.detach() * a_hat).sum(-1).mean()}

    update = update_discrete if disc else update_continuous
    act_fn = make_act_fn(actor, device, args.eval_sample)
    run.start(data, env, act_fn, dims=dims, modules={"nets": nets}, optimizers=opt, generators={"samples": gen})
    step = run.compile(update)  # torch.compile with --compile
    while run.training:
        with run.autocast():  # bfloat16 matmuls with --precision bf16
            stats = step(data.sample(args.batch_size))
        run.record(stats)
    return run.finish()


if __name__ == "__main__":
    with friendly_errors():
        main(tyro.cli(Args))
