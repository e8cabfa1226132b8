"""Readers of the public offline-MARL dataset formats, and tiny writers for tests.

Every public format is converted once into the native format of ``common.data``
(a directory of ``.npy`` + ``meta.json``) in the data cache; training then
memory-maps the native copy. ``common.data.load_dataset(path)`` calls
``convert`` for any path that is not already native.

=========  ===============================================  ==========================================
format     on disk                                          published with
=========  ===============================================  ==========================================
vault      OG-MARL / Flashbax vault: one zarr array per     OG-MARL core datasets and its copies of the
           field in a TensorStore OCDBT database,           OMIGA, CFCQL, AlberDICE and OMAR data
           ``[B, T, N, ...]``, length in ``vault_index``
omiga      HDF5 with rows ``s o a r d``                      OMIGA MaMuJoCo (also used by ComaDICE, OMCDA)
pymarl     pymarl ``EpisodeBatch``: an HDF5 file or a        CFCQL SMAC (HDF5), AlberDICE matrix game and
           directory of ``.npy`` + ``meta.json``,            Bridge (``.npy`` directory)
           ``[E, episode_limit + 1, ...]``, ``filled`` mask
madt       a directory of ``torch.save`` files, one         MADT SMAC, OMIGA SMAC
           episode each: per agent a list of
           ``[g, o, a, r, d, ava]`` steps
comadice   ``.npz`` of padded trajectories ``states obs     ComaDICE
           actions rewards dones actives avails``
=========  ===============================================  ==========================================

``detect(path)`` names the format of a path, ``convert(path, out=None,
**options)`` converts it (once: the result is cached under a hash of the source's
path, sizes and modification times and of the options) and returns the native
directory. docs/datasets.md describes each layout, what the conversion assumes,
and how terminal and time-limit endings are told apart.

The ``write_*`` functions write small files of each exact layout; the tests use
them to make fixtures (the vault writer uses tensorstore alone, no JAX).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import re
import shutil
import threading
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import tyro

from common.data import (ARRAY_FIELDS, DatasetError, OfflineDataset, _complete_meta, _json_default,
                         _remove_dataset_dir, data_dir, is_native_dataset)

FORMATS = ("native", "vault", "omiga", "pymarl", "madt", "comadice")
CONVERTER_VERSION = 1  # bump when the output of a reader changes: cached conversions are then redone
_CHUNK_BYTES = 128 << 20  # padded bytes per chunk of episodes handed to from_padded
_COMMON_OPTIONS = ("env", "task", "quality", "source", "env_options", "provenance", "time_limit", "state")
_READER_OPTIONS = {
    "vault": ("uid", "final_obs_row", "n_actions"),
    "omiga": (),
    "pymarl": (),
    "madt": ("unsafe_pickle",),
    "comadice": (),
}
_STATE_MODES = ("auto", "first", "concat", "concat_obs")


# ---------------------------------------------------------------------------------------------
# errors and optional packages
# ---------------------------------------------------------------------------------------------
def _one_line(e: BaseException, limit: int = 240) -> str:
    text = re.sub(r"\s*\[tensorstore_spec=.*$", "", " ".join(str(e).split())) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


@contextlib.contextmanager
def _reading(path: Path, what: str):
    """Turn a low-level read failure (numpy, h5py, tensorstore, zip, pickle) into one
    ``DatasetError`` line that names the file."""
    try:
        yield
    except DatasetError:
        raise
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, pickle.UnpicklingError, RuntimeError) as e:
        raise DatasetError(f"cannot read {path} as {what} (corrupt, truncated or not this format): "
                           f"{_one_line(e)}") from e


def _need(module: str, extra: str, what: str):
    try:
        return __import__(module)
    except ImportError:
        raise DatasetError(f"reading {what} needs the {module} package: "
                           f"pip install \"offline-marl[{extra}]\"") from None


def _h5py(what: str):
    return _need("h5py", "hdf5", what)


def _tensorstore():
    return _need("tensorstore", "vault", "OG-MARL vaults")


_held_locks = threading.local()


@contextlib.contextmanager
def file_lock(target: str | os.PathLike):
    """Hold an exclusive lock on ``<target>.lock`` while making ``target``, so that parallel
    runs (e.g. the seeds of a benchmark) download, convert or generate a dataset once: the
    others wait, then find it done. A no-op where ``fcntl`` is missing (Windows)."""
    lock = Path(target).expanduser().absolute()
    lock = lock.with_name(lock.name + ".lock")
    held = _held_locks.__dict__.setdefault("paths", set())
    if lock in held:  # re-entrant within a thread (catalog.resolve -> formats.convert)
        yield
        return
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover
        yield
        return
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        held.add(lock)
        try:
            yield
        finally:
            held.discard(lock)
            fcntl.flock(f, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------------
# detection
# ---------------------------------------------------------------------------------------------
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_ZIP_MAGIC = b"PK\x03\x04"


def _head(path: Path, n: int = 8) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(n)
    except OSError as e:
        raise DatasetError(f"cannot read {path}: {_one_line(e)}") from None


def _is_vault_uid_dir(p: Path) -> bool:
    return p.is_dir() and (p / "metadata.json").is_file() and ((p / "manifest.ocdbt").is_file() or (p / "d").is_dir())


def _files(p: Path) -> list[Path]:
    """Regular, non-hidden files of a directory, in natural order (2 before 10)."""
    key = lambda f: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", f.name)]  # noqa: E731
    return sorted((f for f in p.iterdir() if f.is_file() and not f.name.startswith(".")), key=key)


def _is_torch_file(f: Path) -> bool:
    """Starts like ``torch.save`` output: a zip container or a (legacy) pickle stream."""
    head = _head(f, 4)
    return head[:1] == b"\x80" or head == _ZIP_MAGIC


def detect(path: str | os.PathLike) -> str:
    """The format of ``path``: one of ``FORMATS`` or ``"zip"`` (an archive to unpack).

    Raises ``DatasetError`` for a missing path or an unrecognised layout."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DatasetError(f"no dataset at {path}")
    if path.is_dir():
        if (path / "meta.json").is_file() and (path / "episode_start.npy").is_file():
            return "native"
        if _is_vault_uid_dir(path) or any(_is_vault_uid_dir(c) for c in path.iterdir() if c.is_dir()):
            return "vault"
        if (path / "filled.npy").is_file():
            return "pymarl"
        files = _files(path)
        if files and all(_is_torch_file(f) for f in files[:3]):
            return "madt"
        raise DatasetError(f"cannot tell the format of the directory {path}: expected a native dataset, an OG-MARL "
                           "vault (<name>.vlt or one of its uid folders), a pymarl .npy buffer (filled.npy + "
                           "meta.json) or MADT episode files; see docs/datasets.md")
    head = _head(path)
    if head.startswith(_HDF5_MAGIC):
        h5py = _h5py(f"the HDF5 file {path}")
        with _reading(path, "HDF5"), h5py.File(path, "r") as f:
            keys = set(f.keys())
        if {"s", "o", "a", "r", "d"} <= keys:
            return "omiga"
        if {"filled", "reward", "terminated", "actions"} <= keys:
            return "pymarl"
        raise DatasetError(f"the HDF5 file {path} is neither OMIGA data (keys s o a r d) nor a pymarl episode batch "
                           f"(keys filled reward terminated actions ...); it has {sorted(keys)}")
    if head.startswith(_ZIP_MAGIC):
        with _reading(path, "a zip archive"), zipfile.ZipFile(path) as z:
            names = z.namelist()
        arrays = {n[:-4] for n in names if n.endswith(".npy") and "/" not in n}
        if arrays and len(arrays) == len(names):
            if {"obs", "actions", "rewards", "dones", "actives"} <= arrays:
                return "comadice"
            raise DatasetError(f"the .npz file {path} is not a ComaDICE dataset (keys states obs actions rewards "
                               f"dones actives [avails]); it has {sorted(arrays)}")
        return "zip"
    raise DatasetError(f"cannot tell the format of {path}: not HDF5, .npz, zip or a dataset directory; "
                       "see docs/datasets.md for the supported formats")


