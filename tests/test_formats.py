"""Readers of public formats: each writer -> reader round trip gives back the episodes
(shapes, dtypes, boundaries, initial states, masks, terminal/timeout), and bad input gets
one clear line."""

import json
import os
import sys

import numpy as np
import pytest

from common import formats
from common.data import ARRAY_FIELDS, DatasetError, OfflineDataset, load_dataset

sys.path.insert(0, os.path.dirname(__file__))
from dataset_fixtures import expected, madt_episodes, make_episodes, pymarl_arrays, vault_streams  # noqa: E402


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFLINE_MARL_DATA", str(tmp_path / "cache"))


def assert_same(ds, exp):
    assert ds.n_episodes == exp.n_episodes
    for k in ARRAY_FIELDS:
        a, b = np.asarray(ds.arrays[k]), np.asarray(exp.arrays[k])
        assert a.dtype == b.dtype, k
        assert a.shape == b.shape, (k, a.shape, b.shape)
        assert np.array_equal(a, b), k
    # initial states are the episode starts of the expected episodes
    es = ds.episode_start[:-1]
    np.testing.assert_array_equal(ds.obs[es], exp.obs[exp.episode_start[:-1]])


def load(path, **options):
    out = formats.convert(path, **options)
    return OfflineDataset.load(out)


# ------------------------------------------------------------------------------------ vault
def test_vault_discrete_two_streams_round_trip(tmp_path):
    eps = make_episodes(E=8, seed=3)
    # stream b holds episodes b, b+2, ...; the longer stream is cut to the shorter one's
    # length (plus its 2 unfinished trailing steps), so its last episode is incomplete
    experience, T = vault_streams(eps, B=2, trailing=2)
    root = formats.write_vault(tmp_path / "3m.vlt", experience, uid="Good")
    assert (root / "metadata.json").is_file() and (root / "manifest.ocdbt").is_file()
    assert formats.detect(tmp_path / "3m.vlt") == "vault" and formats.detect(root) == "vault"
    ds = load(tmp_path / "3m.vlt")
    # expected: episodes of stream 0 then stream 1, each complete within the first T rows
    order = []
    for b in range(2):
        used = 0
        for ep in eps[b::2]:
            used += len(ep["reward"])
            if used <= T:
                order.append(ep)
    exp = expected(order, missing_final=True)
    assert_same(ds, exp)
    assert ds.meta["quality"] == "good" and ds.meta["provenance"]["format"] == "vault"
    assert ds.meta["n_actions"] == 4 and ds.discrete
    assert ds.terminal.any() and ds.timeout.any()


def test_vault_final_obs_row_continuous_time_limit_and_state(tmp_path):
    eps = make_episodes(E=6, A=2, seed=4, lengths=[5, 3, 5, 1, 4, 5])
    experience, T = vault_streams(eps, final_obs_row=True)
    del experience["infos"]["state"]  # the OMIGA copies store a per-agent vector; rebuild from obs
    experience["infos"]["state"] = experience["observations"][:, :, 0]
    formats.write_vault(tmp_path / "3hopper.vlt", experience, uid="Expert")
    ds = load(tmp_path / "3hopper.vlt", uid="expert", final_obs_row=True, time_limit=5, state="concat_obs",
              env="mamujoco", task="Hopper-3x1", env_options={"obs_mode": "omiga"})
    for ep in eps:  # these copies flag every end as terminal: only the time limit tells cuts apart
        ep["terminated"] = True
    exp = expected(eps, time_limit=5, state=lambda ep: ep["obs"].reshape(len(ep["obs"]), -1))
    assert_same(ds, exp)
    assert not ds.discrete and ds.act_dim == 2 and ds.state_dim == 3 * 4
    assert ds.timeout.sum() == 3 and ds.terminal.sum() == 3
    assert ds.meta["env_options"] == {"obs_mode": "omiga"} and ds.meta["task"] == "Hopper-3x1"


