"""A learning-run dataset: train MAPPO (or IPPO) online and record trajectories spread
over the run, as ComaDICE made its SMACv2 data ("MAPPO for 10 million training steps,
collecting 1,000 trajectories"). Docs: docs/datasets.md ("Learning runs").

    python -m common.collect learn --env lbf --task 8x8-2p-2f            # -> the cache, quality medium-replay
    python -m common.collect learn --env smacv2 --task protoss_5_vs_5 --quality mix

MAPPO: Yu et al. 2022, "The Surprising Effectiveness of PPO in Cooperative Multi-Agent
Games" (arXiv:2103.01955). One actor shared by all agents (observation + one-hot agent
id), actions drawn from the softmax over the *available* actions only; a centralised
critic ``V(s, id)`` on the global state (``--critic obs`` gives IPPO's ``V(o_i, id)``);
the team reward; GAE (Schulman et al. 2016, eq. 16); PPO's objective (Schulman et al.
2017, eq. 9: the clipped surrogate of eq. 7, a value loss and an entropy bonus), with the
two implementation choices MAPPO's paper recommends for the critic: value targets
normalised by running statistics ("value normalisation") and the value change clipped
like the ratio ("value clipping"). Inputs are standardised by running statistics. A
time-limit cut bootstraps from the value of the state where it was cut; a true end does
not. Differences from MAPPO's reference code (docs/datasets.md): no recurrent network,
a squared value error instead of a Huber loss, and the exact running mean and variance
of all targets instead of an exponentially weighted one.

What is recorded: ``record`` episodes, one starting at or after each of ``record``
evenly spaced environment steps of the run (step ``k * total_steps / record``), acted by
the policy being trained at that time, exactly as the learner saw them. Episodes still
running when the budget is spent finish with the last policy (no more updates).

The run lives in ``run_dir`` (default ``$OFFLINE_MARL_DATA/learn/<env>/<task>/<quality>-seed<s>``):
``checkpoint.pt`` (networks, optimiser, normalisers, counters, random generators;
written every ``checkpoint_every`` seconds at an update boundary), ``episodes/`` (each
recorded episode as an ``.npz``, written when it ends) and ``log.jsonl`` (one line per
update). Running the same command again resumes from the checkpoint: the checkpoint keeps,
for every environment, the seed of its running episode and the actions taken in it since,
and the resumed run replays them, so every environment is back where it was and the run
goes on as if it had not stopped (the same data and weights to the bit as an uninterrupted
run). An environment that does not replay to the same observations (one that draws random
numbers the reset seed does not fix) is started afresh instead, with a warning, and its cut
episodes are recorded later ones.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from common import OfflineMarlError
from common.data import data_dir
from common.envs import _Envs, make_env

CKPT_FORMAT = "offline-marl-mappo/1"
# default budgets (environment steps) when --total-steps is 0: ComaDICE's 10M for StarCraft;
# Level-Based Foraging tasks are learnt by then with room to spare (docs/datasets.md)
DEFAULT_STEPS = {"smacv1": 10_000_000, "smacv2": 10_000_000, "lbf": 1_000_000}
FALLBACK_STEPS = 1_000_000


@dataclass
class LearnConfig:
    """Train MAPPO/IPPO online and record a dataset of trajectories spread over the run."""

    env: str
    """environment family (any discrete one that make_env supports)"""
    task: str
    """task name"""
    quality: str = "medium-replay"
    """quality name recorded in meta.json (and the cache folder of the default --out)"""
    out: str = ""
    """dataset directory (default: the cache, $OFFLINE_MARL_DATA/<env>/<task>/<quality>)"""
    overwrite: bool = False
    """replace the dataset already at --out (only a dataset of this project is ever replaced)"""
    run_dir: str = ""
    """where checkpoints and recorded episodes live (default: $OFFLINE_MARL_DATA/learn/<env>/<task>/<quality>-seed<seed>)"""
    env_options: tuple[str, ...] = ()
    """make_env options as KEY=VALUE, e.g. episode_limit=50"""
    seed: int = 0
    """random seed: environment resets, action sampling, network initialisation"""
    total_steps: int = 0
    """environment steps to train for (each step moves every agent); 0: the family's default (10M for StarCraft, 1M for lbf)"""
    record: int = 1000
    """trajectories to record, spread evenly over the run"""
    critic: str = "state"
    """state: MAPPO's centralised V(s, agent id); obs: IPPO's V(o_i, agent id)"""
    n_envs: int = 8
    """environments stepped side by side (one batched forward pass per step)"""
    workers: bool = False
    """step each environment in its own process (for simulators such as StarCraft II)"""
    rollout: int = 64
    """steps per environment between updates"""
    epochs: int = 4
    """passes over each rollout"""
    minibatches: int = 4
    """minibatches per pass"""
    lr: float = 5e-4
    """Adam learning rate (actor and critic)"""
    gamma: float = 0.99
    """discount"""
    gae_lambda: float = 0.95
    """GAE lambda"""
    clip: float = 0.2
    """PPO ratio clip (also clips the value change)"""
    entropy: float = 0.01
    """entropy bonus coefficient"""
    max_grad_norm: float = 10.0
    """gradient norm clip"""
    hidden: int = 64
    """hidden units of both networks' two layers"""
    checkpoint_every: float = 60.0
    """seconds between checkpoints"""
    device: str = "cpu"
    """torch device: cpu, cuda, auto"""
    progress: bool = True
    """show a progress bar"""


