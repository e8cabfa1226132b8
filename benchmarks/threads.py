"""Training speed of every algorithm file under CPU contention: 1 or 2 threads, active or passive
OpenMP waiting, and ``--threads 0`` (the default: the count measured fastest while training), on
an idle machine and beside one competing CPU-bound process. Writes a Markdown table (--out; the
default is the threads page of docs/results).

    python benchmarks/threads.py                       # every file, both shapes (about 45 minutes on 2 cores)
    python benchmarks/threads.py --files comadice.py baselines/bc.py --shapes bridge --seconds 8
    python benchmarks/threads.py --shapes bridge --settings 1 2a 0 --seconds 30   # the default, longer cells

Each cell runs the file's own training loop (sampling included, evaluation off) on a dataset of the
shape's dimensions, in a fresh process, for about ``--seconds`` seconds of updates, and reads the
updates/s from its done.json (train time only: start-up and pre-training phases are excluded). A
cell still running after ``--timeout`` seconds is stopped and its rate read from the progress bar
(marked with a "<"). Run it on an otherwise idle machine: the "idle" column assumes nothing else runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FILES = ["comadice.py", "alberdice.py", "omcda.py", "baselines/bc.py", "baselines/optidice.py",
         "baselines/omiga.py", "baselines/bcq.py", "baselines/cql.py", "baselines/cfcql.py", "baselines/icq.py",
         "baselines/omar.py", "baselines/madtkd.py"]
DISCRETE_ONLY = {"alberdice.py"}
# short pre-training phases: they are not what is measured
PRE = {"alberdice.py": ["--pretrain-steps", "20"], "omcda.py": ["--bc-steps", "20"],
       "baselines/cfcql.py": ["--behaviour-steps", "20"]}
SETTINGS = {  # name -> (--threads, extra environment); --settings picks them by key (1, 2a, 2p, 0)
    "1 thread": (1, {}),
    "2 threads, active wait": (2, {}),
    "2 threads, passive wait": (2, {"OMP_WAIT_POLICY": "PASSIVE"}),
    "--threads 0 (default)": (0, {}),
}

KEYS = dict(zip(["1", "2a", "2p", "0"], SETTINGS))


def make_data(shape: str, out: Path) -> Path:
    """A dataset with the shape's dimensions (random values: speed does not depend on them)."""
    from common import collect
    from common.data import OfflineDataset

    if shape == "bridge":
        return collect.generate("bridge", "hard", "mix", out / "bridge")
    rng = np.random.default_rng(0)
    E, T, N, o, S, A = 100, 1000, 6, 23, 138, 1  # HalfCheetah-6x1 in the omiga observation mode, 100k steps
    ds = OfflineDataset.from_padded(
        obs=rng.standard_normal((E, T + 1, N, o), dtype=np.float32),
        state=rng.standard_normal((E, T + 1, S), dtype=np.float32),
        actions=rng.uniform(-1, 1, (E, T, N, A)).astype(np.float32),
        reward=rng.standard_normal((E, T), dtype=np.float32), lengths=np.full(E, T), terminated=np.zeros(E, bool),
        meta={"env": "mamujoco", "task": "HalfCheetah-6x1", "quality": "synthetic", "discrete": False,
              "env_options": {"obs_mode": "omiga", "episode_limit": 1000}})
    return ds.save(out / "halfcheetah")


def run_cell(file: str, data: Path, threads: int, env_extra: dict, seconds: float, timeout: float,
             rate_hint: float | None) -> tuple[float, bool]:
    updates = max(20, int((rate_hint or 20) * seconds))
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(ROOT / file), "--dataset", str(data), "--device", "cpu", "--eval-episodes", "0",
               "--total-steps", str(updates), "--eval-every", str(updates), "--log-every", str(updates),
               "--threads", str(threads), "--run-dir", str(Path(tmp) / "run"), *PRE.get(file, [])]
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                                  "OMP_WAIT_POLICY")}
        env.update(env_extra)
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                cwd=tmp)
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
            # the progress bar's last "n/total [mm:ss<..." (its clock starts after start-up)
            bars = re.findall(r"(\d+)/" + str(updates) + r" \[(\d+):(\d+)", err)
            if not bars:
                return 0.0, True
            n, mm, ss = (int(x) for x in bars[-1])
            return n / max(60 * mm + ss, 1), True
        if proc.returncode != 0:
            raise RuntimeError(f"{file} failed:\n{err[-2000:]}")
        return json.loads((Path(tmp) / "run" / "done.json").read_text())["updates_per_s"], False


