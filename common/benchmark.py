"""Grids of runs (algorithms x tasks x qualities x seeds) and their aggregation.

    python -m common.benchmark run --definition benchmarks/bridge.toml --workers 2
    python -m common.benchmark run --algos comadice.py baselines/bc.py --env bridge \\
        --tasks hard --qualities mix --seeds 0 1 2 --extra="--total-steps 5000"
    python -m common.benchmark aggregate --definition benchmarks/bridge.toml

Every run of a grid has a fixed directory, ``<root>/<env>__<task>__<quality>__<algo>__<seed>``,
passed to the algorithm file as ``--run-dir``. That makes a grid idempotent: a run
whose directory has ``done.json`` is skipped, one with a checkpoint but no
``done.json`` (interrupted) is restarted with ``--resume``, and a failed run is
reported with the tail of its log while the rest of the grid goes on. The run folders are
not committed; a small record of each finished run is (``benchmarks/records/``), so the
tables rebuild, and finished runs are not run again, in a fresh clone.

Backends: ``local`` (a pool of worker processes on this machine), ``slurm``
(``submitit``: one job per run or a job array) and ``ray`` (tasks on a Ray cluster).
Aggregation reads each run's ``metrics.json`` (marl-eval layout) and writes
Markdown tables (mean ± std, standard error, IQM with bootstrap confidence
intervals via ``rliable``, probability of improvement), a merged marl-eval JSON,
and PNG plots (learning curves with confidence bands, IQM bars per env family).
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import itertools
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import tomllib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np

from common import OfflineMarlError

REPO = Path(__file__).resolve().parent.parent
# the local backend's running runs (their processes), so that an interrupted grid stops them too
_CHILDREN: set[subprocess.Popen] = set()
_CHILDREN_LOCK = threading.Lock()
_STOPPING = threading.Event()  # set under the lock once the grid is interrupted: no run starts after it


class BenchmarkError(OfflineMarlError):
    """A grid cannot be run or aggregated as asked."""


class FewerRunsError(BenchmarkError):
    """A results page would be rewritten with fewer runs than it shows."""


# ===================================================================== grids
@dataclass(frozen=True)
class RunSpec:
    """One run of a grid: which file, which data, which seed, which flags."""

    algo_file: str
    env: str
    task: str
    quality: str
    seed: int
    args: tuple[str, ...] = ()

    @property
    def algo(self) -> str:
        return Path(self.algo_file).stem

    @property
    def name(self) -> str:
        return f"{self.env}__{self.task}__{self.quality}__{self.algo}__{self.seed}"

    def run_dir(self, root: Path) -> Path:
        return Path(root) / self.name

    def command(self, root: Path, resume: bool, python: str = sys.executable) -> list[str]:
        script = Path(self.algo_file)
        if not script.is_absolute():
            script = REPO / script
        cmd = [python, str(script), "--env", self.env, "--task", self.task, "--quality", self.quality,
               "--seed", str(self.seed), "--run-dir", str(self.run_dir(root)), *self.args]
        return cmd + (["--resume"] if resume else [])

    def fingerprint(self) -> str:
        """Identifies what the run computes (not where): guards a directory against reuse
        by a run with other flags."""
        text = json.dumps([self.algo_file, self.env, self.task, self.quality, self.seed, list(self.args)])
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def expand_grid(algos: Sequence[str], env: str, tasks: Sequence[str], qualities: Sequence[str],
                seeds: Sequence[int], extra: Sequence[str] = (),
                algo_args: dict[str, Sequence[str]] | None = None, last: Sequence[str] = ()) -> list[RunSpec]:
    """Every (algorithm, task, quality, seed) combination, in that nesting order.
    ``extra`` flags go to every run, ``algo_args[file]`` only to that algorithm's runs (after
    ``extra``: they win over it), ``last`` to every run after both (it wins over both)."""
    if not algos or not tasks or not qualities or not seeds:
        raise BenchmarkError("a grid needs at least one algorithm, task, quality and seed")
    algo_args = algo_args or {}
    specs = []
    for algo, task, quality, seed in itertools.product(algos, tasks, qualities, seeds):
        specs.append(RunSpec(algo, env, task, quality, int(seed),
                             tuple(extra) + tuple(algo_args.get(algo, ())) + tuple(last)))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise BenchmarkError("two runs of the grid would share a directory (the same algorithm file twice?)")
    return specs


def run_status(spec: RunSpec, root: Path) -> Literal["done", "interrupted", "new"]:
    d = spec.run_dir(root)
    if (d / "done.json").is_file():
        return "done"
    if (d / "checkpoints" / "latest.pt").is_file():
        return "interrupted"
    return "new"


# =================================================================== running
@dataclass
class RunResult:
    spec: RunSpec
    status: Literal["skipped", "ok", "failed"]
    returncode: int = 0
    seconds: float = 0.0
    log_tail: str = ""


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def execute(spec: RunSpec, root: str, threads: int = 1, python: str = sys.executable) -> RunResult:
    """Run one grid cell to completion in a subprocess (what every backend calls).

    Skips a finished run, resumes an interrupted one, writes the combined output
    to ``<run_dir>/log.txt``, and never raises for a failed run."""
    root_p = Path(root)
    status = run_status(spec, root_p)
    if status == "done":
        return RunResult(spec, "skipped")
    d = spec.run_dir(root_p)
    d.mkdir(parents=True, exist_ok=True)
    fp = d / "benchmark.json"
    if fp.is_file():
        old = json.loads(fp.read_text()).get("fingerprint")
        if old != spec.fingerprint() and status == "interrupted":  # a cell that never checkpointed may change
            return RunResult(spec, "failed", -1, 0.0,
                             f"{d} holds a run with other flags (fingerprint {old}); use another output root")
    spent = json.loads(fp.read_text()).get("wall_seconds", 0.0) if fp.is_file() and status == "interrupted" else 0.0
    fp.write_text(json.dumps({"fingerprint": spec.fingerprint(), "spec": dataclasses.asdict(spec),
                              "wall_seconds": spent}, indent=2))
    # the algorithm files import `common`: make this checkout importable even when not pip-installed
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1",
               PYTHONPATH=pythonpath)
    # --resume also for a cell that started but never checkpointed: the run then starts afresh in place
    cmd = spec.command(root_p, resume=status == "interrupted" or (d / "config.json").is_file(), python=python)
    if "--threads" not in spec.args:  # the contract's --threads; the environment variables cover the rest
        cmd[2:2] = ["--threads", str(threads)]
    t0 = time.time()
    with open(d / "log.txt", "a") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        with _CHILDREN_LOCK:  # a run about to start when the grid is interrupted does not start
            if _STOPPING.is_set():
                return RunResult(spec, "failed", -1, 0.0, "not started: the grid was interrupted")
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO),
                                    stdin=subprocess.DEVNULL)
            _CHILDREN.add(proc)
        try:
            rc = proc.wait()
        finally:
            with _CHILDREN_LOCK:
                _CHILDREN.discard(proc)
    dt = time.time() - t0
    # what the run cost: its wall time, start-up, pre-training and evaluations included (summed over resumes)
    info = json.loads(fp.read_text())
    info["wall_seconds"] = round(info.get("wall_seconds", 0.0) + dt, 1)
    fp.write_text(json.dumps(info, indent=2))
    if rc == 0 and (d / "done.json").is_file():
        return RunResult(spec, "ok", 0, dt)
    if rc == 0:
        return RunResult(spec, "failed", 0, dt, _tail(d / "log.txt") + "\n(the run exited 0 but wrote no done.json)")
    return RunResult(spec, "failed", rc, dt, _tail(d / "log.txt"))


@dataclass
class SlurmOptions:
    """Options of the ``slurm`` backend (passed to ``submitit.AutoExecutor``)."""

    partition: str = ""
    """Slurm partition (empty: the cluster's default)."""
    time_min: int = 24 * 60
    """Time limit of each job, in minutes."""
    mem_gb: int = 16
    """Memory per job."""
    gpus: int = 0
    """GPUs per job."""
    cpus: int = 2
    """CPUs per job."""
    array: bool = True
    """Submit the grid as one job array (else one job per run)."""
    array_parallelism: int = 64
    """How many array tasks may run at once."""
    folder: str = ""
    """submitit's log folder (default: <root>/submitit)."""
    cluster: str = ""
    """submitit cluster override: "local" or "debug" run without Slurm (for testing)."""


class _Stop(Exception):
    """SIGTERM on the runner (what ``kill`` sends), handled as Ctrl-C is."""


def _stop_on_sigterm(signum, frame):
    raise _Stop()


def _run_local(specs: list[RunSpec], root: Path, workers: int, threads: int, progress: bool) -> list[RunResult]:
    from tqdm import tqdm

    results = []
    # Ctrl-C or SIGTERM stops the grid: no further run starts, the running ones are terminated (each
    # resumes from its last checkpoint when the same command runs again)
    _STOPPING.clear()
    main_thread = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, _stop_on_sigterm) if main_thread else None
    # Each run is its own Python process; the pool only waits on them, so threads suffice.
    try:
        with cf.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            futs = [pool.submit(execute, s, str(root), threads) for s in specs]
            try:
                with tqdm(total=len(futs), desc="runs", disable=not progress) as bar:
                    for f in cf.as_completed(futs):
                        r = f.result()
                        results.append(r)
                        bar.set_postfix_str(f"{r.spec.name}: {r.status}")
                        bar.update()
            except (KeyboardInterrupt, _Stop):
                pool.shutdown(wait=False, cancel_futures=True)
                stopped = _terminate_children()
                raise BenchmarkError(f"interrupted: {len(results)} of {len(specs)} runs had ended, {stopped} were "
                                     f"stopped (each resumes from its last checkpoint) and the rest never started; "
                                     f"the same command continues the grid") from None
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, old)
    return results


