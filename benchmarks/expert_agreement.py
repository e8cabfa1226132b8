"""How often a saved LBF policy takes an action the scripted expert would take: on the states it
reaches itself, and on the states the expert reaches. A policy trained on expert data that scores
below behaviour cloning can fit the data as well as BC (its log-likelihood of the data's actions,
on the expert's states) and still act worse on the states its own mistakes lead to; this measures
both, split by the step of the episode.

    python benchmarks/expert_agreement.py benchmark_runs/lbf/lbf__8x8-2p-2f-coop__expert__icq__0 \\
        benchmark_runs/lbf/lbf__8x8-2p-2f-coop__expert__bc__0 --episodes 100

Each run directory is a finished or interrupted run of any discrete algorithm file on an LBF task
(its ``checkpoints/latest.pt`` is loaded with weights only), played as its evaluation plays it
(``--eval-sample`` or greedy), on the environment seeds of its final evaluation. At every step of
every agent it records whether the policy's action is one the expert (``common.scripted.LBFExpert``)
takes in that state: the expert breaks ties between equally short moves at random, so its actions
at a state are the union of ``--draws`` of its choices there. ``own``: the policy's actions are
played; ``expert``: the expert's are, while the policy is still asked at every step (a recurrent
policy sees the observations it would see in the data; a decision transformer, which conditions on
its own past actions, is refused there). The fraction is the probability that a
sampling policy gives the expert's actions, estimated from its samples. Prints a Markdown table:
run, states, return, agreement over all steps, over steps before ``--split`` and from it (with the
number of agent-steps each).

LBF only: RWARE's scripted expert keeps plans across steps and breaks livelocks with random moves,
so its action in a state it did not reach itself is no label for that state.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import tyro

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from common.envs import eval_env_for  # noqa: E402
from common.runs import eval_seed  # noqa: E402
from common.scripted import LBFExpert  # noqa: E402
from stalls import algo_file, load_module  # noqa: E402


@dataclass
class Args:
    runs: tyro.conf.Positional[tuple[str, ...]]
    """run directories (each with config.json and checkpoints/latest.pt) of LBF runs"""
    episodes: int = 100
    """episodes per run and mode"""
    modes: tuple[str, ...] = ("own", "expert")
    """own (the policy's actions are played) and/or expert (the expert's are)"""
    split: int = 15
    """agreement is also reported for the steps before this one and from it"""
    draws: int = 16
    """the expert's choices drawn at each state (their union is its set of actions there)"""
    threads: int = 1
    """torch CPU threads"""


def expert_actions(expert: LBFExpert, env, obs, state, avail, draws: int, rng: np.random.Generator) -> np.ndarray:
    """``[N, K]`` bool: the actions the expert takes in this state (the union of ``draws`` draws of
    its tie-breaking)."""
    out = np.zeros(avail.shape, dtype=bool)
    expert.rng = rng
    for _ in range(draws):
        a = np.asarray(expert(env, obs, state, avail))
        out[np.arange(len(a)), a] = True
    return out


def agreement(act, env, episodes: int, seed0: int, mode: str, split: int, draws: int = 16) -> dict:
    """Play ``episodes`` episodes (``mode`` 'own': ``act``'s actions, 'expert': the expert's) and
    count, per agent and step, whether ``act``'s action is one of the expert's."""
    if mode not in ("own", "expert"):
        raise ValueError(f"mode is own or expert, got {mode}")
    if mode == "expert" and hasattr(act, "observe_reward"):
        raise ValueError("a policy conditioned on its own past actions and rewards (a decision transformer) "
                         "cannot be asked along the expert's states: it would see actions that were not played")
    if hasattr(act, "reseed"):
        act.reseed(seed0)
    expert, rng = LBFExpert(), np.random.default_rng(seed0)
    hits = {"early": [], "late": []}
    returns = []
    for e in range(episodes):
        obs, state, avail = env.reset(seed=seed0 + e)
        expert.reset(env, rng)
        if hasattr(act, "reset"):
            act.reset(np.ones(1, bool))
        ret = 0.0
        for t in range(env.episode_limit):
            a = act(obs[None].astype(np.float32), state[None].astype(np.float32), avail[None])
            a = np.asarray(a.detach().cpu().numpy() if hasattr(a, "detach") else a)[0]
            ok = expert_actions(expert, env, obs, state, avail, draws, rng)
            hits["early" if t < split else "late"].extend(ok[np.arange(len(a)), a].tolist())
            play = a if mode == "own" else np.asarray(expert(env, obs, state, avail))
            obs, state, avail, r, term, trunc, _ = env.step(play)
            if hasattr(act, "observe_reward"):  # a decision transformer's return-to-go
                act.observe_reward(np.array([r], np.float32))
            ret += float(r)
            if term or trunc:
                break
        returns.append(ret)
    both = hits["early"] + hits["late"]
    frac = {k: (float(np.mean(v)) if v else None, len(v)) for k, v in (("all", both), *hits.items())}
    return dict(ret=float(np.mean(returns)), **frac)


def main(args: Args) -> None:
    torch.set_num_threads(args.threads)
    bad = set(args.modes) - {"own", "expert"}
    if bad or not args.modes:
        raise SystemExit(f"--modes takes own and/or expert, got {' '.join(args.modes)}")
    if not args.runs:
        raise SystemExit("name at least one run directory")
    files = {run: algo_file(Path(run)) for run in args.runs}  # every run checked before any work
    print(f"| run | states | return | agreement | steps < {args.split} | steps >= {args.split} |")
    print("|---|---|---|---|---|---|")
    for run in args.runs:
        run_dir = Path(run)
        mod = load_module(files[run])
        for mode in args.modes:
            act = mod.load_policy(str(run_dir / "checkpoints" / "latest.pt"))
            if act.meta.get("env") != "lbf":
                raise SystemExit(f"{run_dir}: an {act.meta.get('env')} run; this compares with LBF's scripted expert")
            env = eval_env_for(act.meta, int(getattr(act.args, "eval_episode_limit", 0)))
            try:
                res = agreement(act, env, args.episodes, eval_seed(int(act.args.seed)), mode, args.split, args.draws)
            except ValueError as e:
                print(f"| {run_dir.name} | {mode} | refused: {e} | | | |")
                continue

            def cell(k):
                f, n = res[k]
                return "-" if f is None else f"{f:.3f} ({n})"
            print(f"| {run_dir.name} | {mode} | {res['ret']:.3f} | {cell('all')} | {cell('early')} | {cell('late')} |",
                  flush=True)
            env.close()


if __name__ == "__main__":
    main(tyro.cli(Args))