# ---------------------------------------------------------------------------------------------
# shared episode arithmetic
# ---------------------------------------------------------------------------------------------
@dataclass
class _Plan:
    """What a reader learned from the small arrays (ends, flags) before reading the big ones.

    ``chunks()`` yields dicts of padded arrays (``obs state actions reward [avail]``) for
    consecutive groups of the kept episodes, in the order of ``lengths``."""

    lengths: np.ndarray
    terminated: np.ndarray
    discrete: bool
    n_actions: int | None
    chunks: Callable[[], Iterator[dict[str, np.ndarray]]]
    notes: dict[str, Any] = field(default_factory=dict)
    quality: str | None = None


def _relabel(raw_len: np.ndarray, terminated: np.ndarray, time_limit: int | None) -> np.ndarray:
    """Episodes with exactly ``time_limit`` recorded steps were cut by the time limit."""
    terminated = np.asarray(terminated, dtype=bool).copy()
    if time_limit:
        terminated[raw_len == int(time_limit)] = False
    return terminated


def _close_unstored_final(raw_len: np.ndarray, terminated: np.ndarray) -> np.ndarray:
    """Lengths of episodes whose observation after the last step is not stored (vault, MADT).

    A terminal episode keeps every step: its final row repeats the last observation
    (targets never bootstrap from it). A time-limit episode must bootstrap from the
    observation after its last step, which is missing, so that step is dropped and the
    observation before it becomes the final row."""
    return np.where(terminated, raw_len, raw_len - 1).astype(np.int64)


def _repeat_last(x: np.ndarray, lengths: np.ndarray, terminated: np.ndarray) -> None:
    """In padded observations ``x [n, W, ...]``: slot ``length`` of terminal episodes = slot ``length - 1``."""
    idx = np.flatnonzero(terminated)
    x[idx, lengths[idx]] = x[idx, lengths[idx] - 1]


def _groups(widths: np.ndarray, row_bytes: int, budget: int = _CHUNK_BYTES) -> list[tuple[int, int]]:
    """Consecutive episode ranges whose padded size (count x widest x row bytes) fits the budget."""
    out, lo, wmax = [], 0, 0
    for i, w in enumerate(np.asarray(widths).tolist()):
        wmax2 = max(wmax, w)
        if i > lo and (i - lo + 1) * wmax2 * row_bytes > budget:
            out.append((lo, i))
            lo, wmax2 = i, w
        wmax = wmax2
    if len(widths):
        out.append((lo, len(widths)))
    return out


def _window(block: np.ndarray, rel_starts: np.ndarray, width: int) -> np.ndarray:
    """``[n, width, ...]`` windows of ``block`` starting at ``rel_starts`` (clipped at its end)."""
    idx = np.minimum(rel_starts[:, None] + np.arange(width)[None, :], len(block) - 1)
    return block[idx]


def _state(x: np.ndarray | None, obs: np.ndarray, mode: str, notes: dict[str, Any]) -> np.ndarray:
    """The global state ``[n, W, S]`` from a source state ``[n, W, S]`` or per agent ``[n, W, N, S]``.

    ``auto``: a per-agent state that is the same for every agent is taken once, one that
    differs (e.g. OMIGA's MaMuJoCo state, the agent's normalised observation) is
    concatenated over agents; ``first``/``concat`` force either; ``concat_obs`` builds the
    state as the concatenation of all agents' observations."""
    if mode == "concat_obs" or x is None:
        notes.setdefault("state", "concatenation of all agents' observations")
        return obs.reshape(obs.shape[:2] + (-1,))
    if x.ndim == 3:
        return x
    if mode == "first" or (mode == "auto" and bool((x == x[:, :, :1]).all())):
        notes.setdefault("state", "the per-agent state of agent 0 (the same for every agent)")
        return x[:, :, 0]
    notes["state"] = "concatenation of the per-agent states"
    return x.reshape(x.shape[:2] + (-1,))


def _team_reward(r: np.ndarray, notes: dict[str, Any], rows: np.ndarray | None = None) -> np.ndarray:
    """Team reward from per-agent rewards ``[..., N]``: agent 0's when all agents get the same
    on every row in ``rows`` (a mask; default all) as in cooperative tasks, else the mean over
    agents (recorded in the notes)."""
    if r.shape[-1] == 1:
        return r[..., 0]
    same = r == r[..., :1]
    if bool((same if rows is None else same[rows]).all()):
        return r[..., 0]
    notes["reward"] = "mean over agents of the per-agent rewards (they differ in this source)"
    return r.mean(axis=-1)


def _discrete_actions(a: np.ndarray) -> np.ndarray:
    """int64 action indices (``from_padded`` drops a trailing axis of size 1)."""
    if not np.issubdtype(a.dtype, np.integer):
        a = np.rint(a)
    return a.astype(np.int64)


# ---------------------------------------------------------------------------------------------
# OG-MARL vault (Flashbax layout), read with tensorstore
# ---------------------------------------------------------------------------------------------
def _vault_uid_dir(path: Path, uid: str | None) -> Path:
    if _is_vault_uid_dir(path):
        return path
    uids = sorted(c.name for c in path.iterdir() if _is_vault_uid_dir(c))
    if uid is None:
        if len(uids) == 1:
            return path / uids[0]
        raise DatasetError(f"the vault {path} holds several datasets {uids}: choose one with uid=... "
                           f"(or pass {path}/<uid>)")
    match = [u for u in uids if u.lower() == uid.lower()]
    if not match:
        raise DatasetError(f"the vault {path} has no dataset {uid!r}; it has {uids}")
    return path / match[0]


