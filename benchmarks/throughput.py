"""Throughput of every algorithm file: updates/s of its update step alone and of its training loop
(its own sampling included), FLOPs per update, peak memory, and a micro-benchmark of the sampler.
Writes docs/results/throughput.md (--out).

    python benchmarks/throughput.py                  # everything (about 30 minutes on 2 idle cores)
    python benchmarks/throughput.py --quick          # a smoke run of the same tables (a few minutes)
    python benchmarks/throughput.py --files comadice.py baselines/omiga.py --shapes halfcheetah
    python benchmarks/throughput.py --device cuda    # on a GPU (sampler from device-resident tensors)

Shapes (the data is made here; speed does not depend on its values):

- ``halfcheetah``: MaMuJoCo HalfCheetah-6x1 in the omiga observation mode: 6 agents, obs 23, state 138,
  continuous actions of 1 dimension, 100 episodes of 1,000 steps (100k transitions);
- ``smacv2_5v5``: SMACv2 protoss_5_vs_5: 5 agents, obs 92, state 130, 11 discrete actions with random
  availability masks, 1,000 episodes of 40-81 steps (about 60k transitions, as in ComaDICE's data);
- ``bridge``: the Bridge game's local recipe (``common.collect``, hard/mix).

Each (file, shape) runs in a fresh process that calls the file's own ``main()`` several times, with
evaluation off, at each setting: ``--precision fp32|bf16`` x ``--threads 1|2`` x

- ``update``: the dataset's samplers patched to return one pre-drawn batch (the update step alone);
- ``loop``: the file's plain training loop with its own sampling.

A rate is the number of updates between two clock readings taken in ``Run.record`` (after a warm-up of
``--warmup`` seconds, over ``--seconds`` seconds), so start-up, pre-training phases (shortened here:
AlberDICE's data policies, OMCDA's behaviour cloning and CFCQL's behaviour model get 20 steps) and the
final checkpoint are excluded. FLOPs per update are counted on the second update at fp32 with
``torch.utils.flop_counter.FlopCounterMode`` (matrix products, forward and backward; elementwise work is
not counted). Peak RSS is the process's maximum resident memory over all its settings. AlberDICE's
"update" is one training iteration (its inner steps included); MADTKD is measured in its student phase
(a teacher forward and the students' update), the costlier of its two phases.

``--compile`` rows (``--compile-files`` at ``--compile-shapes``, fp32, 2 threads) use torch.compile with
inductor; compiling takes minutes on a CPU, so they are a subset and their warm-up is
``--compile-warmup`` updates.

The sampler micro-benchmark times ``sample(128)`` + ``sample_initial(128)`` at HalfCheetah-6x1 and SMACv2
protoss_20_vs_20 shapes (20 agents, obs 362, state 820, 26 actions, 77k transitions: the ComaDICE
paper's table of the data), from tensors on the device and from memory-mapped files (warm page cache),
next to a plain copy of the same number of bytes (what no gather can beat).

Results are appended to ``--results`` (JSON lines) as they come: an interrupted run started again with
the same arguments skips what is done. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import platform
import resource
import shlex
import shutil
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
SHAPES = ["halfcheetah", "smacv2_5v5", "bridge"]
DISCRETE_ONLY = {"alberdice.py"}
PRE = {"alberdice.py": {"pretrain_steps": 20}, "omcda.py": {"bc_steps": 20},
       "baselines/cfcql.py": {"behaviour_steps": 20}, "baselines/madtkd.py": {"teacher_steps": 0}}
SAMPLERS = ("sample", "sample_initial", "sample_sequences")
BIG = 10**9


# ======================================================================= data
def make_data(shape: str, out: Path) -> Path:
    """A native dataset with the shape's dimensions under ``out`` (made once per benchmark run)."""
    from common import collect
    from common.data import OfflineDataset

    path = out / shape
    if (path / "meta.json").is_file():
        return path
    if shape == "bridge":
        return collect.generate("bridge", "hard", "mix", path)
    rng = np.random.default_rng(0)
    if shape == "halfcheetah":
        E, T, N, o, S, A = 100, 1000, 6, 23, 138, 1
        ds = OfflineDataset.from_padded(
            obs=rng.standard_normal((E, T + 1, N, o), dtype=np.float32),
            state=rng.standard_normal((E, T + 1, S), dtype=np.float32),
            actions=rng.uniform(-1, 1, (E, T, N, A)).astype(np.float32),
            reward=rng.standard_normal((E, T), dtype=np.float32), lengths=np.full(E, T),
            terminated=np.zeros(E, bool),
            meta={"env": "mamujoco", "task": "HalfCheetah-6x1", "quality": "synthetic", "discrete": False,
                  "env_options": {"obs_mode": "omiga", "episode_limit": 1000}})
    elif shape == "smacv2_5v5":
        E, T, N, o, S, K = 1000, 81, 5, 92, 130, 11
        lengths = rng.integers(40, T + 1, E)
        avail = rng.random((E, T + 1, N, K)) < 0.7
        avail[..., 0] = True  # the no-op is always available here
        actions = np.argmax(avail * rng.random((E, T + 1, N, K)), -1)[:, :T]  # an available action
        ds = OfflineDataset.from_padded(
            obs=rng.standard_normal((E, T + 1, N, o), dtype=np.float32),
            state=rng.standard_normal((E, T + 1, S), dtype=np.float32), actions=actions, avail=avail,
            reward=rng.random((E, T), dtype=np.float32), lengths=lengths, terminated=rng.random(E) < 0.9,
            meta={"env": "smacv2", "task": "protoss_5_vs_5", "quality": "synthetic", "discrete": True,
                  "n_actions": K, "env_options": {"episode_limit": 200}})
    else:
        raise ValueError(shape)
    return ds.save(path)


