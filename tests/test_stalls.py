"""benchmarks/stalls.py: its loop detector finds the period and the first step of a loop, and on
Bridge a memoryless policy that shuttles between two cells is counted as looping from its first
step while a random policy is not."""

import numpy as np

from _baselines_common import load_file
from common.envs import Bridge


def load_stalls():
    return load_file("benchmarks/stalls.py")


def seq(s: str) -> list[bytes]:
    return [c.encode() for c in s]


def test_loop_start_finds_the_smallest_period_and_where_the_loop_begins():
    ls = load_stalls().loop_start
    assert ls(seq("abcd" + "x" * 20), 5, 10) == (1, 4)          # frozen from index 4
    assert ls(seq("qwe" + "xyz" * 8), 5, 12) == (3, 3)          # period 3 (not 6) from index 3
    assert ls(seq("xyzxyz" + "xyz" * 6), 5, 12) == (3, 0)       # periodic from the start
    assert ls(seq("xyzxyzab" + "xyz" * 6), 5, 12) == (3, 8)     # an earlier cycle broken by "ab" does not count
    assert ls(seq("abcdefghijklmnop"), 5, 12) is None           # no repetition
    assert ls(seq("xyzw" * 3 + "xyzv" + "xyzw" * 2), 5, 12) is None  # broken inside the window
    assert ls(seq("abcabcab"), 5, 12) is None                   # shorter than the window
    assert ls(seq("abcdef" * 4), 5, 12) is None                 # period 6 is longer than max_period


def test_a_shuttling_policy_loops_and_a_random_one_does_not():
    stalls = load_stalls()
    env = Bridge("easy", episode_limit=60)

    def shuttle(obs, state, avail):
        # agent 0 at (1, 1) goes up, at (0, 1) goes down; agent 1 stays: period 2 from the first step
        return np.array([[1 if obs[0, 0, 0] == 1 else 2, 0]])

    res = stalls.play(shuttle, env, 3, 0, max_period=5, window=20)
    assert res["looped"] == 3 and res["start"] == 0

    rng = np.random.default_rng(0)
    res = stalls.play(lambda o, s, a: rng.integers(0, 5, (1, 2)), env, 3, 0, max_period=5, window=20)
    assert res["looped"] == 0 and res["start"] is None


def test_a_folder_that_is_not_a_run_is_refused_in_one_sentence(tmp_path):
    import pytest

    with pytest.raises(SystemExit, match="is not a run directory"):
        load_stalls().main(load_stalls().Args(runs=(str(tmp_path),)))


def test_a_window_no_longer_than_the_period_is_refused(tmp_path):
    """With --window <= --max-period no loop can be found: refused, not a table of zeros."""
    import pytest

    stalls = load_stalls()
    with pytest.raises(SystemExit, match="must be longer than --max-period"):
        stalls.main(stalls.Args(runs=(str(tmp_path),), window=20))
