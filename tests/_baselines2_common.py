"""Shared helpers of the ICQ, OMAR and MADTKD tests: loading a script by path, tiny datasets of
every environment family that installs here (SMAC through the stand-in packages of
test_envs_smac.py), and the train / resume / eval-only round trip."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np

from common import collect, envs
from common.data import OfflineDataset
from common.envs import MultiAgentEnv

from _baselines_common import (  # noqa: F401  (re-exported to the ICQ, OMAR and MADTKD tests)
    env_or_skip, load_script, one_thread, resume_is_exact, smoke_resume_eval)

ROOT = Path(__file__).resolve().parents[1]


def random_data(path: Path, env: str, task: str, episodes: int = 4, seed: int = 0, **env_options) -> Path:
    """``episodes`` uniform-random episodes of env/task (common.collect), saved at ``path``."""
    collect.random_dataset(env, task, episodes, seed=seed, env_options=env_options, n_envs=2).save(path)
    return path


def install_fake_smac(monkeypatch, tmp_path: Path) -> None:
    """The stand-in ``smac`` package and a StarCraft II directory with the maps (as test_envs_smac.py)."""
    from test_envs_smac import FakeStarCraft2Env, game_dir

    top, sub = types.ModuleType("smac"), types.ModuleType("smac.env")
    sub.StarCraft2Env = FakeStarCraft2Env
    top.env = sub
    monkeypatch.setitem(sys.modules, "smac", top)
    monkeypatch.setitem(sys.modules, "smac.env", sub)
    monkeypatch.setenv("SC2PATH", str(game_dir(tmp_path)))


def matrix_data(path: Path, joint: list[tuple[int, int]], task: str = "penalty_xor", episodes: int = 10,
                horizon: int = 5, seed: int = 0) -> Path:
    """Repeated matrix-game episodes whose joint action is drawn uniformly from ``joint``."""
    rng = np.random.default_rng(seed)
    o = np.array([0, 1, 0, 1], np.float32)
    eps = []
    for _ in range(episodes):
        acts = np.array(joint)[rng.integers(0, len(joint), horizon)]
        eps.append(dict(obs=np.broadcast_to(o, (horizon + 1, 2, 4)).copy(),
                        state=np.broadcast_to(o, (horizon + 1, 4)).copy(),
                        actions=acts, reward=envs.PAYOFFS[task][acts[:, 0], acts[:, 1]].astype(np.float32),
                        terminated=False))
    meta = dict(env="matrix", task=task, quality="test", n_actions=2, source="tests",
                env_options={"episode_limit": horizon})
    OfflineDataset.from_episodes(eps, meta).save(path)
    return path


class ContinuousBandit(MultiAgentEnv):
    """One-step continuous game: 2 agents, 1-D actions, constant observations; the team reward is
    -(a_0 - 0.5)^2 - (a_1 + 0.3)^2, so the best joint action is (0.5, -0.3)."""

    n_agents, obs_dim, state_dim, discrete, act_dim, episode_limit = 2, 2, 2, False, 1, 1
    best = np.array([0.5, -0.3], np.float32)

    def __init__(self, task: str = "one_step"):
        self._o = np.array([1.0, 0.0], np.float32)

    def reset(self, seed=None):
        return np.stack([self._o, self._o]), self._o.copy(), np.ones((2, 1), bool)

    def step(self, actions):
        a = np.asarray(actions, np.float32).reshape(2)
        r = -float(((a - self.best) ** 2).sum())
        return np.stack([self._o, self._o]), self._o.copy(), np.ones((2, 1), bool), r, True, False, {}


def continuous_bandit(monkeypatch, path: Path, episodes: int = 256, seed: int = 0) -> Path:
    """Register env ``cbandit`` and write ``episodes`` one-step episodes with uniform actions."""
    monkeypatch.setitem(envs.FAMILIES, "cbandit", (lambda task, **o: ContinuousBandit(task, **o), None))
    rng, env, eps = np.random.default_rng(seed), ContinuousBandit(), []
    for _ in range(episodes):
        o, s, _ = env.reset()
        a = rng.uniform(-1, 1, (2, 1)).astype(np.float32)
        o2, s2, _, r, *_ = env.step(a)
        eps.append(dict(obs=np.stack([o, o2]), state=np.stack([s, s2]), actions=a[None],
                        reward=np.array([r], np.float32), terminated=True))
    OfflineDataset.from_episodes(eps, dict(env="cbandit", task="one_step", quality="test", source="tests")).save(path)
    return path


SMOKE_FAMILIES = ["matrix", "bridge", "smacv1", "rware", "mamujoco"]


def smoke_family(mod, family: str, tmp_path: Path, monkeypatch, per_family: dict | None = None, **small) -> None:
    """The smoke run of one environment family (train, resume, --eval-only; exact resume on the
    matrix game and MaMuJoCo) on a tiny dataset; ``per_family[family]`` adds flags there."""
    extra = {**small, **(per_family or {}).get(family, {})}
    if family == "matrix":
        data, task = matrix_data(tmp_path / "data", [(0, 1), (1, 0)]), "penalty_xor"
    elif family == "bridge":
        data, task = random_data(tmp_path / "data", "bridge", "hard", episode_limit=12), "hard"
        extra.setdefault("eval_sample", True)
    elif family == "smacv1":
        install_fake_smac(monkeypatch, tmp_path)
        data, task = random_data(tmp_path / "data", "smacv1", "3m"), "3m"
    elif family == "rware":
        env_or_skip("rware", "tiny-2ag")
        data, task = random_data(tmp_path / "data", "rware", "tiny-2ag", episodes=2, episode_limit=10), "tiny-2ag"
    else:
        env_or_skip("mamujoco", "Hopper-3x1")
        data, task = random_data(tmp_path / "data", "mamujoco", "Hopper-3x1", episodes=2, episode_limit=15), "Hopper-3x1"
    smoke_resume_eval(mod, tmp_path / "smoke", data, family, task, **extra)
    if family in ("matrix", "mamujoco"):
        resume_is_exact(mod, tmp_path / "resume", data, family, task, **extra)