def test_vault_continuous_with_a_legal_action_mask(tmp_path):
    """A continuous vault that also stores a legal-action mask (all ones, as some recorders write):
    discrete vs continuous is decided by the actions ([B, T, N, A] floats), not by the mask."""
    eps = make_episodes(E=4, A=3, seed=6, lengths=[4, 2, 4, 3])
    experience, T = vault_streams(eps)
    experience["infos"]["legals"] = np.ones(experience["actions"].shape, np.float32)
    formats.write_vault(tmp_path / "c.vlt", experience, uid="Good")
    ds = load(tmp_path / "c.vlt")
    assert not ds.discrete and ds.act_dim == 3 and ds.n_transitions == sum(len(ep["reward"]) - (
        0 if ep["terminated"] else 1) for ep in eps)
    assert "ignored" in ds.meta["provenance"]["notes"]["legals"]


def test_vault_several_uids_need_a_choice(tmp_path):
    eps = make_episodes(E=3, seed=5)
    for uid in ("Good", "Poor"):
        formats.write_vault(tmp_path / "x.vlt", vault_streams(eps)[0], uid=uid)
    with pytest.raises(DatasetError, match="several datasets"):
        formats.convert(tmp_path / "x.vlt")
    with pytest.raises(DatasetError, match="no dataset 'Medium'"):
        formats.convert(tmp_path / "x.vlt", uid="Medium")
    assert load(tmp_path / "x.vlt", uid="poor").meta["quality"] == "poor"


# ------------------------------------------------------------------------------------ OMIGA
def test_omiga_hdf5_round_trip(tmp_path):
    eps = make_episodes(E=6, A=3, seed=6, per_agent_state=True, lengths=[4, 2, 4, 1, 3, 4])
    rows = {k: [] for k in "soard"}
    for ep in eps:
        L = len(ep["reward"])
        for t in range(L + 1):  # OMIGA stores the final observation as a row with d = 1
            rows["s"].append(ep["state"][t])
            rows["o"].append(ep["obs"][t])
            rows["a"].append(ep["actions"][t] if t < L else np.zeros_like(ep["actions"][0]))
            rows["r"].append([ep["reward"][t] if t < L else 0.0])
            rows["d"].append([float(t == L)])
    f = formats.write_omiga_hdf5(tmp_path / "Hopper-v2-3x1-expert.hdf5", **{k: np.array(v) for k, v in rows.items()})
    assert formats.detect(f) == "omiga"
    ds = load(f, time_limit=4)
    for ep in eps:  # OMIGA flags every end alike: all terminal but the time-limit ones
        ep["terminated"] = True
    exp = expected(eps, time_limit=4, state=lambda ep: ep["state"].reshape(len(ep["state"]), -1))
    assert_same(ds, exp)
    assert ds.state_dim == 3 * 5 and ds.meta["provenance"]["notes"]["state"].startswith("concatenation")


# ----------------------------------------------------------------------------------- pymarl
@pytest.mark.parametrize("variant", ["h5", "npy"])
def test_pymarl_round_trip(tmp_path, variant):
    T1 = 6
    eps = make_episodes(E=6, seed=7, lengths=[5, 2, 5, 1, 3, 5])
    for ep in eps:
        ep["terminated"] = ep["terminated"] and len(ep["reward"]) < T1 - 1
    # CFCQL (pymarl2, HDF5) leaves time-limit ends unflagged, AlberDICE (.npy) flags them
    arrays = pymarl_arrays(eps, T1, timeouts_flagged=variant == "npy")
    path = formats.write_pymarl(tmp_path / ("2s3z_medium.h5" if variant == "h5" else "buffer_mix"), arrays)
    assert formats.detect(path) == "pymarl"
    ds = load(path)  # time_limit="auto": a full buffer row is a time-limit cut
    exp = expected(eps, time_limit=T1 - 1)
    assert_same(ds, exp)
    assert ds.timeout.sum() >= 3 and ds.meta["provenance"]["notes"]["dropped_episodes"] == 1


def test_pymarl_time_limit_can_be_turned_off(tmp_path):
    eps = make_episodes(E=3, seed=8, lengths=[4, 4, 2])
    for ep in eps:
        ep["terminated"] = True
    path = formats.write_pymarl(tmp_path / "buf", pymarl_arrays(eps, 5, timeouts_flagged=True, empty=0))
    assert load(path).timeout.sum() == 2
    assert load(path, time_limit=0).timeout.sum() == 0


def test_pymarl_obs_from_state_when_obs_missing(tmp_path):
    eps = make_episodes(E=3, seed=9, N=2, o=5, S=5)
    for ep in eps:
        ep["obs"] = np.repeat(ep["state"][:, None], 2, axis=1)
    arrays = pymarl_arrays(eps, 8, timeouts_flagged=False, empty=0)
    del arrays["obs"]
    ds = load(formats.write_pymarl(tmp_path / "buf", arrays))
    assert_same(ds, expected(eps))


