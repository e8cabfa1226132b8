"""common.benchmark: grid expansion, skip/resume, failure reports, aggregation math,
backends (local pool, submitit's local executor, a local Ray instance)."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from common import benchmark as bm
from common.runs import Run

REPO = Path(__file__).resolve().parent.parent

# A stand-in algorithm file with the real contract: the shared Args names, common.runs.Run,
# a checkpoint at every evaluation, --resume, done.json. Its evaluation return is
# seed + step / 100 (+ 10 for quality "good"), so aggregates have known answers.
FAKE_ALGO = textwrap.dedent('''
    import os, sys, time
    from dataclasses import dataclass
    from types import SimpleNamespace
    import torch
    import tyro
    from common.runs import Run

    @dataclass
    class Args:
        env: str = "bridge"
        task: str = "hard"
        quality: str = "mix"
        seed: int = 0
        device: str = "cpu"
        threads: int = 1
        total_steps: int = 400
        eval_every: int = 100
        resume: bool = False
        overwrite: bool = False
        run_dir: str = ""
        crash_after: int = -1   # exit(1) after this many evaluations unless resuming
        fail: bool = False
        sleep: float = 0.0      # seconds per evaluation (a run that takes a while)

    def main(a):
        if a.fail:
            print("something went wrong on purpose")
            raise SystemExit(3)
        run = Run(a, "ALGO", tensorboard=False)
        data = SimpleNamespace(generator=torch.Generator(), meta={"env": a.env, "task": a.task})
        run.start(data, None, None, dims={}, modules={})
        if os.environ.get("FAKE_PIDS"):  # tests: where each run writes its process id
            with open(os.path.join(os.environ["FAKE_PIDS"], f"{a.seed}"), "w") as f:
                f.write(str(os.getpid()))
        if run.finished_summary is not None:
            return run.finish()
        evals = run.progress.get("evals", 0)
        while run.step < a.total_steps:
            run.step += a.eval_every
            ret = a.seed + run.step / 100 + (10 if a.quality == "good" else 0)
            res = dict(returns=[ret, ret], won=None, return_mean=ret, return_std=0.0, length_mean=1.0)
            run.log_eval(run.step, res)
            evals += 1
            time.sleep(a.sleep)
            run.progress["evals"] = evals
            run.checkpoint()
            if a.crash_after >= 0 and evals >= a.crash_after and not a.resume:
                sys.exit(1)
        run.log_final(run.step, res)
        run.finish({"steps": run.step})

    if __name__ == "__main__":
        main(tyro.cli(Args))
''')


@pytest.fixture()
def algos(tmp_path, monkeypatch):
    paths = []
    for name in ("fake_a", "fake_b"):
        p = tmp_path / f"{name}.py"
        p.write_text(FAKE_ALGO.replace("ALGO", name))
        paths.append(str(p))
    monkeypatch.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return paths


def test_expand_grid_order_and_flags():
    specs = bm.expand_grid(["x.py", "baselines/y.py"], "bridge", ["hard"], ["mix", "optimal"], [0, 1],
                           extra=["--total-steps", "5"], algo_args={"x.py": ["--alpha", "3"]})
    assert len(specs) == 8
    assert [s.name for s in specs[:4]] == ["bridge__hard__mix__x__0", "bridge__hard__mix__x__1",
                                           "bridge__hard__optimal__x__0", "bridge__hard__optimal__x__1"]
    assert specs[0].args == ("--total-steps", "5", "--alpha", "3") and specs[4].args == ("--total-steps", "5")
    cmd = specs[5].command(Path("/r"), resume=True)
    assert cmd[-1] == "--resume" and "--run-dir" in cmd and cmd[cmd.index("--run-dir") + 1] == "/r/bridge__hard__mix__y__1"
    with pytest.raises(bm.BenchmarkError):
        bm.expand_grid(["a/x.py", "b/x.py"], "bridge", ["hard"], ["mix"], [0])
    with pytest.raises(bm.BenchmarkError):
        bm.expand_grid([], "bridge", ["hard"], ["mix"], [0])


def test_local_grid_skips_resumes_and_reports_failures(tmp_path, algos):
    root = tmp_path / "runs"
    specs = bm.expand_grid(algos, "bridge", ["hard"], ["mix"], [0, 1], extra=["--crash-after", "2"])
    res = bm.run_grid(specs, root, workers=2, progress=False)
    # every run "was killed" after 2 of its 4 evaluations: checkpoint present, no done.json
    assert all(r.status == "failed" for r in res)
    assert all(bm.run_status(s, root) == "interrupted" for s in specs)
    wall = {s: json.loads((s.run_dir(root) / "benchmark.json").read_text())["wall_seconds"] for s in specs}
    res = bm.run_grid(specs, root, workers=2, progress=False)  # re-run: resumes each from its checkpoint
    assert all(r.status == "ok" for r in res), bm.report(res)
    for r in res:  # the run's wall time counts both attempts
        assert json.loads((r.spec.run_dir(root) / "benchmark.json").read_text())["wall_seconds"] == pytest.approx(
            wall[r.spec] + r.seconds, abs=0.2) and wall[r.spec] > 0
    for s in specs:
        log = (s.run_dir(root) / "log.txt").read_text()
        assert log.count("--resume") == 1
        m = json.loads((s.run_dir(root) / "metrics.json").read_text())
        entry = m["bridge"]["hard__mix"][s.algo][f"seed_{s.seed}"]
        assert [entry[f"step_{k}"]["step_count"] for k in range(4)] == [100, 200, 300, 400] and "step_4" not in entry
    res = bm.run_grid(specs, root, workers=2, progress=False)  # third time: nothing to do
    assert all(r.status == "skipped" for r in res)
    # a failing run is reported with its log tail and does not stop the others
    bad = bm.expand_grid(algos[:1], "bridge", ["hard"], ["good"], [0], extra=["--fail"])
    good = bm.expand_grid(algos[1:], "bridge", ["hard"], ["good"], [0])
    res = bm.run_grid(bad + good, root, workers=1, progress=False)
    st = {r.spec.algo: r for r in res}
    assert st["fake_a"].status == "failed" and st["fake_a"].returncode == 3
    assert "something went wrong on purpose" in st["fake_a"].log_tail
    assert st["fake_b"].status == "ok"
    assert "FAILED bridge__hard__good__fake_a__0" in bm.report(res)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_an_interrupted_grid_stops_its_runs_and_starts_no_more(tmp_path, algos, sig):
    """kill (SIGTERM) or Ctrl-C (SIGINT, here to the runner alone) on the local runner: the running
    run is terminated, no further run starts, one line says how to continue; the same command then
    resumes the stopped run and runs the rest."""
    root, pids = tmp_path / "runs", tmp_path / "pids"
    pids.mkdir()
    cmd = [sys.executable, "-m", "common.benchmark", "run", "--algos", algos[0], "--env", "bridge", "--tasks", "hard",
           "--qualities", "mix", "--seeds", "0", "1", "2", "--workers", "1", "--root", str(root),
           "--records", str(tmp_path / "records")]
    env = dict(os.environ, FAKE_PIDS=str(pids))
    runner = subprocess.Popen(cmd + ["--extra=--sleep 0.5"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    first = bm.expand_grid(algos[:1], "bridge", ["hard"], ["mix"], [0])[0]
    deadline = time.time() + 120
    while not (first.run_dir(root) / "checkpoints" / "latest.pt").is_file():  # the first run is under way
        assert time.time() < deadline and runner.poll() is None, runner.communicate()
        time.sleep(0.1)
    runner.send_signal(sig)
    out, err = runner.communicate(timeout=60)
    assert runner.returncode == 2, (out, err)
    assert err.strip().splitlines()[-1].startswith("error: interrupted: 0 of 3 runs had ended, 1 were stopped"), err
    child = int((pids / "0").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)  # the run's process is gone
    assert bm.run_status(first, root) == "interrupted"
    assert sorted(p.name for p in pids.iterdir()) == ["0"]  # seeds 1 and 2 never started
    done = subprocess.run(cmd + ["--extra=--sleep 0.5"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "3 runs: 3 ran, 0 already done, 0 failed" in done.stdout, done.stderr
    assert (first.run_dir(root) / "log.txt").read_text().count("--resume") == 1
    assert len(list((tmp_path / "records").glob("*.json"))) == 3  # the finished runs' records


def test_flag_change_does_not_reuse_a_directory(tmp_path, algos):
    root = tmp_path / "runs"
    (s,) = bm.expand_grid(algos[:1], "bridge", ["hard"], ["mix"], [0], extra=["--total-steps", "100"])
    assert bm.run_grid([s], root, progress=False)[0].status == "ok"
    (s2,) = bm.expand_grid(algos[:1], "bridge", ["hard"], ["mix"], [0], extra=["--total-steps", "200"])
    s2_dir = s2.run_dir(root)
    (s2_dir / "done.json").unlink()
    r = bm.run_grid([s2], root, progress=False)[0]
    assert r.status == "failed" and "other flags" in r.log_tail


@dataclasses.dataclass
class _Args:
    env: str = "bridge"
    task: str = "hard"
    quality: str = "mix"
    seed: int = 0
    device: str = "cpu"
    threads: int = 1
    total_steps: int = 1
    resume: bool = False
    run_dir: str = ""


def _write_run(root, algo, seed, finals, curve, quality="mix", win=None, task="hard"):
    """A run directory as the real ``Run`` writes it (config.json, metrics.json), with known numbers."""
    args = _Args(quality=quality, seed=seed, task=task, run_dir=str(root / f"{algo}_{seed}"))
    run = Run(args, algo, tensorboard=False)
    run.start(SimpleNamespace(generator=torch.Generator(), meta={"env": "bridge", "task": task}), None, None,
              dims={}, modules={})
    for k, v in enumerate(curve):
        run.log_eval(100 * (k + 1), dict(returns=[v], won=None, return_mean=v, return_std=0.0, length_mean=1.0))
    run.log_final(100 * len(curve), dict(returns=finals, won=win, return_mean=float(np.mean(finals)),
                                         return_std=0.0, length_mean=1.0))


def test_aggregation_known_answers(tmp_path):
    finals = [1.0, 2.0, 3.0, 4.0, 100.0]
    for seed, f in enumerate(finals):
        _write_run(tmp_path, "a", seed, [f - 0.5, f + 0.5], curve=[f - 10, f + 7, f])
        _write_run(tmp_path, "b", seed, [f - 200], curve=[f - 200], win=[True, False])
    recs = bm.load_runs(tmp_path)
    assert len(recs) == 10
    stats = {s.algo: s for s in bm.aggregate(recs, reps=500)}
    a = stats["a"]
    assert a.n == 5 and a.final_mean == pytest.approx(22.0)
    assert a.final_std == pytest.approx(np.std(finals, ddof=1)) and a.final_se == pytest.approx(np.std(finals, ddof=1) / 5**0.5)
    assert a.best_mean == pytest.approx(np.mean(finals) + 7)
    assert a.iqm == pytest.approx(3.0)  # 25% trimmed: mean of 2, 3, 4
    assert a.iqm_lo <= 3.0 <= a.iqm_hi
    assert stats["b"].win_mean == pytest.approx(0.5)
    assert bm.probability_of_improvement(np.array(finals), np.array(finals) - 200) == 1.0
    assert bm.probability_of_improvement(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 0.5
    assert bm.probability_of_improvement(np.array([0.0, 2.0]), np.array([1.0, 1.0])) == 0.5
    md = bm.markdown_tables(list(stats.values()), recs)
    se = np.std(finals, ddof=1) / 5**0.5
    assert f"| bridge | hard | mix | 22.000 ± {se:.3f} (n=5) | {22.0 - 200:.3f} ± {se:.3f} (n=5) |" in md
    assert "| a |  | 1.00 |" in md and "| b | 0.00 |  |" in md  # P(a > b) = 1, P(b > a) = 0
    merged = bm.merged_metrics(recs)
    assert set(merged["bridge"]["hard__mix"]) == {"a", "b"} and len(merged["bridge"]["hard__mix"]["a"]) == 5


def test_unfinished_runs_are_left_out_of_the_tables(tmp_path):
    """A run that is still training (or was killed) has intermediate evaluations only: it must
    not enter the table as if its last evaluation were final."""
    _write_run(tmp_path, "a", 0, [5.0], curve=[1.0, 5.0])
    run = Run(_Args(seed=1, run_dir=str(tmp_path / "a_1")), "a", tensorboard=False)
    run.start(SimpleNamespace(generator=torch.Generator(), meta={"env": "bridge", "task": "hard"}), None, None,
              dims={}, modules={})
    run.log_eval(100, dict(returns=[-50.0], won=None, return_mean=-50.0, return_std=0.0, length_mean=1.0))
    assert [r.seed for r in bm.load_runs(tmp_path)] == [0]
    assert sorted(r.final for r in bm.load_runs(tmp_path, include_unfinished=True)) == [-50.0, 5.0]
    md, stats = bm.write_outputs(tmp_path, table=str(tmp_path / "page.md"), plots=str(tmp_path / "plots"), reps=100)
    assert stats[0].n == 1 and stats[0].final_mean == 5.0 and "1 unfinished run(s)" in md
    assert "1 unfinished run(s)" in (tmp_path / "results.md").read_text()
    # the page is committed: what is still training on this machine is not its business
    assert "unfinished" not in (tmp_path / "page.md").read_text()


def test_bootstrap_ci_covers_true_mean():
    """95% percentile-bootstrap CIs of the mean of N(5, 1) samples cover 5 most of the time."""
    rng = np.random.default_rng(0)
    hits, widths = 0, []
    trials = 60
    for t in range(trials):
        _, lo, hi = bm.bootstrap_ci(rng.normal(5.0, 1.0, size=30), "mean", reps=400, seed=t)
        hits += lo <= 5.0 <= hi
        widths.append(hi - lo)
    assert hits / trials >= 0.85
    # and not by being too wide: about the normal interval's 2 x 1.96 / sqrt(30) = 0.72 (0.68 measured)
    assert np.mean(widths) == pytest.approx(2 * 1.96 / 30**0.5, rel=0.15)


def test_bootstrap_ci_does_not_depend_on_numpys_global_generator():
    """The same scores give the same interval whatever numpy's global generator holds (rliable's
    resampling draws from it too), and the caller's generator state is left as it was."""
    x = np.array([1.84, 1.12, 1.52, 1.68, 1.32])
    np.random.seed(1)
    first = bm.bootstrap_ci(x, reps=300)
    np.random.seed(5)
    np.random.rand(7)
    before = np.random.get_state()[1].copy()
    assert bm.bootstrap_ci(x, reps=300) == first
    assert (np.random.get_state()[1] == before).all()


