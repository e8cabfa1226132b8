"""Shared helpers of the baseline tests (OMIGA, BCQ-MA, CQL-MA, CFCQL): loading a script by
path, small datasets, stand-in environments and the smoke/resume/eval-only round trip."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import torch

from common.runs import load_checkpoint
from common import envs
from common.data import OfflineDataset
from common.envs import MultiAgentEnv

ROOT = Path(__file__).resolve().parents[1]


def load_file(path: str, key: str | None = None):
    """Import an algorithm file (``comadice.py``, ``baselines/bc.py``) by path, once (the files are
    scripts, not a package)."""
    key = key or "_file_" + path.replace("/", "_").removesuffix(".py")
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, ROOT / path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[key] = mod
    spec.loader.exec_module(mod)
    return mod


def load_script(name: str):
    """Import ``baselines/<name>.py`` by path."""
    return load_file(f"baselines/{name}.py", f"_baseline_{name}")


# ============================================================ matrix datasets
def matrix_dataset(path: Path, joint: list[tuple[int, int]], task: str = "penalty_xor", episodes: int = 20,
                   horizon: int = 50, seed: int = 0) -> Path:
    """Repeated-matrix-game episodes whose joint action is drawn uniformly from ``joint``
    (docs/environments.md#matrix-games-matrix: constant observation [0, 1, 0, 1])."""
    rng = np.random.default_rng(seed)
    payoff = envs.PAYOFFS[task]
    o = np.array([0, 1, 0, 1], np.float32)
    eps = []
    for _ in range(episodes):
        acts = np.array(joint)[rng.integers(0, len(joint), horizon)]
        eps.append(dict(obs=np.broadcast_to(o, (horizon + 1, 2, 4)).copy(), state=np.broadcast_to(o, (horizon + 1, 4)).copy(),
                        actions=acts, reward=payoff[acts[:, 0], acts[:, 1]].astype(np.float32), terminated=False))
    meta = dict(env="matrix", task=task, quality="test", n_actions=2, source="tests", env_options={"episode_limit": horizon})
    OfflineDataset.from_episodes(eps, meta).save(path)
    return path


# ================================================== SMAC stand-in (discrete)
class FakeSMAC(MultiAgentEnv):
    """A tiny discrete stand-in for SMAC: 3 agents, 6 actions, masks that change every step.

    Agent i is shown a target action in {1..5}; action 0 ("no-op") is never available and
    action ((t + i) mod 5) + 1 is unavailable unless it is the target. Each agent on its target
    scores +1; all three at once wins and ends the episode (terminated, won). Stepping an
    unavailable action raises, so a run that ignores the masks fails loudly."""

    n_agents, obs_dim, state_dim, discrete, n_actions = 3, 5, 7, True, 6

    def __init__(self, task: str = "3m", episode_limit: int = 8):
        self.episode_limit = episode_limit
        self.rng = np.random.default_rng(0)

    def _observe(self):
        n = self.n_agents
        obs = np.zeros((n, self.obs_dim), np.float32)
        obs[np.arange(n), self.target - 1] = 1.0
        state = np.concatenate([self.target / 5.0, [self.t / self.episode_limit], np.zeros(3)]).astype(np.float32)
        avail = np.ones((n, self.n_actions), bool)
        avail[:, 0] = False
        blocked = (self.t + np.arange(n)) % 5 + 1
        avail[np.arange(n), blocked] = blocked == self.target
        self.avail = avail
        return obs, state, avail.copy()

    def reset(self, seed=None):
        if seed is not None:
            self.rng = np.random.default_rng(seed)
        self.t = 0
        self.target = self.rng.integers(1, 6, self.n_agents)
        return self._observe()

    def step(self, actions):
        a = np.asarray(actions, dtype=np.int64).reshape(self.n_agents)
        if not self.avail[np.arange(self.n_agents), a].all():
            raise ValueError(f"unavailable action {a} under mask {self.avail.astype(int).tolist()}")
        hit = a == self.target
        self.t += 1
        won = bool(hit.all())
        out = self._observe()
        return (*out, float(hit.sum()), won, (not won) and self.t >= self.episode_limit, {"won": won})


def fake_smac_dataset(path: Path, episodes: int = 40, p_target: float = 0.6, seed: int = 0) -> Path:
    env, rng, eps = FakeSMAC(), np.random.default_rng(seed), []
    for e in range(episodes):
        o, s, av = env.reset(seed=seed * 1000 + e)
        ep = dict(obs=[o], state=[s], avail=[av], actions=[], reward=[])
        while True:
            rand = np.array([rng.choice(np.flatnonzero(av[i])) for i in range(env.n_agents)])
            a = np.where(rng.random(env.n_agents) < p_target, env.target, rand)
            a = np.where(av[np.arange(env.n_agents), a], a, rand)
            o, s, av, r, term, trunc, _ = env.step(a)
            for k, x in (("obs", o), ("state", s), ("avail", av), ("actions", a), ("reward", r)):
                ep[k].append(x)
            if term or trunc:
                break
        eps.append({k: np.asarray(v) for k, v in ep.items()} | {"terminated": term})
    meta = dict(env="smacv1", task="3m", quality="test", n_actions=env.n_actions, source="tests")
    OfflineDataset.from_episodes(eps, meta).save(path)
    return path


# ============================================ continuous stand-in (MaMuJoCo-like)
class FakeContinuous(MultiAgentEnv):
    """A tiny continuous stand-in: 2 agents each move their half of a 4-D point by 0.1 a_i;
    reward -|x - goal|^2; time limit 10 (truncated)."""

    n_agents, obs_dim, state_dim, discrete, act_dim = 2, 4, 4, False, 2
    goal = np.array([0.5, -0.5, 0.3, 0.0], np.float32)

    def __init__(self, task: str = "Toy-2x2", episode_limit: int = 10):
        self.episode_limit = episode_limit

    def reset(self, seed=None):
        self.t, self.x = 0, np.random.default_rng(seed).uniform(-1, 1, 4).astype(np.float32)
        return np.stack([self.x, self.x]), self.x.copy(), np.ones((2, 1), bool)

    def step(self, actions):
        a = np.asarray(actions, np.float32).reshape(2, 2)
        if np.abs(a).max() > 1 + 1e-6:
            raise ValueError("continuous actions must lie in [-1, 1]")
        self.x = self.x + 0.1 * a.reshape(4)
        self.t += 1
        r = -float(((self.x - self.goal) ** 2).sum())
        return np.stack([self.x, self.x]), self.x.copy(), np.ones((2, 1), bool), r, False, self.t >= self.episode_limit, {}


def fake_continuous_dataset(path: Path, episodes: int = 20, seed: int = 0) -> Path:
    env, rng, eps = FakeContinuous(), np.random.default_rng(seed), []
    for e in range(episodes):
        o, s, _ = env.reset(seed=e)
        ep = dict(obs=[o], state=[s], actions=[], reward=[])
        for _ in range(env.episode_limit):
            a = np.clip(np.sign(env.goal - env.x).reshape(2, 2) * 0.5 + rng.normal(0, 0.4, (2, 2)), -1, 1)
            o, s, _, r, term, trunc, _ = env.step(a)
            for k, x in (("obs", o), ("state", s), ("actions", a.astype(np.float32)), ("reward", r)):
                ep[k].append(x)
        eps.append({k: np.asarray(v) for k, v in ep.items()} | {"terminated": False})
    meta = dict(env="mamujoco", task="Toy-2x2", quality="test", source="tests")
    OfflineDataset.from_episodes(eps, meta).save(path)
    return path


def install_fakes(monkeypatch, *, mamujoco: bool = True) -> None:
    """Route ``make_env('smacv1', ...)`` (and, while the real wrapper is missing, ``'mamujoco'``)
    to the stand-ins above."""
    families = dict(envs.FAMILIES)
    families["smacv1"] = (lambda task, **o: FakeSMAC(task, **o), None)
    if mamujoco:
        families["mamujoco"] = (lambda task, **o: FakeContinuous(task, **o), None)
    monkeypatch.setattr(envs, "FAMILIES", families)


# ============================================================== smoke runs
def small_networks(mod) -> dict:
    """batch 16 and width 16 for the scripts whose Args have those fields (the smoke runs' defaults)."""
    names = {f.name for f in dataclasses.fields(mod.Args)}
    return {k: 16 for k in ("batch_size", "hidden") if k in names}


def smoke_resume_eval(mod, tmp_path: Path, dataset: Path, env: str, task: str, **overrides) -> dict:
    """Train 4 updates (checkpoint at 2 and 4), resume to 6, then --eval-only; check the files."""
    run_dir = tmp_path / "run"
    base = dict(env=env, task=task, quality="test", dataset=str(dataset), device="cpu", eval_every=2,
                eval_episodes=2, final_eval_episodes=2, eval_envs=2, log_every=2, run_dir=str(run_dir),
                **{**small_networks(mod), **overrides})
    mod.main(mod.Args(total_steps=4, **base))
    ck = load_checkpoint(run_dir, mod.ALGO)
    assert ck["step"] == 4
    summary = mod.main(mod.Args(total_steps=6, resume=True, **base))
    assert summary["steps"] == 6
    metrics = json.loads((run_dir / "metrics.json").read_text())
    entry = metrics[env][f"{task}__test"][mod.ALGO]["seed_0"]
    keys = sorted((k for k in entry if k.startswith("step_")), key=lambda k: int(k.split("_")[1]))
    steps = [entry[k]["step_count"] for k in keys]
    # evaluations every 2 updates (a script may skip some, e.g. MADTKD's teacher phase), none repeated
    assert steps == sorted(set(steps)) and set(steps) <= {2, 4, 6} and steps[-1] == 6, steps
    assert len(entry["absolute_metrics"]["episode_return"]) == 2
    assert (run_dir / "done.json").is_file() and (run_dir / "config.json").is_file()
    res = mod.main(mod.Args(eval_only=True, checkpoint=str(run_dir), **{**base, "run_dir": ""}))
    assert np.isfinite(res["return_mean"])
    return summary


def resume_is_exact(mod, tmp_path: Path, dataset: Path, env: str, task: str, **overrides) -> None:
    """Training 0 -> 6 in one go and 0 -> 3, resume -> 6 give the same parameters."""
    base = dict(env=env, task=task, quality="test", dataset=str(dataset), device="cpu", eval_every=3,
                eval_episodes=1, final_eval_episodes=1, eval_envs=1, log_every=3,
                **{**small_networks(mod), **overrides})
    mod.main(mod.Args(total_steps=6, run_dir=str(tmp_path / "a"), **base))
    mod.main(mod.Args(total_steps=3, run_dir=str(tmp_path / "b"), **base))
    mod.main(mod.Args(total_steps=6, run_dir=str(tmp_path / "b"), resume=True, **base))
    a = load_checkpoint(tmp_path / "a")["modules"]["nets"]
    b = load_checkpoint(tmp_path / "b")["modules"]["nets"]
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{k} differs after resume")


def separable_matrix(monkeypatch) -> None:
    """Register matrix task 'separable': payoff u0(a0) + u1(a1) with u0 = (0, 1), u1 = (0.5, 0);
    its unique optimum is (B, A) paying 1.5 a step; a uniform behaviour policy earns 0.75."""
    payoffs = dict(envs.PAYOFFS, separable=np.array([[0.5, 0.0], [1.5, 1.0]], np.float32))
    monkeypatch.setattr(envs, "PAYOFFS", payoffs)
    families = dict(envs.FAMILIES, matrix=(envs.FAMILIES["matrix"][0], tuple(payoffs)))
    monkeypatch.setattr(envs, "FAMILIES", families)


def args_dict(mod, **kw) -> dict:
    return {f.name: getattr(mod.Args(**kw), f.name) for f in dataclasses.fields(mod.Args)}


def rollout_dataset(path: Path, env_name: str, task: str, episodes: int = 4, seed: int = 0, max_steps: int | None = None,
                    **options) -> Path:
    """Episodes of a uniformly random (masked) policy in ``make_env(env_name, task, **options)``."""
    env = envs.make_env(env_name, task, **options)
    rng, eps = np.random.default_rng(seed), []
    for e in range(episodes):
        o, s, av = env.reset(seed=seed * 1000 + e)
        ep = dict(obs=[o], state=[s], avail=[av], actions=[], reward=[])
        term = False
        for t in range(max_steps or env.episode_limit):
            if env.discrete:
                a = np.array([rng.choice(np.flatnonzero(av[i])) for i in range(env.n_agents)])
            else:
                a = rng.uniform(-1, 1, (env.n_agents, env.act_dim)).astype(np.float32)
            o, s, av, r, term, trunc, _ = env.step(a)
            for k, x in (("obs", o), ("state", s), ("avail", av), ("actions", a), ("reward", r)):
                ep[k].append(x)
            if term or trunc:
                break
        eps.append({k: np.asarray(v) for k, v in ep.items()} | {"terminated": bool(term)})
    env.close()
    meta = dict(env=env_name, task=task, quality="test", source="tests", env_options=dict(options))
    if env.discrete:
        meta["n_actions"] = env.n_actions
    OfflineDataset.from_episodes(eps, meta).save(path)
    return path


def continuous_smoke_data(tmp_path: Path, monkeypatch) -> tuple[Path, str, str]:
    """(dataset, env, task) for a continuous smoke run: two short random episodes of the real
    Hopper-3x1 where MaMuJoCo installs, else the continuous stand-in."""
    import pytest

    try:
        env_or_skip("mamujoco", "Hopper-3x1")
        data = rollout_dataset(tmp_path / "data", "mamujoco", "Hopper-3x1", episodes=2, max_steps=20)
        return data, "mamujoco", "Hopper-3x1"
    except pytest.skip.Exception:
        install_fakes(monkeypatch)
        return fake_continuous_dataset(tmp_path / "data"), "mamujoco", "Toy-2x2"


def env_or_skip(env_name: str, task: str, **options) -> None:
    """Skip the calling test when ``env_name`` is not implemented or not installed here."""
    import pytest

    try:
        envs.make_env(env_name, task, **options).close()
    except envs.EnvError as e:
        pytest.skip(f"{env_name}/{task} not available: {e}")


def one_thread():
    """Generator for an autouse fixture: tiny networks run fastest (and fairest to the other
    test workers) on one intra-op thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
