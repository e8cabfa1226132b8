"""The one dataset representation of offline-marl: ``OfflineDataset``.

Rows are the time steps of all episodes, concatenated. Every episode ends with
one extra row that holds its final observation/state (``last=True``), so the
next row of a transition row ``t`` is always ``t + 1`` and every sampler here is
index arithmetic on whole arrays.

=============  ===================  =======  ==================================
field          shape                dtype    meaning
=============  ===================  =======  ==================================
obs            [R, N, obs_dim]      float32  each agent's observation
state          [R, state_dim]       float32  global state
actions        [R, N]               int64    discrete action (0 on last rows)
               [R, N, act_dim]      float32  continuous action
avail          [R, N, n_actions]    bool     available actions (continuous: [R, N, 1], all true)
reward         [R]                  float32  team reward of the step (0 on last rows)
terminal       [R]                  bool     the step ended the episode for real: no bootstrap
timeout        [R]                  bool     the step hit a time limit: bootstrap from the next row
last           [R]                  bool     the row is an episode's final observation (no action)
episode_start  [E + 1]              int64    row offsets; episode e is rows [start[e], start[e+1])
=============  ===================  =======  ==================================

On disk (the *native format*) a dataset is a directory with one ``.npy`` per
field and a ``meta.json``. ``OfflineDataset.load`` memory-maps the arrays, so a
dataset larger than RAM still trains: ``to(device)`` copies everything onto the
device when it fits and otherwise samples rows straight from the mapped files.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from common import DivergenceError, OfflineMarlError

FORMAT_VERSION = 1
ARRAY_FIELDS = ("obs", "state", "actions", "avail", "reward", "terminal", "timeout", "last", "episode_start")
REQUIRED_META = ("env", "task", "n_agents", "obs_dim", "state_dim", "discrete")


class DatasetError(OfflineMarlError):
    """A dataset is missing, corrupt, or does not fit what it is used with."""


class DatasetExists(DatasetError):
    """A dataset is already where another was to be written."""


DATASET_FILES = frozenset([f"{k}.npy" for k in ARRAY_FIELDS] + ["meta.json"])


def is_native_dataset(path: Path) -> bool:
    """Whether folder ``path`` holds exactly a native dataset written by this project."""
    try:
        names = {p.name for p in path.iterdir()}
        meta = json.loads((path / "meta.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return isinstance(meta, dict) and "format_version" in meta and names <= DATASET_FILES


def check_destination(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse to write a dataset at ``path`` unless it is new, an empty folder, or (with
    ``overwrite``) a dataset this project wrote; returns the path."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise DatasetError(f"{path} is a file; choose a folder for the dataset")
    if path.is_dir() and any(path.iterdir()):
        if not is_native_dataset(path):
            raise DatasetError(f"{path} holds files that are not an offline-marl dataset; choose an empty or "
                               "new folder (nothing there is touched)")
        if not overwrite:
            raise DatasetExists(f"{path} already holds a dataset; pass --overwrite to replace it")
    return path


def _remove_dataset_dir(path: Path) -> None:
    """Delete a dataset folder this project wrote: only its known files, then the folder (which is
    left in place if anything else is in it)."""
    if not path.is_dir():
        return
    for name in DATASET_FILES:
        (path / name).unlink(missing_ok=True)
    try:
        path.rmdir()
    except OSError:
        pass


def data_dir() -> Path:
    """Root of the dataset cache: ``$OFFLINE_MARL_DATA`` or ``~/.cache/offline-marl``."""
    root = Path(os.environ.get("OFFLINE_MARL_DATA", Path.home() / ".cache" / "offline-marl")).expanduser()
    if root.exists() and not root.is_dir():
        raise DatasetError(f"the dataset cache {root} ($OFFLINE_MARL_DATA) is a file; point OFFLINE_MARL_DATA "
                           "at a folder")
    return root


def _available_ram() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


class OfflineDataset:
    """Episodes of a cooperative multi-agent task in the native row layout.

    Build one with ``from_padded`` (episodes as ``[E, T, ...]`` arrays, what most
    public formats store), ``from_episodes`` (a list of per-episode dicts), or
    ``load`` (the native on-disk format). Draw batches with ``sample``,
    ``sample_initial`` and ``sample_sequences``; all three return dicts of torch
    tensors on the dataset's device.
    """

    def __init__(self, arrays: dict[str, np.ndarray], meta: dict[str, Any], *, validate: bool = True):
        missing = [k for k in ARRAY_FIELDS if k not in arrays]
        if missing:
            raise DatasetError(f"dataset is missing the arrays {missing}")
        self.arrays = {k: arrays[k] for k in ARRAY_FIELDS}
        self.meta = dict(meta)
        self.meta.setdefault("format_version", FORMAT_VERSION)
        self.device = torch.device("cpu")
        self._tensors: dict[str, torch.Tensor] | None = None  # set by to(): every field on the device
        self.generator = torch.Generator()
        if validate:
            self.validate()
        self._index()

    # ------------------------------------------------------------------ views
    def __getattr__(self, name: str) -> np.ndarray:
        arrays = self.__dict__.get("arrays")
        if arrays is not None and name in arrays:
            return arrays[name]
        raise AttributeError(name)

    @property
    def n_agents(self) -> int:
        return int(self.arrays["obs"].shape[1])

    @property
    def obs_dim(self) -> int:
        return int(self.arrays["obs"].shape[2])

    @property
    def state_dim(self) -> int:
        return int(self.arrays["state"].shape[1])

    @property
    def discrete(self) -> bool:
        return self.arrays["actions"].ndim == 2

    @property
    def n_actions(self) -> int:
        """Number of discrete actions per agent (1 for continuous datasets)."""
        return int(self.arrays["avail"].shape[2])

    @property
    def act_dim(self) -> int:
        """Continuous action dimension per agent (1 for discrete datasets)."""
        return 1 if self.discrete else int(self.arrays["actions"].shape[2])

    @property
    def n_rows(self) -> int:
        return int(self.arrays["reward"].shape[0])

    @property
    def n_episodes(self) -> int:
        return int(self.arrays["episode_start"].shape[0] - 1)

    @property
    def n_transitions(self) -> int:
        return self.n_rows - self.n_episodes

    @property
    def episode_lengths(self) -> np.ndarray:
        """Transitions per episode, ``[E]``."""
        return np.diff(self.arrays["episode_start"]) - 1

    @property
    def nbytes(self) -> int:
        return int(sum(a.nbytes for a in self.arrays.values()))

    def __len__(self) -> int:
        return self.n_transitions

    def __repr__(self) -> str:
        kind = f"discrete n_actions={self.n_actions}" if self.discrete else f"continuous act_dim={self.act_dim}"
        name = "/".join(str(self.meta.get(k, "?")) for k in ("env", "task", "quality"))
        return (f"OfflineDataset({name}: {self.n_episodes} episodes, {self.n_transitions} transitions, "
                f"n_agents={self.n_agents}, obs_dim={self.obs_dim}, state_dim={self.state_dim}, {kind})")

    # ----------------------------------------------------------- construction
    @classmethod
    def from_padded(
        cls,
        *,
        obs: np.ndarray,
        state: np.ndarray,
        actions: np.ndarray,
        reward: np.ndarray,
        lengths: np.ndarray,
        terminated: np.ndarray,
        avail: np.ndarray | None = None,
        meta: dict[str, Any],
    ) -> "OfflineDataset":
        """Build from padded episodes.

        ``obs [E, T+1, N, o]``, ``state [E, T+1, S]`` and ``avail [E, T+1, N, K]`` hold
        the observation before each step and, at index ``lengths[e]``, the final one;
        ``actions [E, >=T, N(, A)]`` and ``reward [E, >=T]`` hold the steps. Episode
        ``e`` has ``lengths[e] >= 1`` transitions and ended for real when
        ``terminated[e]`` (else by a time limit). Values past an episode's end are
        ignored. Vectorised: no loop over episodes.
        """
        lengths = np.asarray(lengths, dtype=np.int64)
        terminated = np.asarray(terminated, dtype=bool)
        E, T1 = obs.shape[:2]
        if lengths.shape != (E,) or terminated.shape != (E,):
            raise DatasetError(f"lengths and terminated must have shape [{E}], got {lengths.shape} and {terminated.shape}")
        if E == 0:
            raise DatasetError("dataset has no episodes")
        if lengths.min() < 1 or lengths.max() > T1 - 1:
            raise DatasetError(f"episode lengths must be in [1, {T1 - 1}] for {T1} observation slots, "
                               f"got [{lengths.min()}, {lengths.max()}]")
        mask = np.arange(T1)[None, :] <= lengths[:, None]  # [E, T+1]: steps + final row
        R = int(mask.sum())
        start = np.zeros(E + 1, dtype=np.int64)
        np.cumsum(lengths + 1, out=start[1:])
        last_rows = start[1:] - 1

        def steps(x: np.ndarray, dtype) -> np.ndarray:
            x = np.asarray(x)
            pad = T1 - x.shape[1]
            if pad > 0:
                x = np.concatenate([x, np.zeros((E, pad) + x.shape[2:], dtype=x.dtype)], axis=1)
            out = x[:, :T1][mask].astype(dtype, copy=False)
            out[last_rows] = 0
            return out

        actions = np.asarray(actions)
        discrete = bool(meta.get("discrete", np.issubdtype(actions.dtype, np.integer)))
        if discrete and actions.ndim == 4 and actions.shape[-1] == 1:
            actions = actions[..., 0]  # [E, T, N, 1] -> [E, T, N]
        if actions.ndim != (3 if discrete else 4):
            raise DatasetError(f"padded actions must be [E, T, N] (discrete) or [E, T, N, A] (continuous), got {actions.shape}")
        N = obs.shape[2]
        if avail is None:
            K = int(meta["n_actions"]) if discrete else 1
            avail_flat = np.ones((R, N, K), dtype=bool)
        else:
            avail_flat = np.asarray(avail)[:, :T1][mask].astype(bool, copy=False)
        terminal = np.zeros(R, dtype=bool)
        timeout = np.zeros(R, dtype=bool)
        terminal[last_rows - 1] = terminated
        timeout[last_rows - 1] = ~terminated
        last = np.zeros(R, dtype=bool)
        last[last_rows] = True
        arrays = dict(
            obs=np.asarray(obs)[:, :T1][mask].astype(np.float32, copy=False),
            state=np.asarray(state)[:, :T1][mask].astype(np.float32, copy=False),
            actions=steps(actions, np.int64 if discrete else np.float32),
            avail=avail_flat,
            reward=steps(np.asarray(reward).reshape(E, -1), np.float32),
            terminal=terminal,
            timeout=timeout,
            last=last,
            episode_start=start,
        )
        return cls(arrays, _complete_meta(meta, arrays))

    @classmethod
    def from_episodes(cls, episodes: Sequence[dict[str, np.ndarray]], meta: dict[str, Any]) -> "OfflineDataset":
        """Build from a list of episodes, each a dict with ``obs [T+1, N, o]``,
        ``state [T+1, S]``, ``actions [T, N(, A)]``, ``reward [T]``, optional
        ``avail [T+1, N, K]``, and ``terminated`` (bool: true end vs time limit)."""
        if not episodes:
            raise DatasetError("dataset has no episodes")
        lengths = np.array([len(ep["reward"]) for ep in episodes], dtype=np.int64)
        T = int(lengths.max())

        def pad(key: str, extra: int) -> np.ndarray:
            first = np.asarray(episodes[0][key])
            out = np.zeros((len(episodes), T + extra) + first.shape[1:], dtype=first.dtype)
            for e, ep in enumerate(episodes):
                x = np.asarray(ep[key])
                out[e, : len(x)] = x
            return out

        has_avail = all("avail" in ep for ep in episodes)
        return cls.from_padded(
            obs=pad("obs", 1), state=pad("state", 1), actions=pad("actions", 0), reward=pad("reward", 0),
            avail=pad("avail", 1) if has_avail else None, lengths=lengths,
            terminated=np.array([bool(ep["terminated"]) for ep in episodes]), meta=meta,
        )

    @classmethod
    def concatenate(cls, datasets: Sequence["OfflineDataset"], meta: dict[str, Any] | None = None) -> "OfflineDataset":
        """Join datasets of the same task, episode by episode, in order."""
        if not datasets:
            raise DatasetError("nothing to concatenate")
        ref = datasets[0]
        for d in datasets[1:]:
            for k in ("obs", "state", "actions", "avail"):
                if d.arrays[k].shape[1:] != ref.arrays[k].shape[1:]:
                    raise DatasetError(f"cannot concatenate datasets whose {k} shapes differ: "
                                       f"{ref.arrays[k].shape[1:]} vs {d.arrays[k].shape[1:]}")
        arrays = {k: np.concatenate([np.asarray(d.arrays[k]) for d in datasets]) for k in ARRAY_FIELDS if k != "episode_start"}
        offsets = np.cumsum([0] + [d.n_rows for d in datasets])
        arrays["episode_start"] = np.concatenate(
            [d.arrays["episode_start"][:-1] + o for d, o in zip(datasets, offsets)] + [offsets[-1:]]
        ).astype(np.int64)
        return cls(arrays, _complete_meta(meta if meta is not None else ref.meta, arrays))

    def select_episodes(self, episodes: Sequence[int] | np.ndarray, meta: dict[str, Any] | None = None) -> "OfflineDataset":
        """A new in-memory dataset with the given episodes, in the given order."""
        episodes = np.asarray(episodes, dtype=np.int64)
        if episodes.size == 0:
            raise DatasetError("select_episodes needs at least one episode")
        if episodes.min() < 0 or episodes.max() >= self.n_episodes:
            raise DatasetError(f"episode index out of range [0, {self.n_episodes})")
        es = self.arrays["episode_start"]
        sizes = es[episodes + 1] - es[episodes]
        new_start = np.zeros(len(episodes) + 1, dtype=np.int64)
        np.cumsum(sizes, out=new_start[1:])
        rows = np.repeat(es[episodes] - new_start[:-1], sizes) + np.arange(new_start[-1])
        arrays = {k: np.asarray(self.arrays[k][rows]) for k in ARRAY_FIELDS if k != "episode_start"}
        arrays["episode_start"] = new_start
        return OfflineDataset(arrays, _complete_meta(meta if meta is not None else self.meta, arrays))

    def with_reward(self, reward: np.ndarray, note: str) -> "OfflineDataset":
        """The same episodes with another per-row reward (e.g. return-to-go); ``note``
        is recorded in ``meta['reward']``. The arrays are shared, not copied."""
        reward = np.asarray(reward, dtype=np.float32)
        if reward.shape != (self.n_rows,):
            raise DatasetError(f"reward must have shape [{self.n_rows}], got {reward.shape}")
        arrays = dict(self.arrays, reward=reward)
        return OfflineDataset(arrays, dict(self.meta, reward=note), validate=False)

    # ------------------------------------------------------------ disk format
    def save(self, path: str | os.PathLike, overwrite: bool = False) -> Path:
        """Write the native format (one ``.npy`` per field + ``meta.json``) atomically: into a new
        folder beside ``path``, then renamed into place. An existing dataset at ``path`` is replaced
        only with ``overwrite``; a folder holding anything else is never touched."""
        path = check_destination(path, overwrite)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
            _remove_dataset_dir(tmp)
            tmp.mkdir()
        except OSError as e:
            raise DatasetError(f"cannot write a dataset at {path}: {e.strerror or e}") from None
        try:
            for k in ARRAY_FIELDS:
                np.save(tmp / f"{k}.npy", np.asarray(self.arrays[k]))
            meta = _complete_meta(self.meta, self.arrays)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=_json_default) + "\n")
            old = None
            if path.is_dir() and any(path.iterdir()):  # our own dataset, and overwrite was asked for
                old = path.with_name(f".{path.name}.old{os.getpid()}")
                os.replace(path, old)
            try:
                os.replace(tmp, path)
            except OSError:
                if old is not None:
                    os.replace(old, path)
                raise DatasetExists(f"{path} was written by another process meanwhile; nothing was replaced") from None
            if old is not None:
                _remove_dataset_dir(old)
        finally:
            _remove_dataset_dir(tmp)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, mmap: bool = True, validate: bool = True) -> "OfflineDataset":
        """Open a native-format directory (memory-mapped unless ``mmap=False``)."""
        path = Path(path).expanduser()
        if not path.exists():
            raise DatasetError(f"no dataset at {path}")
        if not path.is_dir() or not (path / "meta.json").is_file():
            raise DatasetError(f"{path} is not a native offline-marl dataset (a directory with meta.json and .npy files); "
                               "convert other formats with common.formats.convert")
        try:
            meta = json.loads((path / "meta.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(f"{path / 'meta.json'} is not valid JSON ({e})") from None
        if not isinstance(meta, dict):
            raise DatasetError(f"{path / 'meta.json'} must hold a JSON object, got {type(meta).__name__}")
        version = meta.get("format_version", FORMAT_VERSION)
        if isinstance(version, bool) or not isinstance(version, int):
            raise DatasetError(f"{path / 'meta.json'}: format_version must be an integer, got {version!r}")
        if version > FORMAT_VERSION:
            raise DatasetError(f"{path} has format version {meta['format_version']}; this code reads up to {FORMAT_VERSION}")
        arrays = {}
        for k in ARRAY_FIELDS:
            f = path / f"{k}.npy"
            if not f.is_file():
                raise DatasetError(f"{path} is incomplete: {f.name} is missing")
            try:
                arrays[k] = np.load(f, mmap_mode="r" if mmap else None, allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:
                raise DatasetError(f"{f} is corrupt or truncated ({e})") from None
        return cls(arrays, meta, validate=validate)

    # ------------------------------------------------------------- validation
    def validate(self, check_values: bool = True) -> None:
        """Check shapes, dtypes, episode structure and (optionally) values; raise
        ``DatasetError`` naming the first problem found."""
        a = self.arrays
        R = a["reward"].shape[0] if a["reward"].ndim == 1 else -1
        if R < 0:
            raise DatasetError(f"reward must be 1-D [R], got shape {a['reward'].shape}")
        expect_ndim = dict(obs=3, state=2, avail=3, reward=1, terminal=1, timeout=1, last=1, episode_start=1)
        for k, nd in expect_ndim.items():
            if a[k].ndim != nd:
                raise DatasetError(f"{k} must have {nd} dimensions, got shape {a[k].shape}")
        if a["actions"].ndim not in (2, 3):
            raise DatasetError(f"actions must be [R, N] (discrete) or [R, N, act_dim] (continuous), got {a['actions'].shape}")
        for k in ("obs", "state", "actions", "avail", "terminal", "timeout", "last"):
            if a[k].shape[0] != R:
                raise DatasetError(f"{k} has {a[k].shape[0]} rows but reward has {R}")
        N = a["obs"].shape[1]
        for k in ("actions", "avail"):
            if a[k].shape[1] != N:
                raise DatasetError(f"{k} has {a[k].shape[1]} agents but obs has {N}")
        dtypes = dict(obs=np.float32, state=np.float32, avail=np.bool_, reward=np.float32, terminal=np.bool_,
                      timeout=np.bool_, last=np.bool_, episode_start=np.int64,
                      actions=np.int64 if a["actions"].ndim == 2 else np.float32)
        for k, dt in dtypes.items():
            if a[k].dtype != dt:
                raise DatasetError(f"{k} must be {np.dtype(dt).name}, got {a[k].dtype}")
        if a["actions"].ndim == 3 and a["avail"].shape[2] != 1:
            raise DatasetError(f"continuous datasets have avail of shape [R, N, 1], got {a['avail'].shape}")
        es = np.asarray(a["episode_start"])
        if es.size < 2 or es[0] != 0 or es[-1] != R:
            raise DatasetError(f"episode_start must run from 0 to the row count {R}, got {es[:3]}...{es[-3:]}")
        if np.any(np.diff(es) < 2):
            raise DatasetError("every episode needs at least one transition and its final row")
        last = np.asarray(a["last"])
        last_rows = es[1:] - 1
        if last.sum() != es.size - 1 or not last[last_rows].all():
            raise DatasetError("last must be true exactly on each episode's final row")
        term, tout = np.asarray(a["terminal"]), np.asarray(a["timeout"])
        if (term & tout).any():
            raise DatasetError("a row cannot be both terminal and timeout")
        ends = term | tout
        if ends.sum() != es.size - 1 or not ends[last_rows - 1].all():
            raise DatasetError("terminal/timeout must be set exactly on each episode's final transition row")
        meta_missing = [k for k in REQUIRED_META if k not in self.meta]
        if meta_missing:
            raise DatasetError(f"meta.json is missing {meta_missing}")
        for k, v in (("n_agents", N), ("obs_dim", a["obs"].shape[2]), ("state_dim", a["state"].shape[1]),
                     ("discrete", a["actions"].ndim == 2)):
            if self.meta[k] != v:
                raise DatasetError(f"meta.json says {k}={self.meta[k]} but the arrays have {v}")
        if check_values:
            self._check_values()

    def _check_values(self, chunk: int = 1 << 16) -> None:
        a = self.arrays
        discrete = a["actions"].ndim == 2
        n_unavail = 0
        for lo in range(0, self.n_rows, chunk):
            sl = slice(lo, lo + chunk)
            for k in ("obs", "state", "reward") + (() if discrete else ("actions",)):
                x = np.asarray(a[k][sl])
                if not np.isfinite(x).all():
                    bad = lo + int(np.argwhere(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))[0, 0])
                    raise DatasetError(f"{k} has a NaN or infinite value at row {bad}")
            if discrete:
                act = np.asarray(a["actions"][sl])
                K = a["avail"].shape[2]
                if act.min(initial=0) < 0 or act.max(initial=0) >= K:
                    raise DatasetError(f"discrete actions must lie in [0, {K}), got [{act.min()}, {act.max()}]")
                av = np.asarray(a["avail"][sl])
                ok = np.take_along_axis(av, act[..., None], axis=2)[..., 0]
                n_unavail += int((~ok & ~np.asarray(a["last"][sl])[:, None]).sum())
        if n_unavail:
            warnings.warn(f"{n_unavail} dataset actions are marked unavailable in their own row", stacklevel=3)

    def check_env(self, env: Any) -> None:
        """Raise ``DatasetError`` if the dataset's dimensions do not match ``env``."""
        name = f"{self.meta.get('env')}/{self.meta.get('task')}"
        pairs = [("n_agents", self.n_agents, env.n_agents), ("obs_dim", self.obs_dim, env.obs_dim),
                 ("state_dim", self.state_dim, env.state_dim), ("discrete", self.discrete, env.discrete)]
        if self.discrete and env.discrete:
            pairs.append(("n_actions", self.n_actions, env.n_actions))
        elif not self.discrete and not env.discrete:
            pairs.append(("act_dim", self.act_dim, env.act_dim))
        for what, d, e in pairs:
            if d != e:
                raise DatasetError(f"dataset {name} has {what}={d} but the environment has {what}={e}: "
                                   "the dataset was made for another task or observation mode")

    # -------------------------------------------------------------- statistics
    def _index(self) -> None:
        es = np.array(self.arrays["episode_start"])  # small: always in memory
        self._es = es
        self._trans_rows = np.flatnonzero(~np.asarray(self.arrays["last"]))
        self._episode_of_row = np.repeat(np.arange(len(es) - 1), np.diff(es))
        self._tt: dict[str, torch.Tensor] = {}  # index tables and per-row scalars on the device
        self._views: dict[str, np.ndarray] = {}  # plain ndarray views of the mapped arrays
        self._fingerprints: dict[tuple[str, ...], str] = {}

    def fingerprint(self, fields: Sequence[str] = ARRAY_FIELDS) -> str:
        """A digest of the dataset's contents: the dtype, shape and every byte of ``fields`` (e.g. only
        what a model reads, to key a model trained on it). Memory-mapped arrays are read in chunks;
        the digest is computed once per set of fields."""
        key = tuple(fields)
        if key not in self._fingerprints:
            h = hashlib.blake2b(digest_size=20)
            for k in key:
                a = self._mapped(k)
                h.update(f"{k}:{a.dtype.str}:{a.shape};".encode())
                step = max(1, (1 << 26) // max(1, a.nbytes // max(1, len(a))))  # about 64 MB a chunk
                for lo in range(0, len(a), step):
                    h.update(np.ascontiguousarray(a[lo: lo + step]).data)
            self._fingerprints[key] = h.hexdigest()
        return self._fingerprints[key]

    def episode_returns(self, gamma: float = 1.0) -> np.ndarray:
        """Discounted return of every episode, ``[E]``."""
        if gamma == 1.0:
            c = np.concatenate([[0.0], np.cumsum(np.asarray(self.arrays["reward"], dtype=np.float64))])
            return (c[self._es[1:]] - c[self._es[:-1]]).astype(np.float64)
        return self.returns_to_go(gamma)[self._es[:-1]].astype(np.float64)

    def returns_to_go(self, gamma: float = 1.0) -> np.ndarray:
        """Discounted return from every row to its episode's end, ``[R]`` (0 on last rows)."""
        r = np.asarray(self.arrays["reward"], dtype=np.float64)
        if gamma == 1.0:
            c = np.cumsum(r)
            end = self._es[1:][self._episode_of_row] - 1
            out = c[end] - c + r
        else:
            out = np.zeros_like(r)
            starts, lens = self._es[:-1], self.episode_lengths
            order = np.argsort(-lens, kind="stable")  # longest episodes first
            for p in range(int(lens.max()) - 1, -1, -1):  # one vector step per time position
                eps = order[: np.searchsorted(-lens[order], -p, side="left")]
                rows = starts[eps] + p
                out[rows] = r[rows] + gamma * out[rows + 1]
        out[np.asarray(self.arrays["last"])] = 0.0
        return out.astype(np.float32)

    def summary(self) -> dict[str, Any]:
        ret = self.episode_returns()
        lens = self.episode_lengths
        return dict(episodes=self.n_episodes, transitions=self.n_transitions,
                    return_mean=float(ret.mean()), return_std=float(ret.std()),
                    return_min=float(ret.min()), return_max=float(ret.max()),
                    length_mean=float(lens.mean()), length_max=int(lens.max()))

    # ---------------------------------------------------------------- device
    def to(self, device: str | torch.device, max_bytes: int | None = None) -> "OfflineDataset":
        """Put the dataset on ``device`` for sampling.

        Every array is copied onto the device when it fits (half of the free GPU
        memory, or of the available RAM for the CPU, unless ``max_bytes`` says
        otherwise); then batches are drawn with ``torch.randint`` on the device and
        no host copy happens per step. A dataset that does not fit stays in its
        memory-mapped files and each batch is gathered from them (the per-row
        scalars, a few bytes a row, are on the device either way)."""
        self.device = torch.device(device)
        if self.device.type == "cuda":
            free = torch.cuda.mem_get_info(self.device)[0]
        else:
            free = _available_ram()
        budget = free // 2 if max_bytes is None else max_bytes
        self.generator = torch.Generator(self.device)
        self.generator.manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        self._tt = {}
        if self.nbytes <= budget:
            self._tensors = {k: torch.as_tensor(_materialise(v)).to(self.device) for k, v in self.arrays.items()}
        else:
            self._tensors = None
        for name in ("trans", "trans_next", "init", "starts", "episode_of_row", "reward", "flags"):
            self._row_tensor(name)
        return self

    def seed(self, seed: int) -> "OfflineDataset":
        """Seed this dataset's sampler (on its device)."""
        self.generator = torch.Generator(self.device)
        self.generator.manual_seed(int(seed))
        return self

    @property
    def on_device(self) -> bool:
        """True when every array lives on ``self.device`` as a tensor."""
        return self._tensors is not None

    def _randint(self, high: int, size: tuple[int, ...]) -> torch.Tensor:
        return torch.randint(0, high, size, device=self.device, generator=self.generator)

    def _row_tensor(self, name: str) -> torch.Tensor:
        """Index tables and per-row scalars on the device, built once: ``trans`` (transition rows),
        ``trans_next`` ``[2, T]`` (those rows and the next), ``init`` (episode starts), ``starts``
        (``episode_start``), ``episode_of_row``, ``reward``, ``flags`` ``[R, 3]`` bool (terminal,
        timeout, first: the row starts an episode)."""
        t = self._tt.get(name)
        if t is None:
            if name == "trans":
                t = torch.as_tensor(self._trans_rows)
            elif name == "trans_next":
                t = torch.as_tensor(np.stack([self._trans_rows, self._trans_rows + 1]))
            elif name == "init":
                t = torch.as_tensor(self._es[:-1].copy())
            elif name == "starts":
                t = torch.as_tensor(self._es)
            elif name == "episode_of_row":
                t = torch.as_tensor(self._episode_of_row)
            elif name == "reward":
                t = self._tensors["reward"] if self._tensors is not None else \
                    torch.as_tensor(np.array(self.arrays["reward"]))
            elif name == "flags":
                first = np.zeros(self.n_rows, dtype=bool)
                first[self._es[:-1]] = True
                t = torch.as_tensor(np.stack([np.asarray(self.arrays["terminal"]), np.asarray(self.arrays["timeout"]),
                                              first], 1))
            else:
                raise KeyError(name)
            t = self._tt[name] = t.to(self.device)
        return t

    def _take(self, keys: Sequence[str], rows: torch.Tensor) -> list[torch.Tensor]:
        """The arrays ``keys`` at the 1-D ``rows``: one ``index_select`` each from the device tensors,
        or one ``np.take`` each from the memory-mapped files (then copied to the device)."""
        if self._tensors is not None:
            return [torch.index_select(self._tensors[k], 0, rows) for k in keys]
        idx = rows.cpu().numpy()
        return [torch.from_numpy(np.take(self._mapped(k), idx, axis=0)).to(self.device, non_blocking=True)
                for k in keys]

    def _mapped(self, key: str) -> np.ndarray:
        """A plain ndarray view of the (memory-mapped) array ``key``: no copy, and no per-access
        overhead of the ``np.memmap`` subclass."""
        v = self._views.get(key)
        if v is None:
            v = self._views[key] = np.asarray(self.arrays[key])
        return v

    def _gather(self, key: str, rows: torch.Tensor) -> torch.Tensor:
        """The array ``key`` at ``rows`` of any shape: ``[*rows.shape, *field shape]``."""
        (x,) = self._take((key,), rows.reshape(-1))
        return x.view(rows.shape + x.shape[1:])

    def _trans(self) -> torch.Tensor:
        return self._row_tensor("trans")

    def _ep_of_row(self) -> torch.Tensor:
        return self._row_tensor("episode_of_row")

    def _starts(self) -> torch.Tensor:
        return self._row_tensor("starts")

    # --------------------------------------------------------------- sampling
    def transition_rows(self) -> torch.Tensor:
        """Row index of every transition, ``[n_transitions]`` (on the device).
        ``sample(weights=w)`` takes ``w`` aligned with this order."""
        return self._trans()

    def transitions(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """The transitions at the given (non-last) rows, with ``next_*`` from row + 1.

        Keys: ``obs state avail actions reward next_obs next_state next_avail``,
        ``done`` (float: 1 where the step ended the episode for real, so targets
        do not bootstrap; 0 on time-limit cuts), ``terminal``, ``timeout``,
        ``first`` (the row starts an episode), ``rows``."""
        return self._transitions(torch.stack([rows, rows + 1]))

    def _transitions(self, both: torch.Tensor) -> dict[str, torch.Tensor]:
        """``transitions`` of ``both [2, B]``: the rows and the rows + 1. Each per-agent field is one
        gather of the 2B rows (a view of each half is returned); the per-row flags are one gather."""
        rows, n = both[0], both.shape[1]
        obs, state, avail = self._take(("obs", "state", "avail"), both.reshape(-1))
        (actions,) = self._take(("actions",), rows)
        reward = torch.index_select(self._row_tensor("reward"), 0, rows)
        term, timeout, first = torch.index_select(self._row_tensor("flags"), 0, rows).unbind(1)
        return dict(obs=obs[:n], state=state[:n], avail=avail[:n], actions=actions, reward=reward,
                    next_obs=obs[n:], next_state=state[n:], next_avail=avail[n:],
                    done=term.float(), terminal=term, timeout=timeout, first=first, rows=rows)

    def sample(self, batch_size: int, weights: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """A batch of transitions drawn uniformly, or with probability proportional
        to ``weights`` (one non-negative weight per transition, in the order of
        ``transition_rows()``; drawn with replacement)."""
        trans = self._trans()
        if weights is None:
            pick = self._randint(trans.numel(), (batch_size,))
        else:
            if weights.shape != trans.shape:
                raise ValueError(f"weights must have shape {tuple(trans.shape)}, got {tuple(weights.shape)}")
            try:
                pick = torch.multinomial(weights, batch_size, replacement=True, generator=self.generator)
            except RuntimeError as e:  # NaN, infinite, negative or all-zero weights
                raise DivergenceError(f"the run diverged: its sampling weights became invalid ({str(e)[:80]}); "
                                      "no result is reported") from None
        return self._transitions(torch.index_select(self._row_tensor("trans_next"), 1, pick))

    def initial_rows(self) -> torch.Tensor:
        """Row index of every episode's first step, ``[E]``."""
        return self._row_tensor("init")

    def sample_initial(self, batch_size: int) -> dict[str, torch.Tensor]:
        """Observations, states and masks of true initial states (episode starts)."""
        rows = torch.index_select(self._row_tensor("init"), 0, self._randint(self.n_episodes, (batch_size,)))
        obs, state, avail = self._take(("obs", "state", "avail"), rows)
        return dict(obs=obs, state=state, avail=avail, rows=rows)

    def sample_sequences(self, batch_size: int, length: int | None = None) -> dict[str, torch.Tensor]:
        """Padded sequences for recurrent and sequence models.

        With ``length=None`` whole episodes are drawn (uniformly) and padded to the
        longest episode of the dataset; otherwise windows of ``length`` transitions
        start at a uniformly drawn transition and are padded past the episode's end.

        Returns ``obs [B, L+1, N, o]``, ``state [B, L+1, S]``, ``avail [B, L+1, N, K]``
        (observation slots; slot L+1 holds the final observation when the window
        reaches it), ``actions [B, L, N(, A)]``, ``reward``, ``terminal``, ``timeout``,
        ``done`` ``[B, L]``, ``mask [B, L]`` (valid transitions), ``obs_mask [B, L+1]``,
        ``start [B]`` (the window starts its episode) and ``rows [B, L+1]`` (the row of
        each slot, repeated past the episode's end: per-row data such as returns-to-go
        or time steps can be gathered with it)."""
        if length is None:
            ep = self._randint(self.n_episodes, (batch_size,))
            start = self._starts()[ep]
            length = int(self.episode_lengths.max())
        else:
            start = self._trans()[self._randint(self.n_transitions, (batch_size,))]
            ep = self._ep_of_row()[start]
        last_row = self._starts()[ep + 1] - 1  # [B]
        idx = start[:, None] + torch.arange(length + 1, device=self.device)[None]  # [B, L+1]
        obs_mask = idx <= last_row[:, None]
        idx = torch.minimum(idx, last_row[:, None])
        mask = obs_mask[:, 1:].clone()  # transition k is valid when its next row exists
        steps = idx[:, :-1]
        out = dict(obs=self._gather("obs", idx), state=self._gather("state", idx), avail=self._gather("avail", idx))
        for k in ("actions", "reward", "terminal", "timeout"):
            x = self._gather(k, steps)
            m = mask.view(mask.shape + (1,) * (x.dim() - 2))
            out[k] = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))
        out["done"] = out["terminal"].float()
        out.update(mask=mask, obs_mask=obs_mask, start=start == self._starts()[ep], rows=idx)
        return out


def _materialise(x: np.ndarray) -> np.ndarray:
    """An in-memory, writable, contiguous array (copies memory-mapped ones)."""
    if isinstance(x, np.memmap) or not x.flags.writeable or not x.flags.c_contiguous:
        return np.array(x)
    return x


def _complete_meta(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    """``meta`` with the dimension fields filled in from the arrays."""
    m = dict(meta)
    m["n_agents"] = int(arrays["obs"].shape[1])
    m["obs_dim"] = int(arrays["obs"].shape[2])
    m["state_dim"] = int(arrays["state"].shape[1])
    m["discrete"] = bool(arrays["actions"].ndim == 2)
    if m["discrete"]:
        m["n_actions"] = int(arrays["avail"].shape[2])
        m.pop("act_dim", None)
    else:
        m["act_dim"] = int(arrays["actions"].shape[2])
        m.pop("n_actions", None)
    m["episodes"] = int(arrays["episode_start"].shape[0] - 1)
    m["transitions"] = int(arrays["reward"].shape[0] - m["episodes"])
    m.setdefault("format_version", FORMAT_VERSION)
    return m


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON serialisable: {type(x)}")


def load_dataset(path: str | os.PathLike, **kwargs: Any) -> OfflineDataset:
    """Open a dataset at ``path`` in any supported format: native directories are
    memory-mapped directly, other formats are converted once into the cache
    (``common.formats``)."""
    path = Path(path).expanduser()
    if path.is_dir() and (path / "meta.json").is_file() and (path / "episode_start.npy").is_file():
        return OfflineDataset.load(path, **kwargs)
    from common import formats  # imported lazily: only needed for foreign formats

    return OfflineDataset.load(formats.convert(path), **kwargs)


__all__ = ["OfflineDataset", "DatasetError", "data_dir", "load_dataset", "FORMAT_VERSION"]
