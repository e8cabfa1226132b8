"""BCQ-MA: batch-constrained Q-learning on a linear weighted value decomposition.

Docs: docs/baselines.md#bcq-ma (objective, differences, results).
Papers: S. Fujimoto, D. Meger, D. Precup, "Off-Policy Deep Reinforcement Learning without
Exploration", ICML 2019 (continuous BCQ: generative VAE + perturbation, Alg. 1 there);
S. Fujimoto, E. Conti, M. Ghavamzadeh, J. Pineau, "Benchmarking Batch Deep Reinforcement
Learning Algorithms", 2019 (discrete BCQ: actions filtered by their relative behaviour
probability). Made multi-agent as the OMCDA paper (docs/omcda.md; its Sec. 4 and App. E.3)
describes its BCQ-MA baseline: Q_tot(s, a) = sum_i w_i(s) Q_i(o_i, a_i) + b(s), w_i >= 0.
Reference code: none public for BCQ-MA; the BCQ parts were checked against the two papers.

Because the mixer is linear with non-negative weights, the joint greedy action over each
agent's candidate set is the per-agent greedy action, so every agent acts on its own
observation alone (decentralised execution) and the targets need no joint enumeration.
Agents share weights and see a one-hot id, all in one forward pass.

    python baselines/bcq.py --env mamujoco --task Hopper-3x1 --quality medium
    python baselines/bcq.py --env bridge --task hard --quality mix --total-steps 50000
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

ALGO = "bcq"


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
    # ---- BCQ-MA
    threshold: float = 0.3
    """discrete: an action is allowed when G(a|o) / max_a' G(a'|o) >= threshold (Eq. B1; the paper's 0.3)"""
    phi: float = 0.05
    """continuous: largest perturbation of a generated action, per dimension (Eq. B4; the paper's 0.05)"""
    n_action_samples: int = 10
    """continuous: actions drawn from the VAE per agent when acting and in the targets"""
    lmbda: float = 0.75
    """continuous: soft clipped double Q, lmbda min + (1 - lmbda) max over the two critics"""
    gamma: float = 0.99
    """discount"""
    tau: float = 0.005
    """Polyak rate of the target networks"""
    lr: float = 1e-3
    """Adam learning rate (critics + mixer; VAE; perturbation actor; discrete: Q + imitation net)"""
    hidden: int = 256
    """width of the two hidden layers of every per-agent network"""
    mixer_hidden: int = 64
    """width of the mixer's hidden layer"""
    latent_dim: int | None = None
    """continuous: VAE latent size (default 2 x act_dim, as in BCQ)"""
    grad_clip: float = 10.0
    """gradient-norm clip of every network"""


# ============================================================== pure functions
def bcq_filter(logits: torch.Tensor, avail: torch.Tensor, threshold: float) -> torch.Tensor:
    """Eq. B1: the actions agent i may take, ``avail & G_i(a|o_i) / max_a' G_i(a'|o_i) >= threshold``
    with G_i the behaviour model (masked softmax of ``logits [..., K]``). The behaviour's most
    likely available action always passes; threshold 0 allows every available action."""
    logp = masked_log_softmax(logits, avail)
    ratio = logp - logp.max(-1, keepdim=True).values
    return avail & (ratio >= math.log(threshold) if threshold > 0 else torch.ones_like(avail))


def bcq_select(q_all: torch.Tensor, logits: torch.Tensor, avail: torch.Tensor, threshold: float) -> torch.Tensor:
    """Eq. B2: argmax of Q_i over the allowed actions, per agent ``[..., K] -> [...]``; with
    w_i >= 0 this is the joint argmax of Q_tot over the allowed joint actions."""
    return q_all.masked_fill(~bcq_filter(logits, avail, threshold), float("-inf")).argmax(-1)


def perturb(a: torch.Tensor, xi: torch.Tensor, phi: float) -> torch.Tensor:
    """Eq. B4: a + phi * tanh(xi), clipped to the action box [-1, 1]: at most phi from ``a``."""
    return (a + phi * torch.tanh(xi)).clamp(-1.0, 1.0)


def vae_loss(recon: torch.Tensor, a: torch.Tensor, mean: torch.Tensor, log_std: torch.Tensor) -> torch.Tensor:
    """Eq. B3: reconstruction + 0.5 KL(N(mean, std) || N(0, I)), BCQ's weighting."""
    kl = 0.5 * (mean.pow(2) + (2 * log_std).exp() - 1 - 2 * log_std).sum(-1)
    return F.mse_loss(recon, a) + 0.5 * kl.mean()


def soft_clipped_double_q(q: torch.Tensor, lmbda: float) -> torch.Tensor:
    """lmbda min_k Q^k + (1 - lmbda) max_k Q^k over the leading critic axis."""
    return lmbda * q.min(0).values + (1 - lmbda) * q.max(0).values


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

    def first(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Q_i^1 alone (the perturbation's objective, Eq. B7): ``[..., N]``."""
        return self.q[0](torch.cat([x, a], dim=-1)).squeeze(-1)


class VAE(nn.Module):
    """Conditional VAE G_i(a_i | o_i) of the behaviour actions (BCQ's generative model)."""

    def __init__(self, obs_in: int, act_dim: int, latent: int, hidden: int):
        super().__init__()
        self.latent = latent
        self.enc = mlp(obs_in + act_dim, hidden, 2 * latent)
        self.dec = mlp(obs_in + latent, hidden, act_dim)

    def forward(self, x: torch.Tensor, a: torch.Tensor):
        mean, log_std = self.enc(torch.cat([x, a], -1)).chunk(2, -1)
        log_std = log_std.clamp(-4.0, 15.0)
        z = mean + log_std.exp() * torch.randn_like(mean)
        return self.decode(x, z), mean, log_std

    def decode(self, x: torch.Tensor, z: torch.Tensor | None = None, gen: torch.Generator | None = None):
        """An action from the model; without ``z`` the prior is sampled and clipped to [-0.5, 0.5]."""
        if z is None:
            z = torch.randn(*x.shape[:-1], self.latent, device=x.device, generator=gen).clamp(-0.5, 0.5)
        return torch.tanh(self.dec(torch.cat([x, z], -1)))


class Perturbation(nn.Module):
    """xi_i(o_i, a_i): the raw perturbation; ``perturb`` bounds it by phi (Eq. B4)."""

    def __init__(self, obs_in: int, act_dim: int, hidden: int):
        super().__init__()
        self.net = mlp(obs_in + act_dim, hidden, act_dim)

    def forward(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([x, a], -1))


def build_networks(args: Args, dims: dict[str, Any]) -> nn.ModuleDict:
    n, obs_in, s = dims["n_agents"], dims["obs_dim"] + dims["n_agents"], dims["state_dim"]
    if dims["discrete"]:
        k = dims["n_actions"]
        nets = dict(q=mlp(obs_in, args.hidden, k), imitation=mlp(obs_in, args.hidden, k),
                    mixer=LinearMixer(s, n, args.mixer_hidden))
        targets = ("q", "mixer")
    else:
        ad = dims["act_dim"]
        nets = dict(q=TwinQ(obs_in + ad, args.hidden), mixer=LinearMixer(s, n, args.mixer_hidden),
                    vae=VAE(obs_in, ad, args.latent_dim or 2 * ad, args.hidden),
                    actor=Perturbation(obs_in, ad, args.hidden))
        targets = ("q", "mixer", "actor")
    for t in targets:
        nets[t + "_target"] = copy.deepcopy(nets[t]).requires_grad_(False)
    return nn.ModuleDict(nets)


def candidate_actions(nets: nn.ModuleDict, x: torch.Tensor, n: int, phi: float, actor: str = "actor",
                      gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """n perturbed VAE actions per agent: inputs ``[..., N, o]`` -> ``x [..., N, n, o]``, ``a [..., N, n, d]``."""
    xr = x.unsqueeze(-2).expand(*x.shape[:-1], n, x.shape[-1])
    g = nets["vae"].decode(xr, gen=gen)
    return xr, perturb(g, nets[actor](xr, g), phi)


def make_act_fn(nets: nn.ModuleDict, args: Args, discrete: bool, device: torch.device):
    gen = torch.Generator(device)  # reseeded by common.envs.evaluate

    @torch.no_grad()
    def act_fn(obs, state, avail):
        x = with_agent_id(torch.as_tensor(obs, dtype=torch.float32, device=device))
        if discrete:
            av = torch.as_tensor(avail, dtype=torch.bool, device=device)
            return bcq_select(nets["q"](x), nets["imitation"](x), av, args.threshold).cpu().numpy()
        xr, cand = candidate_actions(nets, x, args.n_action_samples, args.phi, gen=gen)
        best = nets["q"](xr, cand)[0].argmax(-1)  # Eq. B5: argmax_j Q_i^1(o_i, a_ij), per agent
        return cand.gather(-2, best[..., None, None].expand(*best.shape, 1, cand.shape[-1])).squeeze(-2).cpu().numpy()

    act_fn.reseed = gen.manual_seed
    return act_fn


def load_policy(checkpoint: str, device: str = "cpu", sample: bool | None = None):
    """``act_fn(obs [E,N,o], state [E,S], avail [E,N,K]) -> actions`` of a saved run; its
    ``meta`` attribute is the dataset meta (to rebuild the environment). BCQ-MA acts greedily in Q
    (``sample`` must not be True)."""
    if sample:
        raise OfflineMarlError("BCQ-MA acts greedily on its Q-function; it has no action distribution to sample")
    ck = load_checkpoint(checkpoint, ALGO)
    args = restore_args(Args, ck["args"])
    nets = build_networks(args, ck["dims"]).to(device)
    nets.load_state_dict(ck["modules"]["nets"])
    act_fn = make_act_fn(nets.eval(), args, ck["dims"]["discrete"], torch.device(device))
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
    run = Run(args, ALGO, positive=("n_action_samples",), nonneg=("phi",), unit=("threshold", "lmbda"),
              checks=((not args.eval_sample, "--eval-sample: BCQ-MA acts greedily on its Q-function among the "
                       "actions its behaviour model allows; it has no action distribution to sample"),))
    data, env = run.load_data()
    device = run.device
    data.to(device).seed(args.seed)
    dims = dims_of(data)
    discrete = dims["discrete"]
    nets = build_networks(args, dims).to(device)
    if discrete:
        groups = {"critic": [*nets["q"].parameters(), *nets["mixer"].parameters(), *nets["imitation"].parameters()]}
    else:
        groups = {"critic": [*nets["q"].parameters(), *nets["mixer"].parameters()],
                  "vae": list(nets["vae"].parameters()), "actor": list(nets["actor"].parameters())}
    opt = {k: torch.optim.Adam(p, lr=args.lr) for k, p in groups.items()}

    def step_on(key: str, loss: torch.Tensor) -> None:
        opt[key].zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(groups[key], args.grad_clip)
        opt[key].step()

    def update_discrete(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, x2, a = with_agent_id(b["obs"]), with_agent_id(b["next_obs"]), b["actions"]
        q, imit, mixer = nets["q"], nets["imitation"], nets["mixer"]
        with torch.no_grad():  # Eq. B2 target: allowed argmax by the online nets, valued by the target nets
            a2 = bcq_select(q(x2), imit(x2), b["next_avail"], args.threshold)
            q2 = nets["q_target"](x2).gather(-1, a2.unsqueeze(-1)).squeeze(-1)
            q2 = torch.where(b["next_avail"].any(-1), q2, torch.zeros_like(q2))
            y = b["reward"] + args.gamma * (1.0 - b["done"]) * nets["mixer_target"](q2, b["next_state"])
        q_tot = mixer(q(x).gather(-1, a.unsqueeze(-1)).squeeze(-1), b["state"])
        td = F.smooth_l1_loss(q_tot, y)
        logits = imit(x)
        bc = -masked_log_softmax(logits, b["avail"], keep=a).gather(-1, a.unsqueeze(-1)).mean()
        step_on("critic", td + bc + 1e-2 * logits.pow(2).mean())  # Eq. B1 behaviour model + BCQ's logit penalty
        polyak(nets["q_target"], q, args.tau)
        polyak(nets["mixer_target"], mixer, args.tau)
        return {"losses/td": td.detach(), "losses/bc": bc.detach(), "charts/q_tot": q_tot.detach().mean()}

    def update_continuous(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, x2, a = with_agent_id(b["obs"]), with_agent_id(b["next_obs"]), b["actions"]
        q, mixer = nets["q"], nets["mixer"]
        recon, mean, log_std = nets["vae"](x, a)
        v_loss = vae_loss(recon, a, mean, log_std)  # Eq. B3
        step_on("vae", v_loss)
        with torch.no_grad():  # Eq. B6 target: best of n perturbed VAE actions per agent, soft clipped double Q
            xr, cand = candidate_actions(nets, x2, args.n_action_samples, args.phi, actor="actor_target")
            q2 = soft_clipped_double_q(nets["q_target"](xr, cand), args.lmbda).max(-1).values  # [B, N]
            y = b["reward"] + args.gamma * (1.0 - b["done"]) * nets["mixer_target"](q2, b["next_state"])
        w, bias = mixer.weights(b["state"])
        q_tot = (w * q(x, a)).sum(-1) + bias  # [2, B]
        td = F.mse_loss(q_tot, y.expand_as(q_tot)) * 2
        step_on("critic", td)
        # Eq. B7: the perturbation maximises Q_tot^1 at perturbed VAE actions (critic and mixer fixed)
        with torch.no_grad():
            g = nets["vae"].decode(x)
        a_new = perturb(g, nets["actor"](x, g), args.phi)
        actor_loss = -((w.detach()[0] * q.first(x, a_new)).sum(-1) + bias.detach()[0]).mean()  # Eq. B7
        step_on("actor", actor_loss)
        for t in ("q", "mixer", "actor"):
            polyak(nets[t + "_target"], nets[t], args.tau)
        return {"losses/td": td.detach(), "losses/vae": v_loss.detach(), "losses/actor": actor_loss.detach(),
                "charts/q_tot": q_tot.detach().mean()}

    update = update_discrete if discrete else update_continuous
    act_fn = make_act_fn(nets, args, discrete, device)
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