def _terminate_children(grace_s: float = 30.0) -> int:
    """Terminate every running run of this process (SIGTERM, then SIGKILL after ``grace_s``)."""
    with _CHILDREN_LOCK:
        _STOPPING.set()
        procs = list(_CHILDREN)
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return len(procs)


def _run_slurm(specs: list[RunSpec], root: Path, threads: int, opt: SlurmOptions) -> list[RunResult]:
    try:
        import submitit
    except ImportError:
        raise BenchmarkError('the slurm backend needs submitit: pip install "offline-marl[benchmark]"') from None
    ex = submitit.AutoExecutor(folder=opt.folder or str(root / "submitit"), cluster=opt.cluster or None)
    params: dict[str, Any] = dict(timeout_min=opt.time_min, mem_gb=opt.mem_gb, cpus_per_task=opt.cpus,
                                  gpus_per_node=opt.gpus, name="offline-marl")
    if ex.cluster == "slurm":
        params["slurm_array_parallelism"] = opt.array_parallelism
        if opt.partition:
            params["slurm_partition"] = opt.partition
    ex.update_parameters(**params)
    todo = [s for s in specs if run_status(s, root) != "done"]
    results = [RunResult(s, "skipped") for s in specs if run_status(s, root) == "done"]
    if not todo:
        return results
    if opt.array:
        jobs = ex.map_array(execute, todo, [str(root)] * len(todo), [threads] * len(todo))
    else:
        jobs = [ex.submit(execute, s, str(root), threads) for s in todo]
    for s, j in zip(todo, jobs):
        try:
            results.append(j.result())
        except Exception as e:  # the job itself died (time limit, node failure)
            results.append(RunResult(s, "failed", -1, 0.0, f"{type(e).__name__}: {e}"))
    return results


def _run_ray(specs: list[RunSpec], root: Path, threads: int, address: str, gpus: float) -> list[RunResult]:
    try:
        import ray
    except ImportError:
        raise BenchmarkError('the ray backend needs Ray: pip install "offline-marl[ray]"') from None
    started = False
    if not ray.is_initialized():
        ray.init(address=address or None, include_dashboard=False, log_to_driver=False)
        started = True
    try:
        remote = ray.remote(num_cpus=threads, num_gpus=gpus)(execute)
        refs = [remote.remote(s, str(root), threads) for s in specs]
        out = []
        for s, ref in zip(specs, refs):
            try:
                out.append(ray.get(ref))
            except Exception as e:  # a worker died
                out.append(RunResult(s, "failed", -1, 0.0, f"{type(e).__name__}: {e}"))
        return out
    finally:
        if started:
            ray.shutdown()


def run_grid(specs: list[RunSpec], root: str | Path, backend: str = "local", workers: int = 1, threads: int = 1,
             slurm: SlurmOptions | None = None, ray_address: str = "", ray_gpus: float = 0.0,
             progress: bool = True) -> list[RunResult]:
    """Run every spec (skipping finished ones, resuming interrupted ones) on ``backend``."""
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if backend == "local":
        return _run_local(specs, root, workers, threads, progress)
    if backend == "slurm":
        return _run_slurm(specs, root, threads, slurm or SlurmOptions())
    if backend == "ray":
        return _run_ray(specs, root, threads, ray_address, ray_gpus)
    raise BenchmarkError(f"unknown backend {backend!r}; choose local, slurm or ray")


def report(results: list[RunResult]) -> str:
    """A short text summary; failures come with their log tail."""
    n = {k: sum(r.status == k for r in results) for k in ("ok", "skipped", "failed")}
    lines = [f"{len(results)} runs: {n['ok']} ran, {n['skipped']} already done, {n['failed']} failed"]
    for r in results:
        if r.status == "failed":
            lines.append(f"\n--- FAILED {r.spec.name} (exit {r.returncode}); log: "
                         f"{r.spec.run_dir(Path('.'))}/log.txt; last lines:\n{r.log_tail}")
    return "\n".join(lines)