# ================================================================== the child
def load_module(file: str):
    spec = importlib.util.spec_from_file_location(Path(file).stem + "_bench", ROOT / file)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class Clock:
    """Patches ``Run.record``: reads the clock after ``warmup`` seconds (and ``min_warmup`` updates),
    again after ``seconds`` more, then ends the run; optionally counts the FLOPs of update 2."""

    def __init__(self):
        from common.runs import Run

        self.orig = Run.record
        clock = self

        def record(run, stats):
            clock.tick(run)
            clock.orig(run, stats)
            if clock.flops_mode is None and clock.count_flops and run.step == 1:
                from torch.utils.flop_counter import FlopCounterMode

                clock.flops_mode = FlopCounterMode(display=False)
                clock.flops_mode.__enter__()

        Run.record = record
        self.reset(0, 0, 0, False, "cpu")

    def close(self) -> None:
        from common.runs import Run

        Run.record = self.orig

    def reset(self, warmup: float, seconds: float, min_warmup: int, count_flops: bool, device: str) -> None:
        self.warmup, self.seconds, self.min_warmup, self.count_flops = warmup, seconds, min_warmup, count_flops
        self.cuda = device.startswith("cuda")
        self.n, self.t_start, self.t0, self.n0, self.rate, self.flops, self.flops_mode = 0, None, None, 0, None, None, None

    def now(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def tick(self, run) -> None:
        self.n += 1
        if self.count_flops:
            if self.n == 2:
                self.flops_mode.__exit__(None, None, None)
                self.flops = self.flops_mode.get_total_flops()
                run.total = run.step + 1
            return
        if self.t_start is None:
            self.t_start = self.now()
            return
        if self.t0 is None:
            if self.n > self.min_warmup and self.now() - self.t_start >= self.warmup:
                self.t0, self.n0 = self.now(), self.n
            return
        t = self.now()
        if t - self.t0 >= self.seconds:
            self.rate = (self.n - self.n0) / (t - self.t0)
            self.measured = self.n - self.n0
            run.total = run.step + 1  # this update is the last: Run.record ends the run


@contextlib.contextmanager
def predrawn_batches():
    """The dataset's samplers return one pre-drawn batch per (sampler, arguments): the update alone."""
    from common.data import OfflineDataset

    origs = {name: getattr(OfflineDataset, name) for name in SAMPLERS}
    cache: dict = {}

    def patched(name):
        def f(self, *a, **k):
            key = (id(self), name, a, tuple(sorted((kk, v if not hasattr(v, "shape") else tuple(v.shape))
                                                   for kk, v in k.items())))
            if key not in cache:
                cache[key] = origs[name](self, *a, **k)
            return cache[key]
        return f

    for name in SAMPLERS:
        setattr(OfflineDataset, name, patched(name))
    try:
        yield
    finally:
        for name, f in origs.items():
            setattr(OfflineDataset, name, f)


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited across exec)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(spec: dict) -> None:
    """Run ``spec["configs"]`` of one file at one shape; one JSON line per config on stdout."""
    import torch

    mod = load_module(spec["file"])
    clock = Clock()
    base = dict(dataset=spec["data"], device=spec["device"], eval_episodes=0, total_steps=BIG, eval_every=BIG,
                log_every=BIG, seed=0, **PRE.get(spec["file"], {}))
    tmp = Path(tempfile.mkdtemp(prefix="throughput-"))
    try:
        for i, cfg in enumerate(spec["configs"]):
            flops = cfg["mode"] == "flops"
            kw = dict(base, threads=cfg["threads"], precision=cfg["precision"], compile=cfg["compile"],
                      run_dir=str(tmp / f"run{i}"))
            args = dataclasses.replace(mod.Args(), **{k: v for k, v in kw.items() if hasattr(mod.Args(), k)})
            clock.reset(spec["warmup"], spec["seconds"], spec["compile_warmup"] if cfg["compile"] else 1, flops,
                        spec["device"])
            t = time.perf_counter()
            with predrawn_batches() if cfg["mode"] == "update" else contextlib.nullcontext():
                mod.main(args)
            out = dict(cfg, file=spec["file"], shape=spec["shape"], wall_s=time.perf_counter() - t,
                       peak_rss_mb=peak_rss_mb(), batch_size=args.batch_size)
            if flops:
                out["flops"] = clock.flops
            else:
                out.update(updates_per_s=clock.rate, measured_updates=getattr(clock, "measured", None),
                           threads_used=torch.get_num_threads())
            print("RESULT " + json.dumps(out), flush=True)
            shutil.rmtree(tmp / f"run{i}", ignore_errors=True)
    finally:
        clock.close()
        shutil.rmtree(tmp, ignore_errors=True)