# ------------------------------------------------------------------------------------- MADT
def test_madt_round_trip_and_time_limit(tmp_path):
    eps = make_episodes(E=7, seed=10, lengths=[3, 6, 1, 6, 2, 4, 6])
    for ep in eps:  # MADT's done flag is set at every end, time limits included
        ep["terminated"] = True
    files = madt_episodes(eps)
    bad = [files[0][0], files[0][1][:-1], files[0][2]]  # agents disagree on the length: skipped
    path = formats.write_madt(tmp_path / "6h_vs_8z" / "good", files[:1] + [bad] + files[1:])
    assert formats.detect(path) == "madt"
    ds = load(path, time_limit=6)
    assert_same(ds, expected(eps, missing_final=True, time_limit=6))
    assert ds.meta["provenance"]["notes"]["dropped_episodes"] == 1
    assert ds.timeout.sum() == 3


class Opaque(list):
    """A class a safe unpickler does not know."""


def test_madt_refuses_arbitrary_objects_unless_trusted(tmp_path):
    eps = make_episodes(E=2, seed=11)
    files = madt_episodes(eps)
    files[0][0][0] = Opaque(files[0][0][0])
    path = formats.write_madt(tmp_path / "madt", files)
    one_line_error(formats.convert, path, match="--unsafe-pickle")
    assert load(path, unsafe_pickle=True).n_episodes == 2


def test_madt_code_running_pickle_is_refused_and_the_cli_takes_a_positional_path(tmp_path):
    """A MADT file whose pickle would run a command: refused in one line that names the trusted-file
    flag (not torch's advice to set weights_only=False), and nothing runs."""
    import subprocess
    import sys

    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    files = madt_episodes(make_episodes(E=2, seed=3))
    files[0][0][0] = Evil()
    path = formats.write_madt(tmp_path / "madt", files)
    proc = subprocess.run([sys.executable, "-m", "common.formats", str(path)], capture_output=True, text=True,
                          cwd=str(formats.Path(__file__).resolve().parents[1]), timeout=120)
    assert proc.returncode == 2 and not marker.exists()
    (line,) = proc.stderr.strip().splitlines()
    assert "--unsafe-pickle" in line and "weights_only" not in line


# --------------------------------------------------------------------------------- ComaDICE
def test_comadice_discrete_round_trip(tmp_path):
    eps = make_episodes(E=6, seed=12, lengths=[4, 1, 4, 2, 3, 4])
    E, T = len(eps), 4
    N, o = eps[0]["obs"].shape[1:]
    arr = dict(states=np.zeros((E, T + 1, 5), np.float32), obs=np.zeros((E, T + 1, N, o), np.float32),
               avails=np.zeros((E, T + 1, N, 4), np.int64), actions=np.zeros((E, T, N), np.float32),
               rewards=np.zeros((E, T), np.float32), dones=np.zeros((E, T), np.float32),
               actives=np.zeros((E, T), bool))
    for e, ep in enumerate(eps):
        L = len(ep["reward"])
        arr["states"][e, : L + 1], arr["obs"][e, : L + 1] = ep["state"], ep["obs"]
        arr["avails"][e, : L + 1] = ep["avail"]
        arr["actions"][e, :L], arr["rewards"][e, :L] = ep["actions"], ep["reward"]
        arr["dones"][e, L - 1:] = ep["terminated"]
        arr["actives"][e, :L] = True
    path = formats.write_comadice(tmp_path / "5m_vs_6m_medium.npz", **arr)
    assert formats.detect(path) == "comadice"
    assert_same(load(path), expected(eps))