# =============================================================== aggregation
@dataclass
class RunRecord:
    """What aggregation needs from one run directory."""

    env: str
    task: str
    quality: str
    algo: str
    seed: int
    steps: np.ndarray  # [K] evaluation step counts
    curve: np.ndarray  # [K] mean return of each evaluation
    final: float  # mean return of the final evaluation (absolute_metrics; else the last one)
    best: float  # best mean return over the evaluations
    win_final: float | None
    metrics: dict[str, Any]
    train_s: float | None = None  # done.json's train_seconds: the updates' wall time (no start-up, no evaluations)
    wall_s: float | None = None  # the runner's benchmark.json: the whole run's wall time (all of it)


def _finished(metrics: dict[str, Any]) -> bool:
    return any("absolute_metrics" in entry for tasks in metrics.values() for algos in tasks.values()
               for seeds in algos.values() for entry in seeds.values())


def _run_record(cfg: dict[str, Any], metrics: dict[str, Any], where: Path,
                include_unfinished: bool, done: dict[str, Any] | None = None,
                bench: dict[str, Any] | None = None) -> RunRecord | None:
    """A RunRecord from a run's config.json, metrics.json, and done.json and the runner's
    benchmark.json where it has them (None: unfinished and not asked for)."""
    try:
        (env, tasks), = metrics.items()
        (task_key, algos), = tasks.items()
        (algo, seeds), = algos.items()
        (seed_key, entry), = seeds.items()
    except ValueError:
        raise BenchmarkError(f"{where} does not hold exactly one run in marl-eval layout") from None
    step_keys = sorted((k for k in entry if k.startswith("step_")), key=lambda k: int(k.split("_")[1]))
    steps = np.array([entry[k]["step_count"] for k in step_keys], dtype=np.int64)
    curve = np.array([np.mean(entry[k]["episode_return"]) for k in step_keys], dtype=np.float64)
    absm = entry.get("absolute_metrics")
    if absm:
        final = float(np.mean(absm["episode_return"]))
        win = float(np.mean(absm["win_rate"])) if "win_rate" in absm else None
    elif len(curve) and include_unfinished:
        final = float(curve[-1])
        last = entry[step_keys[-1]]
        win = float(np.mean(last["win_rate"])) if "win_rate" in last else None
    else:
        return None  # unfinished (or no evaluation yet)
    best = float(max(curve.max() if len(curve) else -np.inf, final))

    def seconds(d: dict[str, Any] | None, key: str) -> float | None:
        x = (d or {}).get(key)
        return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 else None

    return RunRecord(env, cfg.get("task", task_key.split("__")[0]), cfg.get("quality", ""), algo,
                     int(cfg.get("seed", seed_key.split("_")[-1])), steps, curve, final, best, win, metrics,
                     seconds(done, "train_seconds"), seconds(bench, "wall_seconds"))


def _run_dirs(root: Path) -> dict[str, Path]:
    """Every run directory under ``root`` (one with config.json and metrics.json), by its path
    relative to ``root`` written with "__" (the name of its record)."""
    out = {}
    for mpath in sorted(Path(root).rglob("metrics.json")):
        if (mpath.parent / "config.json").is_file():
            out["__".join(mpath.parent.relative_to(root).parts) or mpath.parent.name] = mpath.parent
    return out


def default_records(root: str | Path) -> Path | None:
    """Where the records of a grid's finished runs are kept: ``benchmarks/records/<name>`` for a
    root in the checkout's ``benchmark_runs/`` (the folder git ignores); none for a root elsewhere."""
    try:
        rel = Path(root).resolve().relative_to((REPO / "benchmark_runs").resolve())
    except ValueError:
        return None
    return REPO / "benchmarks" / "records" / rel if rel.parts else None


def save_records(root: str | Path, records: str | Path) -> int:
    """Copy what aggregation needs of each finished run under ``root`` (its config.json,
    metrics.json and done.json) into one small JSON file per run in ``records``, a folder that is
    committed with the results pages: the run folders (checkpoints, logs) stay out of git, and a
    fresh clone can still rebuild the tables and plots from the records. Returns how many were
    written (a record already up to date is left as it is)."""
    root, records = Path(root), Path(records)
    n = 0
    for name, d in _run_dirs(root).items():
        metrics = json.loads((d / "metrics.json").read_text())
        if not _finished(metrics) or not (d / "done.json").is_file():
            continue
        rec = {"run": name, "config": json.loads((d / "config.json").read_text()), "metrics": metrics,
               "done": json.loads((d / "done.json").read_text())}
        if (d / "benchmark.json").is_file():  # what the runner ran (its fingerprint): a recorded run is done
            rec["benchmark"] = json.loads((d / "benchmark.json").read_text())
        text = json.dumps(rec, sort_keys=True, separators=(",", ":")) + "\n"
        path = records / f"{name}.json"
        if not path.is_file() or path.read_text() != text:
            records.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(text)
            tmp.replace(path)
            n += 1
    return n


def recorded(spec: RunSpec, root: Path, records: Path | None) -> bool:
    """Whether ``spec`` has no folder under ``root`` but a record of the same command (fingerprint)
    in ``records``: the run finished elsewhere (before this checkout) and is not run again."""
    path = None if records is None else Path(records) / f"{spec.name}.json"
    if path is None or spec.run_dir(root).exists() or not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("benchmark", {}).get("fingerprint") == spec.fingerprint()
    except (json.JSONDecodeError, AttributeError):
        return False