# ========================================================== sampler benchmark
def big_discrete(out: Path, E: int, T: int, N: int, o: int, S: int, K: int):
    """A native-layout dataset written straight into memory-mapped files (no copy in memory)."""
    from common.data import OfflineDataset

    R = E * (T + 1)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    arrays = {}
    for k, shape, dt in (("obs", (R, N, o), np.float32), ("state", (R, S), np.float32),
                         ("actions", (R, N), np.int64), ("avail", (R, N, K), bool)):
        a = np.lib.format.open_memmap(out / f"{k}.npy", "w+", dt, shape)
        block = (rng.standard_normal((4096,) + shape[1:]).astype(dt) if dt == np.float32 else
                 rng.integers(0, 2 if dt == bool else K, (4096,) + shape[1:]).astype(dt))
        for lo in range(0, R, 4096):
            a[lo: lo + 4096] = block[: min(4096, R - lo)]
        a.flush()
        arrays[k] = np.load(out / f"{k}.npy", mmap_mode="r")
    es = np.arange(E + 1, dtype=np.int64) * (T + 1)
    last = np.zeros(R, bool)
    last[es[1:] - 1] = True
    term = np.zeros(R, bool)
    term[es[1:] - 2] = True
    arrays.update(reward=np.zeros(R, np.float32), terminal=term, timeout=np.zeros(R, bool), last=last,
                  episode_start=es)
    meta = {"env": "smacv2", "task": "protoss_20_vs_20", "n_agents": N, "obs_dim": o, "state_dim": S,
            "discrete": True, "n_actions": K}
    return OfflineDataset(arrays, meta, validate=False)


