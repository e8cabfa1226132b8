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

import json
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import tyro
from tqdm import tqdm

from common import OfflineMarlError, friendly_errors
from common.runs import Run, load_checkpoint, resolve_device, rng_state, set_rng_state, set_seed

# The shipped AlberDICE configs evaluate the matrix game with 100 steps and Bridge with 20
# (../shared/specs/bridge-and-xor.md); other envs keep the dataset's episode limit.
EVAL_EPISODE_LIMIT = {"matrix": 100, "bridge": 20}
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


@dataclass
class Args:
    # ---- shared fields (docs/architecture.md) ----
    env: str = "bridge"
    """environment family (matrix, bridge, mamujoco, rware, smacv1, smacv2, ...)"""
    task: str = "hard"
    """task within the family"""
    quality: str = "optimal"
    """dataset quality name in the catalog"""
    dataset: str = ""
    """path of a dataset to use instead of the catalog entry (any supported format)"""
    seed: int = 0
    """random seed"""
    device: str = "auto"
    """torch device: auto, cpu, cuda, ..."""
    total_steps: int = 5_000
    """gradient steps"""
    batch_size: int = 256
    """transitions per minibatch"""
    eval_every: int = 1_000
    """steps between evaluations (each also writes checkpoints/latest.pt)"""
    eval_episodes: int = 100
    """episodes per evaluation"""
    final_eval_episodes: int = 500
    """episodes of the final evaluation stored as absolute_metrics in metrics.json"""
    resume: bool = False
    """continue the newest run of the same env/task/quality/seed from its last checkpoint"""
    run_dir: str = ""
    """write the run here instead of runs/<env>__<task>__<quality>__bc__<seed>__<time>"""
    eval_only: bool = False
    """only evaluate --checkpoint and print the result"""
    checkpoint: str = ""
    """checkpoint file or run directory for --eval-only"""
    # ---- BC ----
    lr: float = 1e-3
    """Adam learning rate"""
    hidden: int = 64
    """width of the two hidden layers of each agent's policy"""
    eval_sample: bool = True
    """discrete: sample actions from the policy during evaluation (as the AlberDICE paper evaluates);
    False = argmax. Continuous policies always act with their mean"""
    eval_episode_limit: int = 0
    """evaluation episode limit (0 = matrix 100, bridge 20 as the shipped AlberDICE configs, else the dataset's)"""
    eval_envs: int = 10
    """environments stepped side by side during evaluation"""
    log_every: int = 500
    """steps between TensorBoard loss scalars"""


# ============================================================ pure functions
NEG = -1e10


