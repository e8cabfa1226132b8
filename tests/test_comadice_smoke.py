"""ComaDICE end to end: a few hundred updates on every environment family that runs here
(real environments where they are installed, stand-ins for StarCraft), run directory contents,
--resume (bit-identical continuation), --eval-only, and the one-line error without StarCraft."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import comadice as C
from common.runs import load_checkpoint
from common import OfflineMarlError, envs
from common.data import OfflineDataset

ROOT = Path(__file__).resolve().parents[1]


def rollout_dataset(env, episodes, seed=0, quality="test"):
    """Random-action episodes of ``env`` (available actions only; continuous actions include +-1)."""
    rng = np.random.default_rng(seed)
    eps = []
    for e in range(episodes):
        obs, state, avail = env.reset(seed=seed + e)
        rec = dict(obs=[obs], state=[state], avail=[avail], actions=[], reward=[])
        for _ in range(env.episode_limit):
            if env.discrete:
                a = np.array([rng.choice(np.flatnonzero(av)) for av in avail])
            else:
                a = np.clip(rng.uniform(-1.3, 1.3, size=(env.n_agents, env.act_dim)), -1, 1).astype(np.float32)
            obs, state, avail, r, term, trunc, _ = env.step(a)
            for k, v in (("obs", obs), ("state", state), ("avail", avail), ("actions", a), ("reward", r)):
                rec[k].append(v)
            if term or trunc:
                break
        eps.append({k: np.asarray(v) for k, v in rec.items()} | {"terminated": bool(term)})
    meta = dict(env=env.spec["env"], task=env.spec["task"], quality=quality, discrete=env.discrete, source="test",
                env_options=env.spec["options"], **({"n_actions": env.n_actions} if env.discrete else {}))
    return OfflineDataset.from_episodes(eps, meta)


class StandIn(envs.MultiAgentEnv):
    """A small random game that speaks the protocol: discrete with changing available actions and a
    winner (SMAC-like), or continuous (MaMuJoCo-like)."""

    def __init__(self, discrete=True, n_agents=3, obs_dim=7, state_dim=9, n_actions=6, act_dim=2, episode_limit=12):
        self.discrete, self.n_agents, self.obs_dim, self.state_dim = discrete, n_agents, obs_dim, state_dim
        self.n_actions, self.act_dim = (n_actions, 1) if discrete else (1, act_dim)
        self.episode_limit = episode_limit

    def _observe(self):
        obs = self.rng.normal(size=(self.n_agents, self.obs_dim)).astype(np.float32)
        avail = np.ones((self.n_agents, self.n_actions), bool)
        if self.discrete:
            avail[:, 1:] = self.rng.random((self.n_agents, self.n_actions - 1)) < 0.6  # action 0 (no-op) always
        return obs, obs.reshape(-1)[: self.state_dim].copy(), avail

    def reset(self, seed=None):
        self.rng, self.t = np.random.default_rng(seed), 0
        return self._observe()

    def step(self, actions):
        self.t += 1
        a = np.asarray(actions, dtype=np.float64)
        r = float(a.sum() % 3) if self.discrete else float(-np.square(a - 0.5).sum())
        term = self.discrete and self.rng.random() < 0.1
        info = {"won": bool(term and r > 0)} if self.discrete else {}
        return (*self._observe(), r, term, self.t >= self.episode_limit and not term, info)


@pytest.fixture
def stand_ins(monkeypatch):
    """smacv2 and (until its wrapper is installed) mamujoco answer with stand-ins."""
    monkeypatch.setitem(envs.FAMILIES, "smacv2", (lambda task, **o: StandIn(discrete=True, **o), None))
    try:
        envs.make_env("mamujoco", "Hopper-3x1")
    except OfflineMarlError:
        monkeypatch.setitem(envs.FAMILIES, "mamujoco", (lambda task, **o: StandIn(discrete=False, n_agents=3, **o), None))


def small(**kw):
    base = dict(total_steps=160, eval_every=80, log_every=40, eval_episodes=2, final_eval_episodes=3, batch_size=32,
                hidden=32, mixer_hidden=16, eval_envs=2, quality="test")
    return C.Args(**(base | kw))


def check_run(run_dir: Path, steps: int, win_rate: bool = False):
    assert (run_dir / "config.json").is_file() and list(run_dir.glob("events.out.tfevents.*"))
    ckpt = load_checkpoint(run_dir, "comadice")
    assert ckpt["step"] == steps
    metrics = json.loads((run_dir / "metrics.json").read_text())
    (entry,) = [t for t in metrics[ckpt["args"]["env"]].values()]
    seed = entry["comadice"]["seed_0"]
    assert "step_0" in seed and seed[max((k for k in seed if k.startswith("step_")), key=lambda k: int(k[5:]))][
        "step_count"] == steps  # the last update is evaluated too
    assert ("win_rate" in seed["absolute_metrics"]) == win_rate
    done = json.loads((run_dir / "done.json").read_text())
    assert done["steps"] == steps and done["updates_per_s"] > 0
    return ckpt


@pytest.mark.parametrize("family,task,extra", [
    ("matrix", "penalty_xor", {"mixer_layers": 2, "f_divergence": "kl"}),
    ("bridge", "hard", {"f_divergence": "chi2"}),
    ("bridge", "hard", {"data_distribution": "discounted"}),
    ("mamujoco", "Hopper-3x1", {}),
    ("mamujoco", "Hopper-3x1", {"reference_code": True}),
    ("rware", "tiny-2ag", {}),
    ("smacv2", "protoss_5_vs_5", {"reference_code": True}),
])
def test_smoke_every_family(family, task, extra, tmp_path, stand_ins):
    try:  # short episodes: a smoke test
        env = envs.make_env(family, task, **({} if family == "smacv2" else {"episode_limit": 25}))
    except OfflineMarlError as e:
        pytest.skip(f"{family} cannot be made here: {e}")
    ds = rollout_dataset(env, episodes=6)
    path = ds.save(tmp_path / "data")
    run_dir = tmp_path / "run"
    summary = C.main(small(env=family, task=task, dataset=str(path), run_dir=str(run_dir), **extra))
    ckpt = check_run(run_dir, 160, win_rate=family == "smacv2")
    assert np.isfinite(summary["return_mean"])
    if extra.get("reference_code"):
        a = ckpt["args"]
        assert a["nu_loss"] == "reference" and a["policy_weights"] == "per-agent"
        assert a["return_to_go"] == a["ignore_terminal"] == (family == "smacv2")
        assert a["action_scale"] == (4.0 if family == "mamujoco" else 1.0)
    act = C.load_policy(str(run_dir))
    obs, state, avail = env.reset(seed=0)
    a = act(obs[None], state[None], avail[None])[0]
    if env.discrete:
        assert avail[np.arange(env.n_agents), a].all()
    else:
        assert a.shape == (env.n_agents, env.act_dim) and np.abs(a).max() <= 1


@pytest.mark.parametrize("data_distribution", ["rows", "discounted"])
def test_resume_continues_bit_identically_and_eval_only(tmp_path, monkeypatch, data_distribution):
    monkeypatch.chdir(tmp_path)
    env = envs.make_env("matrix", "penalty_xor", episode_limit=20)
    path = rollout_dataset(env, episodes=8).save(tmp_path / "data")
    kw = dict(env="matrix", task="penalty_xor", dataset=str(path), eval_every=40, eval_episodes=0, hidden=16,
              data_distribution=data_distribution)
    C.main(small(total_steps=80, run_dir=str(tmp_path / "straight"), **kw))
    C.main(small(total_steps=40, **kw))  # runs/matrix__penalty_xor__test__comadice__0__<time>
    (first,) = list((tmp_path / "runs").iterdir())
    summary = C.main(small(total_steps=80, resume=True, **kw))
    assert list((tmp_path / "runs").iterdir()) == [first] and summary["steps"] == 80
    a = load_checkpoint(tmp_path / "straight")["modules"]["model"]
    b = load_checkpoint(first)["modules"]["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "evaluation" in summary  # trained without an environment

    # --eval-only evaluates the checkpoint and completes the run's metrics.json
    out = C.main(C.Args(eval_only=True, checkpoint=str(first / "checkpoints" / "latest.pt"), final_eval_episodes=4))
    assert out["episodes"] == 4 and out["step"] == 80 and np.isfinite(out["return_mean"])
    metrics = json.loads((first / "metrics.json").read_text())
    assert len(metrics["matrix"]["penalty_xor__test"]["comadice"]["seed_0"]["absolute_metrics"]["episode_return"]) == 4
    out = C.main(C.Args(eval_only=True, checkpoint=str(first), final_eval_episodes=2, eval_sample=True))
    assert out["episodes"] == 2 and "metrics" not in out  # an existing final evaluation is not overwritten
    assert (first / "metrics.json").read_text() == json.dumps(metrics, indent=1) + "\n"
    # a finished run is not trained again
    assert C.main(small(total_steps=80, resume=True, **kw))["steps"] == 80


def test_without_starcraft_one_clear_message():
    """The user's example without StarCraft II (and without a public protoss_5_vs_5 dataset)."""
    with pytest.raises(OfflineMarlError) as e:
        C.main(C.Args(env="smacv2", task="protoss_5_vs_5", alpha=10))
    msg = str(e.value)
    assert "--eval-episodes 0" in msg and "--eval-only --checkpoint" in msg and "\n" not in msg
    proc = subprocess.run([sys.executable, str(ROOT / "comadice.py"), "--env", "smacv2", "--task", "protoss_5_vs_5",
                           "--alpha", "10"], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "OFFLINE_MARL_DEBUG"})
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--eval-episodes 0" in lines[0]