def sampler_benchmark(a, tmp: Path) -> list[dict]:
    import torch

    from common.data import OfflineDataset

    torch.set_num_threads(1)
    dev = torch.device(a.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    hc = OfflineDataset.load(make_data("halfcheetah", tmp))
    E20 = 100 if a.quick else 1000  # protoss_20_vs_20: 76.7k transitions in 1,000 episodes
    big = big_discrete(tmp / "smacv2_20v20", E20, 77, 20, 362, 820, 26)
    rows = []
    n = 200 if a.quick else 2000
    for name, ds in (("HalfCheetah-6x1", hc), ("SMACv2 protoss_20_vs_20", big)):
        for where in ("device", "mapped"):
            ds.to(dev, max_bytes=None if where == "device" else 0).seed(0)
            if where == "device" and not ds.on_device:
                continue
            reps = n if name.startswith("Half") else max(n // 10, 20)
            for _ in range(max(reps // 10, 5)):
                ds.sample(128), ds.sample_initial(128)
            sync()
            t, c = time.perf_counter(), time.process_time()
            for _ in range(reps):
                b, i = ds.sample(128), ds.sample_initial(128)
            sync()
            wall, cpu = (time.perf_counter() - t) / reps, (time.process_time() - c) / reps
            nbytes = sum(v.numel() * v.element_size() for d in (b, i) for v in d.values())
            src = torch.empty(nbytes // 4, device=dev)
            dst = torch.empty_like(src)
            for _ in range(5):
                dst.copy_(src)
            sync()
            t = time.perf_counter()
            for _ in range(reps):
                dst.copy_(src)
            sync()
            copy = (time.perf_counter() - t) / reps
            rows.append(dict(kind="sampler", shape=name, where=where if dev.type == "cpu" or where == "mapped"
                             else f"{dev.type} tensors", rows=ds.n_rows, ms=wall * 1e3, cpu_ms=cpu * 1e3,
                             batch_mb=nbytes / 1e6, copy_ms=copy * 1e3, device=str(dev)))
            print(f"sampler {name:26s} {where:6s} {wall * 1e3:7.3f} ms/batch (cpu {cpu * 1e3:.3f}), "
                  f"{nbytes / 1e6:.2f} MB, copy {copy * 1e3:.3f} ms", flush=True)
    return rows


# ================================================================= the parent
def machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        model = info.get("Model name", "").strip()
        cores = info.get("CPU(s)", "").strip()
    except OSError:
        model, cores = platform.processor(), str(os.cpu_count())
    return f"{model or platform.machine()}, {cores} cores"


def load_now() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def configs_for(a, file: str, shape: str) -> list[dict]:
    out = [dict(mode="flops", precision="fp32", threads=1, compile=False)]
    for prec in a.precisions:
        for th in a.threads:
            for mode in ("update", "loop"):
                out.append(dict(mode=mode, precision=prec, threads=th, compile=False))
    if a.compile and file in a.compile_files and shape in a.compile_shapes:
        out += [dict(mode=m, precision="fp32", threads=th, compile=True) for th in a.threads for m in ("update", "loop")]
    return out


def key(r: dict) -> tuple:
    return (r.get("kind", "file"), r.get("file"), r.get("shape"), r.get("mode"), r.get("precision"),
            r.get("threads"), r.get("compile"), r.get("where"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", nargs="+", default=FILES)
    p.add_argument("--shapes", nargs="+", default=SHAPES, choices=SHAPES)
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    p.add_argument("--seconds", type=float, default=2.5, help="measured seconds per setting")
    p.add_argument("--warmup", type=float, default=0.5, help="seconds of updates before the clock starts")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                   help="measure the --compile subset")
    p.add_argument("--compile-files", nargs="+", default=["comadice.py", "baselines/omiga.py"])
    p.add_argument("--compile-shapes", nargs="+", default=["halfcheetah"])
    p.add_argument("--compile-warmup", type=int, default=30, help="updates before a compiled run is timed")
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-sampler", action="store_true", help="skip the sampler micro-benchmark")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 0.5 s per setting, 1 thread, fp32 and bf16, no compile, small 20_vs_20 data")
    p.add_argument("--results", default=str(ROOT / "runs" / "throughput" / "results.jsonl"),
                   help="JSON lines of every measurement (an interrupted run resumes from it)")
    p.add_argument("--fresh", action="store_true", help="ignore the results of an earlier run")
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "throughput.md"))
    p.add_argument("--note", default="", help="a paragraph for the top of the table (e.g. the conditions)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child(json.loads(a.child))
    if a.quick:
        a.seconds, a.warmup, a.threads, a.compile = min(a.seconds, 0.5), min(a.warmup, 0.2), [1], False
    res_path = Path(a.results)
    res_path.parent.mkdir(parents=True, exist_ok=True)
    if a.fresh and res_path.exists():
        res_path.unlink()
    done = [json.loads(line) for line in res_path.read_text().splitlines()] if res_path.exists() else []
    have = {key(r) for r in done}
    started = dict(time=time.strftime("%Y-%m-%d %H:%M"), load=load_now())
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    with tempfile.TemporaryDirectory(prefix="throughput-data-") as tmp:
        tmp = Path(tmp)
        if not a.no_sampler and not any(r.get("kind") == "sampler" for r in done):
            for r in sampler_benchmark(a, tmp):
                r["load"], r["time"] = load_now(), time.strftime("%Y-%m-%d %H:%M")
                done.append(r)
                with res_path.open("a") as f:
                    f.write(json.dumps(r) + "\n")
            shutil.rmtree(tmp / "smacv2_20v20", ignore_errors=True)
        for shape in a.shapes:
            data = None
            for file in a.files:
                if shape == "halfcheetah" and file in DISCRETE_ONLY:
                    continue
                todo = [c for c in configs_for(a, file, shape)
                        if key(dict(c, file=file, shape=shape)) not in have]
                if not todo:
                    continue
                data = data or make_data(shape, tmp)
                spec = dict(file=file, shape=shape, data=str(data), device=a.device, configs=todo,
                            seconds=a.seconds, warmup=a.warmup, compile_warmup=a.compile_warmup)
                proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env, cwd=ROOT,
                                      capture_output=True, text=True)
                got = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
                for r in got:
                    r["load"], r["time"] = load_now(), time.strftime("%Y-%m-%d %H:%M")
                    done.append(r)
                    have.add(key(r))
                    with res_path.open("a") as f:
                        f.write(json.dumps(r) + "\n")
                    what = (f"{r['flops'] / 1e9:.3f} GFLOP/update" if r["mode"] == "flops" else
                            f"{r['updates_per_s']:.1f} updates/s")
                    print(f"{shape:11s} {file:22s} {r['mode']:6s} {r['precision']} {r['threads']}t"
                          f"{' compile' if r['compile'] else ''}: {what}, peak RSS {r['peak_rss_mb']:.0f} MB",
                          flush=True)
                if proc.returncode != 0:
                    print(f"{file} at {shape} failed:\n{proc.stderr[-3000:]}", file=sys.stderr, flush=True)
    write_table(done, a, started)


# ===================================================================== table
def first_wall(rs: list[dict], threads: int) -> str:
    """Seconds from start to the end of the measurement of the first compiled setting (with compilation)."""
    return f"{rs[0]['wall_s']:.0f}" if rs and rs[0]["threads"] == threads else "-"


def write_table(rows: list[dict], a, started: dict) -> None:
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=ROOT).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=ROOT).stdout.strip()
    argv, shown = sys.argv[1:], []
    for i, x in enumerate(argv):  # the note is printed below the command, not inside it
        shown.append("NOTE" if i and argv[i - 1] == "--note" else (shlex.quote(x) if x != "--note" else x))
    cmd = "python benchmarks/throughput.py " + " ".join(shown)
    wait = os.environ.get("OMP_WAIT_POLICY", "")
    times = sorted(r["time"] for r in rows if "time" in r)
    when = f"{times[0]} to {times[-1]}" if times and len(times) == len(rows) else f"table written {started['time']}"
    loads = sorted(float(r["load"].split()[0]) for r in rows if "load" in r)
    load = (f"The 1-minute load average, read after each (file, shape): {loads[0]:.1f} to {loads[-1]:.1f} "
            f"(median {loads[len(loads) // 2]:.1f})." if loads else f"Load average at the start: {started['load']}.")
    lines = ["# Throughput", "",
             f"Measured with `{'OMP_WAIT_POLICY=' + wait + ' ' if wait else ''}{cmd.strip()}` at commit "
             f"{commit}{' (with uncommitted changes)' if dirty else ''}, {when}, on {machine()}, "
             f"torch {torch.__version__}, device {a.device}. {load} How each number is measured: "
             "[benchmarks/throughput.py](../../benchmarks/throughput.py) (its docstring).", ""]
    if a.note:
        lines += [a.note, ""]
    files = [r for r in rows if r.get("kind", "file") == "file"]
    by = {key(r): r for r in files}

    def rate(file, shape, mode, prec, th, comp=False):
        r = by.get(("file", file, shape, mode, prec, th, comp, None))
        return None if r is None or r.get("updates_per_s") is None else r["updates_per_s"]

    def fmt(x, nd=1):
        return "-" if x is None else f"{x:.{nd}f}"

    th_list = sorted({r["threads"] for r in files if r["mode"] != "flops"})
    precs = [p for p in ("fp32", "bf16") if any(r["precision"] == p and r["mode"] != "flops" for r in files)]
    names = {"halfcheetah": "HalfCheetah-6x1 (continuous: 6 agents, obs 23, state 138, 100k transitions)",
             "smacv2_5v5": "SMACv2 protoss_5_vs_5 (discrete: 5 agents, obs 92, state 130, 11 actions, masks)",
             "bridge": "Bridge hard/mix (discrete: 2 agents, the local recipe)"}
    th_ref = max(th_list) if th_list else 1
    for shape in SHAPES:
        present = [f for f in FILES if any(r["file"] == f and r["shape"] == shape for r in files)]
        if not present:
            continue
        lines += [f"## {names[shape]}", "",
                  f"Updates per second: \"update\" is the update step alone (one pre-drawn batch), \"loop\" the "
                  f"training loop with its own sampling. The last columns are at fp32, {th_ref} thread(s): "
                  "\"loop/update\"; \"x ComaDICE\", this file's update rate over ComaDICE's; \"FLOPs x ComaDICE\", "
                  "its matrix-product FLOPs per update (forward and backward, the GFLOP/update column) over "
                  "ComaDICE's; \"per FLOP\", the product of the two: the file's FLOP rate over ComaDICE's (below "
                  "0.5, the file is slow for reasons other than the work it does); GFLOP/s, its FLOP rate. batch: "
                  "the file's default batch size (transitions; sequences for ICQ and MADTKD).", ""]
        cols = [(p, t, m) for p in precs for t in th_list for m in ("update", "loop")]
        lines.append("| file | batch | GFLOP/update | " + " | ".join(f"{m} {p} {t}t" for p, t, m in cols)
                     + " | loop/update | x ComaDICE | FLOPs x ComaDICE | per FLOP | GFLOP/s | peak RSS MB |")
        lines.append("|" + "---|" * (len(cols) + 9))

        def gflop(f):
            fl = by.get(("file", f, shape, "flops", "fp32", 1, False, None))
            return None if fl is None or fl.get("flops") is None else fl["flops"] / 1e9

        ref, ref_gf = rate("comadice.py", shape, "update", "fp32", th_ref), gflop("comadice.py")
        slow = []
        for f in present:
            gf = gflop(f)
            vals = [rate(f, shape, m, p, t) for p, t, m in cols]
            up, lp = rate(f, shape, "update", "fp32", th_ref), rate(f, shape, "loop", "fp32", th_ref)
            rss = max((r["peak_rss_mb"] for r in files if r["file"] == f and r["shape"] == shape and not r["compile"]),
                      default=None)
            batch = next((r.get("batch_size") for r in files if r["file"] == f and r["shape"] == shape), None)
            speed = up / ref if up and ref else None
            work = gf / ref_gf if gf and ref_gf else None
            per = speed * work if speed and work else None
            if speed is not None and speed < 0.5:
                slow.append(f"{f} ({speed:.2f}x ComaDICE's rate, {fmt(work, 1)}x its FLOPs: {fmt(per, 2)} per FLOP)")
            lines.append(f"| {f} | {batch or '-'} | {fmt(gf, 3)} | " + " | ".join(fmt(v) for v in vals) +
                         f" | {fmt(lp / up if up and lp else None, 2)} | {fmt(speed, 2)} | {fmt(work, 2)} | {fmt(per, 2)}"
                         f" | {fmt(gf * up if gf and up else None, 0)} | {fmt(rss, 0)} |")
        lines.append("")
        if slow:
            lines += ["Below half of ComaDICE's update rate: " + "; ".join(slow) + ".", ""]
    comp = [r for r in files if r["compile"]]
    if comp:
        lines += ["## torch.compile (inductor)", "",
                  "Steady-state updates/s after the compilation (warm-up: "
                  f"{a.compile_warmup} updates), fp32, next to the same file eagerly. Compiling is done per network "
                  "(`Run.compile`, docs/architecture.md). The last column is the first compiled setting's time "
                  "from its start to the end of its measurement, compilation included (later settings reuse "
                  "inductor's on-disk cache).", "",
                  "| file | shape | threads | update eager | update compiled | loop eager | loop compiled | "
                  "compile + warm-up s |", "|---|---|---|---|---|---|---|---|"]
        for f in FILES:
            for shape in SHAPES:
                rs = [r for r in comp if r["file"] == f and r["shape"] == shape]
                for t in sorted({r["threads"] for r in rs}):
                    lines.append(f"| {f} | {shape} | {t} | {fmt(rate(f, shape, 'update', 'fp32', t))} | "
                                 f"{fmt(rate(f, shape, 'update', 'fp32', t, True))} | "
                                 f"{fmt(rate(f, shape, 'loop', 'fp32', t))} | "
                                 f"{fmt(rate(f, shape, 'loop', 'fp32', t, True))} | "
                                 f"{first_wall(rs, t)} |")
        lines.append("")
    samp = [r for r in rows if r.get("kind") == "sampler"]
    if samp:
        lines += ["## Sampler", "",
                  "Milliseconds per `sample(128)` + `sample_initial(128)` (wall clock; CPU time of the process in "
                  "brackets), the megabytes such a batch holds, and a plain copy of that many bytes on the same "
                  "device (a lower bound for any gather). \"mapped\": gathered from memory-mapped files (in the "
                  "page cache), then moved to the device.", "",
                  "| shape | from | rows | ms per batch | batch MB | copy of the bytes, ms |", "|---|---|---|---|---|---|"]
        for r in samp:
            lines.append(f"| {r['shape']} | {r['where']} | {r['rows']} | {r['ms']:.3f} ({r['cpu_ms']:.3f}) | "
                         f"{r['batch_mb']:.2f} | {r['copy_ms']:.3f} |")
        lines.append("")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text("\n".join(lines))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
