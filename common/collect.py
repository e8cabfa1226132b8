"""Generate native datasets locally: ``python -m common.collect SUBCOMMAND ...``.

Subcommands::

    recipe   a named dataset (env, task, quality) from ``RECIPES``, e.g. the
             Penalty-XOR datasets a-d and Bridge optimal / mix of AlberDICE
             (docs/datasets.md#the-original-alberdice-datasets), regenerated from their rules
    random   uniform-random episodes in any environment ``make_env`` supports
    policy   rollouts of a saved policy, with optional action noise: an algorithm
             checkpoint with ``--algo FILE.py`` (whose ``load_policy(checkpoint,
             device)`` builds the policy), or a behaviour-policy checkpoint of
             ``common.behaviour``
    list     the recipes

Examples::

    python -m common.collect recipe --env bridge --task hard --quality mix --out data/bridge_mix
    python -m common.collect random --env matrix --task xor --episodes 100 --env-options episode_limit=50 --out data/xor_random
    python -m common.collect policy --env bridge --task hard --algo alberdice.py \\
        --checkpoint runs/.../checkpoints/latest.pt --noise 0.1 --episodes 500 --out data/bridge_noisy

Every dataset is deterministic given ``--seed`` (and ``--n-envs``, the number of
environments rolled out side by side: the policy acts on all of them in one
batched call). ``meta.json`` records ``source: "generated"``, the ``quality``, the
``env_options`` the episodes were recorded with (``make_env_for(meta)`` rebuilds
that environment), and ``provenance``: the command, the seed and what generated
the data. Episodes cut by the time limit are stored as ``timeout`` (targets
bootstrap), true ends as ``terminal``.

``has_recipe(env, task, quality)`` and ``generate(env, task, quality, out, seed)``
are what ``common.catalog`` calls to make a dataset that cannot be downloaded.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from common import OfflineMarlError, friendly_errors
from common.data import DatasetError, OfflineDataset, check_destination
from common.envs import BRIDGE_GOALS, BRIDGE_MOVES, MultiAgentEnv, make_env


def _rng(seed: int, stream: str) -> np.random.Generator:
    """An independent random stream per purpose, stable across runs and machines."""
    return np.random.default_rng([int(seed), zlib.crc32(stream.encode())])


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


# ================================================================== policies
# A policy is ``act_fn(obs [E, N, o], state [E, S], avail [E, N, K]) -> actions``
# ([E, N] integers or [E, N, act_dim] floats in [-1, 1]); a stateful one also has
# ``reset(mask [E])``, called for the environments that start a new episode.
def uniform_available(avail: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One action per agent drawn uniformly from its available ones: ``avail
    [E, N, K]`` bool -> ``[E, N]`` int64."""
    score = rng.random(avail.shape)
    score[~avail] = -1.0
    return score.argmax(-1).astype(np.int64)


class UniformPolicy:
    """Each agent independently uniform over its available actions (discrete), or
    uniform in [-1, 1] per action dimension (continuous)."""

    def __init__(self, env: MultiAgentEnv, rng: np.random.Generator):
        self.discrete, self.act_dim, self.rng = env.discrete, env.act_dim, rng

    def __call__(self, obs, state, avail):
        if self.discrete:
            return uniform_available(np.asarray(avail, dtype=bool), self.rng)
        return self.rng.uniform(-1.0, 1.0, size=obs.shape[:2] + (self.act_dim,)).astype(np.float32)


class JointSupportPolicy:
    """Every step, the joint action is drawn uniformly from ``support`` (a list of
    joint actions): the agents are correlated through the joint draw and the steps
    are independent. This is how the Penalty-XOR datasets were made
    (docs/datasets.md#the-original-alberdice-datasets)."""

    def __init__(self, support: Sequence[Sequence[int]], rng: np.random.Generator):
        self.support, self.rng = np.asarray(support, dtype=np.int64), rng

    def __call__(self, obs, state, avail):
        return self.support[self.rng.integers(len(self.support), size=obs.shape[0])]


class NoisyPolicy:
    """``act_fn`` with exploration noise: Gaussian ``noise`` (the standard deviation)
    added to continuous actions and clipped to [-1, 1]; for discrete actions, each
    agent's action is replaced with probability ``noise`` by a uniformly drawn
    available one (epsilon-uniform)."""

    def __init__(self, act_fn: Callable[..., Any], noise: float, discrete: bool, rng: np.random.Generator):
        if noise < 0 or (discrete and noise > 1):
            raise OfflineMarlError(f"--noise must be in [0, 1] for discrete actions (epsilon) and >= 0 for continuous "
                                   f"ones (Gaussian sigma), got {noise}")
        self.act_fn, self.noise, self.discrete, self.rng = act_fn, float(noise), discrete, rng
        if hasattr(act_fn, "reset"):
            self.reset = act_fn.reset
        if hasattr(act_fn, "observe_reward"):  # return-conditioned policies (as common.envs.evaluate)
            self.observe_reward = act_fn.observe_reward

    def __call__(self, obs, state, avail):
        a = _to_numpy(self.act_fn(obs, state, avail))
        if self.discrete:
            a = (a[..., 0] if a.ndim == 3 and a.shape[-1] == 1 else a).astype(np.int64)
            swap = self.rng.random(a.shape) < self.noise
            return np.where(swap, uniform_available(np.asarray(avail, dtype=bool), self.rng), a)
        return np.clip(a + self.noise * self.rng.standard_normal(a.shape), -1.0, 1.0).astype(np.float32)


