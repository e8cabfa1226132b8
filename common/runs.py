"""What every training script does around its update step: the run directory,
seeding, device choice, TensorBoard scalars, checkpoints and ``metrics.json``.

A run lives in ``runs/<env>__<task>__<quality>__<algo>__<seed>__<time>/``::

    config.json         the arguments of the run
    events.out.tfevents.*   TensorBoard scalars (losses/, charts/, eval/)
    checkpoints/latest.pt   written atomically at every evaluation
    metrics.json        marl-eval layout: env -> task -> algo -> seed_<s> -> step_<k>
                        -> {step_count, episode_return: [...], win_rate: [...]},
                        plus absolute_metrics from the final, larger evaluation;
                        the task key is "<task>__<quality>"

``--resume`` reopens the newest directory of the same (env, task, quality, algo,
seed) that has a checkpoint and continues from it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from common import OfflineMarlError


def set_seed(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OfflineMarlError(f"--device {device} was asked for but torch sees no CUDA device; use --device cpu or auto")
    return dev


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _to_jsonable(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {k: _to_jsonable(v) for k, v in dataclasses.asdict(x).items()}
    if isinstance(x, SimpleNamespace):
        x = vars(x)
    if isinstance(x, dict):
        return {str(k): _to_jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_to_jsonable(v) for v in x]
    if isinstance(x, (np.integer, np.floating, np.bool_)):
        return x.item()
    if isinstance(x, (Path, torch.device)):
        return str(x)
    return x


class Run:
    """One training run's directory, TensorBoard writer, checkpoints and metrics.

    ``algo`` names the algorithm (the file's stem); ``args`` is the script's Args
    dataclass and must have ``env``, ``task``, ``quality``, ``seed`` and
    ``run_dir``/``resume`` fields (``run_dir`` may be empty)."""

    def __init__(self, args: Any, algo: str, root: str | os.PathLike = "runs", resume: bool = False,
                 tensorboard: bool = True):
        self.args = args
        self.algo = algo
        quality = getattr(args, "quality", "") or "custom"
        self.env, self.task_key = args.env, f"{args.task}__{quality}"
        prefix = f"{args.env}__{args.task}__{quality}__{algo}__{args.seed}"
        root = Path(root)
        explicit = getattr(args, "run_dir", "") or ""
        if explicit:
            self.dir = Path(explicit)
        else:
            self.dir = None
            if resume:
                found = sorted((p for p in root.glob(prefix + "__*") if (p / "checkpoints" / "latest.pt").is_file()),
                               key=lambda p: p.stat().st_mtime)
                self.dir = found[-1] if found else None
            if self.dir is None:
                self.dir = root / f"{prefix}__{time.strftime('%Y%m%d-%H%M%S')}"
        self.ckpt_dir = self.dir / "checkpoints"
        self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        self.resumed = resume and (self.ckpt_dir / "latest.pt").is_file()
        config = _to_jsonable(args)
        config["algo"] = algo
        _atomic_write_text(self.dir / "config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
        self.metrics_path = self.dir / "metrics.json"
        self.metrics: dict[str, Any] = {}
        if self.resumed and self.metrics_path.is_file():
            self.metrics = json.loads(self.metrics_path.read_text())
        self._writer = None
        self._tb = tensorboard

    # ----------------------------------------------------------- TensorBoard
    @property
    def writer(self):
        if self._writer is None and self._tb:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.dir))
        return self._writer

    def log(self, step: int, scalars: dict[str, Any]) -> None:
        """Write scalars (floats or 0-d tensors; None is skipped) to TensorBoard."""
        if self.writer is None:
            return
        for k, v in scalars.items():
            if v is None:
                continue
            self.writer.add_scalar(k, float(v), step)

    # -------------------------------------------------------------- metrics
    def _seed_entry(self) -> dict[str, Any]:
        return (self.metrics.setdefault(self.env, {}).setdefault(self.task_key, {})
                .setdefault(self.algo, {}).setdefault(f"seed_{self.args.seed}", {}))

    @staticmethod
    def _episode_metrics(result: dict[str, Any]) -> dict[str, Any]:
        out = {"episode_return": [float(r) for r in result["returns"]]}
        if result.get("won") is not None:
            out["win_rate"] = [float(w) for w in result["won"]]
        return out

    def log_eval(self, step: int, result: dict[str, Any]) -> None:
        """Record an evaluation (the dict ``common.envs.evaluate`` returns) at ``step``:
        TensorBoard ``eval/*`` scalars and a ``step_<k>`` entry in metrics.json."""
        self.log(step, {"eval/return_mean": result["return_mean"], "eval/return_std": result["return_std"],
                        "eval/win_rate": result.get("win_rate"), "eval/length_mean": result["length_mean"]})
        entry = self._seed_entry()
        k = sum(1 for key in entry if key.startswith("step_"))
        entry[f"step_{k}"] = {"step_count": int(step), **self._episode_metrics(result)}
        self._write_metrics()

    def log_final(self, step: int, result: dict[str, Any]) -> None:
        """Record the final, larger evaluation as marl-eval's ``absolute_metrics``."""
        self.log(step, {"eval/final_return_mean": result["return_mean"], "eval/final_win_rate": result.get("win_rate")})
        self._seed_entry()["absolute_metrics"] = {"step_count": int(step), **self._episode_metrics(result)}
        self._write_metrics()

    def _write_metrics(self) -> None:
        _atomic_write_text(self.metrics_path, json.dumps(self.metrics, indent=1) + "\n")

    # ----------------------------------------------------------- checkpoints
    def save(self, state: dict[str, Any], name: str = "latest.pt") -> Path:
        """Save ``state`` (state dicts, step, RNG states...) atomically."""
        path = self.ckpt_dir / name
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
        return path

    def load(self, name: str = "latest.pt", map_location: Any = "cpu") -> dict[str, Any] | None:
        """The checkpoint ``name`` of this run, or None when there is none."""
        path = self.ckpt_dir / name
        return load_checkpoint(path, map_location) if path.is_file() else None

    def finish(self, summary: dict[str, Any]) -> None:
        """Mark the run complete: ``done.json`` holds ``summary`` (final numbers,
        updates/s, wall time). The benchmark runner skips runs that have it."""
        _atomic_write_text(self.dir / "done.json", json.dumps(_to_jsonable(summary), indent=2) + "\n")

    @property
    def finished(self) -> bool:
        return (self.dir / "done.json").is_file()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint file (or the ``checkpoints/latest.pt`` of a run directory)."""
    path = Path(path).expanduser()
    if path.is_dir():
        cand = [path / "checkpoints" / "latest.pt", path / "latest.pt"]
        path = next((c for c in cand if c.is_file()), cand[0])
    if not path.is_file():
        raise OfflineMarlError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # a truncated or foreign file: say so in one line
        raise OfflineMarlError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states, to store in a checkpoint."""
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any]) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