def _vault_leaves(meta: dict[str, Any]) -> dict[str, tuple[str, ...]]:
    """``{"observations": ("observations",), "infos/state": ("infos", "state"), ...}``: the
    leaves of the experience tree in metadata.json."""
    tree = meta.get("structure_shape", meta.get("structure"))
    if not isinstance(tree, dict):
        raise DatasetError("the vault's metadata.json has no structure_shape")
    out: dict[str, str] = {}

    def walk(node: Any, keys: tuple[str, ...]) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, keys + (str(k),))
        else:
            out["/".join(keys)] = keys

    walk(tree, ())
    return out


def _read_vault(path: Path, *, uid: str | None = None, final_obs_row: bool = False, time_limit: int | None = None,
                state: str = "auto", n_actions: int | None = None) -> _Plan:
    ts = _tensorstore()
    root = _vault_uid_dir(path, uid)
    with _reading(root, "an OG-MARL vault"):
        meta = json.loads((root / "metadata.json").read_text())
        leaves = _vault_leaves(meta)
        missing = [k for k in ("observations", "actions", "rewards", "terminals") if k not in leaves]
        if missing:
            raise DatasetError(f"the vault {root} has no {missing} (it has {sorted(leaves)})")
        ctx = ts.Context()  # fresh: no cached state from an earlier vault at the same path

        def open_leaf(name: str):
            spec = {"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{root}", "path": name}}
            return ts.open(spec, open=True, read=True, context=ctx).result()

        def open_tree_leaf(keys: tuple[str, ...]):
            # Flashbax >= 1.0 names a leaf by its dict path with a dot after every key; its
            # first release used jax's keystr, "['infos']['state']"
            try:
                return open_leaf("".join(k + "." for k in keys))
            except ValueError as e:
                if "NOT_FOUND" not in str(e):
                    raise
                return open_leaf("".join(f"['{k}']" for k in keys))

        n = int(open_leaf("vault_index").read().result().reshape(-1)[0])
        stores = {k: open_tree_leaf(v) for k, v in leaves.items()}
        B = int(stores["observations"].shape[0])
        if n < 1:
            raise DatasetError(f"the vault {root} is empty (vault_index = {n})")

        def flags(key: str) -> np.ndarray:  # [B, n]: set for every agent
            if key not in stores:
                return np.zeros((B, n), dtype=bool)
            f = np.asarray(stores[key][:, :n].read().result()).astype(bool)
            return f.reshape(B, n, -1).all(axis=-1)

        term, trunc = flags("terminals"), flags("truncations")
        notes: dict[str, Any] = {}
        rewards = np.asarray(stores["rewards"][:, :n].read().result(), dtype=np.float32).reshape(B, n, -1)
    ends_mask = term | trunc
    last_end = np.where(ends_mask.any(axis=1), n - 1 - np.argmax(ends_mask[:, ::-1], axis=1), -1)
    rewards = _team_reward(rewards, notes, rows=np.arange(n)[None, :] <= last_end[:, None])
    streams, starts, rows, terminated = [], [], [], []
    trailing = 0
    for b in range(B):
        ends = np.flatnonzero(ends_mask[b])
        s = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64) if len(ends) else np.zeros(0, np.int64)
        trailing += n - (int(ends[-1]) + 1 if len(ends) else 0)
        streams.append(np.full(len(ends), b))
        starts.append(s)
        rows.append(ends - s + 1)
        terminated.append(term[b, ends])
    streams, starts, rows, terminated = (np.concatenate(x) for x in (streams, starts, rows, terminated))
    if final_obs_row:  # the flagged row is the final observation, not a step
        raw_len = rows - 1
        terminated = _relabel(raw_len, terminated, time_limit)
        lengths = raw_len
    else:
        raw_len = rows
        terminated = _relabel(raw_len, terminated, time_limit)
        lengths = _close_unstored_final(raw_len, terminated)
    keep = lengths >= 1
    notes["dropped_episodes"] = int((~keep).sum())
    notes["incomplete_steps_dropped"] = int(trailing)
    notes["final_observation"] = (
        "stored: the row carrying each end flag is the episode's final observation" if final_obs_row else
        "not stored in vaults: terminal episodes repeat their last observation as the final row; "
        "time-limit episodes drop their last step, whose next observation is unknown")
    streams, starts, rows, lengths, terminated = (x[keep] for x in (streams, starts, rows, lengths, terminated))
    if not len(lengths):
        raise DatasetError(f"the vault {root} holds no complete episode")

    a_dtype, a_rank = stores["actions"].dtype.numpy_dtype, len(stores["actions"].shape)
    # discrete or continuous from the actions themselves: integers, or one float per agent ([B, T, N])
    # with a legal-action mask, are discrete; [B, T, N, A] floats are continuous, mask or not
    discrete = bool(np.issubdtype(a_dtype, np.integer) or (a_rank == 3 and "infos/legals" in stores))
    legals = discrete and "infos/legals" in stores
    if "infos/legals" in stores and not discrete:
        notes["legals"] = "ignored: the actions are continuous"
    if discrete and not legals and n_actions is None:
        amax = int(np.asarray(stores["actions"][:, :n].read().result()).max())
        n_actions, notes["n_actions"] = amax + 1, "largest action in the data + 1 (the vault has no legal-action masks)"
    elif legals:
        n_actions = int(stores["infos/legals"].shape[-1])
    state_key = "infos/state" if "infos/state" in stores else None
    if state_key is None and state != "concat_obs":
        notes["state"] = "concatenation of all agents' observations (the vault stores no state)"
    row_bytes = sum(int(np.prod(st.shape[2:], dtype=np.int64)) * st.dtype.numpy_dtype.itemsize
                    for st in stores.values()) + 64

    def chunks() -> Iterator[dict[str, np.ndarray]]:
        width = lengths + 1  # slots per episode: steps + final observation
        for lo, hi in _groups(width, row_bytes):
            # one contiguous read per stream b within the group
            for b in np.unique(streams[lo:hi]):
                sel = np.arange(lo, hi)[streams[lo:hi] == b]
                t0, t1 = int(starts[sel[0]]), int(starts[sel[-1]] + rows[sel[-1]])
                rel = starts[sel] - t0
                W = int(width[sel].max())
                with _reading(root, "an OG-MARL vault"):
                    block = {k: np.asarray(stores[k][int(b), t0:t1].read().result())
                             for k in ("observations", "actions") + ((state_key,) if state_key else ())
                             + (("infos/legals",) if legals else ())}
                L, term_sel = lengths[sel], terminated[sel]
                obs = _window(block["observations"], rel, W).astype(np.float32, copy=False)
                st = _window(block[state_key], rel, W).astype(np.float32, copy=False) if state_key else None
                av = _window(block["infos/legals"], rel, W) != 0 if legals else None
                act = _window(block["actions"], rel, W)
                rew = _window(rewards[int(b), t0:t1], rel, W)
                if not final_obs_row:
                    for x in (obs, st, av):
                        if x is not None:
                            _repeat_last(x, L, term_sel)
                yield dict(obs=obs, state=_state(st, obs, state, notes),
                           actions=_discrete_actions(act) if discrete else act.astype(np.float32, copy=False),
                           reward=rew, avail=av)

    notes["vault"] = {"uid": root.name, "version": meta.get("version"), "B": B, "vault_index": n}
    return _Plan(lengths, terminated, bool(discrete), n_actions, chunks, notes, quality=root.name.lower())