def masked_log_softmax(logits: torch.Tensor, avail: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(logits.masked_fill(~avail, NEG), dim=-1)


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
        return -masked_log_softmax(out, avail).gather(-1, actions.unsqueeze(-1)).mean()
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
def make_act_fn(policy: Policy, device: torch.device, sample: bool = True, seed: int = 0):
    """act_fn(obs [E,N,o], state, avail [E,N,K]) -> actions; ``act_fn.probs`` gives discrete action probabilities."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)

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
    return act_fn


def load_policy(checkpoint: str, device: str = "cpu"):
    """The trained joint policy of a checkpoint (file or run directory) as ``act_fn``."""
    ck = load_checkpoint(checkpoint, map_location=device)
    d = ck["dims"]
    policy = Policy(d["n_agents"], d["obs_dim"], d["discrete"], d["n_out"], d["hidden"])
    policy.load_state_dict(ck["policy"])
    policy.to(device).eval()
    return make_act_fn(policy, torch.device(device), sample=d.get("eval_sample", True), seed=int(ck.get("seed", 0)))


def evaluate_policy(env, act_fn, episodes: int, seed: int, n_envs: int) -> dict:
    from common.envs import evaluate

    res = evaluate(env, act_fn, episodes, seed=seed, n_envs=n_envs)
    res["return_per_step"] = float(np.sum(res["returns"]) / max(1, np.sum(res["lengths"])))
    return res


def joint_policy_table(env, act_fn) -> list | None:
    """For a stateless two-agent matrix game: pi_1(a_1) * pi_2(a_2) at its (constant) observation."""
    if env.spec.get("env") != "matrix":
        return None
    obs, state, avail = env.reset(0)
    p = act_fn.probs(obs[None], avail[None])[0].cpu().numpy()
    return np.outer(p[0], p[1]).round(4).tolist()


def eval_env_options(meta: dict, args: Args) -> dict:
    limit = args.eval_episode_limit or EVAL_EPISODE_LIMIT.get(meta["env"], 0)
    return {"episode_limit": limit} if limit else {}


# ===================================================================== main
def main(args: Args) -> dict:
    from common import catalog
    from common.envs import make_env_for

    device = resolve_device(args.device)
    if args.eval_only:
        if not args.checkpoint:
            raise OfflineMarlError("--eval-only needs --checkpoint PATH (a checkpoint file or a run directory)")
        meta = load_checkpoint(args.checkpoint)["dataset_meta"]
        env = make_env_for(meta, **eval_env_options(meta, args))
        act_fn = load_policy(args.checkpoint, str(device))
        res = evaluate_policy(env, act_fn, args.final_eval_episodes, args.seed + 10_000, args.eval_envs)
        out = {k: res[k] for k in ("return_mean", "return_std", "return_per_step", "win_rate", "length_mean")}
        out["joint_policy"] = joint_policy_table(env, act_fn)
        print(json.dumps(out))
        return out

    set_seed(args.seed)
    dataset = catalog.load(args.env, args.task, args.quality, args.dataset or None)
    dataset.to(device).seed(args.seed)
    env = make_env_for(dataset.meta, **eval_env_options(dataset.meta, args))
    dataset.check_env(env)
    discrete = dataset.discrete
    n_out = dataset.n_actions if discrete else dataset.act_dim
    dims = dict(n_agents=dataset.n_agents, obs_dim=dataset.obs_dim, discrete=discrete, n_out=n_out,
                hidden=args.hidden, eval_sample=args.eval_sample)
    policy = Policy(dataset.n_agents, dataset.obs_dim, discrete, n_out, args.hidden).to(device)
    opt = torch.optim.Adam(policy.parameters(), lr=args.lr)

    run = Run(args, "bc", resume=args.resume)
    step = 0
    ck = run.load(map_location="cpu") if run.resumed else None
    if ck is not None:
        policy.load_state_dict(ck["policy"])
        opt.load_state_dict(ck["opt"])
        step = ck["step"]
        set_rng_state(ck["rng"])
        dataset.generator.set_state(ck["sampler"])

    def save(at: int) -> None:
        run.save({"policy": policy.state_dict(), "opt": opt.state_dict(), "step": at, "rng": rng_state(),
                  "sampler": dataset.generator.get_state(), "dims": dims, "seed": args.seed,
                  "dataset_meta": dataset.meta, "args": vars(args)})

    act_fn = make_act_fn(policy, device, sample=args.eval_sample, seed=args.seed)
    t0, steps_done = time.time(), 0
    bar = tqdm(range(step, args.total_steps), initial=step, total=args.total_steps, desc="bc", dynamic_ncols=True,
               mininterval=2.0)
    for step in bar:
        b = dataset.sample(args.batch_size)
        loss = bc_loss(policy(b["obs"]), b["actions"], b["avail"], discrete)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps_done += 1
        if step % args.log_every == 0:
            run.log(step, {"losses/bc": loss.item(), "charts/updates_per_s": steps_done / max(1e-9, time.time() - t0)})
        if (step + 1) % args.eval_every == 0 or step + 1 == args.total_steps:
            res = evaluate_policy(env, act_fn, args.eval_episodes, args.seed + step, args.eval_envs)
            run.log_eval(step + 1, res)
            run.log(step + 1, {"eval/return_per_step": res["return_per_step"]})
            bar.set_postfix(eval=f"{res['return_mean']:.3f}", refresh=False)
            save(step + 1)
    bar.close()
    wall = time.time() - t0
    final = evaluate_policy(env, act_fn, args.final_eval_episodes, args.seed + 10_000, args.eval_envs)
    run.log_final(args.total_steps, final)
    summary = {"return_mean": final["return_mean"], "return_std": final["return_std"],
               "return_per_step": final["return_per_step"], "win_rate": final["win_rate"],
               "episode_limit": env.episode_limit, "updates_per_s": steps_done / max(1e-9, wall),
               "wall_time_s": wall, "joint_policy": joint_policy_table(env, act_fn)}
    run.finish(summary)
    run.close()
    return summary


if __name__ == "__main__":
    with friendly_errors():
        main(tyro.cli(Args))