# ================================================================== rollouts
def rollout(env: MultiAgentEnv, act_fn: Callable[..., Any], episodes: int, *, seed: int = 0, n_envs: int = 8,
            desc: str = "collect", progress: bool = True) -> list[dict[str, Any]]:
    """Record ``episodes`` episodes of ``act_fn`` in ``env`` (and ``n_envs - 1``
    copies built from ``env.spec``, all stepped side by side; the policy acts on
    all of them in one call). Returns the episodes in the order they started, each
    a dict for ``OfflineDataset.from_episodes``: ``obs [T+1, N, o]``, ``state``,
    ``avail``, ``actions [T, N(, A)]``, ``reward [T]``, ``terminated`` (a true end;
    otherwise the time limit cut it). Episode ``i`` is reset with a seed derived from
    ``seed`` and ``i``, so the result depends only on ``seed`` and ``n_envs``. Stateful
    policies are driven as by ``common.envs.evaluate``: ``reset(mask)`` at episode starts,
    ``observe_reward(reward [n])`` after every step."""
    if episodes < 1:
        raise OfflineMarlError(f"--episodes must be at least 1, got {episodes}")
    n = max(1, min(int(n_envs), int(episodes)))
    envs = [env] + [make_env(env.spec["env"], env.spec["task"], **env.spec["options"]) for _ in range(n - 1)]
    reset_base = int(_rng(seed, "reset").integers(0, 2**31 - 1 - episodes))
    N, K = env.n_agents, env.n_actions if env.discrete else 1
    obs = np.zeros((n, N, env.obs_dim), np.float32)
    state = np.zeros((n, env.state_dim), np.float32)
    avail = np.ones((n, N, K), bool)
    slot = [-1] * n  # the episode each environment is recording, -1 when idle
    bufs: list[dict[str, list]] = [{} for _ in range(n)]
    started = np.zeros(n, bool)
    out: list[dict[str, Any] | None] = [None] * episodes
    next_ep = 0

    def start(i: int) -> None:
        nonlocal next_ep
        if next_ep >= episodes:
            slot[i] = -1
            return
        o, s, a = envs[i].reset(seed=reset_base + next_ep)
        obs[i], state[i], avail[i] = o, s, a
        bufs[i] = dict(obs=[obs[i].copy()], state=[state[i].copy()], avail=[avail[i].copy()], actions=[], reward=[])
        slot[i], started[i] = next_ep, True
        next_ep += 1

    try:
        for i in range(n):
            start(i)
        with tqdm(total=episodes, desc=desc, unit="ep", disable=not progress, dynamic_ncols=True) as bar:
            while any(s >= 0 for s in slot):
                if hasattr(act_fn, "reset") and started.any():
                    act_fn.reset(started.copy())
                started[:] = False
                acts = _check_actions(act_fn(obs, state, avail), env, n)
                rewards = np.zeros(n, np.float32)
                for i in range(n):
                    if slot[i] < 0:
                        continue
                    o, s, a, r, term, trunc, _ = envs[i].step(acts[i])
                    obs[i], state[i], avail[i] = o, s, a
                    rewards[i] = r
                    b = bufs[i]
                    b["actions"].append(acts[i].copy())
                    b["reward"].append(float(r))
                    b["obs"].append(obs[i].copy())
                    b["state"].append(state[i].copy())
                    b["avail"].append(avail[i].copy())
                    if term or trunc:
                        out[slot[i]] = dict(
                            obs=np.stack(b["obs"]), state=np.stack(b["state"]), avail=np.stack(b["avail"]),
                            actions=np.stack(b["actions"]), reward=np.asarray(b["reward"], np.float32),
                            terminated=bool(term))
                        bar.update(1)
                        start(i)
                if hasattr(act_fn, "observe_reward"):
                    act_fn.observe_reward(rewards)
    finally:
        for e in envs[1:]:
            e.close()
    return out  # type: ignore[return-value]


def controlled_reset_seeds(seed: int, stream: str, episodes: int) -> list[int]:
    """The reset seeds of ``rollout_controlled``'s episodes (to replay them)."""
    base = int(_rng(seed, f"{stream}-reset").integers(0, 2**31 - 1 - episodes))
    return [base + i for i in range(episodes)]


