"""Known datasets: (env, task, quality) -> a native dataset directory.

``resolve(env, task, quality, dataset=None)`` finds the data, in this order:

1. ``dataset`` when given (any format of ``common.formats``, converted once);
2. the cache ``data_dir()/<env>/<task>/<quality>/`` (a native directory);
3. a local generation recipe of ``common.collect`` (matrix games, Bridge, random data, ...),
   written into the cache;
4. a public download (OG-MARL's vaults on Hugging Face), or a file the user fetched by hand
   from an original source and placed under ``data_dir()/manual/<source>/``;
5. otherwise a ``DatasetError`` that lists what exists for that env/task and how to pass
   ``--dataset PATH`` or generate data locally.

Names users can type: OG-MARL's scenario and dataset names (``3hopper``, ``Good``) map to
ours (``Hopper-3x1``, ``good``). When several sources publish the same quality for a task,
a bare quality (``medium``) takes the first source in ``SOURCE_PRIORITY``; ``<source>/<quality>``
(``og_marl/medium``) names one explicitly and always means that download.

``python -m common.catalog list [--env E] [--task T]`` prints the table;
``python -m common.catalog get ENV TASK QUALITY`` fetches one dataset and prints its path.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from common.data import DatasetError, OfflineDataset, data_dir

HF = "https://huggingface.co/datasets/InstaDeepAI/og-marl/resolve/main/"
OMIGA_MAMUJOCO_PAGE = "https://cloud.tsinghua.edu.cn/d/dcf588d659214a28a777/"
OMIGA_SMAC_PAGE = "https://cloud.tsinghua.edu.cn/d/f3c509d7a9d54ccd89c4/"
CFCQL_PAGE = "https://drive.google.com/file/d/1Hn0CxnGDiwF9i7ugiLCyUYz-GzIkdQeD/view?usp=sharing"

# a bare quality name resolves to the first of these sources that has it; originals placed by
# hand come before OG-MARL's converted copies of the same data
SOURCE_PRIORITY = ("omiga-hdf5", "omiga-madt", "omiga", "cfcql-h5", "cfcql", "alberdice", "omar", "og_marl",
                   "og_marl_legacy")
# quality names generate() may be asked for, used to list local recipes in messages
LOCAL_QUALITIES = ("a", "b", "c", "d", "optimal", "mix", "optimal-l20", "mix-l20", "random", "expert", "medium",
                   "medium-replay", "medium-expert", "expert-alberdice", "medium-alberdice", "mix-alberdice")

# SMAC episode limits (smac/smacv2 map registries): time-limit endings of these vaults are
# stored as terminal, so episodes of exactly this length are re-labelled as time-limit cuts
SMACV1_LIMITS = {"3m": 60, "8m": 120, "5m_vs_6m": 70, "2s3z": 120, "3s5z_vs_3s6z": 170, "27m_vs_30m": 180,
                 "2c_vs_64zg": 400, "6h_vs_8z": 150, "3s_vs_5z": 250, "corridor": 400}
SMACV2_LIMIT = 200
MAMUJOCO_LIMIT = 1000


@dataclass
class Entry:
    """One known dataset."""

    env: str
    task: str
    quality: str  # lowercase; "*": every dataset of the archive (its uids are not documented)
    source: str
    url: str | None  # a zip to download; None: fetched by hand (see ``how``)
    member: str  # the dataset inside the unpacked archive, or the file/folder under manual/<source>/
    options: dict[str, Any] = field(default_factory=dict)  # common.formats.convert options
    env_options: dict[str, Any] = field(default_factory=dict)
    how: str = ""  # manual sources: how to get the file
    page: str = ""  # manual sources: the page to download from
    note: str = ""

    @property
    def name(self) -> str:
        return f"{self.source}/{self.quality}"

    @property
    def manual_path(self) -> Path:
        return data_dir() / "manual" / self.source / self.member

    def describe(self) -> str:
        where = "download" if self.url else f"by hand: {self.how}, then put it at {self.manual_path}"
        return f"{self.env}/{self.task}/{self.name} ({where})"


# ------------------------------------------------------------------------------- the table
_OG_TASKS = {  # OG-MARL scenario -> our task name
    "3hopper": "Hopper-3x1", "2ant": "Ant-2x4", "4ant": "Ant-4x2", "6halfcheetah": "HalfCheetah-6x1",
    "2halfcheetah": "HalfCheetah-2x3", "2walker": "Walker2d-2x3",
}
_ENV_ALIASES = {"smac_v1": "smacv1", "smac": "smacv1", "smac_v2": "smacv2", "gymnasium_mamujoco": "mamujoco",
                "ma_mujoco": "mamujoco", "matrix_game": "matrix", "warehouse": "rware"}


def _vaults(source: str, hf_dir: str, env: str, scenarios: dict[str, tuple[str, ...]], *, env_options=None,
            time_limit=None, note: str = "", **options: Any) -> list[Entry]:
    out = []
    for scenario, uids in scenarios.items():
        task = _OG_TASKS.get(scenario, scenario)
        limit = time_limit(scenario) if callable(time_limit) else time_limit
        opts = dict(options, **({"time_limit": limit} if limit else {}))
        for uid in uids or ("*",):
            out.append(Entry(env, task, uid.lower(), source, f"{HF}{hf_dir}/{scenario}.zip",
                             f"{scenario}.vlt/{uid}" if uid != "*" else f"{scenario}.vlt",
                             dict(opts, uid=uid) if uid != "*" else opts, dict(env_options or {}), note=note))
    return out


def _table() -> list[Entry]:
    gmp, smac = ("Good", "Medium", "Poor"), lambda s: SMACV1_LIMITS.get(s)
    omiga_mj = ("Expert", "Medium", "Medium-Expert", "Medium-Replay")
    mix4 = ("Expert", "Medium", "Medium-Replay", "Mixed")
    omar4 = ("Expert", "Medium", "Medium-Replay", "Random")
    local1 = {"obs_mode": "local", "agent_obsk": 1}
    e: list[Entry] = []
    # OG-MARL core
    e += _vaults("og_marl", "core/smac_v1", "smacv1", {s: gmp for s in ("3m", "8m", "5m_vs_6m", "2s3z",
                                                                        "3s5z_vs_3s6z")}, time_limit=smac)
    e += _vaults("og_marl", "core/smac_v2", "smacv2", {"terran_5_vs_5": ("Replay", "Random"),
                                                       "terran_10_vs_10": ("Replay",), "zerg_5_vs_5": ("Replay",)},
                 time_limit=SMACV2_LIMIT)
    e += _vaults("og_marl", "core/gymnasium_mamujoco", "mamujoco",
                 {"2halfcheetah": ("Replay",),
                  **{s: () for s in ("2ant", "2walker", "3hopper", "4ant", "6halfcheetah")}},
                 env_options=local1, time_limit=MAMUJOCO_LIMIT,
                 note="gymnasium-robotics MaMuJoCo (mamujoco_v0), agent_obsk=1; dataset names other than Replay "
                      "are listed after download")
    e += _vaults("og_marl_legacy", "core/mamujoco", "mamujoco", {"2halfcheetah": gmp, "2ant": ()},
                 env_options=local1, time_limit=MAMUJOCO_LIMIT,
                 note="recorded on MaMuJoCo v1.1 / MuJoCo 2.1 (mujoco-py); the gymnasium-robotics environment "
                      "is its successor and its observations may differ")
    e += _vaults("og_marl", "core/flatland", "flatland", {"20_trains": (), "30_trains": ()},
                 note="no flatland environment in this project: train only")
    # OG-MARL copies of prior work
    e += _vaults("omiga", "prior_work/omiga/mamujoco", "mamujoco",
                 {s: omiga_mj for s in ("3hopper", "2ant", "6halfcheetah")}, env_options={"obs_mode": "omiga"},
                 time_limit=MAMUJOCO_LIMIT, final_obs_row=True, state="concat_obs",
                 note="OMIGA's MaMuJoCo data; the final observation is stored as the row with the end flag and "
                      "the state is rebuilt as the concatenation of the agents' observations (OMIGA's state)")
    e += _vaults("omiga", "prior_work/omiga/smac_v1", "smacv1",
                 {s: gmp for s in ("2c_vs_64zg", "6h_vs_8z", "5m_vs_6m", "corridor")}, time_limit=smac,
                 note="1000-episode samples of the MADT datasets")
    e += _vaults("cfcql", "prior_work/cfcql/smac_v1", "smacv1",
                 {s: mix4 for s in ("6h_vs_8z", "3s_vs_5z", "5m_vs_6m", "2s3z")}, time_limit=smac)
    e += _vaults("alberdice", "prior_work/alberdice/rware", "rware",
                 {s: ("Expert",) for s in ("small-2ag", "small-4ag", "small-6ag", "tiny-2ag", "tiny-4ag", "tiny-6ag")},
                 time_limit=500, note="AlberDICE's warehouse variant; check_env tells if the rware package differs")
    e += _vaults("omar", "prior_work/omar/mpe", "mpe", {s: omar4 for s in ("simple_spread", "simple_tag",
                                                                           "simple_world")},
                 time_limit=25, note="no MPE environment in this project: train only")
    e += _vaults("omar", "prior_work/omar/mamujoco", "mamujoco", {"2halfcheetah": omar4}, time_limit=MAMUJOCO_LIMIT,
                 env_options={"obs_mode": "local", "agent_obsk": 0, "global_categories": []},
                 note="OMAR's MaMuJoCo, agent_obsk=0 without global categories (the CFCQL continuous experiments)")
    # original sources, fetched by hand
    for task, stem in (("Hopper-3x1", "Hopper-v2-3x1"), ("Ant-2x4", "Ant-v2-2x4"),
                       ("HalfCheetah-6x1", "HalfCheetah-v2-6x1")):
        for q in ("expert", "medium", "medium-expert", "medium-replay"):
            e.append(Entry("mamujoco", task, q, "omiga-hdf5", None, f"{stem}-{q}.hdf5",
                           {"time_limit": MAMUJOCO_LIMIT}, {"obs_mode": "omiga"},
                           how=f"download {stem}-{q}.hdf5 from {OMIGA_MAMUJOCO_PAGE}", page=OMIGA_MAMUJOCO_PAGE))
    for m in ("2c_vs_64zg", "6h_vs_8z", "5m_vs_6m", "corridor"):
        for q in ("good", "medium", "poor"):
            e.append(Entry("smacv1", m, q, "omiga-madt", None, f"{m}/{q}", {"time_limit": SMACV1_LIMITS[m]},
                           how=f"download the {m}/{q} episode folder from {OMIGA_SMAC_PAGE}", page=OMIGA_SMAC_PAGE))
    for m in ("6h_vs_8z", "3s_vs_5z", "5m_vs_6m", "2s3z"):
        for q in ("expert", "medium", "medium-replay", "mixed"):
            e.append(Entry("smacv1", m, q, "cfcql-h5", None, f"{m}_{q.replace('-', '_')}.h5",
                           {"time_limit": SMACV1_LIMITS[m]},
                           how=f"download sc2datasets from {CFCQL_PAGE} and unpack {m}_{q.replace('-', '_')}.h5",
                           page=CFCQL_PAGE))
    return e


ENTRIES: list[Entry] = _table()


# ------------------------------------------------------------------------------- names
def _canon_env(env: str) -> str:
    e = env.strip().lower()
    return _ENV_ALIASES.get(e, e)


def _canon_task(env: str, task: str) -> str:
    t = task.strip()
    known = {x.task for x in ENTRIES if x.env == env}
    if env == "lbf" and t.startswith("Foraging-") and t.endswith("-v3"):  # lbforaging's gymnasium id
        t = t[len("Foraging-"):-len("-v3")]
    if env == "mamujoco":
        t = _OG_TASKS.get(t.lower(), t)
        if "-v" in t:  # OMIGA's Hopper-v2-3x1
            name, _, rest = t.partition("-v")
            t = f"{name}-{rest.partition('-')[2]}"
    for k in known:
        if k.lower() == t.lower():
            return k
    return t


def _canon_quality(quality: str) -> tuple[str | None, str]:
    """``(source or None, quality)``: lowercase, ``_`` -> ``-``, optional ``source/`` prefix."""
    q = quality.strip()
    source = None
    if "/" in q:
        source, q = q.split("/", 1)
        source = source.strip().lower()
    return source, q.strip().lower().replace("_", "-")


def _cache_dir(env: str, task: str, source: str | None, quality: str) -> Path:
    base = data_dir() / env / task
    return base / source / quality if source else base / quality


def _is_native(p: Path) -> bool:
    return (p / "meta.json").is_file() and (p / "episode_start.npy").is_file()


def available(env: str | None = None, task: str | None = None) -> list[Entry]:
    """The known public datasets, optionally for one env (and task)."""
    out = ENTRIES
    if env is not None:
        env = _canon_env(env)
        out = [e for e in out if e.env == env]
        if task is not None:
            task = _canon_task(env, task)
            out = [e for e in out if e.task == task]
    return list(out)


def _candidates(env: str, task: str, source: str | None, quality: str) -> list[Entry]:
    entries = available(env, task)
    exact = [e for e in entries if e.quality == quality and (source is None or e.source == source)]
    wild = [e for e in entries if e.quality == "*" and (source is None or e.source == source)]
    rank = {s: i for i, s in enumerate(SOURCE_PRIORITY)}
    return sorted(exact, key=lambda e: rank.get(e.source, 99)) + sorted(wild, key=lambda e: rank.get(e.source, 99))


# ------------------------------------------------------------------------------- collect hook
def _collect():
    """``common.collect`` when it exists and has the generation hook, else None."""
    mod = sys.modules.get("common.collect")
    if mod is None:
        if importlib.util.find_spec("common.collect") is None:
            return None
        mod = importlib.import_module("common.collect")
    return mod if hasattr(mod, "has_recipe") and hasattr(mod, "generate") else None


def _local_recipes(env: str, task: str) -> list[str]:
    collect = _collect()
    if collect is None:
        return []
    try:
        return [q for q in LOCAL_QUALITIES if collect.has_recipe(env, task, q)]
    except Exception:  # a recipe check must never hide the real message
        return []


# ------------------------------------------------------------------------------- download
_urlopen = urllib.request.urlopen  # tests replace this with a fake opener


def _download(url: str, dest: Path) -> Path:
    """Download ``url`` to ``dest`` with a progress bar; a partial ``.part`` file from an
    interrupted run is resumed with an HTTP Range request when the server allows it."""
    from tqdm import tqdm

    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "offline-marl"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        resp = _urlopen(urllib.request.Request(url, headers=headers), timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to fetch
            os.replace(part, dest)
            return dest
        raise DatasetError(f"could not download {url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DatasetError(f"could not download {url} ({reason}); are you offline?") from None
    with resp:
        status = getattr(resp, "status", None) or resp.getcode()
        size = resp.headers.get("Content-Length")
        if status != 206:
            have = 0  # the server sent the whole file
        total = have + int(size) if size is not None else None
        try:
            with open(part, "ab" if have else "wb") as f, tqdm(total=total, initial=have, unit="B", unit_scale=True,
                                                                unit_divisor=1024, desc=dest.name) as bar:
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
        except (urllib.error.URLError, OSError) as e:
            raise DatasetError(f"the download of {url} stopped ({getattr(e, 'reason', e)}); run again to resume") \
                from None
    if total is not None and part.stat().st_size != total:
        raise DatasetError(f"the download of {url} is incomplete ({part.stat().st_size} of {total} bytes); "
                           "run again to resume")
    os.replace(part, dest)
    return dest


def _archive_dir(entry: Entry) -> Path:
    rel = entry.url[len(HF):] if entry.url.startswith(HF) else entry.url.rsplit("/", 1)[-1]
    return data_dir() / "downloads" / Path(rel).with_suffix("")


def _fetch_archive(entry: Entry) -> Path:
    """The unpacked archive of ``entry`` (downloaded and unpacked once)."""
    from common import formats

    folder = _archive_dir(entry)
    with formats.file_lock(folder):
        if not folder.is_dir():
            archive = folder.with_suffix(".zip")
            if not archive.is_file():
                _download(entry.url, archive)
            formats.unpack(archive, folder)
            archive.unlink()
    return folder


def _find(folder: Path, member: str) -> Path:
    """``member`` inside an unpacked archive, wherever the archive put its top folder."""
    if (folder / member).exists():
        return folder / member
    head, _, rest = member.partition("/")
    for p in folder.rglob(head):
        if (p / rest).exists():
            return p / rest
    raise DatasetError(f"{folder} has no {member}; delete the folder to download it again")


def _convert(entry: Entry, src: Path, out: Path, quality: str) -> Path:
    from common import formats

    path = formats.convert(src, out, env=entry.env, task=entry.task, quality=quality, source=entry.source,
                           env_options=entry.env_options, provenance={"catalog": entry.name, "url": entry.url or
                                                                      entry.how, "note": entry.note},
                           **entry.options)
    _settle_ant_model(path)
    return path


def _settle_ant_model(path: Path) -> None:
    """Record which Ant model an OMIGA-style Ant dataset was recorded with.

    Under MuJoCo 2.0 (OMIGA's mujoco-py) Ant-v2's 84 contact-force entries are all zero;
    after OMIGA's per-vector z-scoring, entries 27..110 of every observation are then equal
    within the row (docs/environments.md). That decides ``ant_contact_forces`` in
    ``env_options``, so that ``make_env_for(meta)`` evaluates on the same model."""
    meta_file = path / "meta.json"
    meta = json.loads(meta_file.read_text())
    opts = dict(meta.get("env_options") or {})
    if (meta.get("env") != "mamujoco" or not str(meta.get("task", "")).startswith("Ant-")
            or opts.get("obs_mode", "omiga") != "omiga" or "ant_contact_forces" in opts):
        return
    obs = np.load(path / "obs.npy", mmap_mode="r")
    if obs.shape[2] != 113:  # 111 Ant-v4/v2 entries + 2 agent ids
        return
    rows = np.unique(np.linspace(0, len(obs) - 1, num=min(len(obs), 4096)).astype(np.int64))
    zero = bool(np.ptp(np.asarray(obs[rows])[:, :, 27:111], axis=2).max() < 1e-6)
    opts["ant_contact_forces"] = not zero
    meta["env_options"] = opts
    meta.setdefault("provenance", {}).setdefault("notes", {})["ant_contact_forces"] = (
        "observation entries 27..110 are constant within every sampled row: contact forces were zero "
        "(MuJoCo 2.0 Ant-v2)" if zero else "contact-force entries vary: recorded with contact forces")
    tmp = meta_file.with_name("meta.json.tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, meta_file)


def _from_entry(entry: Entry, quality: str, out: Path) -> Path:
    if entry.url is None:
        return _convert(entry, entry.manual_path, out, quality)
    folder = _fetch_archive(entry)
    if entry.quality != "*":
        return _convert(entry, _find(folder, entry.member), out, quality)
    vault = _find(folder, entry.member)
    uids = sorted(p.name for p in vault.iterdir() if p.is_dir())
    match = [u for u in uids if u.lower() == quality]
    if not match:
        raise DatasetError(f"{entry.env}/{entry.task} from {entry.source} has no dataset {quality!r}; "
                           f"it has {[u.lower() for u in uids]}")
    e = Entry(**{**entry.__dict__, "quality": quality, "options": dict(entry.options, uid=match[0])})
    return _convert(e, vault, out, quality)


# ------------------------------------------------------------------------------- resolve
def _family_options(env: str, task: str) -> dict[str, Any]:
    """Conversion options implied by the environment family for a user's ``--dataset``."""
    if env == "smacv1" and task in SMACV1_LIMITS:
        return {"time_limit": SMACV1_LIMITS[task]}
    if env == "smacv2":
        return {"time_limit": SMACV2_LIMIT}
    if env == "mamujoco":
        return {"time_limit": MAMUJOCO_LIMIT}
    return {}


def _missing(env: str, task: str, source: str | None, quality: str, why: str = "") -> DatasetError:
    name = f"{env}/{task}/{source + '/' if source else ''}{quality}"
    hint = ("pass --dataset PATH (any format in docs/datasets.md) or generate data locally with "
            "python -m common.collect")
    learn = (f"python -m common.collect learn --env {env} --task {task} --quality {quality}" +
             (f" (a {source}/ name is a download: drop the prefix)" if source else ""))
    if env == "smacv2" and task.startswith("protoss"):
        return DatasetError(f"SMACv2 {task} has no public offline dataset (OG-MARL publishes terran_5_vs_5, "
                            "terran_10_vs_10 and zerg_5_vs_5; ComaDICE's SMACv2 data is available from its authors "
                            "on request): record one as ComaDICE did (MAPPO for 10M steps, 1,000 trajectories spread "
                            f"over the run; needs StarCraft II) with {learn}, which writes it where this command "
                            "looks, or pass --dataset PATH")
    entries = available(env, task)
    recipes = _local_recipes(env, task)
    if not entries and not recipes:
        tasks = sorted({e.task for e in available(env)})
        known = f"known {env} tasks: {', '.join(tasks)}" if tasks else \
            f"known envs: {', '.join(sorted({e.env for e in ENTRIES}))}"
        return DatasetError(f"no dataset is known for {name} ({known}); {hint}")
    rank = {s: i for i, s in enumerate(SOURCE_PRIORITY)}
    have = []
    for src in sorted({e.source for e in entries}, key=lambda x: rank.get(x, 99)):
        es = [e for e in entries if e.source == src]
        qs = ", ".join(e.quality for e in es if e.quality != "*") or "names listed after download"
        where = "download" if es[0].url else f"by hand from {es[0].page} into {data_dir() / 'manual' / src}"
        have.append(f"{src}: {qs} ({where})")
    if recipes:
        have.append(f"generated locally: {', '.join(recipes)}")
    lead = f"{why}; " if why else f"no dataset {name}; "
    if env in ("smacv1", "smacv2"):
        hint += f", e.g. a MAPPO learning run as ComaDICE's SMACv2 data: {learn}"
    return DatasetError(f"{lead}{env}/{task} has: {'; '.join(have)}; or {hint}")


def resolve(env: str, task: str, quality: str, dataset: str | None = None, *, download: bool = True,
            generate: bool = True) -> Path:
    """Path of a native-format dataset for (env, task, quality): ``dataset`` when given
    (converted once if it is in a foreign format), else the cache, else a local generation
    recipe, else a download (or a file placed by hand under ``data_dir()/manual``). Raises
    ``DatasetError`` listing what exists otherwise."""
    from common import formats

    env = _canon_env(env)
    task = _canon_task(env, task)
    source, q = _canon_quality(quality)
    if dataset:
        path = Path(dataset).expanduser()
        fmt = formats.detect(path)
        if fmt != "native":
            opts = dict(_family_options(env, task), env=env, task=task, quality=q)
            if fmt == "omiga":
                opts["env_options"] = {"obs_mode": "omiga"}
            if fmt == "pymarl":
                opts.pop("time_limit", None)  # pymarl buffers carry their episode limit
            path = formats.convert(path, format=fmt, **opts)
            _settle_ant_model(path)
        meta = OfflineDataset.load(path, validate=False).meta
        for k, want in (("env", env), ("task", task)):
            have = str(meta.get(k, "unknown"))
            if have not in ("unknown", want):
                raise DatasetError(f"--dataset {dataset} holds {meta.get('env')}/{meta.get('task')} data, "
                                   f"not {env}/{task}")
        return path
    out = _cache_dir(env, task, source, q)
    if _is_native(out):
        return out
    with formats.file_lock(out):  # parallel runs make the dataset once; the others then find it
        return _make(env, task, source, q, out, download, generate)


def _make(env: str, task: str, source: str | None, q: str, out: Path, download: bool, generate: bool) -> Path:
    if _is_native(out):
        return out
    if source is None and generate:
        collect = _collect()
        if collect is not None and collect.has_recipe(env, task, q):
            return Path(collect.generate(env, task, q, out=out, seed=0))
    candidates = _candidates(env, task, source, q)
    why = ""
    for entry in candidates:
        if entry.url is None:
            if entry.manual_path.exists():
                return _from_entry(entry, q, out)
            continue
        if not download:
            raise _missing(env, task, source, q, f"{env}/{task}/{entry.name} is not in the cache "
                                                 "and downloads are off")
        try:
            return _from_entry(entry, q, out)
        except DatasetError as e:
            if entry.quality == "*" and "has no dataset" in str(e):
                why = str(e)
                continue  # another archive may hold it
            raise _missing(env, task, source, q, str(e)) from None
    raise _missing(env, task, source, q, why)


def load(env: str, task: str, quality: str, dataset: str | None = None, **kwargs) -> OfflineDataset:
    """``OfflineDataset.load(resolve(...))``."""
    return OfflineDataset.load(resolve(env, task, quality, dataset), **kwargs)


# ------------------------------------------------------------------------------- command line
def list_datasets(env: str | None = None, task: str | None = None) -> None:
    """Print the known datasets (optionally of one env/task) and where they come from: local
    recipes first (generated on first use), then public downloads."""
    rows = []
    collect = _collect()
    if collect is not None:
        for (e, t, q), recipe in collect.RECIPES.items():
            if env in (None, e) and task in (None, t):
                rows.append((e, t, q, "generated", recipe.about))
    rows += [(e.env, e.task, e.name, "download" if e.url else "by hand", e.url or e.how) for e in available(env, task)]
    if not rows:
        print(f"no public dataset known for {env or ''}{'/' + task if task else ''}")
        return
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4])


def get(env: str, task: str, quality: str, /) -> None:
    """Fetch (download, generate or convert) one dataset into the cache and print its path."""
    path = resolve(env, task, quality)
    print(path)
    print(OfflineDataset.load(path))


def stats(env: str, task: str, quality: str, /, dataset: str | None = None) -> dict:
    """Print one JSON line of a dataset's statistics (episodes, transitions, episode return
    mean/std/min/max over every stored episode, episode lengths, terminal and timeout ends),
    fetching or generating it first; ``--dataset PATH`` reads that file instead."""
    ds = load(env, task, quality, dataset)
    out = {"env": env, "task": task, "quality": quality, **ds.summary(),
           "terminal_ends": int(np.asarray(ds.arrays["terminal"]).sum()),
           "timeout_ends": int(np.asarray(ds.arrays["timeout"]).sum())}
    print(json.dumps(out))
    return out


def cli(args: list[str] | None = None) -> None:
    """``python -m common.catalog {list,get,stats} ...``"""
    import tyro

    tyro.extras.subcommand_cli_from_dict({"list": list_datasets, "get": get, "stats": stats}, args=args,
                                         description="The known offline MARL datasets.")


if __name__ == "__main__":
    from common import friendly_errors

    with friendly_errors():
        cli()