def write_vault(path: str | os.PathLike, experience: dict[str, Any], *, uid: str = "Good",
                version: float = 1.2) -> Path:
    """Write ``experience`` (a nested dict of arrays ``[B, T, ...]``, as OG-MARL records:
    ``observations actions rewards terminals truncations infos/{state,legals}``) as the
    vault ``path/<uid>/`` in Flashbax's layout, with tensorstore alone: ``metadata.json``
    with the structure's shapes and dtypes, one zarr array (gzip level 5) per leaf named by
    its dict path with a dot after every key, the time axis sized 10^13, and the number of
    written steps in the ``vault_index`` array, all in one OCDBT database."""
    ts = _tensorstore()
    root = Path(path) / uid
    root.mkdir(parents=True, exist_ok=False)
    flat: dict[tuple[str, ...], np.ndarray] = {}

    def walk(node: Any, keys: tuple[str, ...]) -> Any:
        if isinstance(node, dict):
            return {k: walk(v, keys + (k,)) for k, v in node.items()}
        flat[keys] = np.asarray(node)
        return node

    walk(experience, ())
    shapes: dict[str, Any] = {}
    dtypes: dict[str, Any] = {}
    for keys, x in flat.items():
        s, d = shapes, dtypes
        for k in keys[:-1]:
            s, d = s.setdefault(k, {}), d.setdefault(k, {})
        s[keys[-1]], d[keys[-1]] = str(tuple(x.shape)), x.dtype.name
    (root / "metadata.json").write_text(json.dumps({"version": version, "structure_shape": shapes,
                                                    "structure_dtype": dtypes}))
    ctx = ts.Context()
    T = None
    for keys, x in flat.items():
        spec = {"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{root}",
                                              "path": "".join(k + "." for k in keys)},
                "metadata": {"compressor": {"id": "gzip", "level": 5}}}
        store = ts.open(spec, create=True, dtype=x.dtype.name, shape=(x.shape[0], int(10e12), *x.shape[2:]),
                        context=ctx).result()
        store[:, : x.shape[1]].write(x).result()
        T = x.shape[1]
    index = ts.open({"driver": "zarr", "kvstore": {"driver": "ocdbt", "base": f"file://{root}", "path": "vault_index"}},
                    create=True, dtype=ts.int32, shape=(1,), context=ctx).result()
    index.write(np.array([T], dtype=np.int32)).result()
    return root


# ---------------------------------------------------------------------------------------------
# OMIGA HDF5 (MaMuJoCo): rows s o a r d
# ---------------------------------------------------------------------------------------------
def _read_omiga(path: Path, *, time_limit: int | None = None, state: str = "auto") -> _Plan:
    h5py = _h5py(f"the OMIGA HDF5 file {path}")
    with _reading(path, "OMIGA HDF5"):
        f = h5py.File(path, "r")
        d = np.asarray(f["d"][:])
        n = len(d)
        for k in ("s", "o", "a", "r"):
            if len(f[k]) != n:
                raise DatasetError(f"{path}: {k} has {len(f[k])} rows but d has {n}")
        o_shape, a_shape = f["o"].shape, f["a"].shape
        r = np.asarray(f["r"][:], dtype=np.float32).reshape(n, -1)
    notes: dict[str, Any] = {}
    done = d.reshape(n, -1)[:, 0] > 0
    ends = np.flatnonzero(done)  # the row flagged d=1 is the episode's final observation
    starts = np.concatenate([[0], ends[:-1] + 1]).astype(np.int64)
    raw_len = ends - starts
    keep = raw_len >= 1
    notes["dropped_episodes"] = int((~keep).sum())
    notes["incomplete_steps_dropped"] = int(n - (ends[-1] + 1 if len(ends) else 0))
    notes["final_observation"] = "stored: the row with d=1 is each episode's final observation (not a step)"
    starts, raw_len = starts[keep], raw_len[keep]
    if not len(raw_len):
        raise DatasetError(f"{path} holds no complete episode (no row has d=1)")
    # OMIGA flags every ending alike (d=1); only a time limit can tell cuts from true ends
    terminated = _relabel(raw_len, np.ones(len(raw_len), bool), time_limit)
    rewards = _team_reward(r, notes)
    row_bytes = 4 * (int(np.prod(o_shape[1:])) * 2 + int(np.prod(a_shape[1:])) + 2)

    def chunks() -> Iterator[dict[str, np.ndarray]]:
        width = raw_len + 1
        for lo, hi in _groups(width, row_bytes):
            t0, t1 = int(starts[lo]), int(starts[hi - 1] + width[hi - 1])
            rel, W = starts[lo:hi] - t0, int(width[lo:hi].max())
            with _reading(path, "OMIGA HDF5"):
                block = {k: np.asarray(f[k][t0:t1], dtype=np.float32) for k in ("s", "o", "a")}
            obs = _window(block["o"], rel, W)
            yield dict(obs=obs, state=_state(_window(block["s"], rel, W), obs, state, notes),
                       actions=_window(block["a"], rel, W), reward=_window(rewards[t0:t1], rel, W), avail=None)
        f.close()

    return _Plan(raw_len.astype(np.int64), terminated, False, None, chunks, notes)


def write_omiga_hdf5(path: str | os.PathLike, *, s: np.ndarray, o: np.ndarray, a: np.ndarray, r: np.ndarray,
                     d: np.ndarray) -> Path:
    """Write OMIGA's MaMuJoCo layout: datasets ``s [R, N, S]``, ``o [R, N, obs]``,
    ``a [R, N, act]``, ``r [R, 1]``, ``d [R, 1]`` (1 on each episode's final-observation row)."""
    h5py = _h5py("OMIGA HDF5 files")
    path = Path(path)
    with h5py.File(path, "w") as f:
        for k, v in dict(s=s, o=o, a=a, r=r, d=d).items():
            f.create_dataset(k, data=np.asarray(v))
    return path


