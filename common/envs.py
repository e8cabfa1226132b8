"""Environments behind one protocol, and ``evaluate``.

Every environment is a ``MultiAgentEnv``::

    reset(seed) -> obs [N, obs_dim] f32, state [state_dim] f32, avail [N, K] bool
    step(actions) -> obs, state, avail, reward (float), terminated, truncated, info

``terminated`` is a true end (no bootstrap), ``truncated`` a time-limit cut.
``info`` has ``"won"`` where the game has a winner. Discrete actions are an int
array ``[N]``; continuous ones a float array ``[N, act_dim]`` in [-1, 1], and
``avail`` is then ``[N, 1]``, all true.

``make_env(env, task, **options)`` builds one; families and tasks:

==========  =====================================================  ===========================
env         tasks                                                  needs
==========  =====================================================  ===========================
matrix      penalty_xor, xor, omcda_toy, omcda_relay                  nothing
bridge      hard, easy                                             nothing
mamujoco    Hopper-3x1, Ant-2x4, HalfCheetah-6x1, HalfCheetah-2x3  mujoco, gymnasium-robotics
rware       tiny-2ag, small-4ag, ...                               rware
lbf         8x8-2p-2f-coop, 10x10-3p-3f, 15x15-4p-3f, ...          lbforaging
smacv1      3m, 5m_vs_6m, 6h_vs_8z, corridor, 2c_vs_64zg, ...      smac + StarCraft II
smacv2      {protoss,terran,zerg}_{5_vs_5,...,20_vs_23}            smacv2 + StarCraft II
==========  =====================================================  ===========================
"""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from common import OfflineMarlError


class EnvError(OfflineMarlError):
    """An environment cannot be made: unknown name, missing package or game."""


class MultiAgentEnv:
    """Base class of every environment (see the module docstring for the protocol)."""

    n_agents: int
    obs_dim: int
    state_dim: int
    discrete: bool
    n_actions: int = 1  # discrete: actions per agent; continuous: 1 (the width of avail)
    act_dim: int = 1  # continuous: action dimension per agent; discrete: 1
    episode_limit: int
    spec: dict[str, Any]  # set by make_env: {"env", "task", "options"}, enough to rebuild it

    def reset(self, seed: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, bool, bool, dict]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        kind = f"n_actions={self.n_actions}" if self.discrete else f"act_dim={self.act_dim}"
        return (f"{type(self).__name__}({self.spec.get('env')}/{self.spec.get('task')}: n_agents={self.n_agents}, "
                f"obs_dim={self.obs_dim}, state_dim={self.state_dim}, {kind}, episode_limit={self.episode_limit})")


def _check_options(env: str, cls: type, options: dict[str, Any]) -> None:
    """An unknown keyword is a user's typo: say which options exist."""
    import inspect

    known = [p for p in inspect.signature(cls).parameters if p != "task"]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise EnvError(f"unknown {env} option(s) {', '.join(unknown)}; the options are {', '.join(known)}")


# =============================================================== matrix games
PAYOFFS = {
    # rows: agent 0's action, columns: agent 1's (0 = A, 1 = B); docs/environments.md#matrix-games-matrix
    "penalty_xor": np.array([[0.0, 1.0], [1.0, -2.0]], dtype=np.float32),
    "xor": np.array([[0.0, 1.0], [1.0, 0.0]], dtype=np.float32),
    # the two-player toy game of OMCDA's Sec. 3 (its Table 1 is missing; docs/environments.md derives
    # this table from the paper's stated numbers): player 1 = agent 0
    "omcda_toy": np.array([[1.3, -0.4], [-1.6, 0.7]], dtype=np.float32),
}
ONE_SHOT = ("omcda_toy",)  # one-step games: the single step ends the episode for real (terminated)