def test_outputs_tables_json_and_plots(tmp_path):
    for seed in range(3):
        _write_run(tmp_path / "r", "a", seed, [1.0 + seed], curve=[0.0, 1.0 + seed])
        _write_run(tmp_path / "r", "b", seed, [2.0 + seed], curve=[0.5, 2.0 + seed], quality="optimal")
    md, stats = bm.write_outputs(tmp_path / "r", table=str(tmp_path / "t.md"), reps=200)
    assert (tmp_path / "t.md").read_text() == md
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["bridge"].keys() == {"hard__mix", "hard__optimal"}
    pngs = sorted(p.name for p in (tmp_path / "r" / "plots").glob("*.png"))
    assert pngs == ["bridge__hard__mix.png", "bridge__hard__optimal.png", "bridge__iqm.png"]


def test_table_file_keeps_the_text_around_its_markers(tmp_path):
    """A results page with the two markers gets fresh tables between them and keeps its own text;
    a page without them is written whole, as before."""
    for seed in range(2):
        _write_run(tmp_path / "r", "a", seed, [1.0 + seed], curve=[1.0 + seed])
    page = tmp_path / "page.md"
    page.write_text(f"# Results\n\nour analysis\n\n{bm.TABLES_BEGIN}\nstale table\n{bm.TABLES_END}\n\nmore analysis\n")
    md, _ = bm.write_outputs(tmp_path / "r", table=str(page), reps=50)
    text = page.read_text()
    assert text.startswith("# Results\n\nour analysis\n\n" + bm.TABLES_BEGIN + "\n")
    assert text.endswith(bm.TABLES_END + "\n\nmore analysis\n")
    assert "stale table" not in text and md.rstrip() in text
    bm.write_outputs(tmp_path / "r", table=str(page), reps=50)
    assert page.read_text() == text  # idempotent
    plain = tmp_path / "plain.md"
    plain.write_text("old generated tables\n")
    bm.write_outputs(tmp_path / "r", table=str(plain), reps=50)
    assert plain.read_text() == md