def test_comadice_continuous_per_agent_state(tmp_path):
    eps = make_episodes(E=4, A=2, seed=13, per_agent_state=True, lengths=[3, 2, 3, 1])
    E, T = len(eps), 3
    N, o = eps[0]["obs"].shape[1:]
    arr = dict(states=np.zeros((E, T + 1, N, 5), np.float32), obs=np.zeros((E, T + 1, N, o), np.float32),
               actions=np.zeros((E, T + 1, N, 2), np.float32), rewards=np.zeros((E, T), np.float32),
               dones=np.zeros((E, T), np.float32), actives=np.zeros((E, T), bool))
    for e, ep in enumerate(eps):
        L = len(ep["reward"])
        arr["states"][e, : L + 1], arr["obs"][e, : L + 1] = ep["state"], ep["obs"]
        arr["actions"][e, :L], arr["rewards"][e, :L] = ep["actions"], ep["reward"]
        arr["dones"][e, L - 1] = ep["terminated"]
        arr["actives"][e, :L] = True
    ds = load(formats.write_comadice(tmp_path / "Hopper-v2-3x1-expert.npz", **arr), time_limit=3)
    assert_same(ds, expected(eps, time_limit=3, state=lambda ep: ep["state"].reshape(len(ep["state"]), -1)))


# ------------------------------------------------------------------------- caching & loading
def test_convert_once_and_redo_when_the_source_changes(tmp_path):
    eps = make_episodes(E=3, seed=14)
    path = formats.write_pymarl(tmp_path / "buf", pymarl_arrays(eps, 7, timeouts_flagged=False))
    out1 = formats.convert(path)
    stamp = (out1 / "meta.json").stat().st_mtime_ns
    assert formats.convert(path) == out1 and (out1 / "meta.json").stat().st_mtime_ns == stamp
    assert load_dataset(path).n_episodes == 3  # common.data.load_dataset converts foreign paths
    assert formats.convert(out1) == out1  # native: returned as it is
    out2 = formats.convert(path, time_limit=0)  # other options: another conversion
    assert out2 != out1
    st = (path / "reward.npy").stat()
    os.utime(path / "reward.npy", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert formats.convert(path) != out1
    explicit = formats.convert(path, tmp_path / "native")
    assert explicit == tmp_path / "native" and formats.convert(path, tmp_path / "native") == explicit
    assert json.loads((explicit / "meta.json").read_text())["provenance"]["converted_from"] == str(path.resolve())


def test_zip_archive_is_unpacked(tmp_path):
    import shutil

    eps = make_episodes(E=3, seed=15)
    formats.write_vault(tmp_path / "src" / "2s3z.vlt", vault_streams(eps)[0], uid="Medium")
    archive = shutil.make_archive(str(tmp_path / "2s3z"), "zip", tmp_path / "src")
    assert formats.detect(archive) == "zip"
    assert load(archive).meta["quality"] == "medium"
    # unpacking never replaces a folder that is already there (the caller's own or anyone's)
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "thesis.tex").write_text("x")
    with pytest.raises(DatasetError, match="never replaces"):
        formats.unpack(archive, tmp_path / "dest")
    assert (tmp_path / "dest" / "thesis.tex").read_text() == "x"
    # a folder where the temporary one would go: removed only if an earlier unpack made it
    (tmp_path / "d2.unpacking").mkdir()
    (tmp_path / "d2.unpacking" / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="not made by offline-marl"):
        formats.unpack(archive, tmp_path / "d2")
    assert (tmp_path / "d2.unpacking" / "notes.txt").read_text() == "mine"
    (tmp_path / "d3.unpacking").mkdir()
    (tmp_path / "d3.unpacking" / formats._TMP_MARK).touch()  # a killed earlier unpack's leftover
    formats.unpack(archive, tmp_path / "d3")
    assert not (tmp_path / "d3.unpacking").exists() and not (tmp_path / "d3" / formats._TMP_MARK).exists()


# --------------------------------------------------------------------------------- bad input
def one_line_error(fn, *args, match=None, **kwargs):
    with pytest.raises(DatasetError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg and len(msg) < 600, msg
    if match:
        assert match in msg, msg
    return msg


def test_wrong_path_and_unknown_format(tmp_path):
    one_line_error(formats.convert, tmp_path / "nothing", match="no dataset at")
    (tmp_path / "notes.txt").write_text("hello")
    one_line_error(formats.convert, tmp_path / "notes.txt", match="cannot tell the format")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "a.csv").write_text("1,2")
    one_line_error(formats.detect, tmp_path / "dir", match="cannot tell the format")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    one_line_error(formats.detect, tmp_path / "other.npz", match="not a ComaDICE dataset")
    path = formats.write_pymarl(tmp_path / "buf", pymarl_arrays(make_episodes(E=2), 7, timeouts_flagged=False))
    one_line_error(formats.convert, path, match="unknown option", uid="x")
    one_line_error(formats.convert, path, match="unknown dataset format", format="csv")