def default_run_dir(cfg: LearnConfig) -> Path:
    return data_dir() / "learn" / cfg.env / cfg.task / f"{cfg.quality}-seed{cfg.seed}"


def budget(cfg: LearnConfig) -> int:
    return int(cfg.total_steps) or DEFAULT_STEPS.get(cfg.env, FALLBACK_STEPS)


# ================================================================== networks
class RunningNorm(nn.Module):
    """Running mean and variance of a stream of vectors (parallel Welford); ``forward``
    standardises, ``denorm`` undoes it."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim, dtype=torch.float64))
        self.register_buffer("var", torch.ones(dim, dtype=torch.float64))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.mean.shape[0]).double()
        n, m, v = x.shape[0], x.mean(0), x.var(0, unbiased=False)
        total = self.count + n
        delta = m - self.mean
        self.var.copy_((self.var * self.count + v * n + delta ** 2 * self.count * n / total) / total)
        self.mean.add_(delta * n / total)
        self.count.copy_(total)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ((x - self.mean) / (self.var.sqrt() + 1e-8)).clamp(-10, 10).to(x.dtype)

    def denorm(self, x: torch.Tensor) -> torch.Tensor:
        return (x * (self.var.sqrt() + 1e-8) + self.mean).to(x.dtype)


def _mlp(inp: int, hidden: int, out: int, gain: float) -> nn.Sequential:
    net = nn.Sequential(nn.Linear(inp, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, out))
    for layer, g in zip(net[::2], (2 ** 0.5, 2 ** 0.5, gain)):
        nn.init.orthogonal_(layer.weight, g)
        nn.init.zeros_(layer.bias)
    return net


class ActorCritic(nn.Module):
    """The shared actor ``pi(a | o_i, i)`` and the critic ``V(s, i)`` (MAPPO) or
    ``V(o_i, i)`` (IPPO); all agents in one batched forward pass."""

    def __init__(self, n_agents: int, obs_dim: int, state_dim: int, n_actions: int, hidden: int, critic: str):
        super().__init__()
        self.n_agents, self.critic_input = n_agents, critic
        self.obs_norm, self.state_norm = RunningNorm(obs_dim), RunningNorm(state_dim)
        self.value_norm = RunningNorm(1)
        self.actor = _mlp(obs_dim + n_agents, hidden, n_actions, 0.01)
        self.critic = _mlp((state_dim if critic == "state" else obs_dim) + n_agents, hidden, 1, 1.0)
        self.register_buffer("eye", torch.eye(n_agents))

    def _with_id(self, x: torch.Tensor) -> torch.Tensor:  # x [..., N, d] -> [..., N, d + N]
        return torch.cat([x, self.eye.expand(*x.shape[:-1], self.n_agents)], -1)

    def dist(self, obs: torch.Tensor, avail: torch.Tensor) -> torch.distributions.Categorical:
        logits = self.actor(self._with_id(self.obs_norm(obs)))
        return torch.distributions.Categorical(logits=logits.masked_fill(~avail, -1e10))

    def value(self, obs: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """Normalised values ``[..., N]``."""
        if self.critic_input == "state":
            x = self.state_norm(state).unsqueeze(-2).expand(*obs.shape[:-1], state.shape[-1])
        else:
            x = self.obs_norm(obs)
        return self.critic(self._with_id(x)).squeeze(-1)


def ppo_losses(model: ActorCritic, b: dict[str, torch.Tensor], cfg: LearnConfig) -> dict[str, torch.Tensor]:
    """PPO's objective (Schulman et al. 2017, eq. 9, as a loss to minimise): the clipped
    surrogate of eq. 7 on the normalised advantages, the clipped squared value error on
    normalised targets (MAPPO's value clipping), minus ``entropy`` times the entropy of the
    masked policy; every term averaged over agents and samples."""
    dist = model.dist(b["obs"], b["avail"])
    logp = dist.log_prob(b["actions"])
    ratio = (logp - b["logp"]).exp()
    adv = b["adv"]
    policy = -torch.min(ratio * adv, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * adv).mean()
    v = model.value(b["obs"], b["state"])
    v_clipped = b["value_n"] + (v - b["value_n"]).clamp(-cfg.clip, cfg.clip)
    value = 0.5 * torch.max((v - b["target_n"]) ** 2, (v_clipped - b["target_n"]) ** 2).mean()
    entropy = dist.entropy().mean()
    return dict(policy=policy, value=value, entropy=entropy, loss=policy + value - cfg.entropy * entropy,
                approx_kl=((ratio - 1) - (logp - b["logp"])).mean().detach())


def gae(reward: torch.Tensor, value: torch.Tensor, done: torch.Tensor, next_value: torch.Tensor, gamma: float,
        lam: float) -> torch.Tensor:
    """Generalised advantage estimates (Schulman et al. 2016, eq. 16) ``[T, E, N]``. ``reward [T, E, N]`` (the team
    reward of each agent) already holds ``gamma * V(final state)`` on time-limit cuts;
    ``done [T, E]`` marks every end (nothing is carried across it); ``value [T, E, N]``;
    ``next_value [E, N]``."""
    adv = torch.zeros_like(value)
    last = torch.zeros_like(next_value)
    for t in reversed(range(reward.shape[0])):
        nv = next_value if t == reward.shape[0] - 1 else value[t + 1]
        keep = (1.0 - done[t]).unsqueeze(-1)
        delta = reward[t] + gamma * nv * keep - value[t]
        last = delta + gamma * lam * keep * last
        adv[t] = last
    return adv


# ================================================================== the run
def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _load(path: str | os.PathLike, device: Any = "cpu") -> Any:
    """A weights-only ``torch.load``: a crafted file is refused in one sentence and runs no code."""
    import pickle

    try:
        return torch.load(Path(path).expanduser(), map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        raise OfflineMarlError(f"{path} is not a checkpoint of common.mappo: it holds Python objects that a "
                               "safe (weights-only) load refuses, and this project never unpickles them") from None
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise OfflineMarlError(f"cannot read {path}: {type(e).__name__}: {str(e)[:160]}") from None


def is_checkpoint(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a checkpoint of this module."""
    try:
        return torch.load(Path(path).expanduser(), map_location="cpu", weights_only=True).get("format") == CKPT_FORMAT
    except Exception:
        return False


def load_policy(checkpoint: str | os.PathLike, device: str = "cpu", deterministic: bool = False):
    """``act_fn(obs [E, N, o], state, avail [E, N, K]) -> actions [E, N]`` of a MAPPO
    checkpoint (sampling from the policy unless ``deterministic``)."""
    ck = _load(checkpoint, device)
    if not isinstance(ck, dict) or ck.get("format") != CKPT_FORMAT:
        raise OfflineMarlError(f"{checkpoint} is not a checkpoint of common.mappo")
    model = ActorCritic(*ck["dims"], ck["config"]["hidden"], ck["config"]["critic"]).to(device)
    model.load_state_dict(ck["model"])

    @torch.no_grad()
    def act_fn(obs, state=None, avail=None):
        o = torch.as_tensor(np.asarray(obs), dtype=torch.float32, device=device)
        av = torch.as_tensor(np.asarray(avail), dtype=torch.bool, device=device)
        d = model.dist(o, av)
        return d.probs.argmax(-1) if deterministic else d.sample()

    return act_fn


def learn(cfg: LearnConfig, command: str | None = None):
    """Train and record; returns the ``OfflineDataset`` of the recorded episodes (not
    saved: ``main`` saves it at ``--out``).

    Runs on one intra-op thread, whatever the caller set: the thread count changes the order
    of torch's floating-point sums, and over a learning run that changes the policy and so the
    data (test_a_learning_run_does_not_depend_on_the_callers_thread_count). With one thread the
    data depends on the seed alone; the small networks here lose little or nothing by it (the
    environments are the cost: docs/datasets.md, learning runs)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _learn(cfg, command)
    finally:
        torch.set_num_threads(previous)


def _learn(cfg: LearnConfig, command: str | None):
    from tqdm.auto import tqdm

    from common.collect import episodes_to_dataset, parse_env_options
    from common.runs import resolve_device

    if cfg.critic not in ("state", "obs"):
        raise OfflineMarlError(f"--critic must be state (MAPPO) or obs (IPPO), got {cfg.critic!r}")
    if cfg.record < 1 or cfg.n_envs < 1 or cfg.rollout < 1 or cfg.minibatches < 1:
        raise OfflineMarlError("--record, --n-envs, --rollout and --minibatches must be at least 1")
    device = resolve_device(cfg.device)
    env = make_env(cfg.env, cfg.task, **parse_env_options(cfg.env_options))
    if not env.discrete:
        raise OfflineMarlError(f"{cfg.env}/{cfg.task} has continuous actions; the learning-run recipe is for "
                               "discrete ones (MaMuJoCo's behaviour policies are in common.behaviour)")
    total = budget(cfg)
    run_dir = Path(cfg.run_dir).expanduser() if cfg.run_dir else default_run_dir(cfg)
    (run_dir / "episodes").mkdir(parents=True, exist_ok=True)
    E, N, K = cfg.n_envs, env.n_agents, env.n_actions
    dims = (N, env.obs_dim, env.state_dim, K)
    torch.manual_seed(cfg.seed)
    model = ActorCritic(*dims, cfg.hidden, cfg.critic).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, eps=1e-5)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    interval = total / cfg.record
    state = dict(step=0, updates=0, episodes_started=0, marks=0, recorded=0, owed=0, curve=[])
    ckpt = run_dir / "checkpoint.pt"
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}
    config["env_options"] = list(cfg.env_options)
    saved = None  # the running episodes at the checkpoint, to replay
    if ckpt.is_file():
        ck = _load(ckpt, device)
        same = {k: ck["config"].get(k) for k in ("env", "task", "seed", "critic", "record", "hidden")}
        if ck.get("format") != CKPT_FORMAT or same != {k: config[k] for k in same} or ck["total"] != total:
            raise OfflineMarlError(f"{run_dir} holds a different learning run ({same}, {ck['total']} steps); "
                                   "pass another --run-dir or delete that folder")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        gen.set_state(ck["gen"])
        state = ck["state"]
        if "episodes" in ck and len(ck["episodes"]["seed"]) == cfg.n_envs:
            saved = ck
    reset_base = int(np.random.default_rng([cfg.seed, 11]).integers(0, 2**30))
    envs = _Envs(env, E, cfg.workers)

    obs = np.zeros((E, N, env.obs_dim), np.float32)
    st = np.zeros((E, env.state_dim), np.float32)
    avail = np.ones((E, N, K), bool)
    ep_ret = np.zeros(E)
    recording: list[dict[str, list] | None] = [None] * E
    recent: deque[float] = deque(maxlen=100)
    ep_seed = [0] * E  # the reset seed of each environment's running episode
    ep_actions: list[list[np.ndarray]] = [[] for _ in range(E)]  # and the actions taken in it so far

    def save_checkpoint(running: int, final: bool = False) -> None:
        extra = {}
        if not final:  # what replays the running episodes on resume (restore below)
            extra = dict(recent=list(recent), episodes=dict(
                seed=list(ep_seed), recording=[r is not None for r in recording], obs=torch.as_tensor(obs),
                actions=[torch.as_tensor(np.asarray(a, np.int64).reshape(len(a), N)) for a in ep_actions]))
        _atomic_save(dict(format=CKPT_FORMAT, config=config, dims=list(dims), total=total, model=model.state_dict(),
                          opt=opt.state_dict(), gen=gen.get_state(), state={**state, "running": running}, **extra), ckpt)

    def owed() -> int:  # recorded episodes still to start
        return cfg.record - state["marks"] + state["owed"]

    def start(ids: list[int], after_budget: bool = False) -> None:
        """Reset these environments; record an episode when a mark is due (or owed)."""
        todo = {}
        for i in ids:
            todo[i] = reset_base + state["episodes_started"]
            state["episodes_started"] += 1
        for i, (o, s, a) in envs.call("reset", todo).items():
            obs[i], st[i], avail[i] = o, s, a
            ep_ret[i] = 0.0
            recording[i] = None
            ep_seed[i], ep_actions[i] = todo[i], []
            if state["owed"] > 0:
                state["owed"] -= 1
            elif state["marks"] < cfg.record and (after_budget or state["step"] >= state["marks"] * interval):
                state["marks"] += 1
            else:
                continue
            recording[i] = dict(obs=[o.copy()], state=[s.copy()], avail=[a.copy()], actions=[], reward=[])

    def restore(saved: dict[str, Any]) -> bool:
        """Bring the environments back to the checkpoint: reset each with its running episode's
        seed, then take the same actions again (recording them where that episode is recorded).
        False if an environment does not come back to the observations the checkpoint saw."""
        todo = {i: int(seed) for i, seed in enumerate(saved["seed"])}
        for i, (o, s, a) in envs.call("reset", todo).items():
            obs[i], st[i], avail[i] = o, s, a
            ep_ret[i] = 0.0
            recording[i] = dict(obs=[o.copy()], state=[s.copy()], avail=[a.copy()], actions=[], reward=[]) \
                if saved["recording"][i] else None
            ep_seed[i], ep_actions[i] = todo[i], []
        history = [a.cpu().numpy() for a in saved["actions"]]
        for t in range(max(len(h) for h in history)):
            for i, (o, s, a, r, term, trunc, _) in envs.call("step", {i: h[t] for i, h in enumerate(history)
                                                                      if t < len(h)}).items():
                if term or trunc:  # it ran on at the checkpoint
                    return False
                record_step(i, history[i][t], r, o, s, a, term, trunc)
                obs[i], st[i], avail[i] = o, s, a
                ep_ret[i] += r
                ep_actions[i].append(history[i][t])
        return bool(np.array_equal(obs, saved["obs"].cpu().numpy()))

    def act(o: np.ndarray, a: np.ndarray) -> tuple[torch.Tensor, Any]:
        o_t, a_t = torch.as_tensor(o, device=device), torch.as_tensor(a, device=device)
        with torch.no_grad():
            d = model.dist(o_t, a_t)
            if device.type == "cpu":
                act = torch.multinomial(d.probs.reshape(-1, K), 1, generator=gen).reshape(a_t.shape[:-1])
            else:
                act = d.sample()
        return act, d

    def values(o: np.ndarray, s: np.ndarray) -> torch.Tensor:
        with torch.no_grad():
            v = model.value(torch.as_tensor(o, device=device), torch.as_tensor(s, device=device))
            return model.value_norm.denorm(v.unsqueeze(-1)).squeeze(-1)

    def record_step(i: int, action: np.ndarray, r: float, o, s, a, term: bool, trunc: bool) -> None:
        rec = recording[i]
        if rec is None:
            return
        rec["actions"].append(action.copy())
        rec["reward"].append(float(r))
        rec["obs"].append(o.copy())
        rec["state"].append(s.copy())
        rec["avail"].append(a.copy())
        if term or trunc:
            path = run_dir / "episodes" / f"{state['recorded']:06d}.npz"
            np.savez(path, obs=np.stack(rec["obs"]), state=np.stack(rec["state"]), avail=np.stack(rec["avail"]),
                     actions=np.stack(rec["actions"]), reward=np.asarray(rec["reward"], np.float32),
                     terminated=np.asarray(bool(term)), step=np.asarray(state["step"]))
            state["recorded"] += 1
            recording[i] = None

    T = cfg.rollout
    buf = {k: torch.zeros((T, E) + shape, dtype=dt, device=device) for k, shape, dt in (
        ("obs", (N, env.obs_dim), torch.float32), ("state", (env.state_dim,), torch.float32),
        ("avail", (N, K), torch.bool), ("actions", (N,), torch.int64), ("logp", (N,), torch.float32),
        ("value", (N,), torch.float32), ("boot", (N,), torch.float32), ("reward", (), torch.float32),
        ("done", (), torch.float32))}
    last_save, t0, step0 = time.monotonic(), time.monotonic(), state["step"]
    bar = tqdm(total=total, initial=min(state["step"], total), desc=f"learn {cfg.env}/{cfg.task}", unit="step",
               disable=not cfg.progress, dynamic_ncols=True, mininterval=1.0, file=sys.stderr)
    try:
        if saved is not None:
            recent.extend(saved["recent"])
            if not restore(saved["episodes"]):
                print(f"warning: {cfg.env}/{cfg.task} did not replay to the checkpoint's observations (its "
                      "environment is not fixed by the reset seed); the episodes that were running start over",
                      file=sys.stderr)
                state["owed"] += state.get("running", 0)
                start(list(range(E)))
        else:  # a fresh run, or a checkpoint without the running episodes: they start over
            state["owed"] += state.get("running", 0)
            start(list(range(E)))
        state.pop("running", None)
        while state["step"] < total:
            # ------------------------------------------------------------ a rollout
            for t in range(T):
                action, d = act(obs, avail)
                buf["obs"][t], buf["state"][t] = torch.as_tensor(obs), torch.as_tensor(st)
                buf["avail"][t], buf["actions"][t] = torch.as_tensor(avail), action
                buf["logp"][t] = d.log_prob(action)
                buf["value"][t] = values(obs, st)
                acts = action.cpu().numpy()
                reward, done, boot = np.zeros(E, np.float32), np.zeros(E, np.float32), np.zeros((E, N), np.float32)
                ended, cut = [], []
                for i, (o, s, a, r, term, trunc, _) in envs.call("step", {i: acts[i] for i in range(E)}).items():
                    record_step(i, acts[i], r, o, s, a, term, trunc)
                    obs[i], st[i], avail[i] = o, s, a
                    ep_actions[i].append(acts[i])
                    reward[i] = r
                    ep_ret[i] += r
                    if term or trunc:
                        done[i] = 1.0
                        ended.append(i)
                        recent.append(float(ep_ret[i]))
                        if not term:
                            cut.append(i)
                if cut:  # a time-limit cut bootstraps from the value of the state where it was cut
                    boot[cut] = cfg.gamma * values(obs[cut], st[cut]).cpu().numpy()
                buf["reward"][t], buf["done"][t] = torch.as_tensor(reward), torch.as_tensor(done)
                buf["boot"][t] = torch.as_tensor(boot)
                state["step"] += E
                bar.update(E)
                if ended:
                    start(ended)
            # ------------------------------------------------------------ an update
            adv = gae(buf["reward"].unsqueeze(-1) + buf["boot"], buf["value"], buf["done"], values(obs, st),
                      cfg.gamma, cfg.gae_lambda)
            target = adv + buf["value"]
            model.obs_norm.update(buf["obs"])
            model.state_norm.update(buf["state"])
            model.value_norm.update(target.reshape(-1, 1))
            flat = {k: buf[k].reshape((T * E,) + buf[k].shape[2:]) for k in ("obs", "state", "avail", "actions", "logp")}
            flat["adv"] = ((adv - adv.mean()) / (adv.std() + 1e-8)).reshape(T * E, N)
            flat["target_n"] = model.value_norm(target.reshape(-1, 1)).reshape(T * E, N)
            flat["value_n"] = model.value_norm(buf["value"].reshape(-1, 1)).reshape(T * E, N)
            size = T * E // cfg.minibatches
            for _ in range(cfg.epochs):
                perm = torch.randperm(T * E, generator=gen, device=device) if device.type == "cpu" else \
                    torch.randperm(T * E, device=device)
                for k in range(cfg.minibatches):
                    idx = perm[k * size:(k + 1) * size]
                    losses = ppo_losses(model, {key: v[idx] for key, v in flat.items()}, cfg)
                    opt.zero_grad()
                    losses["loss"].backward()
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    opt.step()
            state["updates"] += 1
            ret = float(np.mean(recent)) if recent else float("nan")
            state["curve"].append([int(state["step"]), ret])
            fps = (state["step"] - step0) / max(time.monotonic() - t0, 1e-9)
            with open(run_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(dict(step=int(state["step"]), return_mean_100=ret, steps_per_s=round(fps, 1),
                                        recorded=int(state["recorded"]),
                                        **{k: round(float(v.detach()), 5) for k, v in losses.items() if k != "loss"})) + "\n")
            bar.set_postfix({"return(100)": f"{ret:.3g}", "recorded": state["recorded"]}, refresh=False)
            if time.monotonic() - last_save >= cfg.checkpoint_every:
                save_checkpoint(sum(r is not None for r in recording))
                last_save = time.monotonic()
        # -------------------------------------------- the budget is spent: finish the recordings
        bar.set_description(f"learn {cfg.env}/{cfg.task}: finishing the recorded episodes")
        active = [i for i in range(E) if recording[i] is not None]
        while active or owed() > 0:
            idle = [i for i in range(E) if recording[i] is None][:owed()]
            if idle:
                start(idle, after_budget=True)
            active = [i for i in range(E) if recording[i] is not None]
            if not active:
                continue
            action, _ = act(obs[active], avail[active])
            acts = action.cpu().numpy()
            for j, (i, (o, s, a, r, term, trunc, _)) in enumerate(envs.call("step", {i: acts[k] for k, i in
                                                                                     enumerate(active)}).items()):
                record_step(i, acts[j], r, o, s, a, term, trunc)
                obs[i], st[i], avail[i] = o, s, a
            active = [i for i in range(E) if recording[i] is not None]
    finally:
        bar.close()
        envs.close(keep_first=False)
    save_checkpoint(0, final=True)
    episodes = []
    for k in range(cfg.record):
        with np.load(run_dir / "episodes" / f"{k:06d}.npz", allow_pickle=False) as z:
            episodes.append(dict(obs=z["obs"], state=z["state"], avail=z["avail"], actions=z["actions"],
                                 reward=z["reward"], terminated=bool(z["terminated"]), step=int(z["step"])))
    returns = np.array([float(ep["reward"].sum()) for ep in episodes])
    thirds = [float(x.mean()) for x in np.array_split(returns, 3)]
    env.spec["options"] = parse_env_options(cfg.env_options)
    return episodes_to_dataset(env, episodes, cfg.quality, dict(
        policy=f"{'MAPPO' if cfg.critic == 'state' else 'IPPO'} learning run (common.mappo), {total} environment "
               f"steps, {cfg.record} episodes spread evenly over it",
        command=command, seed=int(cfg.seed), total_steps=int(total), run_dir=str(run_dir),
        return_by_third=thirds, recorded_at_step=[int(ep["step"]) for ep in episodes],
        config=config))


def main(cfg: LearnConfig, argv: list[str] | None = None) -> Path:
    """``python -m common.collect learn ...``: train, record, save the dataset at ``--out``."""
    from common.data import check_destination

    command = "python -m common.collect learn " + shlex.join(argv or [])
    out = Path(cfg.out).expanduser() if cfg.out else data_dir() / cfg.env / cfg.task / cfg.quality
    check_destination(out, cfg.overwrite)  # before hours of training, not after
    ds = learn(cfg, command)
    return ds.save(out, overwrite=cfg.overwrite)
