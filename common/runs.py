"""What every training script does around its update step: checking the arguments, threads,
the run directory, resuming, TensorBoard scalars, evaluation, checkpoints, the divergence
guard, ``metrics.json`` and ``done.json``. The twelve algorithm files share this contract
(docs/architecture.md, "The algorithm-file contract"); their own code is the algorithm.

A run lives in ``runs/<env>__<task>__<quality>__<algo>__<seed>__<time>/`` (or ``--run-dir``)::

    config.json             the arguments of the run (+ "algo")
    events.out.tfevents.*   TensorBoard scalars (losses/, charts/, eval/)
    checkpoints/latest.pt   every tensor and RNG state of the run, written atomically at
                            every evaluation point; loads with torch.load(weights_only=True)
    metrics.json            marl-eval layout: env -> "<task>__<quality>" -> algo -> seed_<s>
                            -> step_<k> -> {step_count, episode_return: [...], win_rate: [...]},
                            plus absolute_metrics (the final, larger evaluation)
    done.json               written last, when training and the final evaluation completed

The loop of an algorithm file::

    run = Run(args, "comadice")             # arguments checked, device, threads, seeds
    dataset, env = run.load_data()          # env is None with --eval-episodes 0
    ...                                     # networks, optimisers, act_fn
    run.start(dataset, env, act_fn, dims=..., modules=..., optimizers=...)  # fresh or resumed
    while run.training:
        stats = update(...)                 # a dict of 0-d tensors; no host sync needed
        run.record(stats)                   # logs, evaluates, checkpoints, stops a diverged run
    return run.finish()                     # final evaluation, done.json
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import torch

from common import DivergenceError, OfflineMarlError

CHECKPOINT_SCHEMA = "offline-marl-checkpoint/1"
# Arguments that may differ when a run is resumed: where and how it runs, not what it learns.
OPERATIONAL_ARGS = frozenset({"resume", "overwrite", "run_dir", "eval_only", "checkpoint", "device", "threads",
                              "total_steps", "log_every", "final_eval_episodes", "track", "wandb_project",
                              "capture_video"})
# The files a run directory may hold (the benchmark runner adds the last two before the run starts):
# anything else makes the folder someone else's.
RUN_FILES = ("config.json", "metrics.json", "done.json", "benchmark.json", "log.txt")
RUN_DIRS = ("checkpoints", "videos", "wandb")  # checkpoints/latest.pt, videos/*.mp4, Weights & Biases' own files
KILL_AFTER_ENV = "OFFLINE_MARL_KILL_AFTER_CHECKPOINT"  # tests: exit right after the checkpoint at this step


def eval_seed(seed: int) -> int:
    """The first environment seed of every evaluation of a run with ``--seed seed``: periodic
    evaluations, the final one and ``--eval-only`` all play episodes ``eval_seed + 0, 1, ...``
    (the periodic ones are the first ``--eval-episodes`` of the final one's)."""
    return 1_000_000 * (int(seed) + 1)


# ====================================================================== arguments
def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _is_lr(name: str) -> bool:
    return name == "lr" or name.endswith("_lr") or name.startswith("lr_")


def validate_args(args: Any, positive: tuple[str, ...] = (), nonneg: tuple[str, ...] = (),
                  unit: tuple[str, ...] = (), checks: tuple[tuple[bool, str], ...] = ()) -> None:
    """Refuse impossible arguments before any work starts, all of them in one sentence.

    Rules by name hold in every file (``gamma`` in [0, 1), ``tau`` in (0, 1], learning rates > 0,
    ``grad_clip`` >= 0, widths >= 1, the shared counts); ``positive``/``nonneg``/``unit`` (in [0, 1])
    name a file's own fields; ``checks`` are ``(ok, message)`` pairs of a file's own conditions."""
    v = {f.name: getattr(args, f.name) for f in dataclasses.fields(args)}
    bad: list[str] = []

    def need(name: str, ok: bool, what: str) -> None:
        if name in v and v[name] is not None and not ok:
            bad.append(f"{flag(name)} must be {what}, got {v[name]!r}")

    for name, x in v.items():
        if isinstance(x, float) and not math.isfinite(x):
            bad.append(f"{flag(name)} must be a finite number, got {x}")
    num = {k: x for k, x in v.items() if isinstance(x, (int, float)) and not isinstance(x, bool)
           and math.isfinite(x)}
    for name in ("total_steps", "batch_size", "eval_every", "log_every", "eval_envs"):
        need(name, num.get(name, 1) >= 1, "at least 1")
    if v.get("precision", "fp32") not in ("fp32", "bf16"):
        bad.append(f"--precision must be fp32 or bf16, got {v['precision']!r}")
    for name in ("eval_episodes", "eval_episode_limit", "threads", "final_eval_episodes"):
        need(name, num.get(name, 0) >= 0, "0 or more")
    if num.get("eval_episodes", 0) > 0:
        need("final_eval_episodes", num.get("final_eval_episodes", 1) >= 1, "at least 1 when evaluation is on")
    need("seed", 0 <= num.get("seed", 0) < 2**31, "in [0, 2^31)")
    for name, x in num.items():
        if name == "gamma":
            need(name, 0 <= x < 1, "in [0, 1)")
        elif name == "tau":
            need(name, 0 < x <= 1, "in (0, 1]")
        elif _is_lr(name):
            need(name, x > 0, "positive")
        elif name == "grad_clip":
            need(name, x >= 0, "0 (off) or positive")
        elif name == "hidden" or name.endswith("_hidden") or name.startswith("hidden_"):
            need(name, x >= 1, "at least 1")
    for name in positive:
        need(name, name not in num or num[name] > 0, "positive")
    for name in nonneg:
        need(name, name not in num or num[name] >= 0, "0 or more")
    for name in unit:
        need(name, name not in num or 0 <= num[name] <= 1, "in [0, 1]")
    bad += [msg for ok, msg in checks if not ok]
    if v.get("resume") and v.get("overwrite"):
        bad.append("--resume and --overwrite exclude each other: continue the run or replace it")
    if v.get("eval_only") and not v.get("checkpoint"):
        bad.append("--eval-only needs --checkpoint PATH (a checkpoint file or a run directory)")
    if bad:
        raise OfflineMarlError("; ".join(bad))


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise OfflineMarlError(f"--device {device!r} is not a torch device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OfflineMarlError(f"--device {device} was asked for but torch sees no CUDA device; use --device cpu or auto")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise OfflineMarlError(f"--device {device} is not supported; use auto, cpu, cuda or cuda:N")
    return dev


# ======================================================================== threads
class ThreadTuner:
    """``--threads 0`` on a CPU: use the thread count that is fastest now, measured in the loop.

    OpenMP threads spin while they wait for each other; when another process holds a core,
    every parallel region waits for a descheduled thread and a run slows 2-5x, or ~50x under heavier
    contention (docs/architecture.md, "Threads"). Passive waiting avoids that but costs a third of
    the speed of small networks on an idle machine. So the loop itself measures: it times windows
    of ``probe_s`` of updates at each candidate count, keeps the fastest for ``period_s``, then
    re-checks.

    - The first choice is made on ``rounds`` interleaved windows per candidate (2, 1, 2, 1, ...),
      pooled (updates / seconds): one half-second window is at the mercy of a stall or of another
      process's burst, and interleaving cancels a drift in speed.
    - The first ``warmup_s`` of updates are not timed (a run's first updates are slow: allocations,
      first calls).
    - After the first choice, the count in use is timed over its whole period and a challenger
      over one window; the challenger takes over only when it is faster by ``margin`` (a short
      window's noise does not flip a good choice for a whole period).
    - A candidate that lost by more than 2x is re-checked half as often each time (up to every
      ``max_period_s``), which bounds the cost of probing a count that is slow under contention."""

    def __init__(self, candidates: list[int], period_s: float = 30.0, probe_s: float = 0.5,
                 max_period_s: float = 600.0, warmup_s: float = 0.5, rounds: int = 4, margin: float = 0.05):
        self.candidates = sorted(set(candidates))
        self.period_s, self.probe_s, self.max_period_s = period_s, probe_s, max_period_s
        self.margin = margin
        self.backoff = {c: period_s for c in self.candidates}
        self.next_probe = {c: 0.0 for c in self.candidates}
        self.timed: dict[int, list[float]] = {}  # count -> [updates, seconds] of this decision's windows
        self.queue = list(reversed(self.candidates)) * max(1, rounds)  # the largest count first
        self.current = self.queue.pop(0)
        self.incumbent: int | None = None  # the count kept since the last decision
        self.history: list[dict[str, Any]] = []
        self.warming = warmup_s > 0
        self._begin(self.current, warmup_s if self.warming else probe_s)

    def _begin(self, n: int, window: float) -> None:
        if torch.get_num_threads() != n:
            torch.set_num_threads(n)
        self.current, self.window, self.n, self.t0 = n, window, 0, time.perf_counter()

    def pause(self) -> None:
        """Discard the window in progress (evaluation and checkpoints are not updates)."""
        self.n, self.t0 = 0, time.perf_counter()

    def tick(self) -> None:
        """Call after every update."""
        self.n += 1
        now = time.perf_counter()
        if now - self.t0 < self.window:
            return
        if self.warming:  # the warm-up window is not a measurement
            self.warming = False
            self._begin(self.current, self.probe_s)
            return
        acc = self.timed.setdefault(self.current, [0.0, 0.0])
        acc[0] += self.n
        acc[1] += now - self.t0
        if self.queue:
            self._begin(self.queue.pop(0), self.probe_s)
            return
        rates = {c: n / t for c, (n, t) in self.timed.items()}
        best = max(rates, key=rates.get)
        if self.incumbent in rates and rates[best] <= rates[self.incumbent] * (1 + self.margin):
            best = self.incumbent
        for c, r in rates.items():
            if c != best:
                slow = r * 2 < rates[best]
                self.backoff[c] = min(self.backoff[c] * 2, self.max_period_s) if slow else self.period_s
                self.next_probe[c] = now + self.backoff[c]
        if len(rates) > 1:
            self.history = (self.history + [{"rates": {c: round(r, 2) for c, r in rates.items()},
                                             "threads": best}])[-20:]
        self.timed, self.incumbent = {}, best
        # keep the best for a period; at its end its fresh rate is compared with the probes then due
        self.queue = [c for c in self.candidates if c != best and self.next_probe[c] <= now + self.period_s]
        self._begin(best, self.period_s)


def setup_threads(threads: int, device: torch.device) -> tuple[int, ThreadTuner | None]:
    """``--threads N``: N intra-op threads. ``0``: ``$OMP_NUM_THREADS`` when it is set, else (CPU
    runs) a ``ThreadTuner`` over 1, 2, 4, ... up to the cores this process may use. Returns the
    count in use now and the tuner (None when fixed)."""
    if threads > 0:
        torch.set_num_threads(threads)
        return threads, None
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        torch.set_num_threads(int(env))
        return int(env), None
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    cores = max(1, min(cores, torch.get_num_threads() if device.type == "cpu" else cores))
    if device.type != "cpu" or cores == 1:
        return torch.get_num_threads(), None
    candidates = sorted({1, cores} | {2**k for k in range(1, cores.bit_length()) if 2**k < cores})
    tuner = ThreadTuner(candidates)
    return tuner.current, tuner


# ==================================================================== checkpoints
def _defaults(args: Any) -> dict[str, Any]:
    """The JSON form of each argument's declared default (a dataclass's fields; none otherwise)."""
    if not (dataclasses.is_dataclass(args) and not isinstance(args, type)):
        return {}
    out = {}
    for f in dataclasses.fields(args):
        if f.default is not dataclasses.MISSING:
            out[f.name] = _jsonable(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = _jsonable(f.default_factory())
    return out


def _jsonable(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: _jsonable(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, SimpleNamespace):
        x = vars(x)
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer, np.floating, np.bool_)):
        return x.item()
    if isinstance(x, (Path, torch.device)):
        return str(x)
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as tensors and plain values (a weights-only load reads them)."""
    version, keys, gauss = random.getstate()
    name, mt, pos, has_gauss, cached = np.random.get_state()
    st = {"python": [version, torch.tensor(keys, dtype=torch.int64), gauss],
          "numpy": [name, torch.from_numpy(mt.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
          "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    version, keys, gauss = st["python"]
    random.setstate((version, tuple(int(k) for k in keys.tolist()), gauss))
    name, mt, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((name, mt.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def checkpoint_path(path: str | os.PathLike) -> Path:
    """A checkpoint file, or the ``checkpoints/latest.pt`` of a run directory."""
    path = Path(path).expanduser()
    if path.is_dir():
        cand = [path / "checkpoints" / "latest.pt", path / "latest.pt"]
        path = next((c for c in cand if c.is_file()), cand[0])
    if not path.is_file():
        raise OfflineMarlError(f"no checkpoint at {path}")
    return path


def load_checkpoint(path: str | os.PathLike, algo: str | None = None, map_location: Any = "cpu") -> dict[str, Any]:
    """Read a checkpoint of this project (file or run directory) with a weights-only load: tensors
    and plain values only, so a crafted file cannot run code. ``algo`` refuses another file's."""
    import pickle

    path = checkpoint_path(path)
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise OfflineMarlError(f"{path} is not an offline-marl checkpoint: it holds Python objects that a safe "
                               "(weights-only) load refuses, and this project never unpickles them") from None
    except Exception as e:  # truncated, empty, not a torch file
        raise OfflineMarlError(f"cannot read checkpoint {path}: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(ck, dict) or ck.get("schema") != CHECKPOINT_SCHEMA:
        raise OfflineMarlError(f"{path} is not an offline-marl checkpoint (schema {CHECKPOINT_SCHEMA}); "
                               "it may come from another program or an older version of this project")
    if algo is not None and ck.get("algo") != algo:
        raise OfflineMarlError(f"{path} is a checkpoint of {ck.get('algo')}, not of {algo}: evaluate it with "
                               f"{ck.get('algo')}'s own file (--eval-only --checkpoint {path})")
    return ck


def restore_args(cls: type, saved: dict[str, Any]) -> Any:
    """The Args dataclass of a checkpoint (fields this version does not know are dropped)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in saved.items() if k in names})


def dataset_identity(meta: dict[str, Any]) -> dict[str, Any]:
    """What makes two datasets the same for ``--resume``."""
    keys = ("env", "task", "quality", "source", "n_agents", "obs_dim", "state_dim", "discrete", "n_actions",
            "act_dim", "episodes", "transitions", "reward", "provenance")
    return {k: _jsonable(meta.get(k)) for k in keys}


def _is_wandb_dir(path: Path) -> bool:
    """The folder Weights & Biases writes for a run (``run-*``/``offline-run-*``, ``latest-run``)."""
    names = [p.name for p in path.iterdir()]
    return bool(names) and all(n.startswith(("run-", "offline-run-", "latest-run", "debug")) for n in names)


# ===================================================================== the run
class Run:
    """One training run: arguments, device, threads, directory, TensorBoard writer, resume,
    evaluation, checkpoints and metrics. ``algo`` names the algorithm (the file's stem)."""

    def __init__(self, args: Any, algo: str, root: str | os.PathLike = "runs", *, positive: tuple[str, ...] = (),
                 nonneg: tuple[str, ...] = (), unit: tuple[str, ...] = (),
                 checks: tuple[tuple[bool, str], ...] = (), tensorboard: bool = True):
        validate_args(args, positive, nonneg, unit, checks)
        if getattr(args, "capture_video", False):
            os.environ.setdefault("MUJOCO_GL", "egl")  # off-screen rendering, before mujoco is imported
        self.args, self.algo, self.root = args, algo, Path(root)
        self.device = resolve_device(args.device)
        self.threads, self.tuner = setup_threads(getattr(args, "threads", 0), self.device)
        set_seed(args.seed)
        self.label = {"env": args.env, "task": args.task, "quality": getattr(args, "quality", "") or "custom"}
        self.dir: Path | None = None
        self.step, self.total = 0, int(args.total_steps)
        self.progress: dict[str, Any] = {}  # plain values a file keeps across a resume (e.g. a phase done)
        self.metrics: dict[str, Any] = {}
        self.finished_summary: dict[str, Any] | None = None
        self._writer, self._tb, self._wandb = None, tensorboard, None
        self._train_time, self._clock, self._log_step, self._log_time = 0.0, 0.0, 0, 0.0
        self._first_bad: torch.Tensor | None = None
        self._bad_keys: list[str] = []
        self._bounds: dict[str, float] = {}
        self._bound_vec: torch.Tensor | None = None
        self.last_eval: float | None = None

    # ------------------------------------------------------------------ data
    def load_data(self, check: Callable[[Any], None] | None = None):
        """The dataset (``common.catalog``) and, when evaluation is on, the environment it was
        recorded in (None with ``--eval-episodes 0``). ``check(dataset)`` is a file's own
        requirement on the data (it raises ``OfflineMarlError``); every problem is reported together."""
        from common import catalog
        from common.envs import eval_env_for, make_env

        a, problems, dataset, env = self.args, [], None, None
        name = {"env": a.env, "task": a.task}
        if a.dataset:  # a native --dataset names its env and task: the file defaults give way to them
            from common.data import OfflineDataset, is_native_dataset

            path, default = Path(a.dataset).expanduser(), type(a)()
            if path.is_dir() and (path / "meta.json").is_file() and is_native_dataset(path):
                try:
                    meta = OfflineDataset.load(path, validate=False).meta
                    name.update({k: str(meta[k]) for k in name if getattr(a, k) == getattr(default, k)
                                 and meta.get(k) not in (None, "", "unknown")})
                except OfflineMarlError:
                    pass  # catalog.load reports it
        try:
            dataset = catalog.load(name["env"], name["task"], a.quality, a.dataset or None)
        except OfflineMarlError as e:
            problems.append(str(e))
        if dataset is not None and check is not None:
            try:
                check(dataset)
            except OfflineMarlError as e:
                problems.append(str(e))
        if a.eval_episodes > 0:
            try:
                env = (eval_env_for(dataset.meta, a.eval_episode_limit) if dataset is not None
                       else make_env(name["env"], name["task"]))
            except OfflineMarlError as e:
                if not any(str(e) in p for p in problems):  # an unknown task: the data's error said it
                    problems.append(f"{e} -- the environment is only needed for evaluation: train without it "
                                    "with --eval-episodes 0, then evaluate the saved checkpoint where the "
                                    "environment is installed with --eval-only --checkpoint PATH")
        if problems:
            raise OfflineMarlError("; ".join(problems))
        if env is not None:
            dataset.check_env(env)
            if getattr(a, "capture_video", False) and not hasattr(env, "render"):
                raise OfflineMarlError(f"--capture-video records MaMuJoCo episodes; {type(env).__name__} cannot "
                                       "render frames")
        elif getattr(a, "capture_video", False):
            raise OfflineMarlError("--capture-video records evaluation episodes: it needs --eval-episodes > 0")
        if a.dataset:  # a --dataset run is labelled with its data's env, task and quality, unless given
            default = type(a)()
            self.label.update({k: str(dataset.meta[k]) for k in self.label if getattr(a, k) == getattr(default, k)
                               and dataset.meta.get(k) not in (None, "", "unknown")})
        return dataset, env

    # ------------------------------------------------------------- directory
    @property
    def quality(self) -> str:
        return self.label["quality"]

    def _prefix(self) -> str:
        lb = self.label
        return f"{lb['env']}__{lb['task']}__{lb['quality']}__{self.algo}__{self.args.seed}"

    @staticmethod
    def _ours(d: Path) -> tuple[bool, list[str]]:
        """Whether ``d`` holds a run of this project, and the entries that are not ours."""
        foreign = []
        for p in d.iterdir():
            if p.name in RUN_FILES or p.name.startswith("events.out.tfevents.") or p.name.endswith(".tmp"):
                continue
            if p.name == "checkpoints" and p.is_dir():
                inner = [c for c in p.iterdir() if not (c.is_file() and c.name.startswith("latest.pt"))]
                foreign += [f"checkpoints/{c.name}" for c in inner]
                continue
            if p.name == "videos" and p.is_dir():
                foreign += [f"videos/{c.name}" for c in p.iterdir() if not (c.is_file() and c.suffix == ".mp4")]
                continue
            if p.name == "wandb" and p.is_dir() and _is_wandb_dir(p):
                continue
            foreign.append(p.name)
        config = d / "config.json"
        try:
            ok = config.is_file() and "algo" in json.loads(config.read_text())
        except (OSError, json.JSONDecodeError, TypeError):
            ok = False
        return ok and not foreign, foreign

    def _clear(self, d: Path) -> None:
        """Remove this project's files from run directory ``d`` (done.json first, so that a run killed
        while this happens is never counted as finished). Only names of ``RUN_FILES``, TensorBoard
        event files and ``checkpoints/*.pt`` are touched."""
        for name in ("done.json", "metrics.json", "config.json"):
            (d / name).unlink(missing_ok=True)
        for p in d.glob("events.out.tfevents.*"):
            p.unlink()
        for p in d.glob("*.tmp"):
            p.unlink()
        ck = d / "checkpoints"
        if ck.is_dir():
            for p in ck.iterdir():
                p.unlink()
            ck.rmdir()
        if (d / "videos").is_dir():
            for p in (d / "videos").glob("*.mp4"):
                p.unlink()
            (d / "videos").rmdir()
        if (d / "wandb").is_dir() and _is_wandb_dir(d / "wandb"):
            import shutil

            shutil.rmtree(d / "wandb")  # Weights & Biases' local copy of this run (--track)

    def _choose_dir(self) -> tuple[Path, bool]:
        """The run directory and whether it holds a checkpoint to resume."""
        a = self.args
        explicit = getattr(a, "run_dir", "") or ""
        if explicit:
            d = Path(explicit).expanduser()
        else:
            d = None
            if a.resume:
                found = sorted((p for p in self.root.glob(self._prefix() + "__*")
                                if (p / "checkpoints" / "latest.pt").is_file()), key=lambda p: p.stat().st_mtime)
                d = found[-1] if found else None
            if d is None:
                d = self.root / f"{self._prefix()}__{time.strftime('%Y%m%d-%H%M%S')}"
                k = 1
                while d.exists():
                    d = self.root / f"{self._prefix()}__{time.strftime('%Y%m%d-%H%M%S')}_{k}"
                    k += 1
        if d.exists() and not d.is_dir():
            raise OfflineMarlError(f"--run-dir {d} is a file, not a folder; choose another --run-dir")
        if not d.exists() or not any(d.iterdir()):
            return d, False
        ours, foreign = self._ours(d)
        if not foreign and not (d / "config.json").exists() and not (d / "checkpoints").exists():
            return d, False  # only the benchmark runner's files: a new run
        if not ours:
            what = f"files this project did not write ({', '.join(sorted(foreign)[:3])})" if foreign else \
                "files that are not a run of this project"
            raise OfflineMarlError(f"{d} holds {what}; choose an empty or new --run-dir (nothing there is touched)")
        has_ckpt = (d / "checkpoints" / "latest.pt").is_file()
        if a.resume:
            if not has_ckpt:  # a run killed before its first checkpoint: nothing to continue
                self._clear(d)
            return d, has_ckpt
        if getattr(a, "overwrite", False):
            self._clear(d)
            return d, False
        state = "a finished run" if (d / "done.json").is_file() else "an unfinished run"
        raise OfflineMarlError(f"{d} holds {state}; pass --resume to continue it or --overwrite to replace it")

    def _make_dir(self, d: Path) -> None:
        try:
            (d / "checkpoints").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OfflineMarlError(f"cannot create the run directory {d}: {e.strerror or e}") from None

    # ------------------------------------------------------------ start/resume
    def start(self, dataset, env, act_fn: Callable | None, *, dims: dict[str, Any], modules: dict[str, Any],
              optimizers: dict[str, Any] | None = None, generators: dict[str, torch.Generator] | None = None,
              on_eval: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> int:
        """Create (or reopen with ``--resume``) the run directory and restore every module,
        optimiser, generator and RNG state from its checkpoint. ``modules`` are ``nn.Module``s (or
        anything with ``state_dict``/``load_state_dict``); ``generators`` default to the dataset's
        sampler. ``on_eval(result) -> scalars`` adds a file's own evaluation numbers. Returns the step."""
        self.dataset, self.env, self.act_fn, self.on_eval = dataset, env, act_fn, on_eval
        self.dims = _jsonable(dims)
        self.meta = _jsonable(dataset.meta)
        self.modules, self.optimizers = dict(modules), dict(optimizers or {})
        self.generators = {"data": dataset.generator, **(generators or {})}
        d, resume = self._choose_dir()
        self.dir, self.ckpt_dir, self.metrics_path = d, d / "checkpoints", d / "metrics.json"
        ck = None
        if resume:
            ck = load_checkpoint(d, self.algo)
            self._check_same(ck)
        self._make_dir(d)
        config = _jsonable(self.args)
        config.update(algo=self.algo, label=self.label)
        if ck is not None:
            self._restore(ck)
        _atomic_write_text(d / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
        if getattr(self.args, "track", False):
            self._start_wandb(config)
        if ck is not None and self.metrics_path.is_file():
            self.metrics = json.loads(self.metrics_path.read_text())
            self._truncate_metrics()
        if ck is not None and (d / "done.json").is_file() and self.step >= self.total:
            self.finished_summary = json.loads((d / "done.json").read_text())
        elif (d / "done.json").is_file():  # resumed to train further: the old result no longer holds
            (d / "done.json").unlink()
        self._bar_start()
        return self.step

    def _start_wandb(self, config: dict[str, Any]) -> None:
        """--track: a Weights & Biases run that mirrors the TensorBoard scalars (``sync_tensorboard``;
        started before the writer exists). A resumed run continues the same W&B run (its id is
        derived from the run directory). ``WANDB_MODE=offline`` keeps it on disk."""
        try:
            import wandb
        except ImportError:
            raise OfflineMarlError("--track needs Weights & Biases: pip install 'offline-marl[track]'") from None
        import hashlib

        run_id = hashlib.sha256(str(self.dir.resolve()).encode()).hexdigest()[:16]
        self._wandb = wandb.init(project=getattr(self.args, "wandb_project", "offline-marl"), name=self.dir.name,
                                 id=run_id, resume="allow", config=config, dir=str(self.dir),
                                 sync_tensorboard=True)

    def autocast(self):
        """The context of one update: ``torch.autocast`` to bfloat16 with ``--precision bf16`` (matmuls
        and other autocast-listed ops in bf16; parameters, gradients and optimiser state stay fp32),
        else nothing."""
        import contextlib

        if getattr(self.args, "precision", "fp32") == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def compile(self, fn: Callable) -> Callable:
        """``--compile``: every network of the run (each module with its own ``forward``, at any depth
        of the modules given to ``start``) is compiled in place with ``torch.compile`` (backend
        ``inductor``, or ``$OFFLINE_MARL_COMPILE_BACKEND``, e.g. ``aot_eager`` to check the graphs
        quickly). The update function ``fn`` itself is returned as it is: an update makes several
        backward passes through outputs of one forward computation (e.g. ComaDICE's mixer feeds three
        losses), which one compiled graph per update cannot do, while per-network graphs can. Call
        after ``start`` (state dicts keep their keys)."""
        if getattr(self.args, "compile", False):
            backend = os.environ.get("OFFLINE_MARL_COMPILE_BACKEND", "inductor")
            containers = (torch.nn.ModuleDict, torch.nn.ModuleList, torch.nn.ParameterList, torch.nn.ParameterDict)
            for top in self.modules.values():
                for m in top.modules() if isinstance(top, torch.nn.Module) else []:
                    if not isinstance(m, containers) and type(m).forward is not torch.nn.Module.forward:
                        m.compile(backend=backend)
        return fn

    def _check_same(self, ck: dict[str, Any]) -> None:
        saved, now = ck.get("args", {}), _jsonable(self.args)
        # A flag added to the file after the checkpoint was written is missing from its saved
        # arguments; at its default it is the behaviour the run had (a new flag's default keeps the
        # old behaviour), so only a non-default value counts as a change.
        defaults = _defaults(self.args)
        saved = {**{k: defaults[k] for k in now if k not in saved and k in defaults}, **saved}
        diff = [k for k in sorted(set(saved) | set(now)) if k not in OPERATIONAL_ARGS and saved.get(k) != now.get(k)]
        problems = [f"{flag(k)} {saved.get(k)!r} -> {now.get(k)!r}" for k in diff[:6]]
        if ck.get("dims") != self.dims:
            problems.append("the network shapes differ")
        if dataset_identity(ck.get("meta", {})) != dataset_identity(self.meta):
            problems.append("the dataset differs")
        if problems:
            raise OfflineMarlError(f"--resume refuses {self.dir}: it was trained with other settings "
                                   f"({'; '.join(problems)}); pass the same arguments, or use a new --run-dir")

    def _restore(self, ck: dict[str, Any]) -> None:
        for k, m in self.modules.items():
            m.load_state_dict(ck["modules"][k])
        for k, o in self.optimizers.items():
            o.load_state_dict(ck["optimizers"][k])
        for k, g in self.generators.items():
            g.set_state(ck["generators"][k].cpu())
        set_rng_state(ck["rng"])
        self.step = int(ck["step"])
        prog = dict(ck.get("progress", {}))
        self._train_time = float(prog.pop("train_time", 0.0))
        self.last_eval = prog.pop("last_eval", None)
        self.progress = prog

    def _truncate_metrics(self) -> None:
        """Drop evaluations recorded after the checkpoint (the run was killed between the two)."""
        entry = self._seed_entry()
        for k in [k for k, v in entry.items() if k.startswith("step_") and v.get("step_count", 0) > self.step]:
            del entry[k]
        if self.step < self.total:
            entry.pop("absolute_metrics", None)

    def _bar_start(self) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=self.total, initial=min(self.step, self.total), desc=self.algo, unit="upd",
                         dynamic_ncols=True, mininterval=1.0, file=sys.stderr,
                         disable=self.finished_summary is not None)
        self._post = {"upd/s": "-", "thr": str(torch.get_num_threads()),
                      "eval": "-" if self.last_eval is None else f"{self.last_eval:.4g}"}
        self._clock, self._log_step, self._log_time = time.perf_counter(), self.step, self._train_time
        if self.tuner is not None:
            self.tuner.pause()

    def pretraining_done(self) -> None:
        """After a pre-training phase that precedes the updates (data or behaviour policies): checkpoint
        it, and restart the clock of the updates, so that ``train_seconds``, updates/s and the thread
        tuner's windows count updates only."""
        self.checkpoint()
        self._clock, self._log_time = time.perf_counter(), self._train_time
        # the bar too: its rate and time left were the pre-training's (hours left at the first update)
        done = self._bar.n
        self._bar.reset(total=self.total)
        self._bar.initial = self._bar.n = self._bar.last_print_n = done
        self._bar.refresh()
        if self.tuner is not None:
            self.tuner.pause()

    # ----------------------------------------------------------------- loop
    @property
    def training(self) -> bool:
        return self.finished_summary is None and self.step < self.total

    def record(self, stats: dict[str, Any]) -> None:
        """After every update: count it, watch its losses for NaN/inf (on the device, no sync), log
        every ``--log-every``, evaluate and checkpoint every ``--eval-every`` and at the last step."""
        self.step += 1
        self._watch(stats)
        self._bar.update(1)
        if self.tuner is not None:
            self.tuner.tick()
        a, s = self.args, self.step
        log_now, eval_now = s % a.log_every == 0 or s == self.total, s % a.eval_every == 0 or s == self.total
        if log_now or eval_now:
            now = time.perf_counter()
            self._train_time, self._clock = self._train_time + (now - self._clock), now
        if log_now:
            self._check_finite()
            ups = (s - self._log_step) / max(self._train_time - self._log_time, 1e-9)
            self._log_step, self._log_time = s, self._train_time
            self.log(s, {k: v for k, v in stats.items()} | {"charts/updates_per_s": ups,
                                                              "charts/threads": torch.get_num_threads()})
            self._post.update({"upd/s": f"{ups:.0f}", "thr": str(torch.get_num_threads())})
            self._bar.set_postfix(self._post, refresh=False)
        if eval_now:
            self._check_finite()
            self._check_parameters()
            if self.env is not None:
                self.log_eval(s, self.evaluate(a.eval_episodes))
                if getattr(a, "capture_video", False):
                    self.record_video(f"step_{s:09d}.mp4")
            self.checkpoint()
            if os.environ.get(KILL_AFTER_ENV) == str(s):
                os._exit(3)  # tests: a run killed right after this checkpoint
            if self.tuner is not None:
                self.tuner.pause()
            self._clock = time.perf_counter()

    def bound(self, bounds: dict[str, float]) -> None:
        """Declare statistics that a run which has not diverged keeps within ``±bound`` (e.g. a value
        estimate, bounded by the data's largest reward over 1 - gamma): leaving it counts as divergence,
        checked with the NaN/inf guard (on the device, no extra host synchronisation)."""
        self._bounds.update({k: float(v) for k, v in bounds.items()})
        self._bad_keys = []  # rebuild the watch vectors at the next update

    def _watch(self, stats: dict[str, Any]) -> None:
        keys = [k for k, v in stats.items() if torch.is_tensor(v)]
        if not keys:
            return
        vals = torch.stack([stats[k].detach().float().reshape(()) for k in keys])
        if self._first_bad is None or keys != self._bad_keys:
            if self._first_bad is not None:
                self._check_finite()
            self._bad_keys = keys
            self._first_bad = torch.full((len(keys),), -1, dtype=torch.int64, device=vals.device)
            self._bound_vec = torch.tensor([self._bounds.get(k, math.inf) for k in keys], device=vals.device)
        fresh = (~torch.isfinite(vals) | (vals.abs() > self._bound_vec)) & (self._first_bad < 0)
        self._first_bad = torch.where(fresh, torch.full_like(self._first_bad, self.step), self._first_bad)

    def _diverged(self, what: str) -> None:
        last = self.ckpt_dir / "latest.pt"
        kept = f"the last good checkpoint is kept at {last}" if last.is_file() else "no checkpoint was written yet"
        self.close()
        raise DivergenceError(f"the run diverged: {what}; {kept}; no result is reported (lower the learning rate "
                              "or check the data's rewards)")

    def _check_finite(self) -> None:
        if self._first_bad is None:
            return
        fb = self._first_bad.tolist()
        bad = [(s, k) for s, k in zip(fb, self._bad_keys) if s >= 0]
        if bad:
            s, k = min(bad)
            if k in self._bounds:
                self._diverged(f"{k} became NaN or infinite, or left ±{self._bounds[k]:.4g} (a bound no "
                               f"estimate of this data's values should reach), at update {s}")
            self._diverged(f"{k} became NaN or infinite at update {s}")

    def _check_parameters(self) -> None:
        params = [p for m in self.modules.values() if hasattr(m, "parameters") for p in m.parameters()]
        if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            self._diverged(f"a network parameter became NaN or infinite by update {self.step}")

    def evaluate(self, episodes: int) -> dict[str, Any]:
        """``episodes`` episodes of ``act_fn`` from ``eval_seed(seed)`` (the same at every evaluation);
        a sampling policy's generator is reseeded from it (``act_fn.reseed``)."""
        from common.envs import evaluate

        for m in self.modules.values():
            if hasattr(m, "eval"):
                m.eval()
        try:
            res = evaluate(self.env, self.act_fn, episodes, seed=eval_seed(self.args.seed),
                           n_envs=min(self.args.eval_envs, episodes))
        finally:
            for m in self.modules.values():
                if hasattr(m, "train"):
                    m.train()
        if self.on_eval is not None:
            res["extra"] = self.on_eval(res)
        return res

    def record_video(self, name: str) -> Path:
        """--capture-video: one episode of the policy (the evaluation's first) as ``videos/<name>``."""
        from common.envs import record_video

        for m in self.modules.values():
            if hasattr(m, "eval"):
                m.eval()
        try:
            return record_video(self.env, self.act_fn, eval_seed(self.args.seed), self.dir / "videos" / name)
        finally:
            for m in self.modules.values():
                if hasattr(m, "train"):
                    m.train()

    def checkpoint(self) -> Path:
        """Write every tensor and RNG state of the run (atomically) as ``checkpoints/latest.pt``."""
        state = {"schema": CHECKPOINT_SCHEMA, "algo": self.algo, "step": self.step, "args": _jsonable(self.args),
                 "dims": self.dims, "meta": self.meta,
                 "modules": {k: m.state_dict() for k, m in self.modules.items()},
                 "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                 "generators": {k: g.get_state() for k, g in self.generators.items()},
                 "rng": rng_state(),
                 "progress": _jsonable({**self.progress, "train_time": self._train_time, "last_eval": self.last_eval})}
        path = self.ckpt_dir / "latest.pt"
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
        return path

    def finish(self, extra: dict[str, Any] | Callable[[dict[str, Any] | None], dict[str, Any]] | None = None
               ) -> dict[str, Any]:
        """The final evaluation (``--final-eval-episodes``, marl-eval's absolute_metrics) and
        ``done.json``; ``extra`` (a dict, or a function of the final result) adds a file's numbers.
        Matrix games also get the exact joint policy and expected team reward
        (``common.envs.matrix_policy_summary``)."""
        from common.envs import matrix_policy_summary

        self._bar.close()
        if self.finished_summary is not None:
            print(f"{self.dir} already finished {self.step} updates", file=sys.stderr)
            self.close()
            return self.finished_summary
        summary: dict[str, Any] = {"algo": self.algo, "steps": self.step, "train_seconds": self._train_time,
                                   "updates_per_s": self.step / max(self._train_time, 1e-9),
                                   "threads": torch.get_num_threads(), "run_dir": str(self.dir)}
        result = None
        if self.env is not None:
            result = self.evaluate(self.args.final_eval_episodes)
            self.log_final(self.step, result)
            if getattr(self.args, "capture_video", False):
                summary["video"] = str(self.record_video("final.mp4"))
            summary.update({k: result[k] for k in ("return_mean", "return_std", "return_per_step", "win_rate",
                                                   "length_mean")},
                           episodes=self.args.final_eval_episodes)
            summary.update(result.get("extra") or {})
            summary.update(matrix_policy_summary(self.env, self.act_fn))
        else:
            summary["evaluation"] = ("off (--eval-episodes 0): evaluate later with --eval-only --checkpoint "
                                     f"{self.ckpt_dir / 'latest.pt'}")
        if self.tuner is not None:
            summary["thread_choices"] = self.tuner.history[-5:]
        if extra is not None:
            summary.update(extra(result) if callable(extra) else extra)
        _atomic_write_text(self.dir / "done.json", json.dumps(_jsonable(summary), indent=2) + "\n")
        self.close()
        ret = f", final return {summary['return_mean']:.4g} +- {summary['return_std']:.3g}" if result else ""
        print(f"{self.algo} {self.label['env']}/{self.label['task']}/{self.quality}: {self.step} updates at "
              f"{summary['updates_per_s']:.1f} updates/s{ret}; run directory {self.dir}", file=sys.stderr)
        return summary

    # ----------------------------------------------------------- TensorBoard
    @property
    def writer(self):
        if self._writer is None and self.dir is not None and self._tb:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.dir), purge_step=self.step if self.step else None)
        return self._writer

    def log(self, step: int, scalars: dict[str, Any]) -> None:
        """Write scalars (floats or 0-d tensors; None is skipped) to TensorBoard."""
        if self.writer is None:
            return
        for k, v in scalars.items():
            if v is not None:
                self.writer.add_scalar(k, float(v), step)

    # -------------------------------------------------------------- metrics
    def _seed_entry(self) -> dict[str, Any]:
        lb = self.label
        return (self.metrics.setdefault(lb["env"], {}).setdefault(f"{lb['task']}__{lb['quality']}", {})
                .setdefault(self.algo, {}).setdefault(f"seed_{self.args.seed}", {}))

    @staticmethod
    def _episode_metrics(result: dict[str, Any]) -> dict[str, Any]:
        out = {"episode_return": [float(r) for r in result["returns"]]}
        if result.get("won") is not None and any(w is not None for w in result["won"]):
            out["win_rate"] = [float(bool(w)) for w in result["won"]]
        return out

    def log_eval(self, step: int, result: dict[str, Any]) -> None:
        """An evaluation at ``step``: TensorBoard ``eval/*`` and a ``step_<k>`` entry in metrics.json."""
        self.log(step, {"eval/return_mean": result["return_mean"], "eval/return_std": result["return_std"],
                        "eval/return_per_step": result.get("return_per_step"),
                        "eval/win_rate": result.get("win_rate"), "eval/length_mean": result["length_mean"],
                        **{f"eval/{k}": v for k, v in (result.get("extra") or {}).items()
                           if isinstance(v, (int, float)) and not isinstance(v, bool)}})
        entry = self._seed_entry()
        k = sum(1 for key in entry if key.startswith("step_"))
        entry[f"step_{k}"] = {"step_count": int(step), **self._episode_metrics(result)}
        self.last_eval = float(result["return_mean"])
        self._post["eval"] = f"{self.last_eval:.4g}"
        self._bar.set_postfix(self._post, refresh=False)
        self._write_metrics()

    def log_final(self, step: int, result: dict[str, Any]) -> None:
        """The final, larger evaluation as marl-eval's ``absolute_metrics`` (the final policy,
        ``--final-eval-episodes`` episodes)."""
        self.log(step, {"eval/final_return_mean": result["return_mean"], "eval/final_win_rate": result.get("win_rate")})
        self._seed_entry()["absolute_metrics"] = self._episode_metrics(result)
        self._write_metrics()

    def _write_metrics(self) -> None:
        _atomic_write_text(self.metrics_path, json.dumps(self.metrics, indent=1) + "\n")

    def close(self) -> None:
        if getattr(self, "_bar", None) is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


# ===================================================================== --eval-only
def eval_only(args: Any, algo: str, load_policy: Callable[..., Any],
              extra: Callable[[Any, Any], dict[str, Any]] | None = None) -> dict[str, Any]:
    """``--eval-only --checkpoint PATH``: evaluate a saved policy on the environment its dataset was
    recorded in, with the run's protocol (its ``--eval-sample``, ``--eval-episode-limit``, ``--eval-envs``
    and seed; a value given here that differs from the file's default overrides it), ``--final-eval-episodes``
    episodes from ``eval_seed(seed)``: the final evaluation's episodes. Prints one JSON line. A run
    directory trained with ``--eval-episodes 0`` gets the result as its absolute_metrics.
    ``extra(env, act_fn) -> dict`` adds a file's own numbers."""
    from common.envs import eval_env_for, evaluate, matrix_policy_summary

    validate_args(args)
    device = resolve_device(args.device)
    if getattr(args, "threads", 0) > 0:
        torch.set_num_threads(args.threads)
    ck = load_checkpoint(args.checkpoint, algo)
    saved, default = ck["args"], type(args)()
    sample = args.eval_sample if args.eval_sample != default.eval_sample else bool(saved.get("eval_sample", False))
    limit = args.eval_episode_limit or int(saved.get("eval_episode_limit", 0) or 0)
    n_envs = args.eval_envs if args.eval_envs != default.eval_envs else int(saved.get("eval_envs", args.eval_envs))
    act_fn = load_policy(args.checkpoint, str(device), sample=sample)
    env = eval_env_for(ck["meta"], limit)
    seed = int(saved.get("seed", 0))
    res = evaluate(env, act_fn, args.final_eval_episodes, seed=eval_seed(seed),
                   n_envs=min(n_envs, args.final_eval_episodes))
    out = {"algo": algo, "checkpoint": str(args.checkpoint), "step": int(ck["step"]),
           "episodes": args.final_eval_episodes, "eval_sample": sample, "episode_limit": env.episode_limit,
           **{k: res[k] for k in ("return_mean", "return_std", "return_per_step", "win_rate", "length_mean")}}
    out.update(matrix_policy_summary(env, act_fn))
    if extra is not None:
        out.update(extra(env, act_fn))
    path = Path(args.checkpoint).expanduser()
    run_dir = path if path.is_dir() else path.parent.parent
    metrics = run_dir / "metrics.json"
    if (run_dir / "config.json").is_file() and (run_dir / "checkpoints" / "latest.pt").is_file() and \
            (not metrics.is_file() or "absolute_metrics" not in metrics.read_text()):
        data = json.loads(metrics.read_text()) if metrics.is_file() else {}
        lb = json.loads((run_dir / "config.json").read_text()).get("label") or saved
        entry = (data.setdefault(lb["env"], {}).setdefault(f"{lb['task']}__{lb['quality']}", {})
                 .setdefault(algo, {}).setdefault(f"seed_{seed}", {}))
        entry["absolute_metrics"] = Run._episode_metrics(res)
        _atomic_write_text(metrics, json.dumps(data, indent=1) + "\n")
        out["metrics"] = str(metrics)
    env.close()
    print(json.dumps(_jsonable(out)))
    return out