def truncate(f):
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def test_truncated_or_corrupt_files(tmp_path):
    eps = make_episodes(E=3, A=2, seed=16, per_agent_state=True)
    rows = {k: [] for k in "soard"}
    for ep in eps:
        for t in range(len(ep["reward"]) + 1):
            rows["s"].append(ep["state"][t]), rows["o"].append(ep["obs"][t])
            rows["a"].append(ep["actions"][min(t, len(ep["reward"]) - 1)])
            rows["r"].append([0.0]), rows["d"].append([float(t == len(ep["reward"]))])
    h5 = formats.write_omiga_hdf5(tmp_path / "o.hdf5", **{k: np.array(v) for k, v in rows.items()})
    truncate(h5)
    one_line_error(formats.convert, h5, format="omiga", match=str(h5))

    npz = formats.write_comadice(tmp_path / "c.npz", obs=np.zeros((2, 3, 2, 2)), actions=np.zeros((2, 2, 2)),
                                 rewards=np.zeros((2, 2)), dones=np.ones((2, 2)), actives=np.ones((2, 2), bool))
    truncate(npz)
    one_line_error(formats.convert, npz, format="comadice", match="c.npz")

    deps = make_episodes(E=3, seed=17)
    buf = formats.write_pymarl(tmp_path / "buf", pymarl_arrays(deps, 7, timeouts_flagged=False))
    truncate(buf / "obs.npy")
    one_line_error(formats.convert, buf, match="buf")

    madt = formats.write_madt(tmp_path / "madt", madt_episodes(deps))
    truncate(madt / "1.pkl")
    one_line_error(formats.convert, madt, format="madt", match="1.pkl")

    root = formats.write_vault(tmp_path / "v.vlt", vault_streams(deps)[0], uid="Good")
    for f in (root / "d").iterdir():
        truncate(f)
    one_line_error(formats.convert, tmp_path / "v.vlt", match="vault")
    (root / "manifest.ocdbt").unlink()
    one_line_error(formats.convert, root, format="vault", match="vault")


def test_missing_optional_packages_name_the_extra(tmp_path, monkeypatch):
    eps = make_episodes(E=2, seed=18)
    formats.write_vault(tmp_path / "v.vlt", vault_streams(eps)[0], uid="Good")
    h5 = formats.write_pymarl(tmp_path / "b.h5", pymarl_arrays(eps, 7, timeouts_flagged=False))
    monkeypatch.setitem(sys.modules, "tensorstore", None)  # import tensorstore -> ImportError
    monkeypatch.setitem(sys.modules, "h5py", None)
    one_line_error(formats.convert, tmp_path / "v.vlt", match='pip install "offline-marl[vault]"')
    one_line_error(formats.convert, h5, match='pip install "offline-marl[hdf5]"')


def test_cli_converts_and_detects(tmp_path, capsys):
    eps = make_episodes(E=2, seed=19)
    path = formats.write_pymarl(tmp_path / "buf", pymarl_arrays(eps, 7, timeouts_flagged=False))
    formats.main(formats.ConvertArgs(path=str(path), detect_only=True))
    assert capsys.readouterr().out.strip() == "pymarl"
    formats.main(formats.ConvertArgs(path=str(path), out=str(tmp_path / "n"), env="matrix", task="xor", quality="a"))
    out = capsys.readouterr().out
    assert str(tmp_path / "n") in out and "matrix/xor/a" in out


def test_parallel_conversions_of_one_source_run_once(tmp_path, monkeypatch):
    import threading
    import time

    eps = make_episodes(E=3, seed=20)
    path = formats.write_pymarl(tmp_path / "buf", pymarl_arrays(eps, 7, timeouts_flagged=False))
    real, calls = formats._READERS["pymarl"], []

    def slow_reader(*args, **kwargs):
        calls.append(1)
        time.sleep(0.3)  # both threads are inside convert by now
        return real(*args, **kwargs)

    monkeypatch.setitem(formats._READERS, "pymarl", slow_reader)
    outs = []
    threads = [threading.Thread(target=lambda: outs.append(formats.convert(path))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(outs) == 2 and outs[0] == outs[1]
