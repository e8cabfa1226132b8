"""Behaviour policies for Multi-Agent MuJoCo, and the dataset recipes built on them.

Docs: docs/datasets.md (section "Multi-Agent MuJoCo").

The published MaMuJoCo datasets of OMIGA / ComaDICE / OMCDA (Hopper-3x1,
Ant-2x4, HalfCheetah-6x1 in the qualities expert, medium, medium-replay,
medium-expert) cannot be downloaded here, so this module makes equivalent ones:

1. ``train``: Soft Actor-Critic (Haarnoja et al. 2018, "Soft Actor-Critic
   Algorithms and Applications", arXiv:1812.05905) on the *single-agent*
   gymnasium robot with the joint action. In the ``omiga`` observation mode every
   agent sees the full single-agent observation, so a single policy on the joint
   action produces exactly the data a team of agents would record; only the
   layout differs (``omiga_layout``). Training checkpoints every few minutes at
   an episode boundary (actor, critics, optimisers, replay buffer, RNG states,
   step) and resumes bit-exactly; it snapshots the actor every ``snapshot_every``
   steps with a short evaluation, which is how the medium policy is chosen and
   how medium-replay is regenerated.
2. ``ship``: picks the expert (the best of the last snapshots) and medium (the
   snapshot closest to 0.4 x expert return) policies, measures both over 100
   episodes and writes the
   small committed artefacts under ``common/assets/mamujoco/`` plus the training
   record ``common/assets/mamujoco/behaviour.json``.
3. ``generate`` / ``generate_mamujoco``: the four recipes, deterministic from a
   seed, into the native ``OfflineDataset`` format with ``obs_mode: omiga``.

Commands::

    python -m common.behaviour train --task Hopper-3x1             # resumes when run again
    python -m common.behaviour ship --task Hopper-3x1
    python -m common.behaviour generate --task Hopper-3x1 --quality medium
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from common import OfflineMarlError

# ================================================================== the tasks
# task -> (gymnasium id, gymnasium kwargs, number of agents). Every agent owns a
# contiguous chunk of act_dim // n_agents entries of the joint action.
TASKS: dict[str, tuple[str, dict[str, Any], int]] = {
    "Hopper-3x1": ("Hopper-v4", {}, 3),
    "Ant-2x4": ("Ant-v4", {"use_contact_forces": True}, 2),
    "HalfCheetah-6x1": ("HalfCheetah-v4", {}, 6),
}
MAMUJOCO_QUALITIES = ("expert", "medium", "medium-replay", "medium-expert")
ASSETS = Path(__file__).resolve().parent / "assets" / "mamujoco"
CKPT_FORMAT = "offline-marl-behaviour/1"


class BehaviourError(OfflineMarlError):
    """A behaviour policy or recipe cannot be used as asked."""


def _task(task: str) -> tuple[str, dict[str, Any], int]:
    if task not in TASKS:
        raise BehaviourError(f"no behaviour policy for MaMuJoCo task {task!r}; choose one of {', '.join(TASKS)}")
    return TASKS[task]


def make_gym_env(task: str):
    """The single-agent gymnasium robot behind ``task`` (1000-step time limit)."""
    try:
        import gymnasium as gym
    except ImportError as e:  # pragma: no cover - depends on the install
        raise BehaviourError("MaMuJoCo needs gymnasium and mujoco: pip install 'offline-marl[mujoco]'") from e
    from common.envs import _build_quietly  # v4 on purpose: silence "out of date" and MuJoCo's XML notice

    gym_id, kwargs, _ = _task(task)
    return _build_quietly(gym.make, gym_id, **kwargs)


# ========================================================== the omiga layout
def omiga_layout(raw: np.ndarray, n_agents: int) -> tuple[np.ndarray, np.ndarray]:
    """Single-agent observations ``[..., D]`` -> the ``omiga`` multi-agent layout of
    ``common.envs.MaMuJoCo``: ``obs [..., N, D + N]`` (agent ``i`` sees
    ``z([raw, onehot(i)])``, z-scored within that vector, ``common.envs.omiga_obs``)
    and ``state [..., N * (D + N)]`` (the agents' observations concatenated)."""
    from common.envs import omiga_obs

    obs = omiga_obs(raw, n_agents)
    return obs, obs.reshape(obs.shape[:-2] + (-1,))


def raw_from_omiga(obs: np.ndarray | torch.Tensor, n_agents: int) -> np.ndarray:
    """Invert ``omiga_layout``: recover the single-agent observation ``[..., D]`` from
    agent 0's vector ``obs [..., N, D + N]``. Its one-hot entries are ``(1 - m)/s``
    and ``(0 - m)/s``, which give the mean ``m`` and scale ``s`` of the z-score."""
    if hasattr(obs, "detach"):
        obs = obs.detach().cpu().numpy()
    x = np.asarray(obs, dtype=np.float64)[..., 0, :]
    D = x.shape[-1] - n_agents
    hot, cold = x[..., D], x[..., D + 1]  # agent 0: onehot = [1, 0, ...]
    s = 1.0 / (hot - cold)
    m = -cold * s
    return x[..., :D] * s[..., None] + m[..., None]


def split_actions(joint: np.ndarray, n_agents: int) -> np.ndarray:
    """Joint action ``[..., A]`` -> per-agent actions ``[..., N, A // N]`` (contiguous chunks)."""
    joint = np.asarray(joint)
    return joint.reshape(joint.shape[:-1] + (n_agents, joint.shape[-1] // n_agents))


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
class Actor(nn.Module):
    """Tanh-squashed Gaussian policy pi(a|s) of SAC (appendix C of arXiv:1812.05905)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(obs_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 2 * act_dim))

    def forward(self, obs: torch.Tensor, generator: torch.Generator | None = None, deterministic: bool = False):
        """Returns ``(action in [-1, 1], log pi(action|obs))``; with ``generator=None``
        and ``deterministic=True`` the action is ``tanh(mean)``."""
        mean, log_std = self.net(obs).chunk(2, dim=-1)
        log_std = log_std.clamp(-20.0, 2.0)
        if deterministic:
            return torch.tanh(mean), None
        std = log_std.exp()
        u = mean + std * torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        # the change of variables of appendix C, in its stable form
        return torch.tanh(u), tanh_gaussian_log_prob(mean, log_std, pre_tanh=u)


class TwinQ(nn.Module):
    """The two soft Q-functions Q_1, Q_2 as one batched MLP (batched matmuls, no loop)."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: int, n: int = 2):
        super().__init__()
        dims = [obs_dim + act_dim, hidden, hidden, 1]
        self.w = nn.ParameterList()
        self.b = nn.ParameterList()
        for i, o in zip(dims[:-1], dims[1:]):
            layers = [nn.Linear(i, o) for _ in range(n)]  # torch's default init, per member
            self.w.append(nn.Parameter(torch.stack([l.weight.detach().T for l in layers])))
            self.b.append(nn.Parameter(torch.stack([l.bias.detach()[None] for l in layers])))

    def forward(self, obs: torch.Tensor, act: torch.Tensor, detach: bool = False) -> torch.Tensor:
        """``[B, o], [B, a] -> [n, B]``; ``detach``: no gradient reaches the parameters
        (it still flows into ``act``)."""
        x = torch.cat([obs, act], -1).expand(self.w[0].shape[0], -1, -1)
        for k, (w, b) in enumerate(zip(self.w, self.b)):
            if detach:
                w, b = w.detach(), b.detach()
            x = torch.baddbmm(b, x, w)
            if k < len(self.w) - 1:
                x = F.relu(x)
        return x.squeeze(-1)


# =================================================================== training
@dataclass
class TrainConfig:
    """SAC for a behaviour policy (defaults: arXiv:1812.05905 table 1, smaller networks)."""

    task: str = "Hopper-3x1"
    """MaMuJoCo task: Hopper-3x1, Ant-2x4 or HalfCheetah-6x1."""
    seed: int = 0
    """Seed of the environment, the networks and the sampling."""
    total_steps: int = 300_000
    """Environment steps of training."""
    learning_starts: int = 5_000
    """Steps of uniformly random actions before the first update."""
    hidden: int = 128
    """Width of the two hidden layers of actor and critics."""
    batch_size: int = 128
    """Transitions per update (half the paper's 256: the update's cost on a CPU)."""
    lr: float = 3e-4
    """Adam learning rate of actor, critics and temperature."""
    gamma: float = 0.99
    """Discount."""
    tau: float = 0.005
    """Polyak rate of the target critics."""
    snapshot_every: int = 5_000
    """Save the actor and evaluate it every this many steps."""
    snapshot_episodes: int = 5
    """Episodes of the stochastic policy in each snapshot evaluation."""
    save_every_s: float = 180.0
    """Write the full checkpoint at the first episode end after this many seconds."""
    run_dir: str = ""
    """Training directory; default runs/behaviour/<task>__seed<seed>. Running again resumes."""
    stop_after: int = 0
    """Stop (with a checkpoint) at the first episode end at or after this step; 0: train to total_steps."""


class Buffer:
    """Replay buffer as memory-mapped files in the run directory: a checkpoint only
    has to flush them and record ``size``; resuming reopens them."""

    FIELDS = ("obs", "act", "rew", "next_obs", "term", "end")

    def __init__(self, path: Path, capacity: int, obs_dim: int, act_dim: int, size: int = 0):
        path.mkdir(parents=True, exist_ok=True)
        shapes = dict(obs=(obs_dim,), act=(act_dim,), rew=(), next_obs=(obs_dim,), term=(), end=())
        self.a = {}
        for k, shp in shapes.items():
            f = path / f"{k}.npy"
            mode = "r+" if f.exists() else "w+"
            self.a[k] = np.lib.format.open_memmap(f, mode=mode, dtype=np.float32, shape=(capacity,) + shp)
        self.size = size

    def add(self, obs, act, rew, next_obs, term, end) -> None:
        i = self.size
        a = self.a
        a["obs"][i], a["act"][i], a["rew"][i], a["next_obs"][i], a["term"][i], a["end"][i] = obs, act, rew, next_obs, term, end
        self.size += 1

    def sample(self, idx: np.ndarray) -> list[torch.Tensor]:
        return [torch.from_numpy(self.a[k][idx]) for k in ("obs", "act", "rew", "next_obs", "term")]

    def flush(self) -> None:
        for m in self.a.values():
            m.flush()


class SAC:
    """Networks, optimisers and the update of Soft Actor-Critic with automatic temperature."""

    def __init__(self, obs_dim: int, act_dim: int, cfg: TrainConfig):
        self.cfg = cfg
        self.actor = Actor(obs_dim, act_dim, cfg.hidden)
        self.q = TwinQ(obs_dim, act_dim, cfg.hidden)
        self.q_target = TwinQ(obs_dim, act_dim, cfg.hidden)
        self.q_target.load_state_dict(self.q.state_dict())
        self.log_alpha = torch.zeros((), requires_grad=True)
        self.target_entropy = -float(act_dim)  # section 5 of arXiv:1812.05905
        self.opt = torch.optim.Adam([*self.actor.parameters(), *self.q.parameters(), self.log_alpha], lr=cfg.lr)

    def update(self, batch: list[torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
        """One gradient step on J_Q, J_pi and J(alpha) together: the three losses are
        computed from the same parameters and summed, each touching only its own
        parameters (the critics enter J_pi detached), so one backward pass and one
        Adam step do the work of three (the per-call overhead dominates these small
        networks on a CPU)."""
        obs, act, rew, next_obs, term = batch
        alpha = self.log_alpha.detach().exp()
        with torch.no_grad():
            a2, logp2 = self.actor(next_obs, gen)
            # soft value of the next state, eq. 3, with the clipped double-Q minimum
            v2 = self.q_target(next_obs, a2).min(0).values - alpha * logp2
            y = rew + self.cfg.gamma * (1.0 - term) * v2
        # J_Q, eq. 5 (both critics regress on the same target)
        q_loss = 0.5 * ((self.q(obs, act) - y) ** 2).mean(1).sum()
        # J_pi, eq. 7, with the reparameterised action a = tanh(mean + std * eps) of sec. 4.2
        a, logp = self.actor(obs, gen)
        pi_loss = (alpha * logp - self.q(obs, a, detach=True).min(0).values).mean()
        # J(alpha), eq. 18
        alpha_loss = -(self.log_alpha * (logp.detach() + self.target_entropy)).mean()
        self.opt.zero_grad(set_to_none=True)
        (q_loss + pi_loss + alpha_loss).backward()
        self.opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(self.q_target.parameters()), list(self.q.parameters()), self.cfg.tau)
        return dict(q_loss=q_loss.detach(), pi_loss=pi_loss.detach(), alpha=alpha, entropy=-logp.detach().mean())

    def state_dict(self) -> dict[str, Any]:
        return dict(actor=self.actor.state_dict(), q=self.q.state_dict(), q_target=self.q_target.state_dict(),
                    log_alpha=self.log_alpha.detach().clone(), opt=self.opt.state_dict())

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.actor.load_state_dict(d["actor"])
        self.q.load_state_dict(d["q"])
        self.q_target.load_state_dict(d["q_target"])
        with torch.no_grad():
            self.log_alpha.copy_(d["log_alpha"])
        self.opt.load_state_dict(d["opt"])


def default_run_dir(task: str, seed: int) -> Path:
    return Path("runs") / "behaviour" / f"{task}__seed{seed}"


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rollout_returns(task: str, actor: Actor, episodes: int, seed: int, deterministic: bool = False,
                    n_envs: int = 10) -> np.ndarray:
    """Undiscounted returns of ``episodes`` episodes of ``actor`` on the gymnasium robot
    (``n_envs`` environments stepped side by side, one batched forward pass).
    Episode ``i`` is reset with seed ``seed + i``; sampling noise comes from a
    generator seeded with ``seed``."""
    with _one_thread():
        return _returns_impl(task, actor, episodes, seed, deterministic, n_envs)


def _returns_impl(task, actor, episodes, seed, deterministic, n_envs):
    gen = torch.Generator().manual_seed(seed)
    n = min(n_envs, episodes)
    envs = [make_gym_env(task) for _ in range(n)]
    obs = np.zeros((n, envs[0].observation_space.shape[0]), np.float64)
    ret, active, nxt, out = np.zeros(n), np.zeros(n, bool), 0, []
    for i in range(n):
        obs[i] = envs[i].reset(seed=seed + nxt)[0]
        active[i], nxt = True, nxt + 1
    while active.any():
        with torch.no_grad():
            a, _ = actor(torch.as_tensor(obs, dtype=torch.float32), gen, deterministic)
        a = a.numpy().astype(np.float64)
        for i in np.flatnonzero(active):
            o, r, term, trunc, _ = envs[i].step(a[i])
            obs[i], ret[i] = o, ret[i] + r
            if term or trunc:
                out.append(ret[i])
                ret[i] = 0.0
                if nxt < episodes:
                    obs[i] = envs[i].reset(seed=seed + nxt)[0]
                    nxt += 1
                else:
                    active[i] = False
    for e in envs:
        e.close()
    return np.asarray(out)


def train(cfg: TrainConfig, progress: bool = True) -> Path:
    """Train (or resume) SAC on ``cfg.task``; returns the run directory.

    Layout of the run directory: ``config.json``, ``checkpoint.pt`` (everything
    needed to resume), ``buffer/*.npy`` (the replay buffer, memory-mapped),
    ``snapshots/actor_<step>.pt`` and ``log.jsonl`` (one line per snapshot:
    step, evaluation returns, losses, wall time)."""
    torch.set_num_threads(1)
    gym_id, _, _ = _task(cfg.task)
    run = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg.task, cfg.seed)
    run.mkdir(parents=True, exist_ok=True)
    (run / "snapshots").mkdir(exist_ok=True)
    ckpt_path = run / "checkpoint.pt"
    env = make_gym_env(cfg.task)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    torch.manual_seed(cfg.seed)  # network initialisation
    sac = SAC(obs_dim, act_dim, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)  # every other draw of training
    if ckpt_path.exists():
        ck = _load_safely(ckpt_path, "a behaviour-training checkpoint")
        saved = {k: v for k, v in ck["config"].items() if k not in ("stop_after", "save_every_s", "run_dir", "total_steps")}
        now = {k: v for k, v in dataclasses.asdict(cfg).items() if k in saved}
        if saved != now:
            raise BehaviourError(f"{run} was started with {saved}, not {now}; pass the same options or another --run-dir")
        sac.load_state_dict(ck["sac"])
        gen.set_state(ck["gen"])
        step, episodes, wall = ck["step"], ck["episodes"], ck["wall"]
        env.unwrapped._np_random = np.random.Generator(np.random.PCG64())
        env.unwrapped._np_random.bit_generator.state = ck["env_rng"]
        obs = env.reset()[0]
        if ck["config"]["total_steps"] < cfg.total_steps and ck["capacity"] < cfg.total_steps:
            raise BehaviourError(f"{run}'s replay buffer holds {ck['capacity']} steps; cannot extend to {cfg.total_steps}")
        capacity = ck["capacity"]
    else:
        step, episodes, wall = 0, 0, 0.0
        capacity = cfg.total_steps
        (run / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
        obs = env.reset(seed=cfg.seed)[0]
    buf = Buffer(run / "buffer", capacity, obs_dim, act_dim, size=step)
    log = open(run / "log.jsonl", "a")

    def checkpoint() -> None:
        buf.flush()
        _atomic_save(dict(sac=sac.state_dict(), gen=gen.get_state(), step=step, episodes=episodes,
                          wall=wall + time.time() - t0, env_rng=env_rng, config=dataclasses.asdict(cfg),
                          capacity=capacity, gym_id=gym_id, obs_dim=obs_dim, act_dim=act_dim), ckpt_path)

    from tqdm import tqdm

    bar = tqdm(total=cfg.total_steps, initial=step, desc=f"SAC {cfg.task}", disable=not progress, mininterval=10)
    t0 = last_save = time.time()
    ep_ret, recent, stats = 0.0, [], {}
    env_rng = env.unwrapped.np_random.bit_generator.state  # state to reset from (after the current episode)
    while step < cfg.total_steps:
        if step < cfg.learning_starts:
            a = (torch.rand(act_dim, generator=gen, dtype=torch.float64) * 2 - 1).numpy()
        else:
            with torch.no_grad():
                a = sac.actor(torch.as_tensor(obs, dtype=torch.float32)[None], gen)[0][0].double().numpy()
        next_obs, r, term, trunc, _ = env.step(a)
        buf.add(obs, a, r, next_obs, float(term), float(term or trunc))
        step += 1
        ep_ret += r
        obs = next_obs
        if step >= cfg.learning_starts:
            idx = torch.randint(buf.size, (cfg.batch_size,), generator=gen).numpy()
            stats = sac.update(buf.sample(idx), gen)
        if step % cfg.snapshot_every == 0:
            rets = rollout_returns(cfg.task, sac.actor, cfg.snapshot_episodes, seed=10_000 + step)
            _atomic_save(dict(actor=sac.actor.state_dict(), step=step), run / "snapshots" / f"actor_{step:07d}.pt")
            rec = dict(step=step, eval_return=float(rets.mean()), eval_std=float(rets.std()),
                       train_return=float(np.mean(recent[-10:])) if recent else None, episodes=episodes,
                       wall_s=round(wall + time.time() - t0, 1), **{k: round(float(v), 4) for k, v in stats.items()})
            log.write(json.dumps(rec) + "\n")
            log.flush()
            bar.set_postfix(ret=f"{rec['eval_return']:.0f}")
        if term or trunc:
            episodes += 1
            recent.append(ep_ret)
            ep_ret = 0.0
            env_rng = env.unwrapped.np_random.bit_generator.state
            stop = cfg.stop_after and step >= cfg.stop_after
            if stop or step >= cfg.total_steps or time.time() - last_save > cfg.save_every_s:
                checkpoint()
                last_save = time.time()
                if stop:
                    break
            obs = env.reset()[0]
        bar.update(1)
    else:
        checkpoint()  # the final step ended mid-episode: this checkpoint is final, not for resuming
    bar.close()
    log.close()
    env.close()
    return run


# ============================================== shipped behaviour policies
def _actor_from(ck: dict[str, Any], state_dict: dict[str, torch.Tensor], device: str | torch.device = "cpu") -> Actor:
    actor = Actor(ck["obs_dim"], ck["act_dim"], ck["hidden"]).to(device)
    actor.load_state_dict({k: v.float() for k, v in state_dict.items()})
    return actor.eval().requires_grad_(False)


def shipped_path(task: str, level: str) -> Path:
    """Path of a committed behaviour checkpoint: ``level`` is ``expert``, ``medium`` or ``replay``."""
    _task(task)
    path = ASSETS / task / f"{level}.pt"
    if not path.exists():
        raise BehaviourError(f"no shipped {level} behaviour policy for {task} at {path}; "
                             f"train one with python -m common.behaviour train --task {task} and ship it")
    return path


def _load_safely(path: Path, what: str) -> Any:
    """``torch.load`` with weights only (tensors and plain values; a crafted file runs no code)."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise BehaviourError(f"{path} is not {what}: it holds Python objects that a safe (weights-only) load "
                             "refuses, and this project never unpickles them") from None
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise BehaviourError(f"cannot read {path} as {what}: {type(e).__name__}: {str(e)[:160]}") from None


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a behaviour checkpoint (tensors and plain values only, no pickled code)."""
    path = Path(path)
    if not path.exists():
        raise BehaviourError(f"no behaviour checkpoint at {path}")
    ck = _load_safely(path, "a behaviour checkpoint")
    if not isinstance(ck, dict) or ck.get("format") != CKPT_FORMAT:
        raise BehaviourError(f"{path} is not a behaviour checkpoint ({CKPT_FORMAT})")
    return ck


def load_behaviour_policy(path: str | os.PathLike, device: str = "cpu", deterministic: bool = False,
                          seed: int = 0) -> Callable[..., torch.Tensor]:
    """``act_fn(obs [E, N, o], state, avail) -> actions [E, N, act_dim]`` of a behaviour
    checkpoint, acting in the ``omiga`` observation mode of ``common.envs`` (the
    single-agent observation is recovered exactly from agent 0's z-scored vector,
    see ``raw_from_omiga``). By default it samples like the data collection did;
    ``deterministic=True`` acts with ``tanh(mean)``."""
    ck = load_checkpoint(path)
    actor = _actor_from(ck, ck["actor"], device)
    n = ck["n_agents"]
    gen = torch.Generator(device).manual_seed(seed)

    def act_fn(obs, state=None, avail=None) -> torch.Tensor:
        raw = torch.as_tensor(raw_from_omiga(obs, n), dtype=torch.float32, device=device)
        a, _ = actor(raw, gen, deterministic)
        return a.reshape(raw.shape[0], n, -1)

    return act_fn


# ================================================================ rollouts
class _one_thread:
    """Run torch on one thread inside the block (tiny batched forward passes are
    slower with more threads, much slower on a busy machine), then restore."""

    def __enter__(self):
        self.n = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.n)


def _rollout(task: str, policy_at: Callable[[int], Actor | None], transitions: int, seed: int, n_envs: int = 10,
             deterministic: bool = False, desc: str = "", progress: bool = True) -> list[dict[str, Any]]:
    """Collect exactly ``transitions`` steps on ``n_envs`` copies of the robot.

    ``policy_at(t)`` is the actor that acts once ``t`` transitions have been
    collected (None: uniformly random actions). Env ``i`` is first reset with seed
    ``seed * 1000 + i`` and then continues its own RNG; actions are sampled from a
    generator seeded with ``seed``. Episodes still running when the budget is spent
    are cut and end as time-outs. Returns the episodes in the order they ended:
    dicts with ``raw [T+1, D]``, ``actions [T, A]``, ``reward [T]``, ``terminated``."""
    from tqdm import tqdm

    with _one_thread():
        return _rollout_impl(tqdm, task, policy_at, transitions, seed, n_envs, deterministic, desc, progress)


def _rollout_impl(tqdm, task, policy_at, transitions, seed, n_envs, deterministic, desc, progress):
    gen = torch.Generator().manual_seed(seed)
    n = max(1, min(n_envs, transitions))
    envs = [make_gym_env(task) for _ in range(n)]
    A = envs[0].action_space.shape[0]
    obs = np.stack([e.reset(seed=seed * 1000 + i)[0] for i, e in enumerate(envs)])
    cur = [dict(raw=[obs[i].copy()], actions=[], reward=[]) for i in range(n)]
    out: list[dict[str, Any]] = []

    def finish(i: int, terminated: bool) -> None:
        c = cur[i]
        out.append(dict(raw=np.asarray(c["raw"]), actions=np.asarray(c["actions"], np.float32),
                        reward=np.asarray(c["reward"], np.float32), terminated=terminated))

    t = 0
    bar = tqdm(total=transitions, desc=desc or f"{task} rollouts", disable=not progress, mininterval=2, unit="step")
    while t < transitions:
        k = min(n, transitions - t)
        actor = policy_at(t)
        if actor is None:
            act = torch.rand((k, A), generator=gen, dtype=torch.float64) * 2 - 1
        else:
            with torch.no_grad():
                act = actor(torch.as_tensor(obs[:k], dtype=torch.float32), gen, deterministic)[0]
        act = act.double().numpy()
        for i in range(k):
            o, r, term, trunc, _ = envs[i].step(act[i])
            c = cur[i]
            c["actions"].append(act[i])
            c["reward"].append(r)
            c["raw"].append(o)
            if term or trunc:
                finish(i, bool(term))
                o = envs[i].reset()[0]
                cur[i] = dict(raw=[o], actions=[], reward=[])
            obs[i] = o
        t += k
        bar.update(k)
    bar.close()
    for i in range(n):
        if cur[i]["reward"]:
            finish(i, False)  # cut by the collection budget: a time-out
        envs[i].close()
    return out


def single_agent_episodes_to_dataset(task: str, episodes: list[dict[str, Any]], meta: dict[str, Any], chunk: int = 1 << 16):
    """Single-agent episodes -> an ``OfflineDataset`` in the ``omiga`` layout, built row
    by row (no padding to the longest episode: 1M Ant rows are already 1.8 GB)."""
    from common.data import OfflineDataset

    n = _task(task)[2]
    lengths = np.array([len(e["reward"]) for e in episodes], dtype=np.int64)
    start = np.zeros(len(episodes) + 1, dtype=np.int64)
    np.cumsum(lengths + 1, out=start[1:])
    R = int(start[-1])
    raw = np.concatenate([e["raw"] for e in episodes])
    A = episodes[0]["actions"].shape[1]
    D = raw.shape[1]
    obs = np.empty((R, n, D + n), np.float32)
    for s in range(0, R, chunk):
        obs[s:s + chunk] = omiga_layout(raw[s:s + chunk], n)[0]
    actions = np.concatenate([np.concatenate([e["actions"], np.zeros((1, A), np.float32)]) for e in episodes])
    reward = np.concatenate([np.append(e["reward"], np.float32(0)) for e in episodes]).astype(np.float32)
    last_rows = start[1:] - 1
    terminated = np.array([e["terminated"] for e in episodes], dtype=bool)
    terminal, timeout, last = np.zeros(R, bool), np.zeros(R, bool), np.zeros(R, bool)
    terminal[last_rows - 1] = terminated
    timeout[last_rows - 1] = ~terminated
    last[last_rows] = True
    arrays = dict(obs=obs, state=obs.reshape(R, -1), actions=split_actions(actions, n).astype(np.float32),
                  avail=np.ones((R, n, 1), bool), reward=reward, terminal=terminal, timeout=timeout, last=last,
                  episode_start=start)
    dims = dict(n_agents=n, obs_dim=D + n, state_dim=n * (D + n), discrete=False, act_dim=A // n)
    return OfflineDataset(arrays, {**meta, **dims})


# ================================================================== recipes
DEFAULT_TRANSITIONS = {"expert": 200_000, "medium": 200_000, "medium-expert": 400_000}
"""Default sizes: a fifth of the published datasets (1M / 1M / 2M transitions, ComaDICE
Table 3), so that a dataset is made in minutes on one core; ``transitions=1_000_000``
gives the published size. medium-replay's default is the number of training steps
up to the medium policy (the size of that replay buffer)."""


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def _replay_schedule(ck: dict[str, Any], transitions: int, device: str = "cpu") -> Callable[[int], Actor | None]:
    """``policy_at(t)`` of medium-replay: the training run's sequence of policies,
    stretched or shrunk onto ``transitions`` steps. Training step ``s`` was acted by
    uniform noise while ``s < learning_starts`` and afterwards by the last snapshot
    taken at or before ``s`` (the policy kept changing between snapshots; this takes
    the one at the start of each interval)."""
    import bisect

    total = ck["medium_step"]
    actors = {int(k): _actor_from(ck, v, device) for k, v in ck["snapshots"].items()}
    steps = sorted(actors)

    def policy_at(t: int) -> Actor | None:
        s = t * total // transitions  # the training step this transition stands for
        if s < ck["learning_starts"]:
            return None
        return actors[steps[max(0, bisect.bisect_right(steps, s) - 1)]]  # the last snapshot at or before s

    return policy_at


def mamujoco_dataset(task: str, quality: str, seed: int = 0, transitions: int | None = None, n_envs: int = 10,
                     progress: bool = True):
    """A MaMuJoCo ``OfflineDataset`` (``obs_mode: omiga``) made from the shipped behaviour policies.

    ``expert``: the converged policy, ``medium``: the early-stopped one (both
    sampling their stochastic actions), ``medium-replay``: the training run's
    sequence of policies from uniform noise up to medium (``_replay_schedule``),
    ``medium-expert``: ``transitions // 2`` steps of medium then of expert, each
    generated exactly as the standalone datasets with the same seed. Deterministic
    given ``seed`` (and the versions of mujoco / gymnasium)."""
    import gymnasium
    import mujoco

    if quality not in MAMUJOCO_QUALITIES:
        raise BehaviourError(f"no MaMuJoCo recipe {quality!r}; choose one of {', '.join(MAMUJOCO_QUALITIES)}")
    gym_id, gym_kwargs, n_agents = _task(task)
    used: dict[str, str] = {}
    if quality == "medium-replay":
        path = shipped_path(task, "replay")
        ck = load_checkpoint(path)
        used["replay"] = _sha256(path)
        transitions = int(transitions or ck["medium_step"])
        eps = _rollout(task, _replay_schedule(ck, transitions), transitions, seed, n_envs,
                       desc=f"{task} {quality}", progress=progress)
    else:
        total = int(transitions or DEFAULT_TRANSITIONS[quality])
        parts = [("medium", total // 2), ("expert", total - total // 2)] if quality == "medium-expert" else [(quality, total)]
        eps = []
        for level, size in parts:
            path = shipped_path(task, level)
            ck = load_checkpoint(path)
            used[level] = _sha256(path)
            actor = _actor_from(ck, ck["actor"])
            eps += _rollout(task, lambda t: actor, size, seed, n_envs, desc=f"{task} {level}", progress=progress)
        transitions = total
    cmd = f"python -m common.behaviour generate --task {task} --quality {quality} --seed {seed} --transitions {transitions}"
    meta = dict(env="mamujoco", task=task, quality=quality, source="generated", env_options={"obs_mode": "omiga"},
                reward="team reward = the reward of the single-agent gymnasium robot",
                provenance=dict(command=cmd, generator="common.behaviour.generate_mamujoco", seed=seed,
                                behaviour_checkpoints_sha256=used, simulator=f"{gym_id} {gym_kwargs}",
                                gymnasium=gymnasium.__version__, mujoco=mujoco.__version__))
    return single_agent_episodes_to_dataset(task, eps, meta)


def generate_mamujoco(task: str, quality: str, out: str | os.PathLike, seed: int = 0,
                      transitions: int | None = None, n_envs: int = 10, progress: bool = True) -> Path:
    """``mamujoco_dataset(...)`` saved at ``out`` (native format); returns ``out``."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return mamujoco_dataset(task, quality, seed, transitions, n_envs, progress).save(out)


def buffer_to_dataset(run_dir: str | os.PathLike, task: str, up_to: int):
    """The *recorded* replay buffer of a training run, steps ``[0, up_to)``, as an
    ``OfflineDataset`` (needs the local run directory; the shipped medium-replay
    recipe regenerates an equivalent one without it). The episode running at
    ``up_to`` is cut as a time-out."""
    buf = Path(run_dir) / "buffer"
    a = {k: np.load(buf / f"{k}.npy", mmap_mode="r")[:up_to] for k in Buffer.FIELDS}
    ends = np.flatnonzero(a["end"] > 0) + 1
    bounds = np.concatenate([[0], ends[ends < up_to], [up_to]]) if up_to not in ends else np.concatenate([[0], ends])
    eps = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        eps.append(dict(raw=np.concatenate([a["obs"][s:e], a["next_obs"][e - 1:e]]), actions=np.asarray(a["act"][s:e]),
                        reward=np.asarray(a["rew"][s:e]), terminated=bool(a["term"][e - 1] > 0)))
    meta = dict(env="mamujoco", task=task, quality="medium-replay", source="recorded replay buffer",
                env_options={"obs_mode": "omiga"}, provenance=dict(run_dir=str(run_dir), up_to=up_to))
    return single_agent_episodes_to_dataset(task, eps, meta)


# ================================================================= shipping
def _eval(task: str, actor: Actor, episodes: int, seed: int) -> dict[str, float]:
    sto = rollout_returns(task, actor, episodes, seed)
    det = rollout_returns(task, actor, episodes, seed, deterministic=True)
    return dict(return_mean=float(sto.mean()), return_std=float(sto.std()),
                deterministic_return_mean=float(det.mean()), deterministic_return_std=float(det.std()), episodes=episodes)


def ship(task: str = "Hopper-3x1", seed: int = 0, run_dir: str = "", medium_fraction: float = 0.4,
         expert_candidates: int = 3, select_episodes: int = 10, episodes: int = 100, replay_dtype: str = "float16") -> None:
    """Choose the expert and medium policies of a finished training run, measure them
    over ``episodes`` episodes and write ``common/assets/mamujoco/<task>/{expert,medium,replay}.pt``
    and the task's entry of ``common/assets/mamujoco/behaviour.json``.

    expert: of the last ``expert_candidates`` snapshots, the best by a
    ``select_episodes``-episode evaluation of the stochastic policy. medium: the
    snapshot whose ``select_episodes``-episode return is closest to
    ``medium_fraction`` x expert's (snapshots are screened by their training-time
    evaluation first). replay: every snapshot before medium, stored in
    ``replay_dtype``, for the medium-replay recipe. Selection and the final
    measurement use disjoint environment seeds."""
    torch.set_num_threads(1)
    run = Path(run_dir) if run_dir else default_run_dir(task, seed)
    cfg = json.loads((run / "config.json").read_text())
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    snaps = {int(p.stem.split("_")[1]): p for p in sorted((run / "snapshots").glob("actor_*.pt"))}
    gym_id, gym_kwargs, n_agents = _task(task)
    env = make_gym_env(task)
    head = dict(format=CKPT_FORMAT, task=task, gym_id=gym_id, gym_kwargs=gym_kwargs, n_agents=n_agents,
                obs_dim=env.observation_space.shape[0], act_dim=env.action_space.shape[0], hidden=cfg["hidden"])
    env.close()

    def actor_of(step: int) -> Actor:
        return _actor_from(head, torch.load(snaps[step], weights_only=True)["actor"])

    sel_seed, meas_seed = 100_000, 200_000
    cands = sorted(snaps)[-expert_candidates:]
    scores = {s: float(rollout_returns(task, actor_of(s), select_episodes, sel_seed).mean()) for s in cands}
    expert_step = max(cands, key=lambda s: scores[s])
    expert_sel = scores[expert_step]
    target = medium_fraction * expert_sel
    logged = {r["step"]: r["eval_return"] for r in log}
    screen = [s for s in sorted(snaps) if s > cfg["learning_starts"] and 0.2 * expert_sel <= logged.get(s, -1e9) <= 0.7 * expert_sel]
    mscores = {s: float(rollout_returns(task, actor_of(s), select_episodes, sel_seed).mean()) for s in screen}
    if not mscores:
        raise BehaviourError(f"no snapshot of {run} has a return between 0.2 and 0.7 x expert ({expert_sel:.0f})")
    medium_step = min(mscores, key=lambda s: (abs(mscores[s] - target), s))
    out = ASSETS / task
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = dict(gym_id=gym_id, gym_kwargs=gym_kwargs, algorithm="SAC (arXiv:1812.05905), automatic temperature",
                                  train_config=cfg, train_command=f"python -m common.behaviour train --task {task} "
                                  f"--seed {seed} --total-steps {cfg['total_steps']}",
                                  ship_command=f"python -m common.behaviour ship --task {task} --seed {seed}",
                                  trained_steps=max(snaps), train_wall_s=log[-1]["wall_s"],
                                  curve=[(r["step"], round(r["eval_return"], 1)) for r in log])
    for level, step, sel in (("expert", expert_step, expert_sel), ("medium", medium_step, mscores[medium_step])):
        actor = actor_of(step)
        meas = _eval(task, actor, episodes, meas_seed)
        _atomic_save(dict(head, actor=actor.state_dict(), step=step, measured=meas), out / f"{level}.pt")
        record[level] = dict(step=step, selection_return=round(sel, 1), **{k: round(v, 1) if isinstance(v, float) else v
                                                                          for k, v in meas.items()})
        print(f"{task} {level}: step {step}, return {meas['return_mean']:.1f} +- {meas['return_std']:.1f} "
              f"over {episodes} episodes (deterministic {meas['deterministic_return_mean']:.1f})")
    dtype = getattr(torch, replay_dtype)
    replay = {str(s): {k: v.to(dtype) for k, v in torch.load(snaps[s], weights_only=True)["actor"].items()}
              for s in sorted(snaps) if cfg["learning_starts"] <= s < medium_step}
    _atomic_save(dict(head, snapshots=replay, medium_step=medium_step, learning_starts=cfg["learning_starts"],
                      snapshot_every=cfg["snapshot_every"]), out / "replay.pt")
    record["replay"] = dict(snapshots=len(replay), dtype=replay_dtype, medium_step=medium_step)
    rec_path = ASSETS / "behaviour.json"
    allrec = json.loads(rec_path.read_text()) if rec_path.exists() else {}
    allrec[task] = record
    rec_path.write_text(json.dumps(allrec, indent=1) + "\n")


# ======================================================================== CLI
def generate(task: str = "Hopper-3x1", quality: str = "medium", seed: int = 0, transitions: int = 0,
             out: str = "", n_envs: int = 10) -> Path:
    """Generate one MaMuJoCo dataset (see ``generate_mamujoco``); ``transitions=0`` takes the
    recipe's default size; ``out`` defaults to ``$OFFLINE_MARL_DATA/mamujoco/<task>/<quality>``."""
    from common.data import OfflineDataset, data_dir

    path = Path(out) if out else data_dir() / "mamujoco" / task / quality
    t0 = time.time()
    generate_mamujoco(task, quality, path, seed=seed, transitions=transitions or None, n_envs=n_envs)
    ds = OfflineDataset.load(path)
    ret = ds.episode_returns()
    print(f"{ds!r}: return {ret.mean():.1f} +- {ret.std():.1f} (min {ret.min():.1f}, max {ret.max():.1f}), "
          f"{time.time() - t0:.0f} s")
    return path


def main() -> None:
    import tyro

    from common import friendly_errors

    with friendly_errors():
        cmd = tyro.extras.subcommand_cli_from_dict(dict(
            train=tyro.conf.OmitArgPrefixes[TrainConfig],
            ship=ship,
            generate=generate,
        ))
        if isinstance(cmd, TrainConfig):
            print(train(cmd))
        elif cmd is not None:
            print(cmd)


if __name__ == "__main__":
    main()