# ---------------------------------------------------------------------------------------------
# pymarl episode batches (HDF5 file or .npy directory + meta.json)
# ---------------------------------------------------------------------------------------------
def _read_pymarl(path: Path, *, time_limit: int | str | None = "auto", state: str = "auto") -> _Plan:
    notes: dict[str, Any] = {}
    what = "a pymarl episode batch"
    with _reading(path, what):
        if path.is_dir():
            n_valid = None
            if (path / "meta.json").is_file():
                n_valid = json.loads((path / "meta.json").read_text()).get("episodes_in_buffer")
            src = {f.stem: np.load(f, mmap_mode="r", allow_pickle=False) for f in path.glob("*.npy")}
        else:
            h5py = _h5py(f"the pymarl HDF5 file {path}")
            f = h5py.File(path, "r")
            src = {k: f[k] for k in f.keys()}
            n_valid = None
        missing = [k for k in ("filled", "actions", "reward", "terminated") if k not in src]
        if "obs" not in src and "state" not in src:
            missing.append("obs")
        if missing:
            raise DatasetError(f"{path} is not a complete pymarl episode batch: {missing} missing")
        E = int(src["filled"].shape[0]) if n_valid is None else int(n_valid)
        T1 = int(src["filled"].shape[1])
        filled = np.asarray(src["filled"][:E]).reshape(E, T1) > 0
        term_flags = np.asarray(src["terminated"][:E]).reshape(E, T1) > 0
    if (filled[:, 1:] & ~filled[:, :-1]).any():
        raise DatasetError(f"{path}: filled is not a prefix of ones in every episode")
    raw_len = filled.sum(axis=1).astype(np.int64) - 1  # the last filled slot holds the final observation
    keep = raw_len >= 1
    idx = np.flatnonzero(keep)
    notes["dropped_episodes"] = int((~keep).sum())
    raw_len = raw_len[keep]
    if not len(raw_len):
        raise DatasetError(f"{path} holds no episode with a step")
    terminated = term_flags[idx, raw_len - 1]
    if time_limit == "auto":
        time_limit = T1 - 1  # pymarl buffers have episode_limit + 1 slots
        notes["time_limit"] = f"auto: episodes that fill all {T1} slots ran the episode limit {T1 - 1}"
    terminated = _relabel(raw_len, terminated, time_limit)
    notes["final_observation"] = "stored: the last filled slot"
    a0 = src["actions"]
    discrete = np.issubdtype(a0.dtype, np.integer)
    n_actions = int(src["avail_actions"].shape[-1]) if "avail_actions" in src else None
    if discrete and n_actions is None:
        n_actions = int(np.asarray(a0[:E]).max()) + 1
    if "obs" not in src:
        notes["obs"] = "the state, given to every agent (the buffer has no obs)"
    obs_key = "obs" if "obs" in src else "state"
    row_bytes = sum(int(np.prod(src[k].shape[2:])) * src[k].dtype.itemsize for k in src) + 64
    W_all = raw_len + 1

    def chunks() -> Iterator[dict[str, np.ndarray]]:
        for lo, hi in _groups(np.full(len(idx), T1), row_bytes):
            e0, e1 = int(idx[lo]), int(idx[hi - 1]) + 1
            sel = idx[lo:hi] - e0
            W = int(W_all[lo:hi].max())
            with _reading(path, what):
                get = lambda k: np.asarray(src[k][e0:e1, :W])[sel]  # noqa: E731
                obs = get(obs_key).astype(np.float32, copy=False)
                if obs_key == "state":
                    obs = np.repeat(obs[:, :, None], int(src["actions"].shape[2]), axis=2)
                st = get("state").astype(np.float32, copy=False) if "state" in src else None
                act = get("actions")
                av = get("avail_actions") != 0 if "avail_actions" in src else None
                rew = get("reward").astype(np.float32, copy=False).reshape(len(sel), W, -1)[..., 0]
            yield dict(obs=obs, state=_state(st, obs, state, notes),
                       actions=_discrete_actions(act) if discrete else act.astype(np.float32, copy=False),
                       reward=rew, avail=av)

    return _Plan(raw_len, terminated, bool(discrete), n_actions, chunks, notes)