def test_paper_numbers_sit_under_ours(tmp_path):
    """A definition's [paper] puts the published numbers on a line of their own under ours, in the
    same columns, for the qualities (or task/quality) it names and no others."""
    for seed in range(2):
        _write_run(tmp_path / "r", "a", seed, [1.0 + seed], curve=[1.0 + seed])
        _write_run(tmp_path / "r", "b", seed, [2.0 + seed], curve=[2.0 + seed])
        _write_run(tmp_path / "r" / "optimal", "b", seed, [3.0], curve=[3.0], quality="optimal")
    md, _ = bm.write_outputs(tmp_path / "r", reps=50, paper={"hard/mix": {"b": "-1.29 ± 0.00"}})
    lines = md.splitlines()
    ours = lines.index(next(x for x in lines if x.startswith("| bridge | hard | mix |")))
    assert lines[ours + 1] == "| bridge | hard | mix, paper |  | -1.29 ± 0.00 |"
    assert not any("optimal, paper" in x for x in lines)


def test_by_algorithm_table_is_shaped_as_papers_print_them(tmp_path):
    """by_algorithm = [quality]: one row per algorithm, one column per task, the published numbers in a
    column beside each task that [paper] names (algorithms only the paper ran get a row too)."""
    for seed in range(2):
        _write_run(tmp_path / "r", "a", seed, [1.0 + seed], curve=[1.0 + seed])
        _write_run(tmp_path / "r" / "easy", "a", seed, [4.0], curve=[4.0], task="easy")
    md, _ = bm.write_outputs(tmp_path / "r", reps=50, by_algorithm=["mix"],
                             paper={"hard/mix": {"a": "9.9 ± 0.1", "z": "7.0 ± 0.2"}})
    lines = md.splitlines()
    head = lines.index("| algorithm | easy | hard | hard, paper |")
    assert lines[head + 2] == "| a | 4.000 ± 0.000 (n=2) | 1.500 ± 0.500 (n=2) | 9.9 ± 0.1 |"
    assert lines[head + 3] == "| z |  |  | 7.0 ± 0.2 |"
    assert head < lines.index(next(x for x in lines if x.startswith("| env | task | quality |")))
    md, _ = bm.write_outputs(tmp_path / "r", reps=50, by_algorithm=["other"])
    assert "| algorithm |" not in md