def load_runs(root: str | Path, include_unfinished: bool = False,
              records: str | Path | None = None) -> list[RunRecord]:
    """Every run under ``root`` (recursively) that has a config.json and a metrics.json with
    its final evaluation (``absolute_metrics``). A run still training or killed has only
    intermediate evaluations: it is left out, unless ``include_unfinished`` (then its last
    evaluation stands in for the final one). ``records`` (``save_records``'s folder) adds the
    recorded runs that have no folder under ``root`` (a fresh clone: the records only)."""
    out = []
    dirs = _run_dirs(Path(root)) if Path(root).is_dir() else {}
    for name, d in dirs.items():
        done, bench = (json.loads((d / f).read_text()) if (d / f).is_file() else None
                       for f in ("done.json", "benchmark.json"))
        r = _run_record(json.loads((d / "config.json").read_text()), json.loads((d / "metrics.json").read_text()),
                        d / "metrics.json", include_unfinished, done, bench)
        if r is not None:
            out.append(r)
    if records is not None and Path(records).is_dir():
        for path in sorted(Path(records).glob("*.json")):
            if path.stem in dirs:
                continue  # the run's own folder is here: it was read above
            try:
                rec = json.loads(path.read_text())
                cfg, metrics = rec["config"], rec["metrics"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise BenchmarkError(f"{path} is not a run record (config and metrics of one run)") from None
            done, bench = (x if isinstance(x, dict) else None for x in (rec.get("done"), rec.get("benchmark")))
            r = _run_record(cfg, metrics, path, include_unfinished, done, bench)
            if r is not None:
                out.append(r)
    return out


def iqm(x: np.ndarray) -> float:
    """Interquartile mean (rliable's definition: 25 % trimmed mean)."""
    from scipy.stats import trim_mean

    return float(trim_mean(np.asarray(x, dtype=np.float64).reshape(-1), proportiontocut=0.25))


def bootstrap_ci(scores: np.ndarray, statistic: str = "iqm", reps: int = 2000, ci: float = 0.95,
                 seed: int = 0) -> tuple[float, float, float]:
    """Point estimate and percentile bootstrap CI of ``statistic`` ("iqm" or "mean") over
    runs, using rliable (stratified over tasks when ``scores`` is ``[runs, tasks]``)."""
    from rliable import library as rly, metrics as rmetrics

    x = np.asarray(scores, dtype=np.float64)
    x = x.reshape(len(x), -1)
    fn = rmetrics.aggregate_iqm if statistic == "iqm" else rmetrics.aggregate_mean
    # the resamples also draw from numpy's global generator (measured: the interval moved with its state),
    # so it is seeded here and restored after: the same runs give the same table in any process
    saved = np.random.get_state()
    np.random.seed(seed)
    try:
        with warnings.catch_warnings():  # arch deprecates the RandomState argument rliable passes on
            warnings.simplefilter("ignore", FutureWarning)
            point, interval = rly.get_interval_estimates({"x": x}, lambda s: np.array([fn(s)]), reps=reps,
                                                         confidence_interval_size=ci,
                                                         random_state=np.random.RandomState(seed))
    finally:
        np.random.set_state(saved)
    return float(point["x"][0]), float(interval["x"][0, 0]), float(interval["x"][1, 0])


def probability_of_improvement(x: np.ndarray, y: np.ndarray) -> float:
    """P(X > Y) (ties count half), averaged over tasks: ``x [runs_x, tasks]``, ``y [runs_y, tasks]``
    (rliable's estimator)."""
    from rliable import metrics as rmetrics

    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    y = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
    return float(rmetrics.probability_of_improvement(x, y))


@dataclass
class GroupStats:
    env: str
    task: str
    quality: str
    algo: str
    n: int
    final_mean: float
    final_std: float
    final_se: float
    best_mean: float
    best_std: float
    iqm: float
    iqm_lo: float
    iqm_hi: float
    win_mean: float | None


def aggregate(records: list[RunRecord], reps: int = 2000) -> list[GroupStats]:
    """Statistics over seeds for every (env, task, quality, algo)."""
    groups: dict[tuple[str, str, str, str], list[RunRecord]] = {}
    for r in records:
        groups.setdefault((r.env, r.task, r.quality, r.algo), []).append(r)
    out = []
    for key in sorted(groups):
        rs = groups[key]
        final = np.array([r.final for r in rs])
        best = np.array([r.best for r in rs])
        n = len(rs)
        point, lo, hi = bootstrap_ci(final, "iqm", reps=reps) if n > 1 else (float(final[0]),) * 3
        wins = [r.win_final for r in rs if r.win_final is not None]
        out.append(GroupStats(*key, n=n, final_mean=float(final.mean()),
                              final_std=float(final.std(ddof=1)) if n > 1 else 0.0,
                              final_se=float(final.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan"),
                              best_mean=float(best.mean()), best_std=float(best.std(ddof=1)) if n > 1 else 0.0,
                              iqm=point, iqm_lo=lo, iqm_hi=hi, win_mean=float(np.mean(wins)) if wins else None))
    return out


def _fmt(x: float, digits: int) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.{digits}f}"


def markdown_tables(stats: list[GroupStats], records: list[RunRecord], digits: int = 3,
                    paper: dict[str, dict[str, str]] | None = None, by_algorithm: Sequence[str] = ()) -> str:
    """Markdown: a summary table (final mean ± standard error, one column per algorithm),
    a detailed table, and probability-of-improvement tables per env. ``paper`` (a definition's
    ``[paper]``: quality, or task/quality, -> algorithm name -> the published number as text) adds
    a "paper" line under each of our lines it names. ``by_algorithm`` (a definition's list of
    qualities) adds, first, one table per quality shaped as papers print them: an algorithm per row,
    a task per column, and beside a task the published numbers where ``paper`` names them."""
    lines = []
    for quality in by_algorithm:
        lines += _by_algorithm_table(stats, quality, paper or {}, digits)
    algos = sorted({s.algo for s in stats})
    rows = sorted({(s.env, s.task, s.quality) for s in stats})
    by = {(s.env, s.task, s.quality, s.algo): s for s in stats}
    lines += ["Final evaluation return, mean ± standard error over seeds (n = seeds).", "",
              "| env | task | quality | " + " | ".join(algos) + " |",
              "|---|---|---|" + "---|" * len(algos)]
    for env, task, quality in rows:
        cells = []
        for a in algos:
            s = by.get((env, task, quality, a))
            cells.append("" if s is None else f"{_fmt(s.final_mean, digits)} ± {_fmt(s.final_se, digits)} (n={s.n})")
        lines.append(f"| {env} | {task} | {quality} | " + " | ".join(cells) + " |")
        published = (paper or {}).get(f"{task}/{quality}", (paper or {}).get(quality))
        if published:
            lines.append(f"| {env} | {task} | {quality}, paper | " + " | ".join(published.get(a, "") for a in algos) + " |")
    lines += ["", "Details: final and best evaluation (mean ± std over seeds), standard error, "
              "IQM over seeds with a 95% percentile-bootstrap CI (rliable), final win rate.", "",
              "| env | task | quality | algo | n | final | SE | best | IQM [95% CI] | win rate |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for s in stats:
        lines.append(f"| {s.env} | {s.task} | {s.quality} | {s.algo} | {s.n} | "
                     f"{_fmt(s.final_mean, digits)} ± {_fmt(s.final_std, digits)} | {_fmt(s.final_se, digits)} | "
                     f"{_fmt(s.best_mean, digits)} ± {_fmt(s.best_std, digits)} | "
                     f"{_fmt(s.iqm, digits)} [{_fmt(s.iqm_lo, digits)}, {_fmt(s.iqm_hi, digits)}] | "
                     f"{'' if s.win_mean is None else _fmt(s.win_mean, 2)} |")
    lines += _time_table(records)
    for env in sorted({s.env for s in stats}):
        recs = [r for r in records if r.env == env]
        env_algos = sorted({r.algo for r in recs})
        if len(env_algos) < 2:
            continue
        cells = sorted({(r.task, r.quality) for r in recs})
        lines += ["", f"Probability of improvement on {env} (row beats column; per (task, quality), "
                  "averaged over them; needs the same cells for both):", "",
                  "| P(row > col) | " + " | ".join(env_algos) + " |", "|---|" + "---|" * len(env_algos)]
        for a in env_algos:
            row = []
            for b in env_algos:
                if a == b:
                    row.append("")
                    continue
                common = [c for c in cells if any(r.algo == a and (r.task, r.quality) == c for r in recs)
                          and any(r.algo == b and (r.task, r.quality) == c for r in recs)]
                if not common:
                    row.append("n/a")
                    continue
                p = np.mean([probability_of_improvement(
                    np.array([r.final for r in recs if r.algo == a and (r.task, r.quality) == c]),
                    np.array([r.final for r in recs if r.algo == b and (r.task, r.quality) == c]))
                    for c in common])
                row.append(f"{p:.2f}")
            lines.append(f"| {a} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _time_table(records: list[RunRecord]) -> list[str]:
    """What the runs cost, by algorithm and task: minutes per run of training (done.json's
    train_seconds: the updates only) and, where the runner recorded it, of the whole run (start-up,
    pre-training, evaluations; since 2026-12-07), on the machine that ran them; process-hours in all."""
    timed = [r for r in records if r.train_s is not None or r.wall_s is not None]
    if not timed:
        return []
    walled = [r for r in timed if r.wall_s is not None]
    tasks = sorted({(r.env, r.task) for r in timed})
    total = f"{sum(r.train_s or 0.0 for r in timed) / 3600:.1f} process-hours of training"
    if walled:
        total += f", {sum(r.wall_s for r in walled) / 3600:.1f} of whole runs ({len(walled)} runs timed whole)"
    lines = ["", "What the runs cost, minutes per run (mean over qualities and seeds, on the machine that ran "
             "them): training (the updates) / the whole run (start-up, pre-training and evaluations too, where "
             f"the runner recorded it); {len(timed)} runs, {total}.", "",
             "| algo | " + " | ".join(f"{e} {t}" for e, t in tasks) + " |", "|---|" + "---|" * len(tasks)]
    for algo in sorted({r.algo for r in timed}):
        cells = []
        for task in tasks:
            rs = [r for r in timed if r.algo == algo and (r.env, r.task) == task]
            train = [r.train_s for r in rs if r.train_s is not None]
            wall = [r.wall_s for r in rs if r.wall_s is not None]
            cells.append("" if not rs else
                         f"{np.mean(train) / 60 if train else float('nan'):.1f} / "
                         f"{f'{np.mean(wall) / 60:.1f}' if wall else '–'} (n={len(rs)})")
        lines.append(f"| {algo} | " + " | ".join(cells) + " |")
    return lines


def _by_algorithm_table(stats: list[GroupStats], quality: str, paper: dict[str, dict[str, str]],
                        digits: int) -> list[str]:
    mine = [s for s in stats if s.quality == quality]
    if not mine:
        return []
    by = {(s.task, s.algo): s for s in mine}
    tasks = sorted({s.task for s in mine})
    published = {t: paper.get(f"{t}/{quality}", paper.get(quality)) for t in tasks}
    algos = sorted({s.algo for s in mine} | {a for t in tasks for a in (published[t] or {})})
    head = ["algorithm"]
    for t in tasks:
        head.append(t)
        if published[t]:
            head.append(f"{t}, paper")
    rows = []
    for a in algos:
        cells = [a]
        for t in tasks:
            s = by.get((t, a))
            cells.append("" if s is None else f"{_fmt(s.final_mean, digits)} ± {_fmt(s.final_se, digits)} (n={s.n})")
            if published[t]:
                cells.append(published[t].get(a, ""))
        rows.append("| " + " | ".join(cells) + " |")
    return [f"Final evaluation return on `{quality}`, mean ± standard error over seeds (n = seeds), one "
            "algorithm per row" + (", the published numbers beside ours" if any(published.values()) else "") + ".",
            "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head), *rows, ""]


def merged_metrics(records: list[RunRecord]) -> dict[str, Any]:
    """All runs' metrics.json merged into one marl-eval JSON that marl-eval's
    ``data_process_pipeline`` and ``create_matrices_for_rliable`` read as it is.

    marl-eval needs every run to have the same evaluation points ``step_0 .. step_{K-1}``. Runs of a
    grid may have other budgets and intervals (one algorithm 5 evaluations, another 4), so each run
    is put on a common grid of K points, K the fewest evaluations of any run: ``step_k`` is the run's
    evaluation at fraction (k + 1) / K of its own evaluations (exact when its count is a multiple
    of K), keeping its own ``step_count``. ``absolute_metrics`` (the final policy, the final
    evaluation's episodes) is kept as it is. Metrics that not every entry has (``win_rate`` where
    some runs have no winner) are dropped, since marl-eval reads the first run's metric names in all."""
    runs = []
    for r in records:
        for env, tasks in r.metrics.items():
            for task, algos in tasks.items():
                for algo, seeds in algos.items():
                    for seed, entry in seeds.items():
                        steps = sorted((k for k in entry if k.startswith("step_")), key=lambda k: int(k[5:]))
                        if steps and "absolute_metrics" in entry:
                            runs.append((env, task, algo, seed, [entry[k] for k in steps], entry["absolute_metrics"]))
    if not runs:
        return {}
    K = min(len(steps) for *_, steps, _ in runs)
    names = set.intersection(*(set(e) for *_, steps, final in runs for e in (*steps, final)))
    out: dict[str, Any] = {}
    for env, task, algo, seed, steps, final in runs:
        n = len(steps)
        picked = [steps[round((k + 1) * n / K) - 1] for k in range(K)]
        entry = {f"step_{k}": {"step_count": int(e["step_count"]), **{m: e[m] for m in sorted(names - {"step_count"})}}
                 for k, e in enumerate(picked)}
        entry["absolute_metrics"] = {m: final[m] for m in sorted(names - {"step_count"})}
        out.setdefault(env, {}).setdefault(task, {}).setdefault(algo, {})[seed] = entry
    return out


def plot(records: list[RunRecord], stats: list[GroupStats], out_dir: str | Path) -> list[Path]:
    """Learning curves (mean over seeds, 95% bootstrap band) per (env, task, quality) and an
    IQM bar chart per env family. Returns the PNG paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    rng = np.random.default_rng(0)
    for env, task, quality in sorted({(r.env, r.task, r.quality) for r in records}):
        fig, ax = plt.subplots(figsize=(6, 4))
        for algo in sorted({r.algo for r in records}):
            rs = [r for r in records if (r.env, r.task, r.quality, r.algo) == (env, task, quality, algo) and len(r.curve)]
            if not rs:
                continue
            k = min(len(r.curve) for r in rs)  # the evaluations every seed has reached
            steps = rs[0].steps[:k]
            ys = np.stack([r.curve[:k] for r in rs])  # [seeds, k]
            mean = ys.mean(0)
            boot = ys[rng.integers(0, len(ys), size=(1000, len(ys)))].mean(1)  # [1000, k]
            lo, hi = np.percentile(boot, [2.5, 97.5], axis=0)
            ax.plot(steps, mean, label=f"{algo} (n={len(rs)})")
            ax.fill_between(steps, lo, hi, alpha=0.2)
        ax.set(xlabel="training steps", ylabel="evaluation return", title=f"{env} {task} {quality}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = out_dir / f"{env}__{task}__{quality}.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)
    for env in sorted({s.env for s in stats}):
        ss = [s for s in stats if s.env == env]
        fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(ss), 4))
        labels = [f"{s.algo}\n{s.task}/{s.quality}" for s in ss]
        ax.bar(range(len(ss)), [s.iqm for s in ss],
               yerr=np.array([[s.iqm - s.iqm_lo for s in ss], [s.iqm_hi - s.iqm for s in ss]]), capsize=3)
        ax.set_xticks(range(len(ss)), labels, rotation=45, ha="right", fontsize=7)
        ax.set(ylabel="final return (IQM over seeds, 95% CI)", title=f"{env}: IQM")
        fig.tight_layout()
        p = out_dir / f"{env}__iqm.png"
        fig.savefig(p, dpi=120)
        plt.close(fig)
        paths.append(p)
    return paths


TABLES_BEGIN = "<!-- tables: written by common.benchmark; text outside these two markers is kept -->"
TABLES_END = "<!-- end of tables -->"


def _cells_shown(md: str) -> dict[tuple[str, ...], int]:
    """(env, task, quality, algo) -> n, read off the Details table of Markdown that
    ``markdown_tables`` wrote."""
    out: dict[tuple[str, ...], int] = {}
    inside = False
    for line in md.splitlines():
        if line.startswith("| env | task | quality | algo | n |"):
            inside = True
        elif inside and line.startswith("|") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) > 4 and cells[4].isdigit():
                out[tuple(cells[:4])] = int(cells[4])
        elif inside and not line.startswith("|"):
            inside = False
    return out


def write_table_file(path: str | Path, md: str, allow_fewer: bool = False) -> None:
    """Write a grid's Markdown to ``path``. Where the file already holds the two markers, only the
    text between them is replaced, so a results page can wrap its tables in its own analysis.

    Refused (BenchmarkError, nothing written) where the page shows a cell with more runs than
    ``md`` has, unless ``allow_fewer``: the tables of a page are only as good as the runs they were
    made from, and a checkout that lacks some of them (their folders and records) must not
    rewrite the page with less."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.read_text() if path.is_file() else ""
    marked = TABLES_BEGIN in old and TABLES_END in old.split(TABLES_BEGIN, 1)[1]
    shown = _cells_shown(old.split(TABLES_BEGIN, 1)[1].split(TABLES_END, 1)[0] if marked else old)
    have = _cells_shown(md)
    fewer = [(cell, n, have.get(cell, 0)) for cell, n in shown.items() if have.get(cell, 0) < n]
    if fewer and not allow_fewer:
        (cell, n, m), *_ = fewer
        raise FewerRunsError(
            f"{path} shows {len(fewer)} cell(s) with more finished runs than are here to aggregate (first: "
            f"{' '.join(cell)}, n={n} on the page, {m} here): their run folders and records are missing, so the "
            f"page and its plots are left as they are; --table and --plots write these tables elsewhere, "
            f"--allow-fewer-runs over the page")
    if marked:
        head, rest = old.split(TABLES_BEGIN, 1)
        tail = rest.split(TABLES_END, 1)[1]
        path.write_text(f"{head}{TABLES_BEGIN}\n{md.rstrip()}\n{TABLES_END}{tail}")
    else:
        path.write_text(md)


@dataclass(frozen=True)
class Page:
    """A results page of a definition and the runs it shows: those of ``cells`` ((algorithm,
    task, quality) triples, from a [[grids]] entry that names its own ``table``), or, for the
    definition's own ``table`` (``cells`` None), every run that no other page shows."""

    table: str
    plots: str
    cells: frozenset[tuple[str, str, str]] | None = None


def definition_pages(d: dict[str, Any]) -> list[Page]:
    """The pages a definition writes: one per ``table`` its [[grids]] entries name (an entry's
    cells: its algorithms x tasks x qualities, each falling back to the definition's), then its
    own ``table`` for the rest. Entries naming the same table share a page. None where no entry
    names a table (the definition's ``table`` shows every run)."""
    cells: dict[str, set[tuple[str, str, str]]] = {}
    plots: dict[str, str] = {}
    for g in d.get("grids", []):
        if not g.get("table"):
            continue
        algos = g.get("algos") or list(d.get("algos", {}))
        tasks, qualities = g.get("tasks") or d.get("tasks", []), g.get("qualities") or d.get("qualities", [])
        cells.setdefault(g["table"], set()).update(itertools.product([Path(a).stem for a in algos], tasks, qualities))
        plots[g["table"]] = plots.get(g["table"]) or g.get("plots", "")
    if not cells:
        return []  # one page: the definition's table
    pages = [Page(t, plots[t], frozenset(c)) for t, c in cells.items()]
    return pages + [Page(d.get("table", ""), d.get("plots", ""))]


def _on_page(r: RunRecord, page: Page, pages: Sequence[Page]) -> bool:
    if page.cells is not None:
        return (r.algo, r.task, r.quality) in page.cells
    return not any((r.algo, r.task, r.quality) in p.cells for p in pages if p.cells is not None)


def _tables(runs: list[RunRecord], reps: int, header: str, paper: dict[str, dict[str, str]] | None,
            by_algorithm: Sequence[str], records: str | Path | None) -> tuple[str, list[GroupStats]]:
    stats = aggregate(runs, reps=reps)
    md = (header + "\n\n" if header else "") + markdown_tables(stats, runs, paper=paper, by_algorithm=by_algorithm)
    if records is not None:  # where the numbers come from (a test checks the pages against it)
        where = Path(records).resolve()
        md += f"\n<!-- records: {where.relative_to(REPO) if where.is_relative_to(REPO) else where} -->\n"
    return md, stats


def write_outputs(root: str | Path, table: str = "", plots: str = "", reps: int = 2000,
                  header: str = "", paper: dict[str, dict[str, str]] | None = None,
                  by_algorithm: Sequence[str] = (), records: str | Path | None = None,
                  allow_fewer: bool = False, pages: Sequence[Page] = ()) -> tuple[str, list[GroupStats]]:
    """Aggregate every run under ``root`` and in ``records`` (first brought up to date from
    ``root``: ``save_records``): ``<root>/results.md``, ``<root>/metrics.json`` (merged
    marl-eval), plots in ``plots`` (default ``<root>/plots``); ``table`` also receives the
    Markdown (between its markers, if it has them: ``write_table_file``, which refuses to show
    fewer runs than the page does unless ``allow_fewer``).

    ``pages`` (``definition_pages``) replaces ``table`` and ``plots``: each page gets the tables
    and plots of its own runs (a page with none here is left as it is); a page refused by
    ``write_table_file`` does not stop the others, its error is raised after them. Returns the
    Markdown and statistics of all runs (those of ``<root>/results.md``)."""
    root = Path(root)
    if records is not None:
        save_records(root, records)
    runs = load_runs(root, records=records)
    if not runs:
        raise BenchmarkError(f"no finished evaluations under {root}" + (f" or in {records}" if records else ""))
    md, stats = _tables(runs, reps, header, paper, by_algorithm, records)
    # runs still training here: said in <root>/results.md and on the terminal, not on the pages
    # (committed, they would describe this machine's state, not the records')
    unfinished = len(load_runs(root, include_unfinished=True)) - len(load_runs(root))
    note = f"\n{unfinished} unfinished run(s) under {root.name}/ left out (no final evaluation yet).\n" if unfinished else ""
    if note:
        print(note.strip())
    root.mkdir(parents=True, exist_ok=True)
    (root / "results.md").write_text(md + note)
    (root / "metrics.json").write_text(json.dumps(merged_metrics(runs), indent=1))
    if not pages:
        if table:
            write_table_file(table, md, allow_fewer)
        plot(runs, stats, plots or root / "plots")
        return md + note, stats
    refused = []
    for page in pages:
        mine = [r for r in runs if _on_page(r, page, pages)]
        if not mine or not (page.table or page.plots):
            continue
        page_md, page_stats = _tables(mine, reps, header, paper, by_algorithm, records)
        try:
            if page.table:
                write_table_file(page.table, page_md, allow_fewer)
        except FewerRunsError as e:
            refused.append(e)
            continue
        plot(mine, page_stats, page.plots or root / "plots" / Path(page.table).stem)
        print(f"tables written to {page.table}" if page.table else f"plots written to {page.plots}")
    if refused:
        raise refused[0]
    return md + note, stats


def _records_arg(value: str, root: str | Path) -> Path | None:
    """--records: "" for the default (``default_records``), "none" for none, else a folder."""
    if value == "none":
        return None
    return Path(value) if value else default_records(root)


# ======================================================================= CLI
@dataclass
class RunArgs:
    """Run a grid (skipping finished runs, resuming interrupted ones), then aggregate it."""

    definition: str = ""
    """A benchmark definition file (benchmarks/*.toml); flags below override it."""
    algos: list[str] = field(default_factory=list)
    """Algorithm files, e.g. comadice.py baselines/bc.py."""
    env: str = ""
    tasks: list[str] = field(default_factory=list)
    qualities: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    extra: str = ""
    """Extra flags for every run, one string, e.g. "--total-steps 5000 --eval-every 1000"; they come
    after the definition's (its extra and each algorithm's flags) and win over them."""
    root: str = ""
    """Where the runs go (default: benchmark_runs/<definition name or 'grid'>)."""
    backend: Literal["local", "slurm", "ray"] = "local"
    workers: int = 1
    """local: how many runs at once."""
    threads: int = 1
    """CPU threads per run (OMP_NUM_THREADS / torch threads)."""
    slurm: SlurmOptions = field(default_factory=SlurmOptions)
    ray_address: str = ""
    """ray: address of an existing cluster (empty: start a local one)."""
    ray_gpus: float = 0.0
    """ray: GPUs per run."""
    table: str = ""
    """Also write the Markdown tables of every run here (default: the definition's pages: its
    `table`, and the `table` of each [[grids]] entry that names one, for that entry's runs)."""
    plots: str = ""
    """Folder for the PNG plots of every run (default: the definition's pages' `plots`, else <root>/plots)."""
    dry_run: bool = False
    """Print the commands (with --resume where it applies) and stop."""
    records: str = ""
    """Folder of the run records (one small JSON per finished run, kept in git; default:
    benchmarks/records/<root's name> for a root in benchmark_runs/, none elsewhere; "none": none)."""
    allow_fewer_runs: bool = False
    """Write the table page even where it now shows cells with more runs than are here."""


@dataclass
class AggregateArgs:
    """Aggregate the runs under a folder into tables, a merged JSON and plots."""

    root: str = ""
    """Folder of the runs (default with --definition: benchmark_runs/<its name>)."""
    definition: str = ""
    """A benchmark definition: its root, table, plots, header and [paper] lines (flags override them)."""
    table: str = ""
    """Write the Markdown tables of every run here (default: the definition's pages, as for run)."""
    plots: str = ""
    reps: int = 2000
    """Bootstrap resamples."""
    records: str = ""
    """Folder of the run records (one small JSON per finished run, kept in git; default:
    benchmarks/records/<root's name> for a root in benchmark_runs/, none elsewhere; "none": none)."""
    allow_fewer_runs: bool = False
    """Write the table page even where it now shows cells with more runs than are here."""


def load_definition(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"no benchmark definition at {path}")
    try:
        d = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise BenchmarkError(f"{path} is not valid TOML: {e}") from None
    d.setdefault("name", path.stem)
    _check_definition(d, path)
    return d


_DEFINITION_TYPES = {"name": str, "header": str, "grids": list, "env": str, "tasks": list, "qualities": list, "seeds": list, "extra": str,
                     "table": str, "plots": str, "algos": dict, "workers": int, "threads": int, "paper": dict,
                     "by_algorithm": list}


def _check_definition(d: dict[str, Any], path: Path) -> None:
    """One sentence for the first wrongly typed entry of a benchmark definition (a string where a
    list belongs would otherwise expand letter by letter)."""
    names = {str: "a string", list: "a list", dict: "a table ([algos]: one line per file; [paper]: one line per quality)", int: "an integer"}
    for key, typ in _DEFINITION_TYPES.items():
        if key in d and (not isinstance(d[key], typ) or isinstance(d[key], bool)):
            raise BenchmarkError(f"{path}: {key} must be {names[typ]}, got {d[key]!r}")
    unknown = sorted(set(d) - set(_DEFINITION_TYPES))
    if unknown:
        raise BenchmarkError(f"{path}: unknown entries {unknown}; known: {', '.join(_DEFINITION_TYPES)}")
    for g in d.get("grids", []):
        if not isinstance(g, dict):
            raise BenchmarkError(f"{path}: grids must be [[grids]] tables, got {g!r}")
        for key, value in g.items():
            if not (key in ("algos", "tasks", "qualities", "seeds") and isinstance(value, list)
                    or key in ("table", "plots") and isinstance(value, str)):
                raise BenchmarkError(f"{path}: a [[grids]] entry may set algos, tasks, qualities and seeds, "
                                     f"each a list, and its own page: table and plots, strings; got {key} = {value!r}")
        if g.get("plots") and not g.get("table"):
            raise BenchmarkError(f"{path}: a [[grids]] entry with plots needs its table (its page) too")
    for where in [d, *d.get("grids", [])]:
        for key in ("tasks", "qualities", "algos"):
            if key in where and where is not d or key in ("tasks", "qualities"):
                if any(not isinstance(x, str) for x in where.get(key, [])):
                    raise BenchmarkError(f"{path}: {key} must be a list of strings, got {where[key]!r}")
        if any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in where.get("seeds", [])):
            raise BenchmarkError(f"{path}: seeds must be a list of non-negative integers, got {where['seeds']!r}")
    if any(not isinstance(q, str) for q in d.get("by_algorithm", [])):
        raise BenchmarkError(f"{path}: by_algorithm must be a list of qualities, got {d['by_algorithm']!r}")
    for cell, published in d.get("paper", {}).items():
        if not isinstance(published, dict) or any(not isinstance(v, str) for v in published.values()):
            raise BenchmarkError(f"{path}: [paper] maps a quality (or task/quality) to {{algorithm = \"number\"}}, "
                                 f"got {cell} = {published!r}")
    for file, flags in d.get("algos", {}).items():
        if not isinstance(flags, (str, list)) or (isinstance(flags, list) and any(not isinstance(x, str) for x in flags)):
            raise BenchmarkError(f"{path}: the flags of {file} must be a string (or a list of strings), got {flags!r}")


def specs_from_args(a: RunArgs) -> tuple[list[RunSpec], dict[str, Any]]:
    d = load_definition(a.definition) if a.definition else {"name": "grid"}
    algos_def = d.get("algos", {})
    algos = a.algos or list(algos_def)
    algo_args = {k: shlex.split(v) if isinstance(v, str) else list(v) for k, v in algos_def.items()}
    # the definition's extra, then each algorithm's flags, then the command line's --extra: the
    # last value of a flag wins, so --extra "--total-steps 1000" sets every run's budget
    extra, last = shlex.split(d.get("extra", "")), shlex.split(a.extra)
    env = a.env or d.get("env", "")
    if not env:
        raise BenchmarkError("say which env (--env or the definition's env)")
    # [[grids]]: several sub-grids in one definition (e.g. every algorithm on one task, a few on
    # the others); each may set its own algos (files of [algos]), tasks, qualities and seeds.
    # A command-line list narrows what a [[grids]] entry sets (its cells in that list; an entry left
    # with none is skipped) and replaces what it leaves to the definition's top level.
    def pick(key: str, cli: list, g: dict, default: list) -> list:
        if key in g and cli:
            return [x for x in g[key] if x in cli]
        return list(cli or g.get(key) or default)

    grids = d.get("grids") or [{}]
    specs, seen = [], set()
    for g in grids:
        g_algos = pick("algos", a.algos, g, algos)
        unknown = [x for x in g.get("algos", []) if algos_def and x not in algos_def]
        if unknown:
            raise BenchmarkError(f"a [[grids]] entry names {unknown[0]}, which is not in [algos]")
        missing = [x for x in g_algos if not (REPO / x).is_file() and not Path(x).is_file()]
        if missing:
            raise BenchmarkError(f"no algorithm file {missing[0]}")
        cells = (g_algos, pick("tasks", a.tasks, g, d.get("tasks", [])),
                 pick("qualities", a.qualities, g, d.get("qualities", [])),
                 pick("seeds", a.seeds, g, d.get("seeds", [0, 1, 2, 3, 4])))
        if len(grids) > 1 and not all(cells):
            continue  # the command line leaves this entry nothing to run
        for s in expand_grid(cells[0], env, *cells[1:], extra, algo_args, last):
            if s.name not in seen:
                seen.add(s.name)
                specs.append(s)
    if not specs:
        wanted = ", ".join(f"--{k} {' '.join(map(str, v))}" for k, v in
                           (("algos", a.algos), ("tasks", a.tasks), ("qualities", a.qualities), ("seeds", a.seeds)) if v)
        raise BenchmarkError(f"no [[grids]] entry of {a.definition} has a cell with {wanted}")
    return specs, d


def main_run(a: RunArgs) -> int:
    specs, d = specs_from_args(a)
    # --extra adds flags to the definition's: these runs are a variant of its grid (a control, another
    # device), so they get their own folder, and its page and plots are left as they are unless
    # --table / --plots name them (in its folder a finished run of the grid would be skipped as done)
    variant = bool(a.definition and a.extra)
    if variant and not a.root:
        raise BenchmarkError(f"--extra changes the runs of {a.definition}: give them their own --root "
                             f"(benchmark_runs/{d['name']} holds the definition's own runs)")
    root = Path(a.root or REPO / "benchmark_runs" / d["name"])
    records = _records_arg(a.records, root)
    # a run recorded with the same command (its folder not in this checkout) is done
    done_elsewhere = [s for s in specs if recorded(s, root, records)]
    if a.dry_run:
        for s in specs:
            st = "recorded" if s in done_elsewhere else run_status(s, root)
            print(f"[{st}] " + ("(skip)" if st in ("done", "recorded") else
                                shlex.join(s.command(root, st == "interrupted"))))
        return 0
    try:
        results = [RunResult(s, "skipped") for s in done_elsewhere]
        todo = [s for s in specs if s not in done_elsewhere]
        results += run_grid(todo, root, a.backend, a.workers, a.threads, a.slurm, a.ray_address, a.ray_gpus) if todo else []
    finally:  # an interrupted grid keeps the records of the runs that did finish
        if records is not None and root.is_dir():
            save_records(root, records)
    print(report(results))
    table = a.table or ("" if variant else d.get("table", ""))
    plots = a.plots or ("" if variant else d.get("plots", ""))
    # the definition's pages (its [[grids]] entries' own tables), unless --table/--plots or --extra say otherwise
    pages = [] if a.table or a.plots or variant else definition_pages(d)
    try:
        md, _ = write_outputs(root, table, plots, header=d.get("header", ""), paper=d.get("paper"),
                              by_algorithm=d.get("by_algorithm", []), records=records, allow_fewer=a.allow_fewer_runs,
                              pages=pages)
        print(md)
        if table and not pages:
            print(f"tables written to {table}")
        if variant and not a.table and d.get("table"):
            print(f"--extra changes the definition's runs, so its table {d['table']} and plots are left as they "
                  f"are: these tables are in {root / 'results.md'} (--table and --plots write them elsewhere too)")
    except FewerRunsError as e:
        print(f"tables not written: {e}", file=sys.stderr)
        return 1
    except BenchmarkError as e:
        print(f"nothing to aggregate yet: {e}")
    return 1 if any(r.status == "failed" for r in results) else 0


def main(argv: Sequence[str] | None = None) -> int:
    import tyro

    from common import friendly_errors

    # `--extra "--total-steps 1000"`: a value that starts with "--" reads to the parser as the next
    # flag (tyro: "Missing value for argument '--extra'"); joined as --extra=..., it is the value
    argv = list(sys.argv[1:] if argv is None else argv)
    for i in range(len(argv) - 1, 0, -1):
        if argv[i - 1] == "--extra" and argv[i].startswith("-"):
            argv[i - 1:i + 1] = [f"--extra={argv[i]}"]
    with friendly_errors():
        cmd = tyro.extras.subcommand_cli_from_dict({"run": RunArgs, "aggregate": AggregateArgs}, args=argv)
        if isinstance(cmd, RunArgs):
            return main_run(cmd)
        d = load_definition(cmd.definition) if cmd.definition else {}
        if not (cmd.root or d):
            raise BenchmarkError("aggregate needs --root (a folder of runs) or --definition")
        root = cmd.root or REPO / "benchmark_runs" / d["name"]
        table = cmd.table or d.get("table", "")
        pages = [] if cmd.table or cmd.plots or not d else definition_pages(d)
        md, _ = write_outputs(root, table, cmd.plots or d.get("plots", ""), cmd.reps,
                              header=d.get("header", ""), paper=d.get("paper"), by_algorithm=d.get("by_algorithm", []),
                              records=_records_arg(cmd.records, root), allow_fewer=cmd.allow_fewer_runs, pages=pages)
        print(md)
        if table and not pages:
            print(f"tables written to {table}")
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