def rollout_controlled(env: MultiAgentEnv, episodes: int, *, scripted: bool, seed: int = 0, stream: str = "",
                       noise: float = 0.0, workers: int = 1, desc: str = "collect",
                       progress: bool = True) -> list[dict[str, Any]]:
    """Episodes of a policy that reads its environment's internal state: the scripted
    expert of ``env``'s family (``common.scripted.CONTROLLERS``, when ``scripted``) or
    the uniform policy, with epsilon-uniform action noise ``noise``. Such a policy
    cannot act on batched observations, so parallelism is over episodes instead:
    ``workers`` processes each build the environment (from ``env.spec``) and the
    controller once and play whole episodes. Episode ``i`` has its own reset seed and
    random stream, both derived from ``seed``, ``stream`` and ``i``: the result does
    not depend on ``workers``. Returns the episodes in order, as ``rollout`` does."""
    import functools
    import multiprocessing as mp

    from common.scripted import CONTROLLERS, play_many

    if episodes < 1:
        raise OfflineMarlError(f"--episodes must be at least 1, got {episodes}")
    if scripted and env.spec["env"] not in CONTROLLERS:
        raise OfflineMarlError(f"no scripted expert for {env.spec['env']}; there is one for {', '.join(CONTROLLERS)}")
    tag = zlib.crc32(stream.encode())
    jobs = [(reset, [int(seed), tag, i]) for i, reset in enumerate(controlled_reset_seeds(seed, stream, episodes))]
    workers = max(1, min(int(workers), episodes))
    size = max(1, min(16, episodes // (4 * workers)))
    chunks = [jobs[k:k + size] for k in range(0, episodes, size)]
    run = functools.partial(play_many, env.spec, scripted, noise=noise)
    out: list[dict[str, Any]] = []
    with tqdm(total=episodes, desc=desc, unit="ep", disable=not progress, dynamic_ncols=True) as bar:
        if workers == 1:
            results = map(run, chunks)
            pool = None
        else:
            pool = mp.get_context("spawn").Pool(workers)
            results = pool.imap(run, chunks)
        try:
            for chunk in results:
                out.extend(chunk)
                bar.update(len(chunk))
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
    return out


def _check_actions(acts: Any, env: MultiAgentEnv, n: int) -> np.ndarray:
    a = _to_numpy(acts)
    N = env.n_agents
    if env.discrete:
        if a.shape == (n, N, 1):
            a = a[..., 0]
        if a.shape != (n, N):
            raise OfflineMarlError(f"the policy returned actions of shape {a.shape}; {env.spec['env']}/{env.spec['task']} "
                                   f"needs [{n}, {N}] integers (n_envs x agents)")
        return a.astype(np.int64)
    if a.shape != (n, N, env.act_dim):
        raise OfflineMarlError(f"the policy returned actions of shape {a.shape}; {env.spec['env']}/{env.spec['task']} "
                               f"needs [{n}, {N}, {env.act_dim}] floats")
    return a.astype(np.float32)


def episodes_to_dataset(env: MultiAgentEnv, episodes: list[dict[str, Any]], quality: str,
                        provenance: dict[str, Any]) -> OfflineDataset:
    """The native dataset of recorded episodes, with the meta of a generated dataset."""
    meta = dict(env=env.spec["env"], task=env.spec["task"], quality=quality, discrete=env.discrete,
                source="generated", reward="environment", env_options=dict(env.spec["options"]),
                provenance=dict(provenance))
    meta["n_actions" if env.discrete else "act_dim"] = env.n_actions if env.discrete else env.act_dim
    return OfflineDataset.from_episodes(episodes, meta)


# ============================================================ small-game recipes
# The AlberDICE datasets, regenerated from their rules: docs/datasets.md#the-original-alberdice-datasets.
DATA_EPISODE_LIMIT = 50  # both games' datasets were generated with 50-step episodes

# Penalty-XOR: the joint action of every step i.i.d. uniform over the support; 0 = A, 1 = B.
XOR_SUPPORTS = {
    "a": ((0, 1),),                          # {AB}            original folder buffer_02
    "b": ((0, 1), (1, 0)),                   # {AB, BA}        buffer_02_20
    "c": ((0, 0), (0, 1), (1, 0)),           # {AA, AB, BA}    buffer_00_02_20
    "d": ((0, 0), (0, 1), (1, 0), (1, 1)),   # all four        buffer_random
}
XOR_EPISODES = 100


def xor_dataset(task: str, quality: str, seed: int = 0) -> OfflineDataset:
    """Penalty-XOR / XOR dataset (a)-(d): 100 episodes x 50 steps."""
    env = make_env("matrix", task, episode_limit=DATA_EPISODE_LIMIT)
    policy = JointSupportPolicy(XOR_SUPPORTS[quality], _rng(seed, f"xor-{quality}"))
    eps = rollout(env, policy, XOR_EPISODES, seed=seed, desc=f"matrix/{task}/{quality}")
    return episodes_to_dataset(env, eps, quality, dict(policy=f"joint action uniform over {list(XOR_SUPPORTS[quality])}"))


# Bridge optimal / mix (the routes: same docs section). Routes are written in the frame where agent 0 crosses
# first; when agent 1 crosses first, everything is the point reflection
# (r, c) -> (2 - r, 5 - c) with the agents' roles swapped (the reflection maps each
# agent's start and goal onto the other's).
_BRIDGE_KEEP = ((0, 2, 3), (0, 1, 4))  # actions that keep agent 0 / agent 1 on its goal
_BRIDGE_OPTIMAL_STEPS = 8
BRIDGE_EPISODES = 500


def _move(p: tuple[int, int], q: tuple[int, int]) -> int:
    d = np.subtract(q, p)
    return int(np.flatnonzero((BRIDGE_MOVES == d).all(1))[0])


class BridgeCrossingPolicy:
    """The scripted optimal behaviour of the Bridge ``optimal`` dataset.

    Per episode, with probability 1/2 agent 0 crosses first (first joint action
    Right, Right) and agent 1 retreats; otherwise the mirror image (Left, Left).
    In agent 0's case: agent 0 goes (1,2) -> (1,3) -> (1,4) -> Z -> (2,5); agent 1
    goes (1,3) -> (1,4) -> X -> (1,4) -> (1,3) -> (1,2) -> (1,1) -> Y -> (0,0), with X
    uniform over (1,5), (2,4), (0,4); Z = (2,4) when X = (1,5), Z = (1,5) when X =
    (2,4), and uniform over both when X = (0,4); Y uniform over (0,1), (1,0). An agent
    on its goal records an action drawn uniformly from those that keep it there.
    Every episode takes 8 steps. The plan is drawn at ``reset``; the positions it
    passes through are checked when the dataset is built (every episode must end at
    step 8 with both agents on their goals)."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.plans = np.zeros((0, _BRIDGE_OPTIMAL_STEPS, 2), dtype=np.int64)  # [E, 8, 2], sized at the first reset
        self.t = np.zeros(0, dtype=np.int64)

    def plan(self) -> np.ndarray:
        """One episode's joint actions ``[8, 2]``."""
        rng = self.rng
        agent0_first = bool(rng.integers(2) == 0)
        x = [(1, 5), (2, 4), (0, 4)][rng.integers(3)]
        z = {(1, 5): (2, 4), (2, 4): (1, 5)}.get(x) or [(1, 5), (2, 4)][rng.integers(2)]
        y = [(0, 1), (1, 0)][rng.integers(2)]
        cross = [(1, 2), (1, 3), (1, 4), z, (2, 5)]  # 4 moves, then on its goal
        retreat = [(1, 3), (1, 4), x, (1, 4), (1, 3), (1, 2), (1, 1), y, (0, 0)]  # 8 moves
        crosser = 0 if agent0_first else 1
        if not agent0_first:  # point reflection, roles swapped
            cross = [(2 - r, 5 - c) for r, c in cross]
            retreat = [(2 - r, 5 - c) for r, c in retreat]
        acts = np.zeros((_BRIDGE_OPTIMAL_STEPS, 2), dtype=np.int64)
        acts[:, 1 - crosser] = [_move(p, q) for p, q in zip(retreat[:-1], retreat[1:])]
        n_moves = len(cross) - 1
        acts[:n_moves, crosser] = [_move(p, q) for p, q in zip(cross[:-1], cross[1:])]
        acts[n_moves:, crosser] = rng.choice(_BRIDGE_KEEP[crosser], size=_BRIDGE_OPTIMAL_STEPS - n_moves)
        return acts

    def reset(self, mask: np.ndarray) -> None:
        if len(mask) != len(self.t):
            self.plans = np.zeros((len(mask), _BRIDGE_OPTIMAL_STEPS, 2), dtype=np.int64)
            self.t = np.zeros(len(mask), dtype=np.int64)
        for i in np.flatnonzero(mask):
            self.plans[i] = self.plan()
            self.t[i] = 0

    def __call__(self, obs, state, avail):
        t = np.minimum(self.t, _BRIDGE_OPTIMAL_STEPS - 1)  # idle environments repeat their last action
        a = self.plans[np.arange(len(t)), t]
        self.t += 1
        return a


def bridge_optimal_dataset(seed: int = 0) -> OfflineDataset:
    """Bridge (hard) ``optimal``: 500 episodes of the scripted crossing (docs/datasets.md#the-original-alberdice-datasets)."""
    env = make_env("bridge", "hard", episode_limit=DATA_EPISODE_LIMIT)
    eps = rollout(env, BridgeCrossingPolicy(_rng(seed, "bridge-optimal")), BRIDGE_EPISODES, seed=seed,
                  desc="bridge/hard/optimal")
    for e, ep in enumerate(eps):  # the script's consistency: every episode ends on both goals at step 8
        final = ep["state"][-1]
        if len(ep["reward"]) != _BRIDGE_OPTIMAL_STEPS or not ep["terminated"] or \
                not (final[[0, 1, 4, 5]] == BRIDGE_GOALS.reshape(-1)).all():
            raise RuntimeError(f"scripted Bridge episode {e} did not cross in 8 steps (ended at {final})")
    return episodes_to_dataset(env, eps, "optimal", dict(
        policy="scripted optimal crossing (either agent first, 1/2 each), docs/datasets.md#the-original-alberdice-datasets"))


def bridge_random_dataset(task: str = "hard", seed: int = 0, quality: str = "random") -> OfflineDataset:
    """500 episodes of the uniform random policy with 50-step episodes."""
    env = make_env("bridge", task, episode_limit=DATA_EPISODE_LIMIT)
    eps = rollout(env, UniformPolicy(env, _rng(seed, "bridge-random")), BRIDGE_EPISODES, seed=seed,
                  desc=f"bridge/{task}/random")
    return episodes_to_dataset(env, eps, quality, dict(policy="uniform random over the 5 actions, each agent"))


def bridge_mix_dataset(seed: int = 0) -> OfflineDataset:
    """Bridge (hard) ``mix``: the 500 ``random`` episodes followed by the 500
    ``optimal`` ones of the same seed (array for array equal to those datasets)."""
    rand = bridge_random_dataset("hard", seed, quality="mix")
    opt = bridge_optimal_dataset(seed)
    return OfflineDataset.concatenate([rand, opt], meta=dict(rand.meta, provenance=dict(
        policy="episodes 0-499: uniform random (= quality random); 500-999: scripted optimal (= quality optimal)")))


PUBLISHED_EPISODE_LIMIT = 20  # the published AlberDICE Bridge config's episode limit (envs/bridge.yaml)


def cut_episodes(ds: OfflineDataset, max_steps: int, quality: str) -> OfflineDataset:
    """Every episode cut to its first ``max_steps`` steps, as the published AlberDICE loader reads its
    50-step buffers with the config's episode limit (it keeps ``max_steps + 1`` slots; spec §2, "loader
    caveat"). A cut episode ends by time limit (bootstrap); the meta's episode limit becomes
    ``max_steps``, so an absorbing state after a true end lasts up to ``max_steps`` (as its padding)."""
    es = np.asarray(ds.episode_start)
    episodes = []
    for e in range(ds.n_episodes):
        r0, steps = int(es[e]), int(es[e + 1] - es[e] - 1)  # the episode's last row holds its final observation
        t = min(steps, max_steps)
        rows = slice(r0, r0 + t + 1)
        episodes.append(dict(obs=np.asarray(ds.obs[rows]), state=np.asarray(ds.state[rows]),
                             avail=np.asarray(ds.avail[rows]), actions=np.asarray(ds.actions[r0:r0 + t]),
                             reward=np.asarray(ds.reward[r0:r0 + t]),
                             terminated=steps <= max_steps and bool(ds.terminal[r0 + steps - 1])))
    meta = dict(ds.meta, quality=quality, env_options=dict(ds.meta.get("env_options", {}), episode_limit=max_steps))
    meta["provenance"] = dict(ds.meta.get("provenance", {}), cut=(
        f"every episode cut to its first {max_steps} steps (the published AlberDICE loader with the Bridge "
        f"config's episode limit); cut episodes end by time limit"))
    return OfflineDataset.from_episodes(episodes, meta)


def matrix_random_dataset(task: str, seed: int = 0) -> OfflineDataset:
    """100 episodes x 50 steps, each agent uniform over A, B."""
    env = make_env("matrix", task, episode_limit=DATA_EPISODE_LIMIT)
    eps = rollout(env, UniformPolicy(env, _rng(seed, "matrix-random")), XOR_EPISODES, seed=seed,
                  desc=f"matrix/{task}/random")
    return episodes_to_dataset(env, eps, "random", dict(policy="uniform random over A, B, each agent"))


# OMCDA's games (docs/environments.md): both players uniform, independently.
OMCDA_EPISODES = {"omcda_toy": 10_000, "omcda_relay": 2_000}


def omcda_uniform_dataset(task: str, seed: int = 0) -> OfflineDataset:
    """``omcda_toy`` (10 000 one-step episodes) or ``omcda_relay`` (2 000 episodes of 8 steps),
    each agent uniform over A, B: the data of OMCDA's Sec. 3 toy game and of its multi-step variant."""
    env = make_env("matrix", task)
    eps = rollout(env, UniformPolicy(env, _rng(seed, f"{task}-uniform")), OMCDA_EPISODES[task], seed=seed,
                  desc=f"matrix/{task}/uniform")
    return episodes_to_dataset(env, eps, "uniform", dict(policy="uniform random over A, B, each agent"))


# ================================================================ the recipes
@dataclass(frozen=True)
class Recipe:
    """How to make one named dataset: ``build(seed) -> OfflineDataset`` (its meta
    carries env, task and env_options; ``generate`` adds quality, source and
    provenance) and a one-line description."""

    build: Callable[[int], OfflineDataset]
    about: str


def _partial(fn: Callable[..., OfflineDataset], *args: Any) -> Callable[[int], OfflineDataset]:
    return lambda seed: fn(*args, seed=seed)


RECIPES: dict[tuple[str, str, str], Recipe] = {}
"""(env, task, quality) -> Recipe. Other families add their own block below."""

for _task in ("penalty_xor", "xor"):
    for _q, _support in XOR_SUPPORTS.items():
        RECIPES[("matrix", _task, _q)] = Recipe(
            _partial(xor_dataset, _task, _q),
            f"AlberDICE dataset ({_q}): 100 x 50 steps, joint action uniform over "
            + "{" + ", ".join("AB"[i] + "AB"[j] for i, j in _support) + "}")
    RECIPES[("matrix", _task, "random")] = Recipe(_partial(matrix_random_dataset, _task),
                                                  "100 x 50 steps, each agent uniform")
for _task, _n in OMCDA_EPISODES.items():
    RECIPES[("matrix", _task, "uniform")] = Recipe(
        _partial(omcda_uniform_dataset, _task),
        f"OMCDA {_task.split('_')[1]} game: {_n} episodes, each agent uniform over A, B")
RECIPES[("bridge", "hard", "optimal")] = Recipe(_partial(bridge_optimal_dataset),
                                                "AlberDICE optimal: 500 scripted optimal crossings (8 steps)")
RECIPES[("bridge", "hard", "mix")] = Recipe(_partial(bridge_mix_dataset),
                                            "AlberDICE mix: 500 uniform-random episodes (limit 50) + the 500 optimal")
for _q, _build in (("optimal", bridge_optimal_dataset), ("mix", bridge_mix_dataset)):
    RECIPES[("bridge", "hard", f"{_q}-l20")] = Recipe(
        lambda seed, _build=_build, _q=_q: cut_episodes(_build(seed=seed), PUBLISHED_EPISODE_LIMIT, f"{_q}-l20"),
        f"AlberDICE {_q} as the published code trains on it: every episode cut to its first 20 steps")
for _task in ("hard", "easy"):
    RECIPES[("bridge", _task, "random")] = Recipe(_partial(bridge_random_dataset, _task),
                                                  "500 uniform-random episodes, limit 50")

# ------------------------------------------------- further families' recipes below

# MaMuJoCo (issue 6): OMIGA's four qualities, rolled out from the behaviour policies
# shipped in common/assets/mamujoco (common/behaviour.py; imported only when built).
def _mamujoco(task: str, quality: str) -> Callable[[int], OfflineDataset]:
    def build(seed: int) -> OfflineDataset:
        from common.behaviour import mamujoco_dataset

        return mamujoco_dataset(task, quality, seed=seed)
    return build


for _task in ("Hopper-3x1", "Ant-2x4", "HalfCheetah-6x1"):
    for _q, _about in (("expert", "200k steps of the converged SAC behaviour policy"),
                       ("medium", "200k steps of the early-stopped SAC policy (~0.4 x expert return)"),
                       ("medium-replay", "the SAC training run from uniform noise up to medium, regenerated"),
                       ("medium-expert", "200k steps of medium then 200k of expert")):
        RECIPES[("mamujoco", _task, _q)] = Recipe(_mamujoco(_task, _q), _about)


# Level-Based Foraging and RWARE (issue 19): scripted experts (common/scripted.py), played by
# rollout_controlled; medium = the expert with epsilon-uniform actions; mix = as many
# uniform-random episodes followed by the expert dataset of the same seed (as Bridge mix);
# LBF medium-replay = a MAPPO learning run (common/mappo.py). RWARE data comes in two
# conventions with the same trajectories: native (the number of deliveries, concatenated
# observations as the state) and AlberDICE's ("-alberdice": agent 0's shaped reward, its state).
SCRIPTED_EPISODES = {"lbf": 1000, "rware": 100}
SCRIPTED_NOISE = {"lbf": 0.6, "rware": 0.3}  # epsilon of medium: about 0.6 x the expert's return
SCRIPTED_QUALITIES = ("expert", "medium", "mix")
CONVENTIONS = {"lbf": {"": {}}, "rware": {"": {}, "-alberdice": {"state": "alberdice", "reward": "alberdice"}}}
LBF_TASKS = ("8x8-2p-2f-coop", "10x10-3p-3f", "15x15-4p-3f")
RWARE_TASKS = ("tiny-2ag", "tiny-4ag", "small-4ag")
LEARN_STEPS = {"8x8-2p-2f": 200_000}  # the LBF medium-replay budgets; other tasks: common.mappo's default
LEARN_RECORD = 1000  # episodes recorded over the learning run (ComaDICE: 1,000)


def default_workers() -> int:
    """Processes for scripted RWARE rollouts: ``$OFFLINE_MARL_WORKERS`` when set, else the
    CPUs this process may use, at most 8."""
    if os.environ.get("OFFLINE_MARL_WORKERS"):
        return max(1, int(os.environ["OFFLINE_MARL_WORKERS"]))
    try:
        return max(1, min(8, len(os.sched_getaffinity(0))))
    except AttributeError:  # not on Linux
        return max(1, min(8, os.cpu_count() or 1))


def scripted_dataset(env: str, task: str, quality: str, seed: int = 0, episodes: int | None = None,
                     workers: int | None = None, env_options: dict[str, Any] | None = None) -> OfflineDataset:
    """``expert``, ``medium`` or ``random`` episodes of the scripted family policies
    (``rollout_controlled``), ``episodes`` of them (default ``SCRIPTED_EPISODES``)."""
    e = make_env(env, task, **(env_options or {}))
    n = int(episodes or SCRIPTED_EPISODES[env])
    noise = SCRIPTED_NOISE[env] if quality == "medium" else 0.0
    if workers is None:
        workers = 1 if env == "lbf" else default_workers()
    eps = rollout_controlled(e, n, scripted=quality != "random", seed=seed, stream=f"{env}-{quality}", noise=noise,
                             workers=workers, desc=f"{env}/{task}/{quality}")
    what = {"expert": "the scripted expert (common.scripted)", "random": "uniform random over the available actions",
            "medium": f"the scripted expert (common.scripted), each action replaced with probability {noise} by a "
                      "uniform available one"}[quality]
    return episodes_to_dataset(e, eps, quality, dict(policy=what, episodes=n, workers=int(workers)))


def family_dataset(env: str, task: str, quality: str, seed: int = 0, episodes: int | None = None,
                   workers: int | None = None) -> OfflineDataset:
    """The LBF / RWARE recipes: ``expert``, ``medium``, ``mix`` (+ ``-alberdice`` for RWARE)
    and LBF ``medium-replay``."""
    if env == "lbf" and quality == "medium-replay":
        from common.mappo import LearnConfig, learn

        return learn(LearnConfig(env=env, task=task, quality=quality, seed=seed, total_steps=LEARN_STEPS.get(task, 0),
                                 record=LEARN_RECORD))
    level, conv = quality, ""
    for c in CONVENTIONS[env]:
        if c and quality.endswith(c):
            level, conv = quality[:-len(c)], c
    opts = CONVENTIONS[env][conv]
    if level != "mix":
        return scripted_dataset(env, task, level, seed, episodes, workers, opts)
    rand = scripted_dataset(env, task, "random", seed, episodes, workers, opts)
    expert = scripted_dataset(env, task, "expert", seed, episodes, workers, opts)
    return OfflineDataset.concatenate([rand, expert], meta=dict(rand.meta, provenance=dict(
        policy=f"episodes 0-{rand.n_episodes - 1}: uniform random; {rand.n_episodes}-"
               f"{rand.n_episodes + expert.n_episodes - 1}: the scripted expert (= quality expert{conv})")))


def _learn_default(env: str) -> int:
    from common.mappo import DEFAULT_STEPS, FALLBACK_STEPS

    return DEFAULT_STEPS.get(env, FALLBACK_STEPS)


def _family_recipe(env: str, task: str, quality: str) -> Recipe | None:
    """The LBF and RWARE recipes, for any task of those families."""
    if env not in CONVENTIONS:
        return None
    names = {q + c: q for q in SCRIPTED_QUALITIES for c in CONVENTIONS[env]}
    if env == "lbf":
        names["medium-replay"] = "medium-replay"
    if quality not in names:
        return None
    about = {"expert": f"{SCRIPTED_EPISODES[env]} episodes of the scripted expert",
             "medium": f"{SCRIPTED_EPISODES[env]} episodes of the expert with epsilon = {SCRIPTED_NOISE[env]}",
             "mix": f"{SCRIPTED_EPISODES[env]} uniform-random episodes, then the expert ones",
             "medium-replay": f"{LEARN_RECORD} episodes spread over a MAPPO learning run of "
                              f"{LEARN_STEPS.get(task) or _learn_default(env):,} steps"}[names[quality]]
    if quality.endswith("-alberdice"):
        about += " (AlberDICE's reward and state)"
    return Recipe(lambda seed: family_dataset(env, task, quality, seed=seed), about)


for _task in LBF_TASKS + ("8x8-2p-2f",):
    for _q in SCRIPTED_QUALITIES + ("medium-replay",):
        RECIPES[("lbf", _task, _q)] = _family_recipe("lbf", _task, _q)
for _task in RWARE_TASKS:
    for _q in SCRIPTED_QUALITIES:
        for _c in CONVENTIONS["rware"]:
            RECIPES[("rware", _task, _q + _c)] = _family_recipe("rware", _task, _q + _c)


def recipe_for(env: str, task: str, quality: str) -> Recipe | None:
    """The recipe of (env, task, quality): a registered one, or a family recipe (LBF and
    RWARE make their qualities for any task)."""
    return RECIPES.get((env, task, quality)) or _family_recipe(env, task, quality)


def has_recipe(env: str, task: str, quality: str) -> bool:
    """Whether ``generate`` can make (env, task, quality) locally."""
    return recipe_for(env, task, quality) is not None


def recipe_names(env: str | None = None, task: str | None = None) -> list[str]:
    """``env/task/quality`` of every recipe, optionally of one env (and task)."""
    return [f"{e}/{t}/{q}" for e, t, q in RECIPES if env in (None, e) and task in (None, t)]


def generate(env: str, task: str, quality: str, out: Path, seed: int = 0, command: str | None = None,
             overwrite: bool = False) -> Path:
    """Make the dataset (env, task, quality) from its recipe and save it at ``out``
    (native format). ``command`` is recorded as the provenance; by default the
    equivalent ``python -m common.collect recipe ...`` line."""
    recipe = recipe_for(env, task, quality)
    if recipe is None:
        known = recipe_names(env, task) or recipe_names(env) or recipe_names()
        raise DatasetError(f"no local recipe for {env}/{task}/{quality}; recipes: {', '.join(known)}")
    out = Path(out).expanduser()
    if command is None:
        command = "python -m common.collect " + shlex.join(
            ["recipe", "--env", env, "--task", task, "--quality", quality, "--seed", str(seed), "--out", str(out)])
    ds = recipe.build(seed)
    ds.meta.update(quality=quality, source="generated",
                   provenance={**ds.meta.get("provenance", {}), "command": command, "seed": int(seed),
                               "recipe": recipe.about})
    return ds.save(out, overwrite=overwrite)


# ========================================================== random and policy
def parse_env_options(options: Sequence[str]) -> dict[str, Any]:
    """``["episode_limit=50", "obs_mode=omiga"]`` -> ``{"episode_limit": 50, "obs_mode": "omiga"}``
    (values are read as JSON when they parse, else kept as strings)."""
    out: dict[str, Any] = {}
    for item in options:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise OfflineMarlError(f"environment options are KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def random_dataset(env: str, task: str, episodes: int, seed: int = 0, env_options: dict[str, Any] | None = None,
                   n_envs: int = 8, quality: str = "random", command: str | None = None) -> OfflineDataset:
    """Uniform-random episodes in any environment (discrete: uniform over the
    available actions; continuous: uniform in [-1, 1])."""
    e = make_env(env, task, **(env_options or {}))
    eps = rollout(e, UniformPolicy(e, _rng(seed, "random")), episodes, seed=seed, n_envs=n_envs,
                  desc=f"{env}/{task}/{quality}")
    return episodes_to_dataset(e, eps, quality, dict(policy="uniform random", command=command, seed=int(seed),
                                                     n_envs=int(n_envs)))


def load_act_fn(checkpoint: str | Path, algo: str | Path | None = None, device: str = "cpu") -> Callable[..., Any]:
    """The policy saved at ``checkpoint``: ``load_policy(checkpoint, device)`` of the
    algorithm file ``algo`` (imported by path), or, without ``algo``, a
    behaviour-policy checkpoint of ``common.behaviour``."""
    checkpoint = Path(checkpoint).expanduser()
    if not checkpoint.exists():
        raise OfflineMarlError(f"no checkpoint at {checkpoint}")
    if algo is None:
        from common import mappo

        if mappo.is_checkpoint(checkpoint):
            return mappo.load_policy(checkpoint, device)
        try:
            from common.behaviour import load_behaviour_policy  # lazily: torch networks, only needed here
        except ImportError as e:
            raise OfflineMarlError(f"cannot load behaviour-policy checkpoints ({e}); pass --algo FILE.py for an "
                                   "algorithm checkpoint") from None
        return load_behaviour_policy(checkpoint, device)
    algo = Path(algo).expanduser()
    if not algo.is_file():
        raise OfflineMarlError(f"--algo {algo} is not a file (pass the algorithm's .py file, e.g. alberdice.py)")
    name = "_offline_marl_algo_" + "".join(c if c.isalnum() else "_" for c in algo.stem)
    spec = importlib.util.spec_from_file_location(name, algo)
    if spec is None or spec.loader is None:
        raise OfflineMarlError(f"--algo {algo} cannot be imported as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up by name
    spec.loader.exec_module(module)
    if not hasattr(module, "load_policy"):
        raise OfflineMarlError(f"{algo} defines no load_policy(checkpoint, device) function")
    return module.load_policy(str(checkpoint), device)


def policy_dataset(env: str, task: str, checkpoint: str | Path, episodes: int, algo: str | Path | None = None,
                   noise: float = 0.0, seed: int = 0, device: str = "cpu", env_options: dict[str, Any] | None = None,
                   n_envs: int = 8, quality: str = "policy", command: str | None = None) -> OfflineDataset:
    """Episodes of a saved policy (see ``load_act_fn``) with optional action noise
    (``NoisyPolicy``: Gaussian sigma for continuous actions, epsilon-uniform for
    discrete ones)."""
    from common.runs import resolve_device, set_seed

    set_seed(seed)  # stochastic policies draw from torch
    e = make_env(env, task, **(env_options or {}))
    act_fn = load_act_fn(checkpoint, algo, str(resolve_device(device)))
    if noise:
        act_fn = NoisyPolicy(act_fn, noise, e.discrete, _rng(seed, "noise"))
    eps = rollout(e, act_fn, episodes, seed=seed, n_envs=n_envs, desc=f"{env}/{task}/{quality}")
    return episodes_to_dataset(e, eps, quality, dict(
        policy="algorithm checkpoint" if algo else "behaviour-policy checkpoint", checkpoint=str(checkpoint),
        algo=str(algo) if algo else None, noise=float(noise),
        noise_kind=("epsilon-uniform" if e.discrete else "gaussian sigma") if noise else None,
        command=command, seed=int(seed), n_envs=int(n_envs)))


# ======================================================================= CLI
@dataclass
class RecipeCmd:
    """Make a named dataset from its recipe (see `list`)."""

    env: str
    """environment family, e.g. bridge or matrix"""
    task: str
    """task, e.g. hard or penalty_xor"""
    quality: str
    """dataset name, e.g. optimal, mix, a, b, c, d, random"""
    out: Path
    """output directory (native format); refused if it holds anything but a dataset of this project"""
    overwrite: bool = False
    """replace the dataset already at --out (only a dataset of this project is ever replaced)"""
    seed: int = 0
    """random seed: the same seed gives the same arrays"""


@dataclass
class RandomCmd:
    """Uniform-random episodes in any environment."""

    env: str
    """environment family (any that make_env supports)"""
    task: str
    """task name"""
    out: Path
    """output directory (native format); refused if it holds anything but a dataset of this project"""
    overwrite: bool = False
    """replace the dataset already at --out (only a dataset of this project is ever replaced)"""
    episodes: int = 100
    """number of episodes"""
    seed: int = 0
    """random seed: the same seed (and n_envs) gives the same arrays"""
    env_options: tuple[str, ...] = ()
    """make_env options as KEY=VALUE, e.g. episode_limit=50"""
    n_envs: int = 8
    """environments stepped side by side"""
    quality: str = "random"
    """quality name recorded in meta.json"""


@dataclass
class PolicyCmd:
    """Rollouts of a saved policy, with optional action noise."""

    env: str
    """environment family"""
    task: str
    """task name"""
    checkpoint: Path
    """an algorithm checkpoint (with --algo) or a common.behaviour checkpoint"""
    out: Path
    """output directory (native format); refused if it holds anything but a dataset of this project"""
    overwrite: bool = False
    """replace the dataset already at --out (only a dataset of this project is ever replaced)"""
    algo: Path | None = None
    """the algorithm's .py file whose load_policy(checkpoint, device) builds the policy; omit for behaviour checkpoints"""
    episodes: int = 100
    """number of episodes"""
    noise: float = 0.0
    """action noise: Gaussian sigma (continuous) or epsilon of epsilon-uniform (discrete)"""
    seed: int = 0
    """random seed (environment resets, noise, torch)"""
    device: str = "cpu"
    """device of the policy: cpu, cuda, auto"""
    env_options: tuple[str, ...] = ()
    """make_env options as KEY=VALUE, e.g. episode_limit=50"""
    n_envs: int = 8
    """environments stepped side by side (the policy acts on all in one batch)"""
    quality: str = "policy"
    """quality name recorded in meta.json"""


@dataclass
class ListCmd:
    """List the recipes."""


def main(argv: Sequence[str] | None = None) -> Path | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    from common.mappo import LearnConfig

    cmd = __import__("tyro").extras.subcommand_cli_from_dict(
        {"recipe": RecipeCmd, "random": RandomCmd, "policy": PolicyCmd, "learn": LearnConfig, "list": ListCmd},
        prog="python -m common.collect", description=__doc__.split("\n\n")[0], args=argv)
    command = "python -m common.collect " + shlex.join(argv)
    if isinstance(cmd, (RecipeCmd, RandomCmd, PolicyCmd)):  # refuse a bad --out before any work
        check_destination(cmd.out, cmd.overwrite)
    if isinstance(cmd, ListCmd):
        for (e, t, q), r in RECIPES.items():
            print(f"{e:10s} {t:16s} {q:17s} {r.about}")
        return None
    if isinstance(cmd, LearnConfig):
        from common.mappo import main as learn_main

        path = learn_main(cmd, argv[1:])
    elif isinstance(cmd, RecipeCmd):
        path = generate(cmd.env, cmd.task, cmd.quality, cmd.out, cmd.seed, command=command, overwrite=cmd.overwrite)
    elif isinstance(cmd, RandomCmd):
        ds = random_dataset(cmd.env, cmd.task, cmd.episodes, cmd.seed, parse_env_options(cmd.env_options),
                            cmd.n_envs, cmd.quality, command)
        path = ds.save(cmd.out, overwrite=cmd.overwrite)
    else:
        ds = policy_dataset(cmd.env, cmd.task, cmd.checkpoint, cmd.episodes, cmd.algo, cmd.noise, cmd.seed,
                            cmd.device, parse_env_options(cmd.env_options), cmd.n_envs, cmd.quality, command)
        path = ds.save(cmd.out, overwrite=cmd.overwrite)
    summary = OfflineDataset.load(path).summary()
    print(f"wrote {path}: {summary['episodes']} episodes, {summary['transitions']} transitions, "
          f"return {summary['return_mean']:.4f} +- {summary['return_std']:.4f}")
    return path


__all__ = ["RECIPES", "Recipe", "has_recipe", "recipe_for", "generate", "rollout", "rollout_controlled",
           "controlled_reset_seeds", "family_dataset",
           "scripted_dataset", "episodes_to_dataset", "random_dataset",
           "policy_dataset", "load_act_fn", "UniformPolicy", "JointSupportPolicy", "NoisyPolicy",
           "BridgeCrossingPolicy", "uniform_available", "parse_env_options", "recipe_names"]

if __name__ == "__main__":
    with friendly_errors():
        main()