def test_aggregate_with_a_definition_keeps_its_header_and_paper_lines(tmp_path, capsys):
    """`aggregate --definition` writes what the end of `run` writes: the definition's header and
    [paper] lines, into its table; --root and --table override it; without either it is an error."""
    for seed in range(2):
        _write_run(tmp_path / "r", "b", seed, [2.0 + seed], curve=[2.0 + seed])
    page = tmp_path / "page.md"
    definition = tmp_path / "d.toml"
    definition.write_text(f'name = "d"\nenv = "bridge"\ntable = "{page}"\nplots = "{tmp_path / "plots"}"\n'
                          'header = "Our header."\n[paper]\n"hard/mix" = {b = "-1.29 ± 0.00"}\n')
    assert bm.main(["aggregate", "--definition", str(definition), "--root", str(tmp_path / "r"), "--reps", "50"]) == 0
    text = page.read_text()
    assert text.startswith("Our header.\n") and "| bridge | hard | mix, paper | -1.29 ± 0.00 |" in text
    other = tmp_path / "other.md"
    bm.main(["aggregate", "--definition", str(definition), "--root", str(tmp_path / "r"), "--table", str(other),
             "--reps", "50"])
    assert other.read_text() == text
    capsys.readouterr()
    with pytest.raises(SystemExit):
        bm.main(["aggregate"])
    assert "--root" in capsys.readouterr().err


