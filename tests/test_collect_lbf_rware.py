"""Level-Based Foraging and RWARE data made here: the scripted experts' returns on seeded
episodes, rollouts that do not depend on the number of worker processes, and the
generated datasets replayed step by step in the environment they name (a round trip
through the catalog, the cache and the native format)."""

import numpy as np
import pytest

pytest.importorskip("lbforaging")
pytest.importorskip("rware")

from common import catalog, collect  # noqa: E402
from common.data import OfflineDataset  # noqa: E402
from common.envs import make_env, make_env_for  # noqa: E402


@pytest.mark.parametrize("task", collect.LBF_TASKS)
def test_lbf_expert_collects_all_food(task):
    eps = collect.rollout_controlled(make_env("lbf", task), 8, scripted=True, seed=1, stream="test", progress=False)
    assert all(ep["terminated"] for ep in eps)
    assert [float(ep["reward"].sum()) for ep in eps] == pytest.approx([1.0] * 8, abs=1e-5)


def test_lbf_medium_is_about_sixty_percent_and_random_is_poor():
    env = make_env("lbf", "8x8-2p-2f-coop")
    ret = lambda eps: np.mean([ep["reward"].sum() for ep in eps])  # noqa: E731
    medium = ret(collect.rollout_controlled(env, 40, scripted=True, seed=0, stream="m", progress=False,
                                            noise=collect.SCRIPTED_NOISE["lbf"]))
    rand = ret(collect.rollout_controlled(env, 40, scripted=False, seed=0, stream="r", progress=False))
    assert 0.35 < medium < 0.75 and rand < 0.3


def test_rware_expert_delivers():
    env = make_env("rware", "tiny-2ag")
    expert = [ep["reward"].sum() for ep in collect.rollout_controlled(env, 2, scripted=True, seed=0, stream="e",
                                                                       progress=False)]
    medium = [ep["reward"].sum() for ep in collect.rollout_controlled(
        env, 2, scripted=True, seed=0, stream="e", noise=collect.SCRIPTED_NOISE["rware"], progress=False)]
    rand = collect.rollout_controlled(env, 1, scripted=False, seed=0, stream="e", progress=False)[0]["reward"].sum()
    # 26 and 29 deliveries (expert), 18 and 14 (medium), 0 (random) measured on these layouts
    assert min(expert) >= 24 and 0.4 * np.mean(expert) < np.mean(medium) < 0.8 * np.mean(expert) and rand <= 2


def test_controlled_rollouts_do_not_depend_on_the_workers():
    env = make_env("lbf", "8x8-2p-2f-coop")
    one = collect.rollout_controlled(env, 6, scripted=True, seed=3, stream="w", noise=0.5, progress=False)
    two = collect.rollout_controlled(env, 6, scripted=True, seed=3, stream="w", noise=0.5, workers=2, progress=False)
    for a, b in zip(one, two):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(one[0]["obs"][0], one[1]["obs"][0])  # each episode its own layout


def replay(ds: OfflineDataset, seeds: list[int]) -> None:
    """Reset the dataset's environment with each episode's seed, step its actions, and
    find the stored rewards, observations, states, masks and end flags."""
    env = make_env_for(ds.meta)
    a = {k: np.asarray(v) for k, v in ds.arrays.items()}
    for e, seed in enumerate(seeds):
        lo, hi = a["episode_start"][e], a["episode_start"][e + 1]
        obs, state, avail = env.reset(seed=seed)
        for t in range(lo, hi - 1):
            np.testing.assert_array_equal(obs, a["obs"][t])
            np.testing.assert_array_equal(state, a["state"][t])
            np.testing.assert_array_equal(avail, a["avail"][t])
            obs, state, avail, r, term, trunc, _ = env.step(a["actions"][t])
            assert r == pytest.approx(float(a["reward"][t]), abs=1e-6)
            assert (term, trunc) == (bool(a["terminal"][t]), bool(a["timeout"][t]))
        np.testing.assert_array_equal(obs, a["obs"][hi - 1])
        np.testing.assert_array_equal(state, a["state"][hi - 1])
        np.testing.assert_array_equal(avail, a["avail"][hi - 1])
        assert a["last"][hi - 1] and not a["last"][lo:hi - 1].any() and (term or trunc)


def test_lbf_mix_through_the_catalog(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFLINE_MARL_DATA", str(tmp_path))
    monkeypatch.setitem(collect.SCRIPTED_EPISODES, "lbf", 12)
    ds = catalog.load("lbf", "Foraging-8x8-2p-2f-coop-v3", "mix")  # the gymnasium id names the task too
    assert (tmp_path / "lbf" / "8x8-2p-2f-coop" / "mix" / "meta.json").is_file()
    m = ds.meta
    assert (m["env"], m["task"], m["quality"], m["source"], m["n_agents"], m["n_actions"]) == \
        ("lbf", "8x8-2p-2f-coop", "mix", "generated", 2, 6)
    assert "common.collect recipe --env lbf --task 8x8-2p-2f-coop --quality mix" in m["provenance"]["command"]
    ret = ds.episode_returns()
    assert ds.n_episodes == 24 and ret[12:] == pytest.approx(np.ones(12), abs=1e-5) and ret[:12].mean() < 0.3
    replay(ds, collect.controlled_reset_seeds(0, "lbf-random", 12) + collect.controlled_reset_seeds(0, "lbf-expert", 12))
    assert catalog.resolve("lbf", "8x8-2p-2f-coop", "mix") == tmp_path / "lbf" / "8x8-2p-2f-coop" / "mix"  # cached


def test_rware_conventions_share_trajectories(monkeypatch, tmp_path):
    monkeypatch.setitem(collect.SCRIPTED_EPISODES, "rware", 1)
    native = collect.family_dataset("rware", "tiny-2ag", "medium", workers=1)
    shaped = collect.family_dataset("rware", "tiny-2ag", "medium-alberdice", workers=1)
    assert shaped.meta["env_options"] == {"state": "alberdice", "reward": "alberdice"} and native.meta["env_options"] == {}
    for k in ("obs", "actions", "avail", "terminal", "timeout"):
        np.testing.assert_array_equal(np.asarray(native.arrays[k]), np.asarray(shaped.arrays[k]))
    assert native.arrays["state"].shape[1] == 142 and shaped.arrays["state"].shape[1] == 10
    assert int(native.arrays["timeout"].sum()) == 1 and not native.arrays["terminal"].any()  # cut at 500 steps
    # the recipe's noise is on: fewer deliveries than the expert's fewest on tiny-2ag (24, test above)
    assert native.episode_returns()[0] < 24
    seeds = collect.controlled_reset_seeds(0, "rware-medium", 1)
    replay(native, seeds)
    replay(OfflineDataset.load(shaped.save(tmp_path / "shaped")), seeds)


def test_recipe_names():
    for task in collect.RWARE_TASKS:
        for q in ("expert", "medium", "mix", "expert-alberdice", "medium-alberdice", "mix-alberdice"):
            assert ("rware", task, q) in collect.RECIPES
    for task in collect.LBF_TASKS:
        for q in ("expert", "medium", "mix", "medium-replay"):
            assert ("lbf", task, q) in collect.RECIPES
    assert collect.has_recipe("lbf", "12x12-3p-2f", "expert") and collect.has_recipe("rware", "small-2ag", "mix")
    assert not collect.has_recipe("lbf", "8x8-2p-2f", "expert-alberdice")
    assert not collect.has_recipe("rware", "tiny-2ag", "medium-replay")
    assert "expert-alberdice" in catalog._local_recipes("rware", "tiny-2ag")
