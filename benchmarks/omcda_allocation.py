"""OMCDA's allocation measured: variants x seeds on the Sec. 3 toy game and the relay MMDP.

    python benchmarks/omcda_allocation.py run [--tasks relay toy] [--seeds 0 1 2 3 4] [--variants ...]
    python benchmarks/omcda_allocation.py report            # docs/results/omcda_allocation.md + plots

``run`` starts one ``omcda.py`` process at a time (single-threaded) per (task, variant, seed) under
``--root`` (default ``benchmark_runs/omcda_allocation``): a run with ``done.json`` is skipped, one
with a checkpoint is continued with ``--resume``. The datasets are the ``uniform`` recipes of
``common.collect``, made by the catalog on first use. ``report`` reads each run's ``done.json``
(``expected_return``: the exact expected episode return of the learned stochastic policies) and its
TensorBoard curves of d_i and alpha_i, and writes the table and the plots. The variants of
``common.benchmark``'s grids are one flag set per algorithm file, so this script runs its own.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
TASKS = {  # name -> (env task, updates)
    "relay": ("omcda_relay", 8000),
    "toy": ("omcda_toy", 6000),
}
COMMON = ["--env", "matrix", "--quality", "uniform", "--hidden", "64", "--bc-steps", "2000", "--eval-every", "2000",
          "--eval-episodes", "10", "--final-eval-episodes", "100", "--eval-sample", "--log-every", "250",
          "--device", "cpu"]
FULL = ["--no-diag-constraint-mixer"]  # the paper's N x N constraint mixer (the default before this benchmark)
VARIANTS = {  # name -> flags, explicit about W^c and the floor so that they do not depend on the defaults
    "omcda": FULL + ["--alloc-floor", "0.1"],
    "no-allocation": FULL + ["--no-allocation"],
    "random-allocation": FULL + ["--random-allocation"],
    "no-decomposition": ["--no-decomposition", "--alloc-floor", "0.1"],  # one entangled Q: no constraint mixer
    "no-floor": FULL + ["--alloc-floor", "0"],
    "paper-softmax": FULL + ["--alloc-floor", "0", "--no-alloc-normalise"],
    "diag-Wc": ["--diag-constraint-mixer", "--alloc-floor", "0.1"],
    "lr-constraint-2e-4": FULL + ["--alloc-floor", "0.1", "--lr-constraint", "2e-4"],  # Table 5: 4e-5
    # the defaults chosen from the rows above: diagonal W^c, no floor
    "default": ["--diag-constraint-mixer", "--alloc-floor", "0"],
    "default-no-allocation": ["--diag-constraint-mixer", "--no-allocation"],
}


def command(task: str, variant: str, seed: int, root: Path, resume: bool) -> list[str]:
    env_task, steps = TASKS[task]
    return [sys.executable, str(REPO / "omcda.py"), *COMMON, "--task", env_task, "--total-steps", str(steps),
            "--seed", str(seed), "--run-dir", str(run_dir(root, task, variant, seed)), *VARIANTS[variant]] + (
        ["--resume"] if resume else [])


def run_dir(root: Path, task: str, variant: str, seed: int) -> Path:
    return root / f"{task}__{variant}__{seed}"


def run(a: argparse.Namespace) -> None:
    root = Path(a.root)
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
    for task in a.tasks:
        for seed in a.seeds:
            for variant in a.variants:
                d = run_dir(root, task, variant, seed)
                if (d / "done.json").is_file():
                    continue
                resume = (d / "checkpoints" / "latest.pt").is_file()
                cmd = command(task, variant, seed, root, resume)
                print(" ".join(cmd), flush=True)
                d.mkdir(parents=True, exist_ok=True)
                with open(d.with_suffix(".log"), "a") as log:
                    rc = subprocess.call(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
                print(f"  -> exit {rc}: {json.loads((d / 'done.json').read_text()) if rc == 0 else 'see log'}",
                      flush=True)


def curves(d: Path, tag_prefix: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(d), size_guidance={"scalars": 0})
    acc.Reload()
    series = [acc.Scalars(f"{tag_prefix}_{i}") for i in range(n)]
    steps = np.array([e.step for e in series[0]])
    return steps, np.array([[e.value for e in s] for s in series])  # [n, T]


def score(done: dict) -> float:
    """The exact expected episode return of a run's done.json (``expected_return``; runs made before it
    had that name stored it as ``expected_team_reward``)."""
    return done["expected_return"] if "expected_return" in done else done["expected_team_reward"]


def report(a: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    root = Path(a.root)
    lines = ["# OMCDA allocation: variants on the toy game and the relay MMDP", "",
             "Written by `python benchmarks/omcda_allocation.py report` from the runs of `... run` "
             "(commands in docs/omcda.md). `return` is `expected_return` of `done.json`: the exact "
             "expected episode return of the learned stochastic policies. d and alpha are the final values.", ""]
    plot_dir = REPO / "docs" / "results" / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    for task in a.tasks:
        lines += [f"## {TASKS[task][0]}", "", "| variant | seeds | return mean ± std | per seed (0, 1, ...) | "
                  "omcda − variant, per seed: mean (omcda higher in) | d (mean) | alpha (mean) |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        base = {s: score(json.loads((run_dir(root, task, "omcda", s) / "done.json").read_text()))
                for s in a.seeds if (run_dir(root, task, "omcda", s) / "done.json").is_file()}
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for variant in a.variants:
            done = [(s, json.loads((run_dir(root, task, variant, s) / "done.json").read_text()))
                    for s in a.seeds if (run_dir(root, task, variant, s) / "done.json").is_file()]
            if not done:
                continue
            ret = np.array([score(x) for _, x in done])
            dd = np.array([x["d"] for _, x in done]).mean(0)
            al = np.array([x["alpha"] for _, x in done]).mean(0)
            per = ", ".join(f"{v:.3f}" for v in ret)
            diff = np.array([base[s] - score(x) for s, x in done if s in base])
            paired = "" if variant == "omcda" or not len(diff) else \
                f"{diff.mean():+.3f} ({(diff > 0).sum()} of {len(diff)})"
            lines.append(f"| {variant} | {len(done)} | {ret.mean():.3f} ± {ret.std():.3f} | {per} | {paired} | "
                         f"({dd[0]:.3f}, {dd[1]:.3f}) | ({al[0]:.3f}, {al[1]:.3f}) |")
            if variant in ("omcda", "no-allocation", "random-allocation", "no-decomposition", "paper-softmax", "default"):
                ds_, als = [], []
                for s, _ in done:
                    steps, dv = curves(run_dir(root, task, variant, s), "charts/d", 2)
                    _, av = curves(run_dir(root, task, variant, s), "charts/alpha", 2)
                    ds_.append(dv[0]), als.append(av)
                n = min(len(x) for x in ds_)
                line, = axes[0].plot(steps[:n], np.mean([x[:n] for x in ds_], 0), label=variant)
                am = np.mean([x[:, :n] for x in als], 0)
                axes[1].plot(steps[:n], am[0], color=line.get_color(), label=f"{variant}: agent 0")
                axes[1].plot(steps[:n], am[1], color=line.get_color(), ls="--", label=f"{variant}: agent 1")
        axes[0].set(xlabel="update", ylabel="d_0 (agent 0's budget; d_1 = d_tot - d_0)",
                    title=f"{TASKS[task][0]}: allocation (mean over seeds)")
        axes[1].set(xlabel="update", ylabel="alpha_i", yscale="log", title="conservatism levels (- agent 0, -- agent 1)")
        axes[0].legend(fontsize=7), axes[1].legend(fontsize=6, ncol=2)
        fig.tight_layout()
        out = plot_dir / f"omcda_allocation_{task}.png"
        fig.savefig(out, dpi=110)
        plt.close(fig)
        lines += ["", f"![allocation and alpha curves](plots/{out.name})", ""]
    (REPO / "docs" / "results" / "omcda_allocation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=["run", "report"])
    p.add_argument("--root", default=str(REPO / "benchmark_runs" / "omcda_allocation"))
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    a = p.parse_args(argv)
    run(a) if a.action == "run" else report(a)


if __name__ == "__main__":
    main()
