"""Scripted expert policies for Level-Based Foraging and RWARE (docs/datasets.md).

Both are *controllers*: ``reset(env, rng)`` at the start of an episode, then
``controller(env, obs, state, avail) -> actions [N]`` every step. They read the
environment's own objects (``env.game``: the package's ``ForagingEnv`` or
``Warehouse``), as a scripted policy of a partially observed game must, so they are
rolled out by ``common.collect.rollout_controlled``, which builds environment and
controller together in each worker process. ``rng`` breaks ties (and the
livelock breaker draws from it), so an episode depends only on its reset seed and
its random stream.

- ``LBFExpert``: greedy team formation. Food is taken in order of how soon a group of
  free agents whose levels add up to its level can stand next to it; every agent walks
  a shortest path (BFS around food and around agents that stay put) to its own cell
  next to its food, and the group loads together once enough of it is there. Agents
  left over help the nearest food.
- ``RwareExpert``: free agents are assigned to the requested shelves nearest to them;
  an agent walks to its shelf (under other shelves, which an unloaded robot may), picks
  it up, carries it to the nearest goal along highways and free slots (a loaded robot
  cannot pass under shelves), then carries it back to the nearest free slot and puts
  it down. Routes are shortest paths in (cell, heading) space, where turning costs a
  step. An agent blocked by another agent replans around it. Livelock breaker (two
  loaded robots meeting head-on in a one-lane aisle would otherwise wait for each other
  forever): when agents make no progress for a few steps, one of them gives way, heading
  for a nearby cell on no other agent's route; when no agent at all has made progress for
  longer (several robots jammed in one aisle), all of them move at random for a few steps.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np

# ======================================================================= LBF
# lbforaging's actions; moves as (dy, dx)
LBF_NONE, LBF_LOAD = 0, 5
LBF_MOVES = {1: (-1, 0), 2: (1, 0), 3: (0, -1), 4: (0, 1)}  # north, south, west, east


def _grid_bfs(shape: tuple[int, int], sources: list[tuple[int, int]], blocked: np.ndarray) -> np.ndarray:
    """Steps from every cell to the nearest source over unblocked cells (4-neighbour
    moves); unreachable cells get a large number."""
    rows, cols = shape
    dist = np.full(shape, 10**6, dtype=np.int64)
    queue = deque()
    for s in sources:
        if not blocked[s]:
            dist[s] = 0
            queue.append(s)
    while queue:
        y, x = queue.popleft()
        d = dist[y, x] + 1
        for dy, dx in LBF_MOVES.values():
            ny, nx = y + dy, x + dx
            if 0 <= ny < rows and 0 <= nx < cols and not blocked[ny, nx] and dist[ny, nx] > d:
                dist[ny, nx] = d
                queue.append((ny, nx))
    return dist


class LBFExpert:
    """Coordinated Level-Based Foraging (see the module docstring); acts from the full
    grid of ``env.game``, whatever the agents' sight."""

    def reset(self, env: Any, rng: np.random.Generator) -> None:
        self.rng = rng

    def __call__(self, env: Any, obs: np.ndarray, state: np.ndarray, avail: np.ndarray) -> np.ndarray:
        game = env.game
        field = np.asarray(game.field)
        shape = field.shape
        pos = [tuple(int(v) for v in p.position) for p in game.players]
        level = [int(p.level) for p in game.players]
        n = len(pos)
        foods = [(int(y), int(x)) for y, x in zip(*np.nonzero(field))]
        actions = np.zeros(n, dtype=np.int64)
        if not foods:
            return actions
        food_cells = field > 0
        # cells next to each food, and the walking distance of every cell to them
        beside = {f: [(f[0] + dy, f[1] + dx) for dy, dx in LBF_MOVES.values()
                      if 0 <= f[0] + dy < shape[0] and 0 <= f[1] + dx < shape[1] and not food_cells[f[0] + dy, f[1] + dx]]
                  for f in foods}
        dist = {f: _grid_bfs(shape, beside[f], food_cells) for f in foods}
        # teams: the food a group can load soonest first
        free, left, target = set(range(n)), list(foods), [None] * n
        while free and left:
            best = None
            for f in left:
                group, total = [], 0
                for i in sorted(free, key=lambda i: (dist[f][pos[i]], i)):
                    group.append(i)
                    total += level[i]
                    if total >= field[f]:
                        break
                if total < field[f]:
                    continue
                key = (max(dist[f][pos[i]] for i in group), sum(dist[f][pos[i]] for i in group), f)
                if best is None or key < best[0]:
                    best = (key, f, group)
            if best is None:
                break
            _, f, group = best
            for i in group:
                target[i] = f
            free -= set(group)
            left.remove(f)
        for i in free:  # nobody to team up with: help at the nearest food
            target[i] = min(foods, key=lambda f: (dist[f][pos[i]], f))
        # each agent's own cell next to its food; load when the agents there are enough
        stay, goal = set(), {}
        for f in set(t for t in target if t is not None):
            members = [i for i in range(n) if target[i] == f]
            here = [i for i in members if pos[i] in beside[f]]
            if sum(level[i] for i in here) >= field[f]:
                for i in here:
                    actions[i] = LBF_LOAD if avail[i, LBF_LOAD] else LBF_NONE
                    stay.add(i)
                continue
            taken = {pos[i] for i in here}
            stay.update(here)
            for i in sorted(set(members) - set(here), key=lambda i: (dist[f][pos[i]], i)):
                cells = [c for c in beside[f] if c not in taken] or beside[f]
                c = min(cells, key=lambda c: (abs(c[0] - pos[i][0]) + abs(c[1] - pos[i][1]), c))
                taken.add(c)
                goal[i] = c
        # walk: the agents that stay are obstacles, and two agents never step into one cell
        blocked = food_cells.copy()
        for i in stay:
            blocked[pos[i]] = True
        for i in sorted(goal, key=lambda i: (dist[target[i]][pos[i]], i)):
            d = _grid_bfs(shape, [goal[i]], blocked)
            here = d[pos[i]]
            steps = [a for a, (dy, dx) in LBF_MOVES.items()
                     if avail[i, a] and 0 <= pos[i][0] + dy < shape[0] and 0 <= pos[i][1] + dx < shape[1]
                     and not blocked[pos[i][0] + dy, pos[i][1] + dx] and d[pos[i][0] + dy, pos[i][1] + dx] < here]
            if steps:
                a = steps[self.rng.integers(len(steps))]
                actions[i] = a
                blocked[pos[i][0] + LBF_MOVES[a][0], pos[i][1] + LBF_MOVES[a][1]] = True
            else:
                blocked[pos[i]] = True
        return actions