def write_pymarl(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> Path:
    """Write a pymarl episode batch: ``state [E, T1, S]``, ``obs [E, T1, N, o]``,
    ``actions [E, T1, N, 1]`` (int64), ``avail_actions [E, T1, N, K]`` (int32),
    ``reward [E, T1, 1]``, ``terminated [E, T1, 1]`` (uint8), ``filled [E, T1, 1]`` (int64),
    ... (``T1`` = episode limit + 1). A path ending in ``.h5``/``.hdf5`` gets one HDF5 file
    with a dataset per key (CFCQL); any other path a directory with one ``.npy`` per key
    and AlberDICE's ``meta.json``."""
    path = Path(path)
    if path.suffix in (".h5", ".hdf5"):
        h5py = _h5py("pymarl HDF5 files")
        with h5py.File(path, "w") as f:
            for k, v in arrays.items():
                f.create_dataset(k, data=np.asarray(v))
        return path
    path.mkdir(parents=True, exist_ok=True)
    for k, v in arrays.items():
        np.save(path / f"{k}.npy", np.asarray(v))
    E = int(np.asarray(arrays["filled"]).shape[0])
    (path / "meta.json").write_text(json.dumps({"buffer_index": 0, "episodes_in_buffer": E, "buffer_size": E}))
    return path


# ---------------------------------------------------------------------------------------------
# MADT episode files (torch.save): per agent a list of [g, o, a, r, d, ava] steps
# ---------------------------------------------------------------------------------------------
def _numpy_safe_globals() -> list[Any]:
    """The numpy pieces a MADT pickle needs, for ``torch.load(weights_only=True)``, under
    numpy 2 and numpy 1 names."""
    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar  # type: ignore
    items: list[Any] = [np.ndarray, np.dtype]
    for obj, name in ((_reconstruct, "_reconstruct"), (scalar, "scalar")):
        items += [(obj, f"numpy.core.multiarray.{name}"), (obj, f"numpy._core.multiarray.{name}")]
    items += [type(np.dtype(t)) for t in ("float16", "float32", "float64", "int8", "int16", "int32", "int64",
                                          "uint8", "bool")]
    return items


def _torch_load(f: Path, unsafe_pickle: bool) -> Any:
    import torch

    with _reading(f, "a MADT episode file"):
        if unsafe_pickle:
            return torch.load(f, map_location="cpu", weights_only=False)
        try:
            with torch.serialization.safe_globals(_numpy_safe_globals()):
                return torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise DatasetError(f"{f} holds Python objects that a safe (weights-only) load refuses, and this "
                               "project does not unpickle them by default; only if you trust the file, convert "
                               f"it with: python -m common.formats {f.parent} --unsafe-pickle") from None


def _madt_episode(ep: Any, f: Path) -> dict[str, np.ndarray] | None:
    if not isinstance(ep, (list, tuple)) or not ep or not all(isinstance(a, (list, tuple)) for a in ep):
        raise DatasetError(f"{f} is not a MADT episode (a list per agent of [g, o, a, r, d, ava] steps)")
    L = len(ep[0])
    if L == 0 or any(len(a) != L for a in ep):
        return None  # agents disagree on the length: the published loaders skip such episodes

    def field_(i: int, dtype) -> np.ndarray:  # [L, N, ...]
        return np.asarray([[np.asarray(step[i]).reshape(-1) for step in agent] for agent in ep], dtype=dtype
                          ).swapaxes(0, 1)

    try:
        return dict(g=field_(0, np.float32), o=field_(1, np.float32), a=field_(2, np.float64)[..., 0],
                    r=np.asarray([np.asarray(step[3]).reshape(-1)[0] for step in ep[0]], dtype=np.float32),
                    d=bool(np.asarray(ep[0][-1][4]).reshape(-1)[0]), ava=field_(5, np.float32) != 0)
    except (IndexError, ValueError, TypeError) as e:
        raise DatasetError(f"{f} is not a MADT episode (a list per agent of [g, o, a, r, d, ava] steps): "
                           f"{_one_line(e)}") from None


def _read_madt(path: Path, *, time_limit: int | None = None, state: str = "auto",
               unsafe_pickle: bool = False) -> _Plan:
    files = _files(path)
    if not files:
        raise DatasetError(f"{path} has no episode files")
    notes: dict[str, Any] = {}
    episodes, skipped = [], 0
    from tqdm import tqdm

    for f in tqdm(files, desc="reading MADT episodes", unit="file", disable=None, leave=False):
        ep = _madt_episode(_torch_load(f, unsafe_pickle), f)
        if ep is None:
            skipped += 1
        else:
            episodes.append(ep)
    if not episodes:
        raise DatasetError(f"{path} holds no usable episode")
    shapes = {(e["g"].shape[1:], e["o"].shape[1:], e["ava"].shape[1:]) for e in episodes}
    if len(shapes) > 1:
        raise DatasetError(f"the episodes in {path} disagree on their shapes: {sorted(shapes)[:3]}")
    raw_len = np.array([len(e["r"]) for e in episodes], dtype=np.int64)
    terminated = _relabel(raw_len, np.array([e["d"] for e in episodes]), time_limit)
    lengths = _close_unstored_final(raw_len, terminated)
    keep = lengths >= 1
    notes["dropped_episodes"] = int((~keep).sum()) + skipped
    notes["final_observation"] = ("not stored in MADT files: terminal episodes repeat their last observation as the "
                                  "final row; time-limit episodes drop their last step")
    episodes = [e for e, k in zip(episodes, keep) if k]
    lengths, terminated, raw_len = lengths[keep], terminated[keep], raw_len[keep]
    ep0 = episodes[0]
    row_bytes = 4 * (ep0["g"][0].size + ep0["o"][0].size + ep0["ava"][0].size + ep0["a"][0].size + 1)

    def chunks() -> Iterator[dict[str, np.ndarray]]:
        for lo, hi in _groups(raw_len + 1, row_bytes):
            W = int(raw_len[lo:hi].max()) + 1

            def pad(key: str) -> np.ndarray:
                first = episodes[lo][key]
                out = np.zeros((hi - lo, W) + first.shape[1:], dtype=first.dtype)
                for i, e in enumerate(episodes[lo:hi]):
                    out[i, : len(e[key])] = e[key]
                return out

            L, term_sel = lengths[lo:hi], terminated[lo:hi]
            obs, g, av = pad("o"), pad("g"), pad("ava")
            for x in (obs, g, av):
                _repeat_last(x, L, term_sel)
            yield dict(obs=obs, state=_state(g, obs, state, notes), actions=_discrete_actions(pad("a")),
                       reward=pad("r"), avail=av)

    return _Plan(lengths, terminated, True, int(ep0["ava"].shape[-1]), chunks, notes)


def write_madt(path: str | os.PathLike, episodes: list[list[list[list[Any]]]]) -> Path:
    """Write MADT episode files: ``path/<i>.pkl`` = ``torch.save(episode)``, where an
    episode is a list per agent of steps ``[g, o, [a], [r], done, ava]`` (g, o, ava
    as lists of floats, ``done`` the agent's done flag after the step)."""
    import torch

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for i, ep in enumerate(episodes):
        torch.save(ep, path / f"{i}.pkl")
    return path


# ---------------------------------------------------------------------------------------------
# ComaDICE .npz (padded trajectories)
# ---------------------------------------------------------------------------------------------
def _read_comadice(path: Path, *, time_limit: int | None = None, state: str = "auto") -> _Plan:
    what = "a ComaDICE .npz"
    with _reading(path, what), np.load(path, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    notes: dict[str, Any] = {}
    obs = data["obs"]
    if obs.ndim != 4:
        raise DatasetError(f"{path}: obs must be [E, T+1, N, obs_dim], got {obs.shape}")
    E, T1, N = obs.shape[:3]
    act = data["actives"]
    act = (act.reshape(E, act.shape[1], -1) > 0).all(axis=-1)
    if (act[:, 1:] & ~act[:, :-1]).any():
        raise DatasetError(f"{path}: actives is not a prefix of ones in every episode")
    raw_len = act.sum(axis=1).astype(np.int64)
    keep = raw_len >= 1
    if raw_len.max(initial=0) > T1 - 1:
        raise DatasetError(f"{path}: episodes of {raw_len.max()} steps need {raw_len.max() + 1} observation slots, "
                           f"obs has {T1}")
    notes["dropped_episodes"] = int((~keep).sum())
    notes["final_observation"] = "stored: obs/states slot T of an episode with T active steps"
    idx = np.flatnonzero(keep)
    raw_len = raw_len[keep]
    dones = data["dones"].reshape(E, data["dones"].shape[1], -1)[..., 0] > 0
    terminated = _relabel(raw_len, dones[idx, raw_len - 1], time_limit)
    discrete = "avails" in data
    a = data["actions"]
    rewards = _team_reward(data["rewards"].astype(np.float32, copy=False).reshape(E, data["rewards"].shape[1], -1),
                           notes)
    states = data.get("states")

    def chunks() -> Iterator[dict[str, np.ndarray]]:
        row_bytes = obs[0, 0].nbytes * 3 + 64
        for lo, hi in _groups(np.full(len(idx), T1), row_bytes):
            sel = idx[lo:hi]
            o = obs[sel].astype(np.float32, copy=False)
            st = states[sel].astype(np.float32, copy=False) if states is not None else None
            yield dict(obs=o, state=_state(st, o, state, notes),
                       actions=_discrete_actions(a[sel]) if discrete else a[sel].astype(np.float32, copy=False),
                       reward=rewards[sel], avail=data["avails"][sel] != 0 if discrete else None)

    n_actions = int(data["avails"].shape[-1]) if discrete else None
    return _Plan(raw_len, terminated, bool(discrete), n_actions, chunks, notes)


def write_comadice(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    """Write ComaDICE's padded layout with ``np.savez_compressed``: ``obs [E, T+1, N, o]``,
    ``states [E, T+1, S]`` (SMAC) or ``[E, T+1, N, S]`` (MaMuJoCo), ``avails [E, T+1, N, K]``
    (discrete only), ``actions [E, T, N]`` (discrete) or ``[E, T+1, N, A]`` (continuous),
    ``rewards [E, T]``, ``dones [E, T]``, ``actives [E, T]`` (bool)."""
    path = Path(path)
    np.savez_compressed(path, **{k: np.asarray(v) for k, v in arrays.items()})
    return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")


# ---------------------------------------------------------------------------------------------
# conversion
# ---------------------------------------------------------------------------------------------
_READERS: dict[str, Callable[..., _Plan]] = {
    "vault": _read_vault, "omiga": _read_omiga, "pymarl": _read_pymarl, "madt": _read_madt, "comadice": _read_comadice,
}
_FORMAT_NAMES = {
    "vault": "OG-MARL vault", "omiga": "OMIGA HDF5", "pymarl": "pymarl episode batch",
    "madt": "MADT episode files", "comadice": "ComaDICE .npz",
}


def _fingerprint(path: Path) -> list[Any]:
    """Sizes and modification times of a file or of every file under a directory."""
    if path.is_file():
        st = path.stat()
        return [path.name, st.st_size, st.st_mtime_ns]
    out = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            st = os.stat(os.path.join(root, name))
            out.append([os.path.relpath(os.path.join(root, name), path), st.st_size, st.st_mtime_ns])
    return out


def _source_key(path: Path, fmt: str, options: dict[str, Any]) -> str:
    blob = json.dumps([str(path.resolve()), fmt, _fingerprint(path), options, CONVERTER_VERSION],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


_TMP_MARK = ".offline-marl-tmp"


def _fresh_tmp(tmp: Path) -> None:
    """Create the temporary folder ``tmp`` (marked as ours). A leftover of an earlier killed call is
    removed only if it carries the mark; a folder of that name without it is someone else's and
    is refused, never deleted."""
    if tmp.exists():
        if not (tmp / _TMP_MARK).is_file():
            raise DatasetError(f"{tmp} exists and was not made by offline-marl; move it away and run again")
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    (tmp / _TMP_MARK).touch()


def _finish_tmp(tmp: Path, dest: Path) -> None:
    """Move a finished temporary folder into place, without its mark."""
    (tmp / _TMP_MARK).unlink(missing_ok=True)
    os.replace(tmp, dest)


def unpack(archive: str | os.PathLike, dest: str | os.PathLike) -> Path:
    """Extract a zip archive into ``dest`` (atomically: into a temporary folder first)
    and return ``dest``. Members that would land outside ``dest`` are refused."""
    archive, dest = Path(archive), Path(dest)
    if dest.exists():
        raise DatasetError(f"{dest} already exists; unpacking {archive.name} never replaces a folder")
    tmp = dest.with_name(dest.name + ".unpacking")
    _fresh_tmp(tmp)  # a killed earlier unpack of this archive into this cache folder (callers hold its lock)
    with _reading(archive, "a zip archive"), zipfile.ZipFile(archive) as z:
        for name in z.namelist():
            target = (tmp / name).resolve()
            if not str(target).startswith(str(tmp.resolve())):
                raise DatasetError(f"{archive} has a member outside its folder ({name}); refusing to unpack it")
        z.extractall(tmp)
    _finish_tmp(tmp, dest)
    return dest


def _unpacked_dataset(root: Path) -> Path:
    """The dataset inside an unpacked archive: the archive's single top-level entry, or
    the one ``*.vlt`` vault in it."""
    entries = [c for c in root.iterdir() if not c.name.startswith((".", "__MACOSX"))]
    vaults = [p for p in root.rglob("*.vlt") if p.is_dir()]
    if len(vaults) == 1:
        return vaults[0]
    if len(entries) == 1:
        return entries[0]
    return root


class _NativeWriter:
    """Writes the native format chunk by chunk into memory-mapped ``.npy`` files, so a
    dataset larger than RAM converts in bounded memory."""

    def __init__(self, path: Path, n_rows: int, n_episodes: int):
        self.path, self.R, self.E = path, n_rows, n_episodes
        self.arrays: dict[str, np.ndarray] = {}
        self.row = 0
        self.episode_start = [np.zeros(1, np.int64)]

    def add(self, ds: OfflineDataset) -> None:
        n = ds.n_rows
        for k in ARRAY_FIELDS:
            if k == "episode_start":
                continue
            x = ds.arrays[k]
            if k not in self.arrays:
                self.arrays[k] = np.lib.format.open_memmap(self.path / f"{k}.npy", mode="w+", dtype=x.dtype,
                                                           shape=(self.R,) + x.shape[1:])
            elif self.arrays[k].shape[1:] != x.shape[1:]:
                raise DatasetError(f"{k} changes shape between episodes: {self.arrays[k].shape[1:]} vs {x.shape[1:]}")
            self.arrays[k][self.row: self.row + n] = x
        self.episode_start.append(ds.arrays["episode_start"][1:] + self.row)
        self.row += n

    def finish(self, meta: dict[str, Any]) -> None:
        if self.row != self.R:
            raise DatasetError(f"conversion wrote {self.row} rows, expected {self.R}")
        for x in self.arrays.values():
            x.flush()
        self.arrays["episode_start"] = np.concatenate(self.episode_start)
        np.save(self.path / "episode_start.npy", self.arrays["episode_start"])
        meta = _complete_meta(meta, self.arrays)
        (self.path / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=_json_default) + "\n")
        self.arrays.clear()


def convert(path: str | os.PathLike, out: str | os.PathLike | None = None, **options: Any) -> Path:
    """Convert the dataset at ``path`` into the native format and return its directory.

    A native directory is returned as it is. Otherwise the result goes to ``out`` (default:
    ``data_dir()/converted/<name>-<hash>``) and is reused as long as the source (path, file
    sizes, modification times) and the options are unchanged.

    Options (all optional):

    - ``format``: skip auto-detection (one of ``FORMATS``).
    - ``env``, ``task``, ``quality``, ``source``, ``env_options``, ``provenance``: recorded in
      ``meta.json`` (``env_options`` is what ``common.envs.make_env_for`` rebuilds the
      environment with, e.g. ``{"obs_mode": "omiga"}``).
    - ``time_limit``: episodes with exactly this many recorded steps are time-limit cuts
      (bootstrapped), whatever the file's end flag says. Needed for sources whose end flag
      includes time limits (OG-MARL SMAC vaults, OMIGA, MADT, AlberDICE buffers). ``0``
      disables it; pymarl buffers default to ``"auto"`` (slots - 1, the episode limit the
      buffer was made with), the other formats to off.
    - ``state``: ``auto`` | ``first`` | ``concat`` | ``concat_obs`` (see ``_state``).
    - vault: ``uid`` (which dataset of a ``.vlt`` folder), ``final_obs_row`` (the row with
      the end flag is the final observation, as in OG-MARL's copies of the OMIGA MaMuJoCo
      data), ``n_actions`` (discrete vaults without legal-action masks).
    - madt: ``unsafe_pickle`` (allow arbitrary pickled objects; only for trusted files).
    """
    path = Path(path).expanduser()
    fmt = options.pop("format", None) or detect(path)
    if fmt == "native":
        return path
    if fmt == "zip":
        key = _source_key(path, fmt, {})[:12]
        root = data_dir() / "unpacked" / f"{path.stem}-{key}"
        with file_lock(root):
            if not root.is_dir():
                unpack(path, root)
        return convert(_unpacked_dataset(root), out, **options)
    if fmt not in _READERS:
        raise DatasetError(f"unknown dataset format {fmt!r}; known: {', '.join(FORMATS)}")
    allowed = _COMMON_OPTIONS + _READER_OPTIONS[fmt]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise DatasetError(f"unknown option(s) {unknown} for {_FORMAT_NAMES[fmt]}; accepted: {', '.join(allowed)}")
    if options.get("state", "auto") not in _STATE_MODES:
        raise DatasetError(f"state must be one of {_STATE_MODES}, got {options['state']!r}")
    key = _source_key(path, fmt, options)
    out = Path(out).expanduser() if out is not None else data_dir() / "converted" / f"{path.name}-{key[:12]}"
    with file_lock(out):
        return _convert_locked(path, fmt, out, key, options)


def _remove_stale_tmp(out: Path) -> None:
    """Temporary folders ``<out>.tmp<PID>`` left by conversions that were killed (their process is
    gone): only the dataset files this module writes are removed, then the empty folder."""
    for tmp in out.parent.glob(f"{out.name}.tmp*") if out.parent.is_dir() else []:
        pid = tmp.name[len(out.name) + 4:]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        _remove_dataset_dir(tmp)


def _convert_locked(path: Path, fmt: str, out: Path, key: str, options: dict[str, Any]) -> Path:
    if (out / "meta.json").is_file():
        try:
            if json.loads((out / "meta.json").read_text()).get("provenance", {}).get("source_key") == key \
                    and (out / "episode_start.npy").is_file():
                return out
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not is_native_dataset(out))):
        raise DatasetError(f"{out} exists and is not a dataset of this project; choose another output folder "
                           "(nothing there is touched)")
    _remove_stale_tmp(out)

    reader_opts = {k: options[k] for k in _READER_OPTIONS[fmt] if k in options}
    time_limit = options.get("time_limit")
    if time_limit is not None:
        reader_opts["time_limit"] = time_limit
    if time_limit == "auto" and fmt != "pymarl":
        raise DatasetError("time_limit='auto' only applies to pymarl buffers; pass the episode limit as a number")
    reader_opts["state"] = options.get("state", "auto")
    plan = _READERS[fmt](path, **reader_opts)

    meta: dict[str, Any] = {
        "env": options.get("env") or "unknown",
        "task": options.get("task") or "unknown",
        "quality": options.get("quality") or plan.quality or "unknown",
        "source": options.get("source") or fmt,
        "discrete": plan.discrete,
        "reward": "team reward of each step as stored in the source (return-to-go is a training-time option "
                  "of the scripts)",
        "env_options": dict(options.get("env_options") or {}),
        "provenance": {
            **dict(options.get("provenance") or {}),
            "converted_from": str(path.resolve()), "format": fmt, "source_key": key,
            "converter_version": CONVERTER_VERSION,
            "options": {k: v for k, v in options.items() if k not in ("provenance", "env_options")},
            "notes": plan.notes,
        },
    }
    if plan.n_actions is not None:
        meta["n_actions"] = int(plan.n_actions)
    E = len(plan.lengths)
    R = int(plan.lengths.sum()) + E
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    _fresh_tmp(tmp)
    try:
        writer = _NativeWriter(tmp, R, E)
        from tqdm import tqdm

        e0 = 0
        with tqdm(total=E, desc=f"converting {path.name}", unit="episode", disable=None, leave=False) as bar:
            for arrays in plan.chunks():
                n = arrays["obs"].shape[0]
                ds = OfflineDataset.from_padded(**arrays, lengths=plan.lengths[e0:e0 + n],
                                                terminated=plan.terminated[e0:e0 + n], meta=meta)
                writer.add(ds)
                e0 += n
                bar.update(n)
        writer.finish(meta)
        OfflineDataset.load(tmp, validate=False).validate(check_values=False)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # the temporary folder this call made
        raise
    if out.exists():  # an older conversion (our own dataset, checked above): only its files are removed
        _remove_dataset_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _finish_tmp(tmp, out)
    return out


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
@dataclass
class ConvertArgs:
    """Convert a public dataset into the native format (once) and print where it is."""

    path: tyro.conf.Positional[str]
    """the dataset: a file or a folder in any format of docs/datasets.md"""
    out: str | None = None
    """output folder (default: a hashed folder under the data cache)"""
    format: str | None = None
    """skip auto-detection: vault, omiga, pymarl, madt or comadice"""
    env: str | None = None
    """environment family recorded in meta.json (e.g. mamujoco)"""
    task: str | None = None
    """task recorded in meta.json (e.g. Hopper-3x1)"""
    quality: str | None = None
    """quality recorded in meta.json (e.g. expert)"""
    time_limit: int | None = None
    """episodes with exactly this many steps are time-limit cuts (0: off; default: the format's)"""
    state: str = "auto"
    """state construction: auto, first, concat or concat_obs"""
    uid: str | None = None
    """vault: which dataset of a .vlt folder"""
    final_obs_row: bool = False
    """vault: the row carrying the end flag is the final observation (OG-MARL's OMIGA MaMuJoCo copies)"""
    unsafe_pickle: bool = False
    """MADT: allow arbitrary pickled objects (only for files you trust)"""
    detect_only: bool = False
    """only print the detected format"""


def main(args: ConvertArgs) -> None:
    if args.detect_only:
        print(detect(args.path))
        return
    fmt = args.format or detect(args.path)
    opts: dict[str, Any] = {k: getattr(args, k) for k in ("env", "task", "quality", "time_limit")
                            if getattr(args, k) is not None}
    if args.state != "auto":
        opts["state"] = args.state
    if fmt == "vault":
        opts.update({k: getattr(args, k) for k in ("uid",) if getattr(args, k) is not None})
        if args.final_obs_row:
            opts["final_obs_row"] = True
    if fmt == "madt" and args.unsafe_pickle:
        opts["unsafe_pickle"] = True
    if args.format:
        opts["format"] = args.format
    out = convert(args.path, args.out, **opts)
    ds = OfflineDataset.load(out)
    print(out)
    print(ds)


if __name__ == "__main__":
    from common import friendly_errors

    with friendly_errors():
        main(tyro.cli(ConvertArgs))
