"""OMIGA: offline multi-agent RL with implicit global-to-local value regularisation.

Docs: docs/baselines.md#omiga (objective, derivation, differences from the reference code).
Paper: X. Wang, H. Xu, Y. Zheng, X. Zhan, "Offline Multi-Agent Reinforcement Learning with
Implicit Global-to-Local Value Regularization", NeurIPS 2023 (arXiv 2307.11620).
Reference code checked against: github.com/ZhengYinan-AIR/OMIGA (`master`: MaMuJoCo,
`SMAC` branch: SMAC), read for facts only.

Local Q_i, V_i and policies pi_i; a state-conditioned mixer with non-negative weights,
Q_tot = sum_i w_i(s) Q_i + b(s) and V_tot = sum_i w_i(s) V_i + b(s); the global reverse-KL
regularised objective becomes one implicit local value objective per agent (Eq. O3) and an
exp-advantage weighted behaviour cloning of each local policy (Eq. O4). Discrete and
continuous actions; agents share weights and see a one-hot id, all in one forward pass.

    python baselines/omiga.py --env mamujoco --task Hopper-3x1 --quality medium
    python baselines/omiga.py --env bridge --task hard --quality mix --total-steps 50000
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

ALGO = "omiga"


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
    # ---- OMIGA
    alpha: float = 10.0
    """regularisation strength alpha of the reverse-KL behaviour regulariser (the paper's default)"""
    gamma: float = 0.99
    """discount"""
    tau: float = 0.005
    """Polyak rate of the target Q, V and mixer"""
    lr: float = 5e-4
    """Adam learning rate of Q + mixer, V and the policy (reference default)"""
    hidden: int = 256
    """width of the two hidden layers of Q_i, V_i and pi_i"""
    mixer_hidden: int = 64
    """width of the mixer's hidden layer"""
    mixer_input: Literal["state", "obs"] = "state"
    """what the mixer sees: the global state, or all agents' observations concatenated (reference code)"""
    grad_clip: float = 1.0
    """gradient-norm clip of every network"""
    z_max: float = 10.0
    """the exp in the V objective (Eq. O3) continues as its tangent line above this exponent"""
    weight_clip: float = 10.0
    """the exponent of the policy weights (Eq. O4) is clipped to [-weight_clip, weight_clip] (reference: 10)"""
    official_v_loss: bool = False
    """use the reference code's V loss: exponent clamped to [-10, 10] inside the loss and rescaled by exp(-max z)"""
    return_to_go: bool = False
    """train on the undiscounted return-to-go instead of the reward (what the reference does on SMAC)"""


# ============================================================== pure functions
def exp_linear(z: torch.Tensor, z_max: float) -> torch.Tensor:
    """exp(z) for z <= z_max and its tangent line e^z_max (1 + z - z_max) above: convex, C^1,
    and it never overflows, so V cannot run away when Q - V is large."""
    zc = z.clamp(max=z_max)
    return torch.exp(zc) * (1.0 + z - zc)


def omiga_exponent(q: torch.Tensor, v: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """z_i = w_i(s) (Q_i(o_i, a_i) - V_i(o_i)) / alpha, the exponent of Eqs. O3 and O4."""
    return w * (q - v) / alpha


def omiga_v_loss(q: torch.Tensor, v: torch.Tensor, w: torch.Tensor, alpha: float, z_max: float = 10.0,
                 official: bool = False) -> torch.Tensor:
    """Eq. O3, the implicit local value objective, averaged over the batch and the agents:
    E_D[ exp(w_i (Q_i - V_i) / alpha) + w_i V_i / alpha ].

    Its minimiser in V_i is V_i* = (alpha / w_i) log E_{a_i ~ D}[exp(w_i Q_i / alpha)], the
    local soft value, and then sum_i w_i V_i* + b is the global reverse-KL regularised value
    (docs: the global-to-local equivalence). ``q`` and ``w`` come from target networks and must
    carry no gradient. ``official=True`` is the reference code's form (clamped exponent, loss
    scaled by exp(-max(max z, -1)))."""
    z = omiga_exponent(q, v, w, alpha)
    if official:
        z = z.clamp(-10.0, 10.0)
        m = torch.clamp(z.max(), min=-1.0).detach()
        return (torch.exp(z - m) + torch.exp(-m) * w * v / alpha).mean()
    return (exp_linear(z, z_max) + w * v / alpha).mean()


def omiga_policy_weights(q: torch.Tensor, v: torch.Tensor, w: torch.Tensor, alpha: float,
                         clip: float = 10.0) -> torch.Tensor:
    """Eq. O4's weights exp(w_i (Q_i - V_i) / alpha), exponent clipped to [-clip, clip]; with
    w_i = 1 this is the familiar exp(A_i / alpha) of advantage-weighted regression."""
    return torch.exp(omiga_exponent(q, v, w, alpha).clamp(-clip, clip)).detach()


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


class LinearMixer(nn.Module):
    """x_tot = sum_i w_i(s) x_i + b(s) with w_i = |.| >= 0, from one ReLU layer on the mixer input
    (OMCDA Eq. 1; the reference OMIGA mixer). The same mixer mixes Q (Eq. O1) and V (Eq. O2)."""

    def __init__(self, inp: int, n_agents: int, hidden: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(inp, hidden), nn.ReLU())
        self.w = nn.Linear(hidden, n_agents)
        self.b = nn.Linear(hidden, 1)

    def weights(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(s)
        return self.w(h).abs(), self.b(h).squeeze(-1)

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        w, b = self.weights(s)
        return (w * x).sum(-1) + b


class QNet(nn.Module):
    """Q_i(o_i, a_i): discrete -> one output per action; continuous -> (obs, action) -> 1."""

    def __init__(self, obs_in: int, n_actions: int, act_dim: int, hidden: int, discrete: bool):
        super().__init__()
        self.discrete = discrete
        self.net = mlp(obs_in, hidden, n_actions) if discrete else mlp(obs_in + act_dim, hidden, 1)

    def forward(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        if self.discrete:
            return self.net(x).gather(-1, a.unsqueeze(-1)).squeeze(-1)
        return self.net(torch.cat([x, a], dim=-1)).squeeze(-1)


class Policy(nn.Module):
    """pi_i(a_i | o_i): masked categorical, or tanh-Gaussian (mean clamped to +-9, log-std to [-5, 2])."""

    def __init__(self, obs_in: int, n_actions: int, act_dim: int, hidden: int, discrete: bool):
        super().__init__()
        self.discrete = discrete
        self.net = mlp(obs_in, hidden, n_actions if discrete else 2 * act_dim)

    def _gauss(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, log_std = self.net(x).chunk(2, dim=-1)
        return mu.clamp(-9.0, 9.0), log_std.clamp(-5.0, 2.0)

    def log_prob(self, x: torch.Tensor, a: torch.Tensor, avail: torch.Tensor) -> torch.Tensor:
        if self.discrete:
            return masked_log_softmax(self.net(x), avail, keep=a).gather(-1, a.unsqueeze(-1)).squeeze(-1)
        return tanh_gaussian_log_prob(*self._gauss(x), a)

    def act(self, x: torch.Tensor, avail: torch.Tensor, sample: bool, gen: torch.Generator | None = None):
        if self.discrete:
            logits = masked_logits(self.net(x), avail)
            if not sample:
                return logits.argmax(-1)
            flat = torch.softmax(logits, -1).reshape(-1, logits.shape[-1])
            return torch.multinomial(flat, 1, generator=gen).reshape(logits.shape[:-1])
        mu, log_std = self._gauss(x)
        if sample:
            mu = mu + log_std.exp() * torch.randn(mu.shape, device=mu.device, generator=gen)
        return torch.tanh(mu)


def build_networks(args: Args, dims: dict[str, Any]) -> nn.ModuleDict:
    n, disc = dims["n_agents"], dims["discrete"]
    obs_in = dims["obs_dim"] + n
    k, ad = dims.get("n_actions", 1), dims.get("act_dim", 1)
    mix_in = dims["state_dim"] if args.mixer_input == "state" else n * dims["obs_dim"]
    nets = nn.ModuleDict(dict(
        q=QNet(obs_in, k, ad, args.hidden, disc), v=mlp(obs_in, args.hidden, 1),
        mixer=LinearMixer(mix_in, n, args.mixer_hidden), policy=Policy(obs_in, k, ad, args.hidden, disc),
    ))
    for name in ("q", "v", "mixer"):
        nets[name + "_target"] = copy.deepcopy(nets[name]).requires_grad_(False)
    return nets


def mixer_input(args: Args, state: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
    return state if args.mixer_input == "state" else obs.flatten(-2)


def make_act_fn(policy: Policy, device: torch.device, sample: bool):
    """act_fn(obs [E,N,o], state, avail [E,N,K]) -> actions; sampled actions draw from the act_fn's
    own generator, which ``common.envs.evaluate`` reseeds."""
    gen = torch.Generator(device)

    @torch.no_grad()
    def act_fn(obs, state, avail):
        x = with_agent_id(torch.as_tensor(obs, dtype=torch.float32, device=device))
        return policy.act(x, torch.as_tensor(avail, dtype=torch.bool, device=device), sample, gen).cpu().numpy()

    act_fn.reseed = gen.manual_seed
    return act_fn


def load_policy(checkpoint: str, device: str = "cpu", sample: bool | None = None):
    """``act_fn(obs [E,N,o], state [E,S], avail [E,N,K]) -> actions`` of a saved run; its
    ``meta`` attribute is the dataset meta (to rebuild the environment). ``sample`` overrides
    the run's ``eval_sample`` (sampled actions instead of the mode)."""
    ck = load_checkpoint(checkpoint, ALGO)
    args = restore_args(Args, ck["args"])
    nets = build_networks(args, ck["dims"]).to(device)
    nets.load_state_dict(ck["modules"]["nets"])
    sample = args.eval_sample if sample is None else sample
    act_fn = make_act_fn(nets["policy"].eval(), torch.device(device), sample)
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
    run = Run(args, ALGO, positive=("alpha", "z_max", "weight_clip"))
    data, env = run.load_data()
    if args.return_to_go:
        data = data.with_reward(data.returns_to_go(), "undiscounted return-to-go (OMIGA SMAC reference)")
    data.to(run.device).seed(args.seed)
    dims = dims_of(data)
    nets = build_networks(args, dims).to(run.device)
    opt = {
        "q": torch.optim.Adam([*nets["q"].parameters(), *nets["mixer"].parameters()], lr=args.lr),
        "v": torch.optim.Adam(nets["v"].parameters(), lr=args.lr),
        "policy": torch.optim.Adam(nets["policy"].parameters(), lr=args.lr),
    }
    q, v, mixer, policy = nets["q"], nets["v"], nets["mixer"], nets["policy"]
    q_t, v_t, mixer_t = nets["q_target"], nets["v_target"], nets["mixer_target"]
    q_params = [*q.parameters(), *mixer.parameters()]

    def update(b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, x2 = with_agent_id(b["obs"]), with_agent_id(b["next_obs"])
        s, s2 = mixer_input(args, b["state"], b["obs"]), mixer_input(args, b["next_state"], b["next_obs"])
        a = b["actions"]
        # Eq. O1: Q_tot(s, a) = sum_i w_i(s) Q_i(o_i, a_i) + b(s) regressed on r + gamma V_tot^target(s')
        with torch.no_grad():
            y = b["reward"] + args.gamma * (1.0 - b["done"]) * mixer_t(v_t(x2).squeeze(-1), s2)
            q_tgt = q_t(x, a)
            w_tgt, _ = mixer_t.weights(s)
        q_tot = mixer(q(x, a), s)
        q_loss = F.mse_loss(q_tot, y)  # Eq. O1 regressed on r + γ V_tot(s') (O2)
        # Eq. O3: implicit local value objective (target Q and target mixer weights, gradient into V only)
        v_i = v(x).squeeze(-1)
        v_loss = omiga_v_loss(q_tgt, v_i, w_tgt, args.alpha, args.z_max, args.official_v_loss)  # Eq. O3
        # Eq. O4: weighted behaviour cloning, weights exp(w_i (Q_i - V_i) / alpha)
        weight = omiga_policy_weights(q_tgt, v_i.detach(), w_tgt, args.alpha, args.weight_clip)
        pi_loss = -(weight * policy.log_prob(x, a, b["avail"])).mean()  # Eq. O4
        for loss, key, params in ((pi_loss, "policy", policy.parameters()), (q_loss, "q", q_params),
                                  (v_loss, "v", v.parameters())):
            opt[key].zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(params, args.grad_clip)
            opt[key].step()
        polyak(q_t, q, args.tau)
        polyak(v_t, v, args.tau)
        polyak(mixer_t, mixer, args.tau)
        return {"losses/q": q_loss.detach(), "losses/v": v_loss.detach(), "losses/policy": pi_loss.detach(),
                "charts/q_tot": q_tot.detach().mean(), "charts/v_mean": v_i.detach().mean(),
                "charts/weight_mean": weight.mean(), "charts/weight_max": weight.max(),
                "charts/mixer_w_mean": w_tgt.mean()}

    act_fn = make_act_fn(policy, run.device, args.eval_sample)
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