# ===================================================================== RWARE
# rware's actions and headings; a heading's move as (dy, dx); turning left/right steps
# through UP, RIGHT, DOWN, LEFT (rware's Direction values 0..3)
RW_NOOP, RW_FORWARD, RW_LEFT, RW_RIGHT, RW_TOGGLE = range(5)
RW_STEP = ((-1, 0), (1, 0), (0, -1), (0, 1))  # UP, DOWN, LEFT, RIGHT
_CLOCKWISE = (0, 3, 1, 2)  # UP -> RIGHT -> DOWN -> LEFT
_TURN = {RW_RIGHT: {d: _CLOCKWISE[(_CLOCKWISE.index(d) + 1) % 4] for d in range(4)},
         RW_LEFT: {d: _CLOCKWISE[(_CLOCKWISE.index(d) - 1) % 4] for d in range(4)}}
_UNREACHABLE = 10**6


def _route_table(open_: np.ndarray, targets: list[tuple[int, int]]) -> np.ndarray:
    """Actions needed from every (y, x, heading) to stand on any target cell, moving
    forward only into ``open_`` cells and turning in place (one step each): a BFS
    backwards from the targets. ``[H, W, 4]`` ints, ``_UNREACHABLE`` where impossible."""
    h, w = open_.shape
    dist = np.full((h, w, 4), _UNREACHABLE, dtype=np.int64)
    queue = deque()
    for y, x in targets:
        for d in range(4):
            dist[y, x, d] = 0
            queue.append((y, x, d))
    while queue:
        y, x, d = queue.popleft()
        k = dist[y, x, d] + 1
        for turn in (RW_LEFT, RW_RIGHT):  # the heading from which this turn leads to d
            p = _TURN[RW_RIGHT if turn == RW_LEFT else RW_LEFT][d]
            if dist[y, x, p] > k:
                dist[y, x, p] = k
                queue.append((y, x, p))
        py, px = y - RW_STEP[d][0], x - RW_STEP[d][1]  # forward from (py, px) heading d lands here
        if 0 <= py < h and 0 <= px < w and open_[py, px] and dist[py, px, d] > k:
            dist[py, px, d] = k
            queue.append((py, px, d))
    return dist