def test_definition_file_and_cli_dry_run(tmp_path, algos, capsys):
    d = tmp_path / "def.toml"
    d.write_text(textwrap.dedent(f'''
        name = "tiny"
        env = "bridge"
        tasks = ["hard"]
        qualities = ["mix"]
        seeds = [0, 1]
        extra = "--total-steps 200"
        [algos]
        "{algos[0]}" = "--eval-every 50"
        "{algos[1]}" = []
    '''))
    root = tmp_path / "out"
    assert bm.main(["run", "--definition", str(d), "--root", str(root), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("[new]") == 4 and "--eval-every 50" in out
    assert bm.main(["run", "--definition", str(d), "--root", str(root), "--workers", "2",
                    "--table", str(tmp_path / "table.md")]) == 0
    table = (tmp_path / "table.md").read_text()
    assert "fake_a" in table and "fake_b" in table and "(n=2)" in table
    with pytest.raises(SystemExit):
        bm.main(["run", "--definition", str(tmp_path / "nope.toml")])


def one_cell_definition(tmp_path, algo: str, extra: str, algo_flags: str, more: str = ""):
    """A definition of one run (bridge hard mix, seed 0) of ``algo``: its extra, the algorithm's
    flags (a TOML value) and more top-level lines."""
    d = tmp_path / "def.toml"
    d.write_text(f'name = "tiny"\nenv = "bridge"\ntasks = ["hard"]\nqualities = ["mix"]\nseeds = [0]\n'
                 f'extra = "{extra}"\n{more}\n[algos]\n"{algo}" = {algo_flags}\n')
    return d


def test_a_run_with_other_flags_leaves_the_definitions_page_alone(tmp_path, algos, capsys):
    """`run --definition D --extra ...` runs a variant of D's grid (a control at another alpha, say):
    its tables go to <root>/results.md, not over D's page and plots, unless --table names a page."""
    page, plots = tmp_path / "page.md", tmp_path / "plots"
    d = one_cell_definition(tmp_path, algos[0], "--total-steps 200", "[]", f'table = "{page}"\nplots = "{plots}"')
    page.write_text("the grid's page\n")
    with pytest.raises(SystemExit):  # in the definition's own folder its finished runs would be skipped as done
        bm.main(["run", "--definition", str(d), "--extra=--total-steps 100", "--dry-run"])
    assert "own --root" in capsys.readouterr().err
    assert bm.main(["run", "--definition", str(d), "--root", str(tmp_path / "control"),
                    "--extra=--total-steps 100"]) == 0
    assert page.read_text() == "the grid's page\n" and not plots.exists()
    assert "fake_a" in (tmp_path / "control" / "results.md").read_text()
    assert "left as they are" in capsys.readouterr().out
    assert bm.main(["run", "--definition", str(d), "--root", str(tmp_path / "control"),
                    "--extra=--total-steps 100", "--table", str(tmp_path / "chosen.md")]) == 0
    assert "fake_a" in (tmp_path / "chosen.md").read_text() and page.read_text() == "the grid's page\n"
    assert bm.main(["run", "--definition", str(d), "--root", str(tmp_path / "grid")]) == 0
    assert "fake_a" in page.read_text() and plots.is_dir()


def test_command_line_extra_comes_last_and_wins(tmp_path, algos, capsys):
    """--extra on the command line is added after the definition's extra and each algorithm's flags,
    so a budget given there is every run's budget (before, an algorithm's own --total-steps won)."""
    d = one_cell_definition(tmp_path, algos[0], "--eval-episodes 3", '"--total-steps 300"')
    assert bm.main(["run", "--definition", str(d), "--root", str(tmp_path / "r"), "--dry-run",
                    "--extra=--total-steps 100"]) == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("[new]")]
    assert line.endswith("--eval-episodes 3 --total-steps 300 --total-steps 100")
    # written with a space, as a shell user would: the value starts with "--" and is still --extra's
    assert bm.main(["run", "--definition", str(d), "--root", str(tmp_path / "r"), "--dry-run",
                    "--extra", "--total-steps 200 --eval-every 50"]) == 0
    (line,) = [x for x in capsys.readouterr().out.splitlines() if x.startswith("[new]")]
    assert line.endswith("--total-steps 300 --total-steps 200 --eval-every 50")


def test_definition_with_sub_grids(tmp_path, algos):
    """[[grids]]: every algorithm on one task, one of them on more; shared runs count once."""
    d = tmp_path / "def.toml"
    d.write_text(textwrap.dedent(f'''
        env = "bridge"
        qualities = ["mix"]
        seeds = [0, 1]
        [algos]
        "{algos[0]}" = ""
        "{algos[1]}" = ""
        [[grids]]
        tasks = ["hard"]
        [[grids]]
        algos = ["{algos[1]}"]
        tasks = ["hard", "easy"]
        qualities = ["mix", "random"]
    '''))
    specs, _ = bm.specs_from_args(bm.RunArgs(definition=str(d)))
    names = sorted((Path(s.algo).stem, s.task, s.quality, s.seed) for s in specs)
    assert len(names) == len(set(names)) == 2 * 2 + 2 * 2 * 2 - 2  # (b, hard, mix) is in both grids
    assert {n[:3] for n in names if n[0] == "fake_a"} == {("fake_a", "hard", "mix")}
    # a command-line list narrows each entry to its cells in that list (it does not put the first
    # entry's algorithms on the second entry's tasks); seeds, set by neither entry, are replaced
    specs, _ = bm.specs_from_args(bm.RunArgs(definition=str(d), tasks=["easy"], seeds=[3]))
    assert sorted((Path(s.algo).stem, s.task, s.quality, s.seed) for s in specs) == [
        ("fake_b", "easy", "mix", 3), ("fake_b", "easy", "random", 3)]
    specs, _ = bm.specs_from_args(bm.RunArgs(definition=str(d), algos=[algos[0]], qualities=["mix"]))
    assert sorted((Path(s.algo).stem, s.task, s.seed) for s in specs) == [("fake_a", "hard", 0), ("fake_a", "hard", 1)]
    with pytest.raises(bm.BenchmarkError, match="no \\[\\[grids\\]\\] entry .* --tasks medium"):
        bm.specs_from_args(bm.RunArgs(definition=str(d), tasks=["medium"]))
    d.write_text(d.read_text().replace(f'algos = ["{algos[1]}"]', 'algos = ["other.py"]'))
    with pytest.raises(bm.BenchmarkError, match="not in \\[algos\\]"):
        bm.specs_from_args(bm.RunArgs(definition=str(d)))


def test_slurm_backend_with_submitit_local_executor(tmp_path, algos):
    pytest.importorskip("submitit")
    root = tmp_path / "runs"
    specs = bm.expand_grid(algos, "bridge", ["hard"], ["mix"], [0], extra=["--total-steps", "100"])
    opt = bm.SlurmOptions(cluster="local", time_min=5, array=True)
    res = bm.run_grid(specs, root, backend="slurm", slurm=opt)
    assert [r.status for r in res] == ["ok", "ok"], bm.report(res)
    res = bm.run_grid(specs, root, backend="slurm", slurm=bm.SlurmOptions(cluster="debug", array=False))
    assert [r.status for r in res] == ["skipped", "skipped"]


def test_ray_backend_on_a_local_instance(tmp_path, algos):
    pytest.importorskip("ray")
    root = tmp_path / "runs"
    specs = bm.expand_grid(algos, "bridge", ["hard"], ["mix"], [0], extra=["--total-steps", "100"])
    res = bm.run_grid(specs, root, backend="ray", threads=1)
    assert [r.status for r in res] == ["ok", "ok"], bm.report(res)


def test_tiny_real_grid_on_bridge(tmp_path, monkeypatch):
    """Two real algorithm files x two seeds on Bridge through the local pool: every run finishes,
    the table has both algorithms with n = 2, and running the grid again does no work."""
    monkeypatch.setenv("PYTHONPATH", str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("OFFLINE_MARL_DATA", str(tmp_path / "data"))
    flags = ["--device", "cpu", "--total-steps", "20", "--eval-every", "10", "--eval-episodes", "2",
             "--final-eval-episodes", "4", "--eval-episode-limit", "20", "--batch-size", "32", "--hidden", "16"]
    specs = bm.expand_grid(["baselines/bc.py", "baselines/optidice.py"], "bridge", ["hard"], ["mix"], [0, 1], flags)
    root = tmp_path / "grid"
    res = bm.run_grid(specs, root, workers=2, progress=False)
    assert all(r.status == "ok" for r in res), bm.report(res)
    records = bm.load_runs(root)
    assert sorted((r.algo, r.seed) for r in records) == [("bc", 0), ("bc", 1), ("optidice", 0), ("optidice", 1)]
    assert all(-30 <= r.final <= -1.2 for r in records)  # Bridge hard: optimum -1.235 at limit 20
    text, _ = bm.write_outputs(root, plots=str(tmp_path / "plots"), reps=200)
    assert "| bridge | hard | mix | bc | 2 |" in text and "| bridge | hard | mix | optidice | 2 |" in text
    assert all(r.status == "skipped" for r in bm.run_grid(specs, root, workers=2, progress=False))


def test_merged_metrics_with_unequal_budgets_are_read_by_marl_eval(tmp_path):
    """Algorithms with other budgets and evaluation intervals (5, 4 and 3 evaluations) merge onto a
    common grid that the real marl-eval package processes as it is: its data pipeline, the rliable
    matrices and a plot. (CI installs it: `pip install --no-deps id-marl-eval colorama colorcet seaborn`;
    its own requirements pin pandas 1.4, which does not build on current Pythons.)"""
    pytest.importorskip("marl_eval")
    pytest.importorskip("seaborn")
    from marl_eval.plotting_tools.plotting import performance_profiles, sample_efficiency_curves
    from marl_eval.utils.data_processing_utils import create_matrices_for_rliable, data_process_pipeline

    for algo, n in (("a", 5), ("b", 4), ("c", 3)):
        for seed in range(3):
            _write_run(tmp_path, algo, seed, [seed + 1.0, seed + 2.0], curve=[float(k + seed) for k in range(n)])
    merged = bm.merged_metrics(bm.load_runs(tmp_path))
    runs = merged["bridge"]["hard__mix"]
    assert {len([k for k in e if k.startswith("step_")]) for a in runs.values() for e in a.values()} == {3}
    # run "a" (5 evaluations) is read at fractions 1/3, 2/3, 1 of its evaluations: its 2nd, 3rd and 5th
    assert [runs["a"]["seed_0"][f"step_{k}"]["step_count"] for k in range(3)] == [200, 300, 500]
    processed = data_process_pipeline(merged, metrics_to_normalize=["episode_return"])
    final, curves = create_matrices_for_rliable(processed, "bridge", metrics_to_normalize=["episode_return"])
    assert final["mean_norm_episode_return"]["a"].shape == (3, 1)
    assert curves["mean_norm_episode_return"]["c"].shape == (3, 1, 3)
    import matplotlib

    matplotlib.use("Agg")
    fig = performance_profiles(final, metric_name="episode_return", metrics_to_normalize=["episode_return"])
    fig.savefig(tmp_path / "profile.png")
    sample_efficiency_curves(curves, metric_name="episode_return", metrics_to_normalize=["episode_return"])
    assert (tmp_path / "profile.png").stat().st_size > 1000


def _finish(root, algo, seed):
    (root / f"{algo}_{seed}" / "done.json").write_text('{"steps": 100}\n')


def test_records_rebuild_the_tables_in_a_checkout_without_the_run_folders(tmp_path):
    """The run folders (checkpoints, logs) stay out of git; one small record per finished run is kept
    beside the pages, and from the records alone a fresh clone writes the same tables."""
    runs, records = tmp_path / "runs", tmp_path / "records"
    for seed in range(3):
        _write_run(runs, "a", seed, [1.0 + seed, 2.0], curve=[0.5, 1.0 + seed])
        _write_run(runs, "b", seed, [3.0 * seed], curve=[0.0, 3.0 * seed], win=[True])
        _finish(runs, "a", seed), _finish(runs, "b", seed)
    unfinished = Run(_Args(seed=7, run_dir=str(runs / "a_7")), "a", tensorboard=False)
    unfinished.start(SimpleNamespace(generator=torch.Generator(), meta={"env": "bridge", "task": "hard"}), None, None,
                     dims={}, modules={})
    unfinished.log_eval(100, dict(returns=[9.0], won=None, return_mean=9.0, return_std=0.0, length_mean=1.0))
    md, _ = bm.write_outputs(runs, plots=str(tmp_path / "p1"), reps=100, records=records)
    assert sorted(p.name for p in records.iterdir()) == [f"{x}_{s}.json" for x in "ab" for s in range(3)]
    assert f"<!-- records: {records.resolve()} -->" in md  # where the numbers come from
    rec = json.loads((records / "a_1.json").read_text())
    assert rec["run"] == "a_1" and rec["config"]["seed"] == 1 and rec["done"] == {"steps": 100}
    stamp = (records / "a_1.json").stat().st_mtime_ns
    assert bm.save_records(runs, records) == 0 and (records / "a_1.json").stat().st_mtime_ns == stamp  # up to date
    # run folders and records of the same runs are counted once
    assert len(bm.load_runs(runs, records=records)) == 6
    fresh = tmp_path / "clone" / "runs"  # a fresh clone: no run folders, the records only
    md2, stats = bm.write_outputs(fresh, plots=str(tmp_path / "p2"), reps=100, records=records)
    assert md2 == md.replace("\n1 unfinished run(s) under runs/ left out (no final evaluation yet).\n", "")
    assert {s.algo: s.n for s in stats} == {"a": 3, "b": 3}
    assert sorted(p.name for p in (tmp_path / "p2").glob("*.png")) == sorted(p.name for p in (tmp_path / "p1").glob("*.png"))
    # a run that ran again (its folder rewritten) updates its record
    shutil.rmtree(runs / "a_0")
    _write_run(runs, "a", 0, [50.0], curve=[50.0])
    _finish(runs, "a", 0)
    assert bm.save_records(runs, records) == 1
    assert json.loads((records / "a_0.json").read_text())["metrics"]["bridge"]["hard__mix"]["a"]["seed_0"][
        "absolute_metrics"]["episode_return"] == [50.0]
    (records / "junk.json").write_text("[1, 2]")
    with pytest.raises(bm.BenchmarkError, match="not a run record"):
        bm.load_runs(fresh, records=records)


def test_records_default_to_a_folder_beside_the_pages_for_the_checkouts_own_runs():
    assert bm.default_records(REPO / "benchmark_runs" / "lbf") == REPO / "benchmarks" / "records" / "lbf"
    assert bm.default_records(REPO / "benchmark_runs") is None
    assert bm.default_records("/tmp/elsewhere/lbf") is None
    assert bm._records_arg("none", REPO / "benchmark_runs" / "lbf") is None
    assert bm._records_arg("x/y", "/tmp") == Path("x/y")


def test_a_page_is_not_rewritten_with_fewer_runs_than_it_shows(tmp_path, capsys):
    """A checkout that lacks some of a page's runs (a fresh clone before records existed, a moved
    folder) must not replace the page's tables and plots with fewer: refused, with one line."""
    runs, page, plots = tmp_path / "runs", tmp_path / "page.md", tmp_path / "plots"
    for seed in range(3):
        _write_run(runs, "a", seed, [1.0 + seed], curve=[1.0 + seed])
        _write_run(runs, "b", seed, [2.0], curve=[2.0], task="easy")
    page.write_text(f"intro\n{bm.TABLES_BEGIN}\nold\n{bm.TABLES_END}\nafter\n")
    bm.write_outputs(runs, table=str(page), plots=str(plots), reps=50)
    assert bm._cells_shown(page.read_text()) == {("bridge", "hard", "mix", "a"): 3, ("bridge", "easy", "mix", "b"): 3}
    before = page.read_text()
    shutil.rmtree(runs / "a_2")
    shutil.rmtree(plots)
    with pytest.raises(bm.FewerRunsError, match=r"bridge hard mix a, n=3 on the page, 2 here"):
        bm.write_outputs(runs, table=str(page), plots=str(plots), reps=50)
    assert page.read_text() == before and not plots.exists()
    for d in ("b_0", "b_1", "b_2"):
        shutil.rmtree(runs / d)
    with pytest.raises(bm.FewerRunsError, match="2 cell"):  # a cell gone entirely counts too
        bm.write_outputs(runs, table=str(page), reps=50)
    # more runs, or --allow-fewer-runs, write it
    bm.write_outputs(runs, table=str(page), reps=50, allow_fewer=True)
    assert bm._cells_shown(page.read_text()) == {("bridge", "hard", "mix", "a"): 2}
    assert page.read_text().startswith("intro\n") and page.read_text().endswith("after\n")
    _write_run(runs, "a", 5, [1.0], curve=[1.0])
    bm.write_outputs(runs, table=str(page), reps=50)
    assert bm._cells_shown(page.read_text()) == {("bridge", "hard", "mix", "a"): 3}
    # from the command line: the run's own tables still go to <root>/results.md, exit 1 and one line
    shutil.rmtree(runs / "a_5")
    with pytest.raises(SystemExit) as exit_:
        bm.main(["aggregate", "--root", str(runs), "--table", str(page), "--reps", "50"])
    assert exit_.value.code == 2 and "n=3 on the page, 2 here" in capsys.readouterr().err
    assert "| a |" in (runs / "results.md").read_text()


def test_a_definitions_sub_grid_writes_its_own_page(tmp_path, capsys):
    """A [[grids]] entry that names its own table (and plots) gets a page of its runs; the
    definition's table gets every other run. A page refused by the guard leaves the others written."""
    runs, main, sub = tmp_path / "runs", tmp_path / "main.md", tmp_path / "sub.md"
    for seed in range(2):
        _write_run(runs, "a", seed, [1.0], curve=[1.0])
        _write_run(runs, "b", seed, [2.0], curve=[2.0])
        _write_run(runs, "b", seed + 10, [3.0 + seed], curve=[3.0], task="easy")
        _write_run(runs, "a", seed + 10, [4.0], curve=[4.0], task="other")  # in no entry: the main page
    definition = tmp_path / "def.toml"
    definition.write_text(textwrap.dedent(f'''
        env = "bridge"
        qualities = ["mix"]
        table = "{main}"
        plots = "{tmp_path / 'plots'}"
        [algos]
        "a.py" = ""
        "b.py" = ""
        [[grids]]
        tasks = ["hard"]
        [[grids]]
        algos = ["b.py"]
        tasks = ["easy", "hard"]
        table = "{sub}"
        plots = "{tmp_path / 'sub_plots'}"
    '''))
    d = bm.load_definition(definition)
    pages = bm.definition_pages(d)
    assert [p.table for p in pages] == [str(sub), str(main)]
    assert pages[0].cells == {("b", "easy", "mix"), ("b", "hard", "mix")} and pages[1].cells is None
    bm.main(["aggregate", "--definition", str(definition), "--root", str(runs), "--records", "none", "--reps", "50"])
    assert bm._cells_shown(sub.read_text()) == {("bridge", "easy", "mix", "b"): 2, ("bridge", "hard", "mix", "b"): 2}
    assert bm._cells_shown(main.read_text()) == {("bridge", "hard", "mix", "a"): 2, ("bridge", "other", "mix", "a"): 2}
    assert {p.name for p in (tmp_path / "sub_plots").glob("*.png")} == {
        "bridge__easy__mix.png", "bridge__hard__mix.png", "bridge__iqm.png"}
    assert not (tmp_path / "plots" / "bridge__easy__mix.png").exists()
    assert len(bm._cells_shown((runs / "results.md").read_text())) == 4  # the root's own tables: every run
    out = capsys.readouterr().out
    assert f"tables written to {sub}" in out and f"tables written to {main}" in out
    # the main page lacks a run now: refused, and the sub-grid's page is still brought up to date
    shutil.rmtree(runs / "a_0")
    _write_run(runs, "b", 12, [9.0], curve=[9.0], task="easy")
    with pytest.raises(SystemExit) as exit_:
        bm.main(["aggregate", "--definition", str(definition), "--root", str(runs), "--records", "none", "--reps", "50"])
    assert exit_.value.code == 2 and f"{main} shows 1 cell(s)" in capsys.readouterr().err
    assert bm._cells_shown(sub.read_text())[("bridge", "easy", "mix", "b")] == 3
    assert bm._cells_shown(main.read_text())[("bridge", "hard", "mix", "a")] == 2
    # --table puts every run on the one page named, as without pages
    bm.main(["aggregate", "--definition", str(definition), "--root", str(runs), "--records", "none", "--reps", "50",
             "--table", str(tmp_path / "all.md")])
    assert len(bm._cells_shown((tmp_path / "all.md").read_text())) == 4
    definition.write_text(definition.read_text().replace(f'table = "{sub}"\n', ""))
    with pytest.raises(bm.BenchmarkError, match="plots needs its table"):
        bm.load_definition(definition)


def test_a_fresh_clone_does_not_run_again_what_its_records_hold(tmp_path, algos, capsys):
    """A run recorded with the same command is done, though its folder is not in this checkout; a
    record of other flags (the definition changed since) is not, and the run then replaces it."""
    root, records = tmp_path / "runs", tmp_path / "records"
    cmd = ["run", "--algos", algos[0], "--env", "bridge", "--tasks", "hard", "--qualities", "mix",
           "--seeds", "0", "1", "--root", str(root), "--records", str(records), "--extra=--total-steps 200"]
    assert bm.main(cmd) == 0
    first = (root / "results.md").read_text()
    # what the runs cost goes with them: the training time (done.json) and the whole run's (the runner)
    import re
    rec = json.loads((records / "bridge__hard__mix__fake_a__0.json").read_text())
    assert 0 <= rec["done"]["train_seconds"] < rec["benchmark"]["wall_seconds"]
    train, wall = map(float, re.search(r"\| fake_a \| ([0-9.]+) / ([0-9.]+) \(n=2\) \|", first).groups())
    assert 0 <= train <= wall and "2 runs timed whole" in first
    shutil.rmtree(root)  # a fresh clone: the records only
    capsys.readouterr()
    assert bm.main(cmd + ["--dry-run"]) == 0
    assert capsys.readouterr().out.count("[recorded] (skip)") == 2
    assert bm.main(cmd) == 0
    out = capsys.readouterr().out
    assert "2 runs: 0 ran, 2 already done, 0 failed" in out and not any(root.glob("bridge__*"))
    assert (root / "results.md").read_text() == first
    assert bm.main(cmd[:-1] + ["--extra=--total-steps 300"]) == 0  # other flags: run, record replaced
    assert "2 runs: 2 ran" in capsys.readouterr().out
    rec = json.loads((records / "bridge__hard__mix__fake_a__0.json").read_text())
    assert rec["done"]["steps"] == 300


def _details_rows(md: str) -> dict[tuple[str, ...], list[str]]:
    """(env, task, quality, algo) -> [n, final, SE, best] of a Details table (the bootstrap CI left out)."""
    rows = {}
    for cell in bm._cells_shown(md):
        line = next(x for x in md.splitlines() if x.startswith("| " + " | ".join(cell) + " | "))
        rows[cell] = [c.strip() for c in line.strip().strip("|").split("|")][4:8]
    return rows


def test_results_pages_agree_with_their_records():
    """A page whose tables name their records (``<!-- records: ... -->``, written by the
    aggregation) shows exactly the cells and numbers that its committed records give: records
    added without the page rewritten, or a number edited by hand, fail here."""
    import re

    # a definition's pages: a page of a [[grids]] entry shows that entry's runs, its main page the rest
    named = {}
    for definition in sorted((REPO / "benchmarks").glob("*.toml")):
        ps = bm.definition_pages(bm.load_definition(definition))
        named.update({(REPO / p.table).resolve(): (p, ps) for p in ps if p.table})
    pages = 0
    for page in sorted((REPO / "docs" / "results").glob("*.md")):
        text = page.read_text()
        if bm.TABLES_BEGIN in text:
            text = text.split(bm.TABLES_BEGIN, 1)[1].split(bm.TABLES_END, 1)[0]
        m = re.search(r"<!-- records: (\S+) -->", text)
        if not m:
            continue  # tables written before the records existed
        pages += 1
        runs = bm.load_runs(REPO / "no-such-folder", records=REPO / m.group(1))
        if page.resolve() in named:
            runs = [r for r in runs if bm._on_page(r, *named[page.resolve()])]
        assert runs, f"{page.name} names {m.group(1)}, which holds no records"
        expected = _details_rows(bm.markdown_tables(bm.aggregate(runs, reps=20), runs))
        assert _details_rows(text) == expected, f"{page.name} is not what {m.group(1)} gives: aggregate again"
    assert pages >= 1
