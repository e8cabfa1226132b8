"""Where a saved policy stops making progress: how many of its evaluation episodes end with the
environment's state in a loop, when the loop starts, and when the last reward came; acting
greedily and by sampling.

A memoryless policy that acts deterministically (the greedy action, or a softmax saturated near
one action) in a deterministic game repeats itself for ever once it revisits a state: on LBF it
stands still (a loop of period 1), on RWARE robots turn or shuttle in place. This counts those
episodes: an episode "ends in a loop" when its state sequence (the environment's global state, as
the run's data records it) is periodic, with a period of at most ``--max-period`` steps, over at
least its last ``--window`` steps; the loop starts at the first step from which it is periodic.
Episodes that end by termination before ``--window`` steps count as not looped.

    python benchmarks/stalls.py benchmark_runs/rware/rware__tiny-2ag__expert__omar__0 \\
        benchmark_runs/rware/rware__tiny-2ag__expert__bc__0 --episodes 20

Each run directory is a finished or interrupted run of any discrete algorithm file (its
``config.json`` names the algorithm; its ``checkpoints/latest.pt`` is loaded with weights only).
Episode ``e`` is played with the environment seed of the run's final evaluation (``eval_seed(seed)
+ e``), at the evaluation's episode limit, one environment at a time. ``--modes`` chooses greedy,
sampled or both; a Q-greedy method (nothing to sample) is reported greedy only. Prints a Markdown
table: run, mode, mean return, episodes ending in a loop, median step at which those loops start,
median step of the last reward (-1: none in the episode).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tyro

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from common import OfflineMarlError  # noqa: E402
from common.envs import eval_env_for  # noqa: E402
from common.runs import eval_seed  # noqa: E402


@dataclass
class Args:
    runs: tyro.conf.Positional[tuple[str, ...]]
    """run directories (each with config.json and checkpoints/latest.pt)"""
    episodes: int = 20
    """episodes per run and mode"""
    modes: tuple[str, ...] = ("greedy", "sample")
    """greedy and/or sample"""
    max_period: int = 25
    """longest period that counts as a loop"""
    window: int = 100
    """a looped episode is periodic over at least its last this many steps"""
    threads: int = 1
    """torch CPU threads"""


def loop_start(states: list[bytes], max_period: int, window: int) -> tuple[int, int] | None:
    """``(period, start)`` when ``states`` is periodic with the smallest period ``p <= max_period``
    over (at least) its last ``window`` entries: ``states[t] == states[t - p]`` for every ``t`` from
    ``start + p`` to the end, and ``start`` is the earliest such index; None otherwise."""
    n = len(states)
    if n < window or window <= max_period:
        return None
    for p in range(1, max_period + 1):
        if all(states[t] == states[t - p] for t in range(n - window + p, n)):
            k = n - window
            while k - 1 >= 0 and states[k - 1 + p] == states[k - 1]:
                k -= 1
            return p, k
    return None


def algo_file(run_dir: Path) -> Path:
    config = run_dir / "config.json"
    if not config.is_file() or not (run_dir / "checkpoints" / "latest.pt").is_file():
        raise SystemExit(f"{run_dir} is not a run directory (it needs config.json and checkpoints/latest.pt)")
    name = json.loads(config.read_text()).get("algo", "")
    for f in (ROOT / f"{name}.py", ROOT / "baselines" / f"{name}.py"):
        if f.exists():
            return f
    raise SystemExit(f"{run_dir}: no algorithm file named {name}.py in {ROOT} or {ROOT / 'baselines'}")


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def play(act, env, episodes: int, seed0: int, max_period: int, window: int) -> dict:
    if hasattr(act, "reseed"):
        act.reseed(seed0)
    returns, looped, starts, last_reward = [], 0, [], []
    for e in range(episodes):
        obs, state, avail = env.reset(seed=seed0 + e)
        if hasattr(act, "reset"):
            act.reset(np.ones(1, bool))
        states, ret, last = [], 0.0, -1
        for t in range(env.episode_limit):
            a = act(obs[None].astype(np.float32), state[None].astype(np.float32), avail[None])
            if hasattr(a, "detach"):
                a = a.detach().cpu().numpy()
            obs, state, avail, r, term, trunc, _ = env.step(np.asarray(a)[0])
            if hasattr(act, "observe_reward"):
                act.observe_reward(np.array([r], np.float32))
            ret += float(r)
            states.append(np.asarray(state).tobytes())
            if r != 0:
                last = t
            if term or trunc:
                break
        returns.append(ret)
        last_reward.append(last)
        found = loop_start(states, max_period, window)
        if found is not None:
            looped += 1
            starts.append(found[1])
    return dict(ret=float(np.mean(returns)), looped=looped, episodes=episodes,
                start=float(np.median(starts)) if starts else None, last=float(np.median(last_reward)))


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    bad = set(args.modes) - {"greedy", "sample"}
    if bad or not args.modes:
        raise SystemExit(f"--modes takes greedy and/or sample, got {' '.join(args.modes)}")
    if not args.runs:
        raise SystemExit("name at least one run directory")
    if args.window <= args.max_period:  # no loop could be found: every episode would count as not looped
        raise SystemExit(f"--window ({args.window}) must be longer than --max-period ({args.max_period}); "
                         "for LBF's 50-step episodes, e.g. --window 20 --max-period 10")
    files = {run: algo_file(Path(run)) for run in args.runs}  # every run checked before any work
    print("| run | mode | return | episodes ending in a loop | loop starts (median step) | last reward (median step) |")
    print("|---|---|---|---|---|---|")
    for run in args.runs:
        run_dir = Path(run)
        mod = load_module(files[run])
        for mode in args.modes:
            try:
                act = mod.load_policy(str(run_dir / "checkpoints" / "latest.pt"), sample=mode == "sample")
            except OfflineMarlError as e:  # a Q-greedy method refuses to sample
                print(f"| {run_dir.name} | {mode} | refused: {e} | | | |")
                continue
            if not act.meta.get("discrete", True):
                raise SystemExit(f"{run_dir}: continuous actions; this counts loops of discrete games")
            env = eval_env_for(act.meta, int(getattr(act.args, "eval_episode_limit", 0)))
            res = play(act, env, args.episodes, eval_seed(int(act.args.seed)), args.max_period, args.window)
            start = "-" if res["start"] is None else f"{res['start']:.0f}"
            print(f"| {run_dir.name} | {mode} | {res['ret']:.2f} | {res['looped']} / {res['episodes']} | {start} "
                  f"| {res['last']:.0f} |", flush=True)
            env.close()


if __name__ == "__main__":
    main(tyro.cli(Args))