class RwareExpert:
    """Deliver requested shelves and put them back (see the module docstring)."""

    PATIENCE = 4  # steps without getting closer before an agent gives way
    YIELD = 6  # steps it then spends on the way to (or waiting in) a cell off the others' routes
    DEADLOCK, SHAKE = 12, 4  # steps in which no agent gets closer, then random moves for everyone

    def reset(self, env: Any, rng: np.random.Generator) -> None:
        self.rng = rng
        self.cache: dict[Any, np.ndarray] = {}
        n = env.n_agents
        self.assigned: list[Any] = [None] * n  # the requested shelf each free agent walks to
        self.best = [_UNREACHABLE] * n  # the smallest distance to the current target so far
        self.target_of: list[Any] = [None] * n
        self.stuck = [0] * n
        self.giving_way: list[Any] = [None] * n  # (cell, steps left) while an agent gives way
        self.calm = 0  # steps in which no agent got closer to its target
        self.shaking = 0  # random steps left for everyone

    def _table(self, key: Any, open_: np.ndarray, targets: list[tuple[int, int]]) -> np.ndarray:
        if key is None:
            return _route_table(open_, targets)
        if key not in self.cache:
            if len(self.cache) > 256:
                self.cache.clear()
            self.cache[key] = _route_table(open_, targets)
        return self.cache[key]

    def _plans(self, g: Any, standing: np.ndarray) -> list[Any]:
        """Per agent ``(cache key, target cells, open cells, action on arrival)`` or None."""
        h, w = g.grid_size
        agents, n = g.agents, len(g.agents)
        carried = {a.carrying_shelf.id for a in agents if a.carrying_shelf is not None}
        highway = g.highways.astype(bool)
        requested = {s.id: s for s in g.request_queue}
        layout = standing.tobytes()
        plans: list[Any] = [None] * n
        free_slots = [(int(y), int(x)) for y, x in zip(*np.nonzero(~highway & ~standing))]
        taken: set[tuple[int, int]] = set()
        for i, a in enumerate(agents):
            s = a.carrying_shelf
            if s is None:
                continue
            self.assigned[i] = None
            if s.id in requested:  # to the nearest goal: the delivery happens on arrival
                plans[i] = (("goal", layout), [(y, x) for x, y in g.goals], ~standing, RW_NOOP)
            elif not highway[a.y, a.x]:  # on a free slot: put it down
                plans[i] = (None, [(a.y, a.x)], ~standing, RW_TOGGLE)
            else:  # back to the nearest free slot
                slots = [c for c in free_slots if c not in taken] or free_slots
                c = min(slots, key=lambda c: (abs(c[0] - a.y) + abs(c[1] - a.x), c))
                taken.add(c)
                plans[i] = (("slot", c, layout), [c], ~standing, RW_TOGGLE)
        # free agents keep a shelf that is still requested and on the floor, else take the nearest
        for i, a in enumerate(agents):
            s = self.assigned[i]
            if s is not None and (s.id not in requested or s.id in carried):
                self.assigned[i] = None
        for i, a in enumerate(agents):
            if a.carrying_shelf is not None or self.assigned[i] is not None:
                continue
            wanted = {s.id for s in self.assigned if s is not None}
            choices = [s for s in requested.values() if s.id not in carried and s.id not in wanted]
            if choices:
                self.assigned[i] = min(choices, key=lambda s: (abs(s.y - a.y) + abs(s.x - a.x), s.id))
        everywhere = np.ones((h, w), dtype=bool)
        for i, a in enumerate(agents):
            if plans[i] is not None:
                continue
            s = self.assigned[i]
            if s is not None:
                plans[i] = (("shelf", s.y, s.x), [(s.y, s.x)], everywhere, RW_TOGGLE)
            elif highway[a.y, a.x]:  # nothing to do: wait off the aisles, under an unrequested shelf
                spots = [(int(y), int(x)) for y, x in zip(*np.nonzero(standing & ~highway))
                         if not any(r.y == y and r.x == x for r in requested.values())]
                if spots:
                    c = min(spots, key=lambda c: (abs(c[0] - a.y) + abs(c[1] - a.x), c))
                    plans[i] = (("park", c), [c], everywhere, RW_NOOP)
        return plans

    def _route(self, table: np.ndarray, a: Any, open_: np.ndarray, length: int = 12) -> list[tuple[int, int]]:
        """The cells of the agent's shortest route, up to ``length`` actions ahead."""
        y, x, d = a.y, a.x, a.dir.value
        cells = [(y, x)]
        h, w = open_.shape
        for _ in range(length):
            k = table[y, x, d]
            if k == 0 or k >= _UNREACHABLE:
                break
            dy, dx = RW_STEP[d]
            if 0 <= y + dy < h and 0 <= x + dx < w and open_[y + dy, x + dx] and table[y + dy, x + dx, d] < k:
                y, x = y + dy, x + dx
                cells.append((y, x))
            else:
                d = min((_TURN[t][d] for t in (RW_LEFT, RW_RIGHT)), key=lambda e: table[y, x, e])
        return cells

    def __call__(self, env: Any, obs: np.ndarray, state: np.ndarray, avail: np.ndarray) -> np.ndarray:
        g = env.game
        h, w = g.grid_size
        agents, n = g.agents, len(g.agents)
        carried = {a.carrying_shelf.id for a in agents if a.carrying_shelf is not None}
        standing = np.zeros((h, w), dtype=bool)  # shelves not on a robot: a loaded robot cannot enter
        for s in g.shelfs:
            if s.id not in carried:
                standing[s.y, s.x] = True
        plans = self._plans(g, standing)
        tables = [None if p is None else self._table(p[0], p[2], p[1]) for p in plans]
        dist = [None if t is None else int(t[a.y, a.x, a.dir.value]) for t, a in zip(tables, agents)]
        progress = False
        for i in range(n):  # progress: a new target resets it
            if plans[i] is None or self.target_of[i] != plans[i][0] or plans[i][0] is None:
                progress |= plans[i] is not None and plans[i][0] is not None
                self.target_of[i] = None if plans[i] is None else plans[i][0]
                self.best[i], self.stuck[i] = _UNREACHABLE if dist[i] is None else dist[i], 0
            elif dist[i] < self.best[i] or dist[i] == 0:
                progress = True
                self.best[i], self.stuck[i] = dist[i], 0
            elif self.giving_way[i] is None:
                self.stuck[i] += 1
        # the last resort: when nobody has got closer for a while (several robots jammed in an
        # aisle, which one agent giving way cannot undo), everybody moves at random for a few steps
        self.calm = 0 if progress else self.calm + 1
        if self.calm >= self.DEADLOCK:
            self.calm, self.shaking = 0, self.SHAKE
            self.giving_way = [None] * n
            self.stuck = [0] * n
        if self.shaking > 0:
            self.shaking -= 1
            return self.rng.choice(np.array([RW_FORWARD, RW_LEFT, RW_RIGHT]), size=n)
        # the livelock breaker: of the agents stuck for a while, one gives way to the others
        stuck = [i for i in range(n) if self.stuck[i] >= self.PATIENCE and self.giving_way[i] is None]
        if stuck and not any(x is not None for x in self.giving_way):
            i = stuck[self.rng.integers(len(stuck))]
            self.stuck[i] = 0
            open_ = plans[i][2] if plans[i] is not None else np.ones((h, w), dtype=bool)
            busy = {c for j in range(n) if j != i and tables[j] is not None
                    for c in self._route(tables[j], agents[j], plans[j][2])}
            busy |= {(a.y, a.x) for a in agents}
            reach = open_.copy()
            for j, a in enumerate(agents):
                if j != i:
                    reach[a.y, a.x] = False
            steps = _route_table(reach, [(agents[i].y, agents[i].x)]).min(-1)  # cells reachable from here
            cells = [(int(y), int(x)) for y, x in zip(*np.nonzero((steps < _UNREACHABLE) & reach))
                     if (y, x) not in busy]
            if cells:
                near = min(steps[c] for c in cells)
                cells = [c for c in cells if steps[c] <= near + 1]
                self.giving_way[i] = (cells[self.rng.integers(len(cells))], self.YIELD)

        acts = np.zeros(n, dtype=np.int64)
        occupied = {(a.y, a.x) for a in agents}
        claimed: set[tuple[int, int]] = set()
        for i, a in enumerate(agents):
            if self.giving_way[i] is not None:
                cell, left = self.giving_way[i]
                self.giving_way[i] = (cell, left - 1) if left > 1 else None
                open_ = plans[i][2] if plans[i] is not None else np.ones((h, w), dtype=bool)
                key, targets, arrive = None, [cell], RW_NOOP
                table = _route_table(open_, targets)
            elif plans[i] is None:
                continue
            else:
                key, targets, open_, arrive = plans[i]
                table = tables[i]
            if table[a.y, a.x, a.dir.value] == 0:
                acts[i] = arrive
                continue
            ahead = (a.y + RW_STEP[a.dir.value][0], a.x + RW_STEP[a.dir.value][1])
            acts[i] = self._best_move(table, a, open_)
            if acts[i] == RW_FORWARD and (ahead in occupied or ahead in claimed):  # a way around the robots
                detour = open_.copy()
                for c in (occupied - {(a.y, a.x)}) | claimed:
                    detour[c] = False
                table = _route_table(detour, targets)
                if table[a.y, a.x, a.dir.value] >= _UNREACHABLE:
                    acts[i] = RW_NOOP  # wait for the way to clear
                    continue
                acts[i] = self._best_move(table, a, detour)
            if acts[i] == RW_FORWARD:
                claimed.add(ahead)
        return acts

    def _best_move(self, table: np.ndarray, a: Any, open_: np.ndarray) -> int:
        h, w = open_.shape
        d = a.dir.value
        dy, dx = RW_STEP[d]
        options = [(table[a.y, a.x, _TURN[t][d]], t) for t in (RW_LEFT, RW_RIGHT)]
        if 0 <= a.y + dy < h and 0 <= a.x + dx < w and open_[a.y + dy, a.x + dx]:
            options.append((table[a.y + dy, a.x + dx, d], RW_FORWARD))
        best = min(v for v, _ in options)
        if best >= table[a.y, a.x, d]:
            return RW_NOOP
        moves = [m for v, m in options if v == best]
        return moves[self.rng.integers(len(moves))]