def busy_process() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", nargs="+", default=FILES)
    p.add_argument("--shapes", nargs="+", default=["bridge", "halfcheetah"], choices=["bridge", "halfcheetah"])
    p.add_argument("--seconds", type=float, default=10.0, help="updates per cell: about this many seconds' worth")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--settings", nargs="+", default=list(KEYS), choices=list(KEYS),
                   help="1: one thread, 2a/2p: two threads with active/passive waiting, 0: --threads 0. The table's "
                        "shares need 1 and 0; 'best idle' is the best of the settings run")
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "threads.md"), help="the table's path")
    a = p.parse_args()
    a.names = [KEYS[k] for k in KEYS if k in a.settings]
    if not {"1", "0"} <= set(a.settings):
        p.error("--settings must include 1 and 0 (the table compares the default with one thread)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = {s: make_data(s, Path(tmp)) for s in a.shapes}
        for shape in a.shapes:
            for file in a.files:
                if shape == "halfcheetah" and file in DISCRETE_ONLY:
                    continue
                hint, _ = run_cell(file, data[shape], 1, {}, 2.0, a.timeout, None)  # sizes the cells
                row = {"shape": shape, "file": file}
                for load in ("idle", "busy"):
                    other = busy_process() if load == "busy" else None
                    try:
                        for name in a.names:
                            threads, extra = SETTINGS[name]
                            rate, cut = run_cell(file, data[shape], threads, extra, a.seconds, a.timeout, hint)
                            row[(load, name)] = (rate, cut)
                            print(f"{shape:11s} {file:22s} {load:4s} {name:26s} {'<' if cut else ' '}{rate:8.1f} upd/s",
                                  flush=True)
                    finally:
                        if other is not None:
                            other.kill()
                            other.wait()
                rows.append(row)
    write_table(rows, a)


def write_table(rows: list[dict], a) -> None:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    import torch

    lines = ["# Threads and CPU contention", "",
             f"Measured with `python benchmarks/threads.py {' '.join(sys.argv[1:])}`".rstrip() + f" at commit {commit}, "
             f"{time.strftime('%Y-%m-%d')}, on {platform.machine()} with {os.cpu_count()} cores "
             f"({platform.processor() or 'cpu'}), torch {torch.__version__}. Updates per second of each file's "
             "training loop (sampling included, evaluation off), defaults otherwise; \"busy\": beside one other "
             "CPU-bound process (`python -c 'while True: pass'`). \"<\": the cell was stopped at its time limit "
             "and the rate is an upper bound. Last three columns: the default's speed on the idle machine as a "
             "share of the best idle setting's; the default's speed beside the busy process as a share of the best "
             "idle speed of the same file; and as a share of one thread's speed beside the busy process, the most "
             "that the one core left free can give.", ""]
    names = a.names
    head = "| shape | file | " + " | ".join(f"idle: {n}" for n in names) + " | " + \
        " | ".join(f"busy: {n}" for n in names) + " | default idle / best idle | default busy / best idle | " \
        "default busy / 1 thread busy |"
    lines += [head, "|" + "---|" * (5 + 2 * len(names))]
    for r in rows:
        cells = []
        for load in ("idle", "busy"):
            for n in names:
                rate, cut = r[(load, n)]
                cells.append(f"{'<' if cut else ''}{rate:.1f}")
        best_idle = max(r[("idle", n)][0] for n in names)
        default = "--threads 0 (default)"
        idle_share = r[("idle", default)][0] / best_idle
        share = r[("busy", default)][0] / best_idle
        free_core = r[("busy", default)][0] / max(r[("busy", "1 thread")][0], 1e-9)
        lines.append(f"| {r['shape']} | {r['file']} | " + " | ".join(cells) +
                     f" | {idle_share:.0%} | {share:.0%} | {free_core:.0%} |")
    Path(a.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