class MatrixGame(MultiAgentEnv):
    """A stateless two-player matrix game: repeated (Penalty-XOR, XOR) or one-shot (OMCDA's toy).

    Both agents observe the constant vector ``[0, 1, 0, 1]`` (the state of the
    original 2-state MMDP, which never leaves state 1). Every step pays the payoff
    of the joint action. A repeated game is cut after ``episode_limit`` steps
    (``truncated``: a time limit, so value targets bootstrap); the shipped AlberDICE
    config evaluates with 100 steps, its datasets were generated with 50. A one-shot
    game (``ONE_SHOT``) is one step that ends it for real (``terminated``)."""

    n_agents, obs_dim, state_dim, discrete, n_actions = 2, 4, 4, True, 2

    def __init__(self, task: str = "penalty_xor", episode_limit: int | None = None):
        self.payoff = PAYOFFS[task]
        self.one_shot = task in ONE_SHOT
        if episode_limit is None:
            episode_limit = 1 if self.one_shot else 100
        if isinstance(episode_limit, bool) or not isinstance(episode_limit, (int, np.integer)) or episode_limit < 1:
            raise EnvError(f"matrix episode_limit must be a positive integer, got {episode_limit!r}")
        if self.one_shot and episode_limit != 1:
            raise EnvError(f"matrix/{task} is a one-step game; its episode_limit is 1, got {episode_limit}")
        self.episode_limit = int(episode_limit)
        self._obs = np.array([0, 1, 0, 1], dtype=np.float32)
        self._t = 0

    def _observe(self):
        return np.stack([self._obs, self._obs]), self._obs.copy(), np.ones((2, 2), dtype=bool)

    def reset(self, seed: int | None = None):
        self._t = 0
        return self._observe()

    def step(self, actions):
        a = np.asarray(actions, dtype=np.int64).reshape(2)
        r = float(self.payoff[a[0], a[1]])
        self._t += 1
        end = self._t >= self.episode_limit
        return (*self._observe(), r, end and self.one_shot, end and not self.one_shot, {})

    def exact_return(self, probs_fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> float:
        """The expected (undiscounted) episode return of stochastic policies, exactly:
        ``probs_fn(obs [M, N, obs_dim], avail [M, N, K]) -> probs [M, N, K]``. The
        state never changes, so it is ``episode_limit * p_0^T payoff p_1``."""
        obs, _, avail = self._observe()
        p = np.asarray(probs_fn(obs[None], avail[None]), dtype=np.float64)[0]
        return float(self.episode_limit * (p[0] @ self.payoff.astype(np.float64) @ p[1]))


class MatrixRelay(MultiAgentEnv):
    """``omcda_relay``: a two-agent matrix MMDP with heterogeneous agents (docs/environments.md).

    Agent 0 (the runner) moves a ball along positions 0..6: A advances it one
    position (it stays at 6), B holds it. Agent 1 (the helper) plays A (stay back,
    pays 0) or B (pass): +2 when the runner holds that step, -1.5 when it runs.
    The episode lasts exactly 8 steps and then ends for real (``terminated``); the
    last step pays +20 more if the ball is at 6 after it. Both agents (and the
    state) see ``[one-hot(t) of 8, one-hot(position) of 7]``. The optimum, 24, is the
    runner running six times while the helper stays back, then two passes. Under
    uniform data the helper's pass looks good ((2 - 1.5) / 2 per step), but it costs
    the team once the runner runs, while the runner's choices decide the +20."""

    n_agents, discrete, n_actions = 2, True, 2
    HORIZON, GOAL, PASS_HOLD, PASS_RUN, BONUS = 8, 6, 2.0, -1.5, 20.0
    obs_dim = state_dim = HORIZON + GOAL + 1

    def __init__(self, task: str = "omcda_relay", episode_limit: int = 8):
        if episode_limit != self.HORIZON:
            raise EnvError(f"matrix/omcda_relay lasts exactly {self.HORIZON} steps; episode_limit must be "
                           f"{self.HORIZON}, got {episode_limit!r}")
        self.episode_limit = self.HORIZON
        self._t, self._k = 0, 0

    def _observe(self):
        s = np.zeros(self.state_dim, dtype=np.float32)
        s[min(self._t, self.HORIZON - 1)] = 1.0
        s[self.HORIZON + self._k] = 1.0
        return np.stack([s, s]), s.copy(), np.ones((2, 2), dtype=bool)

    def reset(self, seed: int | None = None):
        self._t, self._k = 0, 0
        return self._observe()

    @classmethod
    def transition(cls, k: int, t: int, a0: int, a1: int) -> tuple[int, float]:
        """(next position, reward) of one step from position ``k`` at step ``t``."""
        k2 = min(k + 1, cls.GOAL) if a0 == 0 else k
        r = (cls.PASS_RUN if a0 == 0 else cls.PASS_HOLD) if a1 == 1 else 0.0
        if t + 1 == cls.HORIZON and k2 == cls.GOAL:
            r += cls.BONUS
        return k2, r

    def step(self, actions):
        a = np.asarray(actions, dtype=np.int64).reshape(2)
        self._k, r = self.transition(self._k, self._t, int(a[0]), int(a[1]))
        self._t += 1
        end = self._t >= self.HORIZON
        return (*self._observe(), float(np.float32(r)), end, False, {})

    def exact_return(self, probs_fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> float:
        """The expected episode return of stochastic policies, exactly, by dynamic programming over
        the (step, position) states; ``probs_fn`` as in ``MatrixGame.exact_return``."""
        H, G = self.HORIZON, self.GOAL
        obs = np.zeros((H, G + 1, 2, self.obs_dim), np.float32)
        for t in range(H):
            for k in range(G + 1):
                obs[t, k, :, t] = obs[t, k, :, H + k] = 1.0
        p = np.asarray(probs_fn(obs.reshape(-1, 2, self.obs_dim), np.ones((H * (G + 1), 2, 2), bool)), np.float64)
        p = p.reshape(H, G + 1, 2, 2)
        v = np.zeros(G + 1)
        for t in reversed(range(H)):
            nv = np.zeros(G + 1)
            for k in range(G + 1):
                for a0 in range(2):
                    for a1 in range(2):
                        k2, r = self.transition(k, t, a0, a1)
                        nv[k] += p[t, k, 0, a0] * p[t, k, 1, a1] * (r + v[k2])
            v = nv
        return float(v[0])


# ===================================================================== bridge
# Bridge (Fu et al. 2022; AlberDICE's "Bridge (Hard)"), exactly the rules of
# docs/environments.md#bridge-step-function. A 3 x 6 grid, cells (row, col), row 0 on top:
#
#        c0  c1  c2  c3  c4  c5
#   r0   G1  .   #   #   .   .
#   r1   .   .   S0  S1  .   .        hard: S0 = (1,2), S1 = (1,3) (both on the bridge)
#   r2   .   .   #   #   .   G0       easy: S0 = (1,1), S1 = (1,4)
BRIDGE_SHAPE = (3, 6)
BRIDGE_WALLS = ((0, 2), (0, 3), (2, 2), (2, 3))
BRIDGE_GOALS = np.array([[2, 5], [0, 0]], dtype=np.int64)  # agent 0, agent 1
BRIDGE_STARTS = {"hard": np.array([[1, 2], [1, 3]], dtype=np.int64), "easy": np.array([[1, 1], [1, 4]], dtype=np.int64)}
BRIDGE_MOVES = np.array([[0, 0], [-1, 0], [1, 0], [0, 1], [0, -1]], dtype=np.int64)  # stay, up, down, right, left
_BRIDGE_OPEN = np.ones(BRIDGE_SHAPE, dtype=bool)
_BRIDGE_OPEN[tuple(np.array(BRIDGE_WALLS).T)] = False


def _same(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a == b).all(-1)


def bridge_move(pos: np.ndarray, done: np.ndarray, actions: np.ndarray) -> np.ndarray:
    """The Bridge movement rules (docs/environments.md#bridge-step-function, steps 1-4), vectorised over any batch shape.

    ``pos [..., 2, 2]`` (agent, (row, col)) integers, ``done [..., 2]`` bool (the done
    flags from earlier steps), ``actions [..., 2]`` in 0..4. Returns the new positions."""
    pos = np.asarray(pos, dtype=np.int64)
    done = np.asarray(done, dtype=bool)
    # 1. intended cells: off-grid, wall, or a done agent -> stay
    n = pos + BRIDGE_MOVES[actions]
    inside = (n >= 0).all(-1) & (n[..., 0] < BRIDGE_SHAPE[0]) & (n[..., 1] < BRIDGE_SHAPE[1])
    free = inside & _BRIDGE_OPEN[np.clip(n[..., 0], 0, BRIDGE_SHAPE[0] - 1), np.clip(n[..., 1], 0, BRIDGE_SHAPE[1] - 1)]
    n = np.where((free & ~done)[..., None], n, pos)
    s0, s1, n0, n1 = pos[..., 0, :], pos[..., 1, :], n[..., 0, :], n[..., 1, :]
    d0, d1 = done[..., 0], done[..., 1]
    # 2. agent 0 first; the first matching rule decides (np.select takes the first true condition)
    rules0 = [d0,                                   # a. done: stays
              _same(n0, BRIDGE_GOALS[0]),           # b. entering its goal: moves, even onto agent 1
              _same(n0, s0),                        # c. not moving
              d1,                                   # d. agent 1 is done, hence invisible: moves
              _same(n0, s1) & _same(n1, s1),        # e. into a standing agent 1: stays
              _same(n0, n1),                        # f. same target cell: agent 0 moves, agent 1 is fixed
              _same(n0, s1) & _same(n1, s0)]        # g. head-on swap: both fixed
    move0 = np.select(rules0, [False, True, False, True, False, True, False], default=True)  # h. moves
    fixed1 = np.select(rules0, [False, False, False, False, False, True, True], default=False)
    new0 = np.where(move0[..., None], n0, s0)
    # 3. agent 1, unless 2f/2g fixed it
    rules1 = [fixed1,
              d1,                                   # a. done: stays
              _same(n1, BRIDGE_GOALS[1]),           # b. entering its goal: moves
              _same(n1, s1),                        # c. not moving
              d0,                                   # d. agent 0 is done: moves
              _same(n1, new0)]                      # e. into agent 0's new cell: stays
    move1 = np.select(rules1, [False, False, True, False, True, False], default=True)  # f. moves
    new1 = np.where(move1[..., None], n1, s1)
    return np.stack([new0, new1], axis=-2)  # 4. overlaps (rules 2b, 3b, done agents) are legal


_BRIDGE_CELLS = BRIDGE_SHAPE[0] * BRIDGE_SHAPE[1]
_bridge_tables_cache: list[tuple[np.ndarray, np.ndarray]] = []


def _bridge_tables() -> tuple[np.ndarray, np.ndarray]:
    """``bridge_move`` and the reward of step 5 tabulated once over every (cell, cell,
    done, done, action, action) and (cell, cell), so that a step is a table lookup."""
    if not _bridge_tables_cache:
        c0, c1, d0, d1, a0, a1 = np.meshgrid(np.arange(_BRIDGE_CELLS), np.arange(_BRIDGE_CELLS), [0, 1], [0, 1],
                                             np.arange(5), np.arange(5), indexing="ij")
        cells = np.stack([c0, c1], -1)
        pos = np.stack([cells // BRIDGE_SHAPE[1], cells % BRIDGE_SHAPE[1]], -1)
        new = bridge_move(pos, np.stack([d0, d1], -1).astype(bool), np.stack([a0, a1], -1))
        move = new[..., 0] * BRIDGE_SHAPE[1] + new[..., 1]  # [18, 18, 2, 2, 5, 5, 2] cells after the move
        # 5. r = mean over agents of -0.1 * distance to the goal, in float32 as the original
        pos = np.stack(np.meshgrid(np.arange(_BRIDGE_CELLS), np.arange(_BRIDGE_CELLS), indexing="ij"), -1)
        pos = np.stack([pos // BRIDGE_SHAPE[1], pos % BRIDGE_SHAPE[1]], -1)
        per_agent = (-0.1 * np.sqrt(((BRIDGE_GOALS - pos) ** 2).sum(-1))).astype(np.float32)
        reward = (per_agent[..., 0] + per_agent[..., 1]) * np.float32(0.5)  # [18, 18]
        _bridge_tables_cache.append((move, reward))
    return _bridge_tables_cache[0]


def bridge_step(pos: np.ndarray, done: np.ndarray, t: np.ndarray | int, actions: np.ndarray, episode_limit: int):
    """One full Bridge step (docs/environments.md#bridge-step-function, steps 1-6), vectorised over any batch shape.

    ``pos [..., 2, 2]``, ``done [..., 2]`` and ``actions [..., 2]`` as in
    ``bridge_move``; ``t`` is the number of steps taken before this one. Returns
    ``(pos', done', reward, terminated, truncated)``: the episode ends when both
    agents are done; ``terminated`` when both stand on their goals (a true end),
    ``truncated`` when the limit ``episode_limit`` cut it. The reward is float32
    and 0 on the step that ends the episode."""
    move, reward_of = _bridge_tables()
    pos, done, actions = np.asarray(pos), np.asarray(done, dtype=bool), np.asarray(actions)
    cell = pos[..., 0] * BRIDGE_SHAPE[1] + pos[..., 1]
    new_cell = move[cell[..., 0], cell[..., 1], done[..., 0].astype(np.int64), done[..., 1].astype(np.int64),
                    actions[..., 0], actions[..., 1]]
    new = np.stack([new_cell // BRIDGE_SHAPE[1], new_cell % BRIDGE_SHAPE[1]], -1)
    at_goal = _same(new, BRIDGE_GOALS)  # [..., 2]
    # 6. d_i <- (s_i' = g_i) or (k = L); the episode ends when both are done
    new_done = at_goal | (np.asarray(t) + 1 >= episode_limit)[..., None]
    end = new_done.all(-1)
    terminated = at_goal.all(-1)
    reward = np.where(end, np.float32(0.0), reward_of[new_cell[..., 0], new_cell[..., 1]])
    return new, new_done, reward, terminated, end & ~terminated


def bridge_observation(pos: np.ndarray) -> np.ndarray:
    """The observation (= state) ``[r0, c0, 2, 5, r1, c1, 0, 0]`` float32 of positions ``[..., 2, 2]``."""
    pos = np.asarray(pos)
    out = np.empty(pos.shape[:-2] + (2, 4), dtype=np.float32)
    out[..., :2] = pos
    out[..., 2:] = BRIDGE_GOALS
    return out.reshape(pos.shape[:-2] + (8,))


class Bridge(MultiAgentEnv):
    """Two agents cross a one-lane bridge in opposite directions (docs/environments.md#bridge-bridge).

    ``task="hard"`` starts both agents on the bridge, facing each other (the
    AlberDICE paper's Bridge); ``"easy"`` starts them at (1,1) and (1,4). Both
    agents see the full state ``[r0, c0, 2, 5, r1, c1, 0, 0]``. Actions 0..4 =
    stay, up, down, right, left, always available. The episode ends for real
    (``terminated``) when both agents stand on their goals, or is cut
    (``truncated``) after ``episode_limit`` steps: 20 in the shipped AlberDICE
    config, 50 in its datasets. The step that ends the episode pays 0.

    A step is ``bridge_step`` for one environment, written with the same tables on
    Python scalars (a test checks that both agree step for step)."""

    n_agents, obs_dim, state_dim, discrete, n_actions = 2, 8, 8, True, 5

    def __init__(self, task: str = "hard", episode_limit: int = 20):
        if isinstance(episode_limit, bool) or not isinstance(episode_limit, (int, np.integer)) or episode_limit < 1:
            raise EnvError(f"bridge episode_limit must be a positive integer, got {episode_limit!r}")
        self.task = task
        self.episode_limit = int(episode_limit)
        self._move, self._reward = _bridge_tables()
        cols = BRIDGE_SHAPE[1]
        self._start = [int(r * cols + c) for r, c in BRIDGE_STARTS[task]]
        self._goal = [int(r * cols + c) for r, c in BRIDGE_GOALS]
        self._cells, self._done, self._t, self._over = list(self._start), [False, False], 0, True

    def _observe(self):
        cols = BRIDGE_SHAPE[1]
        (c0, c1), (g0, g1) = self._cells, BRIDGE_GOALS
        s = [c0 // cols, c0 % cols, g0[0], g0[1], c1 // cols, c1 % cols, g1[0], g1[1]]
        return np.array([s, s], dtype=np.float32), np.array(s, dtype=np.float32), np.ones((2, 5), dtype=bool)

    def reset(self, seed: int | None = None):
        self._cells, self._done, self._t, self._over = list(self._start), [False, False], 0, False
        return self._observe()

    def step(self, actions):
        if self._over:
            raise RuntimeError("Bridge.step called on a finished episode; call reset() first")
        a = np.asarray(actions)
        a0, a1 = a.reshape(2).tolist() if a.size == 2 and a.dtype.kind in "iu" else (-1, -1)
        if not (0 <= a0 <= 4 and 0 <= a1 <= 4):
            raise EnvError(f"bridge takes one action in 0..4 per agent ([2] integers), got {a!r}")
        c0, c1 = self._move[self._cells[0], self._cells[1], int(self._done[0]), int(self._done[1]), a0, a1].tolist()
        self._t += 1
        at_goal = [c0 == self._goal[0], c1 == self._goal[1]]
        limit = self._t >= self.episode_limit
        self._cells, self._done = [c0, c1], [at_goal[0] or limit, at_goal[1] or limit]
        terminated = at_goal[0] and at_goal[1]
        self._over = self._done[0] and self._done[1]
        r = 0.0 if self._over else float(self._reward[c0, c1])
        return (*self._observe(), r, terminated, self._over and not terminated, {})


def _make_bridge(task: str, **options: Any) -> MultiAgentEnv:
    _check_options("bridge", Bridge, options)
    return Bridge(task, **options)


# =================================================================== mamujoco
MAMUJOCO_TASKS = ("Hopper-3x1", "Ant-2x4", "HalfCheetah-6x1", "HalfCheetah-2x3")
MAMUJOCO_OBS_MODES = ("omiga", "local")
_MAMUJOCO_HELP = "MaMuJoCo needs mujoco, gymnasium and gymnasium-robotics: pip install 'offline-marl[mujoco]'"


def omiga_obs(single_obs: np.ndarray, n_agents: int) -> np.ndarray:
    """The observations of the OMIGA MaMuJoCo datasets, from one single-agent observation.

    Agent ``i`` sees ``[single_obs, onehot(i)]`` standardised within that vector
    (minus its mean, divided by its population std). ``single_obs [..., D]`` gives
    ``[..., n_agents, D + n_agents]`` float32."""
    x = np.asarray(single_obs, dtype=np.float64)
    eye = np.broadcast_to(np.eye(n_agents), x.shape[:-1] + (n_agents, n_agents))
    v = np.concatenate([np.broadcast_to(x[..., None, :], x.shape[:-1] + (n_agents, x.shape[-1])), eye], axis=-1)
    v = (v - v.mean(-1, keepdims=True)) / v.std(-1, keepdims=True)
    return v.astype(np.float32)


def _build_quietly(make: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``make(*args, **kwargs)`` without the noise of building the v4 assets: MuJoCo's
    deprecation of ``settotalmass`` in half_cheetah.xml (which MuJoCo would also append
    to a MUJOCO_LOG.TXT in the working directory) and gymnasium's "v4 is out of date"
    (v4 is chosen on purpose). Other MuJoCo warnings become Python warnings."""
    import warnings

    import mujoco

    def on_warning(msg: str) -> None:
        if "settotalmass" not in msg:
            warnings.warn(f"MuJoCo: {msg}", RuntimeWarning, stacklevel=2)

    previous = mujoco.get_mju_user_warning()
    mujoco.set_mju_user_warning(on_warning)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is out of date.*")
            return make(*args, **kwargs)
    finally:
        mujoco.set_mju_user_warning(previous)


class MaMuJoCo(MultiAgentEnv):
    """Multi-Agent MuJoCo: one robot, its joints split among agents (docs/environments.md).

    ``task`` is ``<Robot>-<agents>x<joints per agent>``. Actions ``[N, act_dim]`` are
    clipped to [-1, 1] (the robots' control range); ``avail`` is ``[N, 1]``, all true.
    The team reward is the single-agent environment's reward; a fall (Hopper, Ant
    unhealthy) is ``terminated``, reaching ``episode_limit`` is ``truncated``.

    ``obs_mode="omiga"`` (the default; every published MaMuJoCo offline dataset of
    OMIGA, ComaDICE and OMCDA): gymnasium's v4 single-agent env (Ant with its 84
    contact-force entries, 111-dim obs); each agent observes ``omiga_obs`` of the full
    observation, the state is all agents' observations concatenated, and agent ``i``
    drives the contiguous chunk ``i*act_dim:(i+1)*act_dim`` of the joint action.
    ``ant_contact_forces=False`` reproduces Ant-v2 under mujoco-py 2.x: those 84
    entries are zero and the reward has no contact cost.

    ``obs_mode="local"`` (OG-MARL): gymnasium-robotics ``mamujoco_v1`` (v5 envs),
    each agent's ``agent_obsk``-hop local observation (plus the robot root's
    ``global_categories``, the library's default when None), zero-padded at the end to
    the largest agent's size; the state is ``env.state()`` (the single-agent
    observation); actions go to the joints of the library's partition."""

    discrete, n_actions = False, 1

    def __init__(self, task: str, obs_mode: str = "omiga", episode_limit: int = 1000, agent_obsk: int = 1,
                 global_categories: list[str] | None = None, ant_contact_forces: bool = True):
        if obs_mode not in MAMUJOCO_OBS_MODES:
            raise EnvError(f"unknown MaMuJoCo obs_mode {obs_mode!r}; choose one of {', '.join(MAMUJOCO_OBS_MODES)}")
        if obs_mode == "omiga" and (agent_obsk != 1 or global_categories is not None):
            raise EnvError("agent_obsk and global_categories choose local observations: use them with obs_mode='local'")
        if obs_mode == "local" and not ant_contact_forces:
            raise EnvError("ant_contact_forces=False is the OMIGA datasets' Ant: use it with obs_mode='omiga'")
        robot, conf = task.split("-")
        self.n_agents, self.act_dim = (int(x) for x in conf.split("x"))
        self.obs_mode, self.episode_limit = obs_mode, int(episode_limit)
        try:
            import gymnasium
            import mujoco  # noqa: F401
        except ImportError as e:
            raise EnvError(f"{_MAMUJOCO_HELP} ({e})") from None
        if obs_mode == "omiga":
            kwargs = {"use_contact_forces": bool(ant_contact_forces)} if robot == "Ant" else {}
            # the bare env: the time limit is counted here, so a fall and a cut stay distinct
            self._env = _build_quietly(gymnasium.make, f"{robot}-v4", disable_env_checker=True, **kwargs).unwrapped
            self._pad = 84 if robot == "Ant" and not ant_contact_forces else 0  # 14 bodies x 6 forces
            self.obs_dim = self._env.observation_space.shape[0] + self._pad + self.n_agents
            self.state_dim = self.n_agents * self.obs_dim
        else:
            import contextlib
            import io

            try:
                with contextlib.redirect_stderr(io.StringIO()):  # an import-time notice about Adroit envs
                    from gymnasium_robotics import mamujoco_v1
            except ImportError as e:
                raise EnvError(f"{_MAMUJOCO_HELP} ({e})") from None
            base = _build_quietly(gymnasium.make, f"{robot}-v5", disable_env_checker=True).unwrapped
            self._base = base
            self._env = mamujoco_v1.parallel_env(robot, conf, agent_obsk=agent_obsk, gym_env=base,
                                                 global_categories=None if global_categories is None
                                                 else tuple(global_categories))
            self._agents = list(self._env.possible_agents)
            self._act_sizes = [self._env.action_space(a).shape[0] for a in self._agents]
            self.obs_dim = max(self._env.observation_space(a).shape[0] for a in self._agents)
            self.state_dim = base.observation_space.shape[0]
        self._t = 0

    def _observe(self, raw):
        """``raw``: the single-agent observation (omiga) or the library's per-agent dict (local)."""
        avail = np.ones((self.n_agents, 1), dtype=bool)
        if self.obs_mode == "omiga":
            if self._pad:
                raw = np.concatenate([raw, np.zeros(self._pad)])
            obs = omiga_obs(raw, self.n_agents)
            return obs, obs.reshape(-1), avail
        obs = np.zeros((self.n_agents, self.obs_dim), np.float32)
        for i, a in enumerate(self._agents):
            obs[i, :raw[a].shape[0]] = raw[a]
        return obs, self._env.state().astype(np.float32), avail

    def reset(self, seed: int | None = None):
        self._t = 0
        raw, _ = self._env.reset(seed=seed)
        return self._observe(raw)

    def step(self, actions):
        a = np.clip(np.asarray(actions, dtype=np.float64).reshape(self.n_agents, self.act_dim), -1.0, 1.0)
        self._t += 1
        if self.obs_mode == "omiga":
            raw, reward, terminated, _, _ = self._env.step(a.reshape(-1))  # agent i drives chunk i
        else:
            raw, rewards, terms, _, _ = self._env.step(
                {name: a[i, :k] for i, (name, k) in enumerate(zip(self._agents, self._act_sizes))})
            reward, terminated = rewards[self._agents[0]], terms[self._agents[0]]
        terminated = bool(terminated)
        return (*self._observe(raw), float(reward), terminated, not terminated and self._t >= self.episode_limit, {})

    def render(self, width: int = 320, height: int = 240) -> np.ndarray:
        """An RGB frame ``[height, width, 3]`` of the robot, rendered off-screen with a camera that
        follows it (set ``MUJOCO_GL=egl`` or ``osmesa`` before mujoco is imported on a machine without
        a screen; ``common.runs`` does for ``--capture-video``)."""
        import mujoco

        base = self._env if self.obs_mode == "omiga" else self._base
        if getattr(self, "_renderer", None) is None:
            self._renderer = mujoco.Renderer(base.model, height, width)
            self._camera = mujoco.MjvCamera()
            self._camera.type = mujoco.mjtCamera.mjCAMERA_TRACKING
            self._camera.trackbodyid = 1
            self._camera.distance = 4.0  # metres: the whole robot, Ant included
            self._camera.elevation = -20.0
        self._renderer.update_scene(base.data, camera=self._camera)
        return self._renderer.render()

    def close(self):
        if getattr(self, "_renderer", None) is not None:
            self._renderer.close()
            self._renderer = None
        self._env.close()


def _make_mamujoco(task: str, **options: Any) -> MultiAgentEnv:
    _check_options("mamujoco", MaMuJoCo, options)
    return MaMuJoCo(task, **options)


# ====================================================================== rware
RWARE_STATES = ("concat", "alberdice")
RWARE_REWARDS = ("sum", "alberdice")


def alberdice_warehouse_reward(reward0: float, obs0: np.ndarray) -> float:
    """AlberDICE's Warehouse team reward: agent 0's own reward plus the dense shaping
    of its released env (marl_env/.../reward_calculator.py), read from agent 0's new
    observation (rware's flat layout: 8 own features, then 3x3 cells of ``[agent,
    direction x4, shelf, requested]``, the agent's own cell in the middle): +0.006 on a
    requested shelf while carrying one, +0.003 on it without, +0.001 when any requested
    shelf is in view."""
    cells = np.asarray(obs0[8:8 + 63]).reshape(9, 7)
    requested = (cells[:, 5] == 1) & (cells[:, 6] == 1)
    bonus = (0.006 if obs0[2] == 1 else 0.003) if requested[4] else 0.0
    return float(reward0) + bonus + (0.001 if requested.any() else 0.0)


class Warehouse(MultiAgentEnv):
    """The multi-robot warehouse (RWARE, package ``rware`` 2.x, gymnasium id
    ``rware-<task>-v2``, e.g. ``tiny-2ag``, ``small-4ag``, ``medium-6ag-hard``).

    Five actions (noop, forward, left, right, toggle load), all always available.
    Each agent's obs is rware's flat 71-dim local view. The episode is cut
    (``truncated``) after ``episode_limit`` steps (500, as AlberDICE's Warehouse
    config); there is no other ending. ``state="concat"`` is all agents' observations
    concatenated; ``state="alberdice"`` is AlberDICE's shared observation (each
    agent's x, y, direction, then each requested shelf's x, y). ``reward="sum"`` is the
    number of requested shelves delivered (the sum of rware's individual rewards);
    ``reward="alberdice"`` is ``alberdice_warehouse_reward``."""

    discrete = True

    def __init__(self, task: str, episode_limit: int = 500, state: str = "concat", reward: str = "sum"):
        if state not in RWARE_STATES:
            raise EnvError(f"unknown rware state {state!r}; choose one of {', '.join(RWARE_STATES)}")
        if reward not in RWARE_REWARDS:
            raise EnvError(f"unknown rware reward {reward!r}; choose one of {', '.join(RWARE_REWARDS)}")
        try:
            import gymnasium
            import rware  # noqa: F401  (registers the rware-* ids)
        except ImportError as e:
            raise EnvError(f"rware needs the rware package: pip install 'offline-marl[rware]' ({e})") from None
        gym_id = f"rware-{task}-v2"
        if gym_id not in gymnasium.registry:
            raise EnvError(f"unknown rware task {task!r}; tasks are <size>-<n>ag[-easy|-hard] with size one of "
                           "tiny, small, medium, large and 1 to 19 agents, e.g. tiny-2ag, small-4ag")
        # the bare env with no step limit of its own: the cut is counted here and reported as truncated
        self._env = gymnasium.make(gym_id, max_steps=None, disable_env_checker=True).unwrapped
        self.game = self._env  # the package's Warehouse, for scripted policies (common.scripted)
        self.n_agents = self._env.n_agents
        self.n_actions = int(self._env.action_space[0].n)
        self.obs_dim = int(self._env.observation_space[0].shape[0])
        self.state_mode, self.reward_mode = state, reward
        self.state_dim = (self.n_agents * self.obs_dim if state == "concat"
                          else 3 * self.n_agents + 2 * self._env.request_queue_size)
        self.episode_limit = int(episode_limit)
        self._t = 0

    def _observe(self, raw):
        obs = np.stack(raw).astype(np.float32)
        if self.state_mode == "concat":
            state = obs.reshape(-1)
        else:
            env = self._env
            state = np.array([v for a in env.agents for v in (a.x, a.y, a.dir.value)]
                             + [v for s in env.request_queue for v in (s.x, s.y)], dtype=np.float32)
        return obs, state, np.ones((self.n_agents, self.n_actions), dtype=bool)

    def reset(self, seed: int | None = None):
        self._t = 0
        raw, _ = self._env.reset(seed=seed)
        return self._observe(raw)

    def step(self, actions):
        raw, rewards, _, _, _ = self._env.step([int(a) for a in np.asarray(actions).reshape(self.n_agents)])
        self._t += 1
        out = self._observe(raw)
        r = sum(rewards) if self.reward_mode == "sum" else alberdice_warehouse_reward(rewards[0], out[0][0])
        return (*out, float(r), False, self._t >= self.episode_limit, {})

    def close(self):
        self._env.close()


def _make_rware(task: str, **options: Any) -> MultiAgentEnv:
    _check_options("rware", Warehouse, options)
    return Warehouse(task, **options)


# ==================================================================== lbf
LBF_HELP = "lbf needs the lbforaging package: pip install 'offline-marl[lbf]'"


def lbf_gym_id(task: str) -> str:
    """lbforaging's gymnasium id of a task: ``8x8-2p-2f-coop`` -> ``Foraging-8x8-2p-2f-coop-v3``,
    ``2s-8x8-2p-2f`` -> ``Foraging-2s-8x8-2p-2f-v3``; a full id is returned as it is."""
    return task if task.startswith("Foraging") else f"Foraging-{task}-v3"


class Foraging(MultiAgentEnv):
    """Level-Based Foraging (package ``lbforaging`` 2.x, gymnasium id
    ``Foraging[-2s]-<s>x<s>-<n>p-<f>f[-coop]-v3``; the task is the id's middle part,
    e.g. ``8x8-2p-2f-coop``, ``10x10-3p-3f``, ``2s-8x8-2p-2f`` for sight 2).

    Six actions (none, north, south, west, east, load); ``avail`` is the package's
    valid-action table (a move into food or off the grid, or a load with no food
    next to the agent, is unavailable; the package would turn it into "none").
    Each agent observes the package's flat vector: ``(y, x, level)`` of each food in
    sight (row-major order, ``(-1, -1, 0)`` when fewer), then ``(y, x, level)`` of
    itself and of the other agents in agent order (``(-1, -1, 0)`` when out of
    sight). With full sight (no ``-2s``) positions are absolute. The state is the
    same vector over the whole grid with the agents in agent order, i.e. agent 0's
    full-sight observation. The team reward is the sum of the agents' rewards: each
    food pays its level divided by the total level of the episode's food, so
    collecting all food returns 1. Collecting the last food is ``terminated``;
    reaching ``episode_limit`` (50, the package's) with food left is ``truncated``."""

    discrete = True

    def __init__(self, task: str, episode_limit: int = 50):
        try:
            import gymnasium
            import lbforaging  # noqa: F401  (registers the Foraging-* ids)
            from lbforaging.foraging.environment import ForagingEnv
        except ImportError as e:
            raise EnvError(f"{LBF_HELP} ({e})") from None
        gym_id = lbf_gym_id(task)
        if gym_id not in gymnasium.registry or gymnasium.registry[gym_id].kwargs.get("grid_observation"):
            raise EnvError(f"unknown lbf task {task!r}; tasks are [2s-]<s>x<s>-<n>p-<f>f[-coop] (lbforaging's "
                           "Foraging-...-v3 ids, s 5 to 19, n 2 to 9, f 1 to 4), e.g. 8x8-2p-2f-coop, 10x10-3p-3f")
        if isinstance(episode_limit, bool) or not isinstance(episode_limit, (int, np.integer)) or episode_limit < 1:
            raise EnvError(f"lbf episode_limit must be a positive integer, got {episode_limit!r}")
        # the package's own step limit ends the episode with the same flag as the last food: it is
        # set to our limit and the two are told apart from the field in step()
        kwargs = {**gymnasium.registry[gym_id].kwargs, "max_episode_steps": int(episode_limit)}
        self.game = ForagingEnv(**kwargs)
        self.n_agents = self.game.n_agents
        self.n_actions = int(self.game.action_space[0].n)
        self.obs_dim = int(self.game.observation_space[0].shape[0])
        self.state_dim = 3 * (self.game.max_num_food + self.n_agents)
        self.episode_limit = int(episode_limit)
        self._over = True

    def global_state(self) -> np.ndarray:
        """``(y, x, level)`` of every food on the grid (row-major; ``(-1, -1, 0)`` after the
        last), then of every agent in agent order."""
        g = self.game
        out = np.zeros((g.max_num_food + self.n_agents, 3), np.float32)
        out[:g.max_num_food, :2] = -1
        ys, xs = np.nonzero(g.field)
        out[:len(ys), 0], out[:len(ys), 1], out[:len(ys), 2] = ys, xs, g.field[ys, xs]
        out[g.max_num_food:] = [(p.position[0], p.position[1], p.level) for p in g.players]
        return out.reshape(-1)

    def _observe(self, raw):
        g = self.game
        avail = np.zeros((self.n_agents, self.n_actions), dtype=bool)
        for i, p in enumerate(g.players):
            avail[i, [a.value for a in g._valid_actions[p]]] = True
        return np.stack(raw).astype(np.float32), self.global_state(), avail

    def reset(self, seed: int | None = None):
        # lbforaging places each player on a cell no other player holds, and counts the positions
        # left over from the previous episode: clear them, so that a reset depends on its seed only
        # (as a fresh environment's first reset), not on how the previous episode ended
        for p in self.game.players:
            p.position = None
        raw, _ = self.game.reset(seed=seed)
        self._over = False
        return self._observe(raw)

    def step(self, actions):
        if self._over:
            raise RuntimeError("Foraging.step called on a finished episode; call reset() first")
        raw, rewards, done, _, _ = self.game.step([int(a) for a in np.asarray(actions).reshape(self.n_agents)])
        terminated = bool(self.game.field.sum() == 0)
        self._over = bool(done)
        return (*self._observe(raw), float(sum(rewards)), terminated, self._over and not terminated, {})


def _make_lbf(task: str, **options: Any) -> MultiAgentEnv:
    _check_options("lbf", Foraging, options)
    return Foraging(task, **options)


# ============================================================ smacv1 / smacv2
SMACV2_TASKS = tuple(f"{race}_{size}" for race in ("protoss", "terran", "zerg")
                     for size in ("5_vs_5", "10_vs_10", "10_vs_11", "20_vs_20", "20_vs_23"))

# The standard SMACv2 scenarios (smacv2/examples/configs/sc2_gen_<race>.yaml and the
# README's table of n_units/n_enemies): race -> (map, unit types, their weights, unit
# types a team may not consist of entirely).
SMACV2_RACES = {
    "protoss": ("10gen_protoss", ("stalker", "zealot", "colossus"), (0.45, 0.45, 0.1), ()),
    "terran": ("10gen_terran", ("marine", "marauder", "medivac"), (0.45, 0.45, 0.1), ("medivac",)),
    "zerg": ("10gen_zerg", ("zergling", "baneling", "hydralisk"), (0.45, 0.1, 0.45), ("baneling",)),
}
# The configs' env_args that differ from StarCraft2Env's defaults (the rest are defaults).
SMACV2_ENV_ARGS = {"conic_fov": False, "obs_own_pos": True, "use_unit_ranges": True, "min_attack_range": 2,
                   "num_fov_actions": 12}


def smacv2_capability_config(task: str) -> dict[str, Any]:
    """The capability config of a standard SMACv2 task, e.g. ``zerg_10_vs_11``: teams
    drawn by unit-type weights (enemies mirror the allies, plus extra draws when they
    outnumber them), start positions "surrounded" or "reflect" with probability 0.5 on
    a 32x32 map."""
    race, allies, _, enemies = task.split("_")
    _, units, weights, exceptions = SMACV2_RACES[race]
    team_gen = {"dist_type": "weighted_teams", "unit_types": list(units), "weights": list(weights), "observe": True}
    if exceptions:
        team_gen["exception_unit_types"] = list(exceptions)
    return {"n_units": int(allies), "n_enemies": int(enemies), "team_gen": team_gen,
            "start_positions": {"dist_type": "surrounded_and_reflect", "p": 0.5, "map_x": 32, "map_y": 32}}


def _sc2_help(package: str) -> str:
    maps = ("https://github.com/oxwhirl/smac/releases/download/v0.1-beta1/SMAC_Maps.zip" if package == "smac"
            else "https://github.com/oxwhirl/smacv2/releases/tag/maps")
    return (f"to run it: pip install git+https://github.com/oxwhirl/{package}.git, install StarCraft II "
            f"(Linux: https://github.com/Blizzard/s2client-proto#downloads), unzip the SMAC maps ({maps}) into "
            "$SC2PATH/Maps/SMAC_Maps, export SC2PATH=<the StarCraftII directory>, and export "
            "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python before starting Python")


def _import_sc2(env: str, package: str):
    """``package.env``, or an ``EnvError`` saying how to install it."""
    import importlib
    import os

    # pysc2's protobuf files clash with tensorboard's protobuf unless the pure-Python
    # implementation is chosen before protobuf is first imported.
    os.environ.setdefault("PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION", "python")
    try:
        return importlib.import_module(f"{package}.env")
    except ImportError as e:
        raise EnvError(f"{env} needs the {package} package, which is not installed ({e}); "
                       f"{_sc2_help(package)}") from None
    except Exception as e:  # typically protobuf's "Descriptors cannot be created directly"
        raise EnvError(f"importing {package} failed ({type(e).__name__}: {e}); {_sc2_help(package)}") from None


def _check_sc2(env: str, package: str, map_file: str) -> None:
    """Fail with what to do unless StarCraft II and ``map_file`` are where pysc2 looks."""
    import os

    root = os.path.expanduser(os.environ.get("SC2PATH", "~/StarCraftII"))  # pysc2's default on Linux
    if not os.path.isdir(os.path.join(root, "Versions")):
        where = f"SC2PATH={root}" if "SC2PATH" in os.environ else f"SC2PATH is not set and {root}"
        raise EnvError(f"{env} needs StarCraft II, but {where} has no game (no Versions directory); "
                       f"{_sc2_help(package)}")
    maps = os.path.join(root, "Maps", "SMAC_Maps")
    if not os.path.isfile(os.path.join(maps, map_file)):
        raise EnvError(f"{env} needs the map {map_file}, which is not in {maps}; {_sc2_help(package)}")


class StarCraft(MultiAgentEnv):
    """SMACv1 or SMACv2 behind the protocol: ``get_obs``/``get_state``/
    ``get_avail_actions`` after ``reset`` and ``step``; ``info["won"]`` is the game's
    ``battle_won``; a battle that reaches the map's time limit is ``truncated`` (the
    packages flag it with ``info["episode_limit"]``, which they set only with
    ``continuing_episode=True``; that flag changes nothing else, so it is always on).

    StarCraft II cannot be reseeded per episode: ``reset(seed)`` ignores the seed; the
    game's seed is the ``seed`` option given at construction."""

    discrete = True

    def __init__(self, game: Any):
        self._game = game
        info = game.get_env_info()
        self.n_agents, self.n_actions = int(info["n_agents"]), int(info["n_actions"])
        self.obs_dim, self.state_dim = int(info["obs_shape"]), int(info["state_shape"])
        self.episode_limit = int(info["episode_limit"])

    def _observe(self):
        g = self._game
        return (np.asarray(g.get_obs(), dtype=np.float32).reshape(self.n_agents, self.obs_dim),
                np.asarray(g.get_state(), dtype=np.float32).reshape(self.state_dim),
                np.asarray(g.get_avail_actions()).astype(bool).reshape(self.n_agents, self.n_actions))

    def reset(self, seed: int | None = None):
        self._game.reset()
        return self._observe()

    def step(self, actions):
        reward, ended, info = self._game.step([int(a) for a in np.asarray(actions).reshape(self.n_agents)])
        truncated = bool(ended and info.get("episode_limit", False))
        return (*self._observe(), float(reward), bool(ended) and not truncated, truncated,
                {**info, "won": bool(info.get("battle_won", False))})

    def close(self):
        self._game.close()


def _construct(env: str, make: Callable[..., Any], **kwargs: Any) -> Any:
    """The package's env (this does not start the game yet)."""
    try:
        return make(**kwargs, continuing_episode=True)
    except KeyError as e:  # the packages' map registry
        raise EnvError(f"unknown {env} map {e}; python -m {'smac' if env == 'smacv1' else 'smacv2'}.bin.map_list "
                       "lists them") from None
    except TypeError as e:  # an option the package does not know
        raise EnvError(f"{env}: bad option ({e})") from None


def _make_smacv1(task: str, **options: Any) -> MultiAgentEnv:
    """SMACv1 map ``task`` (e.g. 3m, 5m_vs_6m, corridor); ``options`` go to
    ``smac.env.StarCraft2Env`` (its defaults are the SMAC benchmark's settings)."""
    module = _import_sc2("smacv1", "smac")
    game = _construct("smacv1", module.StarCraft2Env, map_name=task, **options)
    _check_sc2("smacv1", "smac", f"{task}.SC2Map")
    return StarCraft(game)


def _make_smacv2(task: str, **options: Any) -> MultiAgentEnv:
    """SMACv2 task ``task`` with the standard capability config; ``options`` go to
    ``smacv2.env.StarCraftCapabilityEnvWrapper`` over ``SMACV2_ENV_ARGS``."""
    module = _import_sc2("smacv2", "smacv2")
    game = _construct("smacv2", module.StarCraftCapabilityEnvWrapper, map_name=SMACV2_RACES[task.split("_")[0]][0],
                      capability_config=smacv2_capability_config(task), **{**SMACV2_ENV_ARGS, **options})
    _check_sc2("smacv2", "smacv2", "32x32_flat.SC2Map")
    return StarCraft(game)


# ================================================================== registry
MATRIX_MMDPS = {"omcda_relay": MatrixRelay}


def _make_matrix(task: str, **options: Any) -> MultiAgentEnv:
    cls = MATRIX_MMDPS.get(task, MatrixGame)
    _check_options("matrix", cls, options)
    return cls(task, **options)


FAMILIES: dict[str, tuple[Callable[..., MultiAgentEnv], tuple[str, ...] | None]] = {
    # env -> (factory(task, **options), known tasks or None when any task name is passed through)
    "matrix": (_make_matrix, (*PAYOFFS, *MATRIX_MMDPS)),
    "bridge": (_make_bridge, ("hard", "easy")),
    "mamujoco": (_make_mamujoco, MAMUJOCO_TASKS),
    "rware": (_make_rware, None),
    "lbf": (_make_lbf, None),
    "smacv1": (_make_smacv1, None),
    "smacv2": (_make_smacv2, SMACV2_TASKS),
}


def make_env(env: str, task: str, **options: Any) -> MultiAgentEnv:
    """Build environment ``env``/``task``; ``options`` go to the family's constructor
    (e.g. ``episode_limit``, ``obs_mode``). Unknown names and missing packages raise
    ``EnvError`` with what exists and what to install."""
    if env not in FAMILIES:
        raise EnvError(f"unknown env {env!r}; choose one of {', '.join(FAMILIES)}")
    factory, tasks = FAMILIES[env]
    if tasks is not None and task not in tasks:
        raise EnvError(f"unknown {env} task {task!r}; choose one of {', '.join(tasks)}")
    e = factory(task, **options)
    e.spec = {"env": env, "task": task, "options": dict(options)}
    return e


def make_env_for(meta: dict[str, Any], episode_limit: int = 0, **options: Any) -> MultiAgentEnv:
    """The environment a dataset was recorded in: ``meta['env']``/``meta['task']`` with the
    dataset's ``meta['env_options']`` (e.g. the MaMuJoCo ``obs_mode``), overridden by ``options``;
    ``episode_limit`` > 0 replaces the dataset's limit, 0 keeps it."""
    if episode_limit > 0:
        options["episode_limit"] = episode_limit
    return make_env(meta["env"], meta["task"], **{**meta.get("env_options", {}), **options})


# The evaluation protocol of the small games (AlberDICE's configs: Penalty-XOR 100 steps, Bridge 20),
# whose datasets were recorded with 50-step episodes; every other family, and the matrix games of fixed
# length (the one-step toy, the 8-step relay), evaluates with the limit its data was recorded with.
EVAL_EPISODE_LIMIT = {"matrix": 100, "bridge": 20}
FIXED_LENGTH = {"matrix": (*ONE_SHOT, *MATRIX_MMDPS)}


def eval_env_for(meta: dict[str, Any], episode_limit: int = 0) -> MultiAgentEnv:
    """The environment every algorithm file evaluates a policy trained on a dataset with ``meta``
    in (``--eval-episode-limit``): ``make_env_for(meta)`` with ``episode_limit`` steps when > 0, else
    the family's evaluation protocol (``EVAL_EPISODE_LIMIT``: matrix 100, bridge 20, except the games
    of fixed length), else the dataset's own limit."""
    if episode_limit <= 0 and meta["task"] not in FIXED_LENGTH.get(meta["env"], ()):
        episode_limit = EVAL_EPISODE_LIMIT.get(meta["env"], 0)
    return make_env_for(meta, episode_limit)


def matrix_policy_summary(env: MultiAgentEnv, act_fn: Callable[..., Any]) -> dict[str, Any]:
    """For the two-player matrix games and a policy with ``act_fn.probs(obs, avail) -> [E, N, K]``:
    ``expected_return``, the exact expected episode return of the stochastic policies
    (``env.exact_return``, no evaluation noise); for a stateless game also the joint policy
    pi_1(a_1) pi_2(a_2) and its exact expected team reward per step,
    ``expected_team_reward`` = sum_{a_1, a_2} pi_1(a_1) pi_2(a_2) R(a_1, a_2). Empty otherwise."""
    if env.spec.get("env") != "matrix" or not hasattr(act_fn, "probs") or env.n_agents != 2:
        return {}

    def probs(obs, avail):
        p = act_fn.probs(obs, avail)
        return p.detach().cpu().numpy() if hasattr(p, "detach") else np.asarray(p)

    out: dict[str, Any] = {"expected_return": env.exact_return(probs)}
    if hasattr(env, "payoff"):
        obs, _, avail = env.reset(0)
        p = probs(obs[None], avail[None])[0]
        joint = np.outer(p[0], p[1]).astype(np.float64)
        out |= {"joint_policy": joint.round(4).tolist(),
                "expected_team_reward": float((joint * np.asarray(env.payoff, dtype=np.float64)).sum())}
    return out


# ================================================================= evaluation
def record_video(env: MultiAgentEnv, act_fn: Callable[..., Any], seed: int, path: str | Path, fps: int = 30,
                 max_steps: int = 1000) -> Path:
    """One episode of ``act_fn`` from ``seed`` in an environment with ``render()`` (MaMuJoCo),
    written as an mp4 at ``path`` (imageio with its ffmpeg plugin)."""
    try:
        import imageio.v2 as imageio
    except ImportError as e:
        raise EnvError(f"writing videos needs imageio and imageio-ffmpeg: pip install \"offline-marl[mujoco]\" ({e})") from None
    if not hasattr(env, "render"):
        raise EnvError(f"{type(env).__name__} cannot render frames; --capture-video records MaMuJoCo episodes")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if hasattr(act_fn, "reseed"):
        act_fn.reseed(seed)
    if hasattr(act_fn, "reset"):
        act_fn.reset(np.ones(1, bool))
    obs, state, avail = env.reset(seed)
    frames = [env.render()]
    for _ in range(max_steps):
        acts = act_fn(obs[None], state[None], avail[None])
        acts = acts.detach().cpu().numpy() if hasattr(acts, "detach") else np.asarray(acts)
        obs, state, avail, r, term, trunc, _ = env.step(acts[0])
        if hasattr(act_fn, "observe_reward"):
            act_fn.observe_reward(np.array([r], np.float32))
        frames.append(env.render())
        if term or trunc:
            break
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    imageio.mimwrite(tmp, frames, fps=fps, macro_block_size=1)
    os.replace(tmp, path)
    return path


def _worker(conn, spec: dict[str, Any]) -> None:
    env = make_env(spec["env"], spec["task"], **spec["options"])
    try:
        while True:
            cmd, arg = conn.recv()
            if cmd == "reset":
                conn.send(env.reset(arg))
            elif cmd == "step":
                conn.send(env.step(arg))
            else:
                break
    except (EOFError, KeyboardInterrupt):
        pass
    finally:
        env.close()
        conn.close()


class _Envs:
    """``n`` environments side by side: in this process, or one per worker process."""

    def __init__(self, env: MultiAgentEnv, n: int, workers: bool):
        self.workers = workers
        if workers:
            ctx = mp.get_context("spawn")
            self.conns, self.procs = [], []
            for _ in range(n):
                parent, child = ctx.Pipe()
                p = ctx.Process(target=_worker, args=(child, env.spec), daemon=True)
                p.start()
                child.close()
                self.conns.append(parent)
                self.procs.append(p)
        else:
            self.envs = [env] + [make_env(env.spec["env"], env.spec["task"], **env.spec["options"]) for _ in range(n - 1)]

    def call(self, cmd: str, args: dict[int, Any]) -> dict[int, Any]:
        if not self.workers:
            return {i: getattr(self.envs[i], cmd)(a) for i, a in args.items()}
        for i, a in args.items():
            self.conns[i].send((cmd, a))
        return {i: self.conns[i].recv() for i in args}

    def close(self, keep_first: bool) -> None:
        if self.workers:
            for c, p in zip(self.conns, self.procs):
                try:
                    c.send(("close", None))
                except (BrokenPipeError, OSError):
                    pass
                p.join(timeout=5)
        else:
            for e in self.envs[1 if keep_first else 0:]:
                e.close()


def evaluate(env: MultiAgentEnv, act_fn: Callable[..., Any], episodes: int, seed: int = 0,
             n_envs: int = 1, workers: bool = False) -> dict[str, Any]:
    """Run ``episodes`` episodes of ``act_fn`` and summarise them.

    ``act_fn(obs [E, N, obs_dim], state [E, S], avail [E, N, K]) -> actions`` acts
    for ``E = n_envs`` environments at once (one batched forward pass); it returns
    ``[E, N]`` integers or ``[E, N, act_dim]`` floats (numpy or torch). If it has a
    ``reset(mask)`` method (recurrent or history-based policies), that is called
    with a bool mask ``[E]`` of the environments starting a new episode; if it has an
    ``observe_reward(reward)`` method (return-conditioned policies), that is called
    after every step with the team rewards ``[E]`` (0 for idle environments). Episode
    ``i`` is reset with seed ``seed + i``. With ``workers=True`` each environment
    runs in its own process (for simulators that dominate the cost).

    If it has a ``reseed(seed)`` method (policies that sample actions), that is called
    first with ``seed``, so an evaluation depends only on the policy and ``seed``.

    Returns ``return_mean``, ``return_std``, ``return_per_step`` (all rewards over all
    steps), ``win_rate`` (None when the game has no
    winner), ``length_mean``, and the per-episode ``returns``/``lengths``/``won``."""
    if episodes < 1:
        raise ValueError("evaluate needs at least one episode")
    n = max(1, min(int(n_envs), episodes))
    if hasattr(act_fn, "reseed"):
        act_fn.reseed(seed)
    envs = _Envs(env, n, workers)
    try:
        returns, lengths, wins = [], [], []
        next_ep = 0
        cur = {}
        obs = np.zeros((n, env.n_agents, env.obs_dim), np.float32)
        state = np.zeros((n, env.state_dim), np.float32)
        avail = np.ones((n, env.n_agents, env.n_actions), bool)
        active = np.zeros(n, bool)
        started = np.zeros(n, bool)

        def start(ids: list[int]) -> None:
            nonlocal next_ep
            todo = {}
            for i in ids:
                if next_ep < episodes:
                    todo[i] = seed + next_ep
                    next_ep += 1
                    active[i] = True
                    started[i] = True
                    cur[i] = [0.0, 0, False]
                else:
                    active[i] = False
            for i, (o, s, a) in envs.call("reset", todo).items():
                obs[i], state[i], avail[i] = o, s, a

        start(list(range(n)))
        while active.any():
            if hasattr(act_fn, "reset") and started.any():
                act_fn.reset(started.copy())
            started[:] = False
            acts = act_fn(obs, state, avail)
            if hasattr(acts, "detach"):
                acts = acts.detach().cpu().numpy()
            acts = np.asarray(acts)
            ids = [int(i) for i in np.flatnonzero(active)]
            done = []
            rewards = np.zeros(n, np.float32)
            for i, (o, s, a, r, term, trunc, info) in envs.call("step", {i: acts[i] for i in ids}).items():
                obs[i], state[i], avail[i] = o, s, a
                rewards[i] = r
                c = cur[i]
                c[0] += float(r)
                c[1] += 1
                c[2] = info.get("won")
                if term or trunc:
                    returns.append(c[0])
                    lengths.append(c[1])
                    wins.append(c[2])
                    done.append(i)
            if hasattr(act_fn, "observe_reward"):
                act_fn.observe_reward(rewards)
            if done:
                start(done)
    finally:
        envs.close(keep_first=True)
    ret = np.asarray(returns, dtype=np.float64)
    has_win = any(w is not None for w in wins)
    return dict(
        return_mean=float(ret.mean()), return_std=float(ret.std()),
        return_per_step=float(ret.sum() / max(1, int(np.sum(lengths)))),
        win_rate=float(np.mean([bool(w) for w in wins])) if has_win else None,
        length_mean=float(np.mean(lengths)), returns=returns, lengths=lengths,
        won=[bool(w) for w in wins] if has_win else None,
    )