# ================================================================ playing them
CONTROLLERS = {"lbf": LBFExpert, "rware": RwareExpert}


def play(env: Any, controller: Any, reset_seed: int, rng: np.random.Generator, noise: float = 0.0) -> dict[str, Any]:
    """One episode of ``controller`` (None: every agent uniform over its available
    actions) in ``env``, each agent's action replaced with probability ``noise`` by a
    uniformly drawn available one. Returns the episode as ``rollout`` records it."""
    obs, state, avail = env.reset(seed=reset_seed)
    if controller is not None:
        controller.reset(env, rng)
    ep = dict(obs=[obs], state=[state], avail=[avail], actions=[], reward=[])
    while True:
        uniform = (rng.random(avail.shape) * avail).argmax(-1)  # uniform over the available actions
        if controller is None:
            a = uniform
        else:
            a = np.asarray(controller(env, obs, state, avail), dtype=np.int64)
            if noise > 0:
                a = np.where(rng.random(a.shape) < noise, uniform, a)
        obs, state, avail, r, term, trunc, _ = env.step(a)
        for k, v in (("obs", obs), ("state", state), ("avail", avail), ("actions", a), ("reward", r)):
            ep[k].append(v)
        if term or trunc:
            break
    return dict(obs=np.stack(ep["obs"]), state=np.stack(ep["state"]), avail=np.stack(ep["avail"]),
                actions=np.stack(ep["actions"]).astype(np.int64), reward=np.asarray(ep["reward"], np.float32),
                terminated=bool(term))


_worker_env: dict[str, Any] = {}


def play_many(spec: dict[str, Any], scripted: bool, jobs: list[tuple[int, Any]], noise: float = 0.0) -> list[dict]:
    """``play`` one episode per job ``(reset seed, seed of its random stream)`` in the
    environment ``spec`` (built once per process), with the family's scripted expert
    (``scripted``) or the uniform policy. This is what each worker process of
    ``common.collect.rollout_controlled`` runs."""
    from common.envs import make_env

    key = repr(spec)
    if key not in _worker_env:
        _worker_env.clear()
        _worker_env[key] = make_env(spec["env"], spec["task"], **spec["options"])
    env = _worker_env[key]
    controller = CONTROLLERS[spec["env"]]() if scripted else None
    return [play(env, controller, reset_seed, np.random.default_rng(rng_seed), noise)
            for reset_seed, rng_seed in jobs]
