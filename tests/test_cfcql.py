"""CFCQL: the counterfactual sweep, its reduction to per-agent CQL under an additive mixer, the
softmax-temperature agent weights, the monotonic mixer, learning a separable game, smoke runs."""


import json
import os

import numpy as np
import pytest
import torch

from _baselines_common import (continuous_smoke_data, env_or_skip, fake_smac_dataset, install_fakes,
                               load_script, matrix_dataset, one_thread, resume_is_exact, rollout_dataset,
                               separable_matrix, smoke_resume_eval)

cfcql = load_script("cfcql")
cql = load_script("cql")
_one_thread = pytest.fixture(autouse=True)(one_thread)


def _batch(B=6, N=3, K=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    q_all = torch.randn(B, N, K, generator=g) * 2
    avail = torch.rand(B, N, K, generator=g) < 0.7
    a = torch.multinomial(avail.float().view(-1, K) + 1e-9, 1, generator=g).view(B, N)
    avail.scatter_(-1, a[..., None], True)
    return q_all, avail, a


@torch.no_grad()
def test_counterfactual_sweep_replaces_one_agent_at_a_time():
    torch.manual_seed(0)
    B, N, K, S = 2, 3, 4, 5
    mixer = cfcql.QMixer(S, N, 8, 16)
    q_all, _, a = _batch(B, N, K)
    s = torch.randn(B, S)
    q_data = q_all.gather(-1, a[..., None])[..., 0]
    cf = cfcql.counterfactual_q_tot(q_all, q_data, lambda v: mixer(v, s))
    for b in range(B):
        for i in range(N):
            for k in range(K):
                v = q_data[b].clone()
                v[i] = q_all[b, i, k]
                assert cf[b, i, k].item() == pytest.approx(mixer(v[None], s[b:b + 1])[0].item(), rel=1e-5, abs=1e-6)
    # at the dataset action the sweep gives back Q_tot(s, a^D)
    np.testing.assert_allclose(cf.gather(-1, a[..., None])[..., 0], mixer(q_data, s)[:, None].expand(B, N), rtol=1e-5)


def test_reduces_to_per_agent_cql_when_the_mixer_is_additive():
    q_all, avail, a = _batch()
    N = q_all.shape[1]
    q_data = q_all.gather(-1, a[..., None])[..., 0]
    cf = cfcql.counterfactual_q_tot(q_all, q_data, lambda v: v.sum(-1))
    per_agent = cfcql.log_mean_exp(q_all, avail) - q_data  # CQL penalty of each Q_i on its own
    uniform = torch.full_like(q_data, 1.0 / N)
    pen = cfcql.cfcql_penalty(cf, q_data.sum(-1), uniform, avail)
    np.testing.assert_allclose(pen, per_agent.mean(-1), rtol=1e-5, atol=1e-6)
    # ... = (1/N) x CQL-MA's joint penalty with unit weights
    np.testing.assert_allclose(pen, cql.cql_penalty_discrete(q_all, a, avail, torch.ones_like(q_data)) / N, rtol=1e-5, atol=1e-6)
    # any agent weights lambda: the lambda-weighted sum of the per-agent penalties
    lam = torch.softmax(torch.randn_like(q_data), -1)
    np.testing.assert_allclose(cfcql.cfcql_penalty(cf, q_data.sum(-1), lam, avail), (lam * per_agent).sum(-1),
                               rtol=1e-5, atol=1e-6)


def test_penalty_zero_when_q_tot_ignores_the_swept_action_and_positive_when_it_prefers_ood():
    B, N, K = 3, 2, 4
    avail = torch.ones(B, N, K, dtype=torch.bool)
    lam = torch.full((B, N), 0.5)
    q_tot = torch.full((B,), 1.3)
    assert cfcql.cfcql_penalty(torch.full((B, N, K), 1.3), q_tot, lam, avail).abs().max() < 1e-6
    cf = torch.full((B, N, K), 1.3)
    cf[..., 1:] = 3.0  # dataset action is 0
    assert (cfcql.cfcql_penalty(cf, q_tot, lam, avail) > 0.5).all()


def test_agent_weights_softmax_temperature():
    dev = torch.tensor([[0.1, 2.0, 0.5], [1.0, 1.0, 1.0]])
    np.testing.assert_allclose(cfcql.agent_weights(dev, 0.0), torch.full((2, 3), 1 / 3))
    w = cfcql.agent_weights(dev, 5.0)
    np.testing.assert_allclose(w.sum(-1), torch.ones(2), rtol=1e-6)
    assert w[0].argmax() == 1 and w[0, 1] > w[0, 2] > w[0, 0]
    np.testing.assert_allclose(w[1], torch.full((3,), 1 / 3), rtol=1e-6)
    np.testing.assert_allclose(cfcql.agent_weights(dev, 1e4)[0], torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)
    np.testing.assert_allclose(w[0], torch.exp(5 * dev[0]) / torch.exp(5 * dev[0]).sum(), rtol=1e-6)


def test_counterfactual_kl():
    q_all, avail, _ = _batch()
    logmu = torch.log_softmax(q_all.masked_fill(~avail, float("-inf")), -1)
    same = cfcql.counterfactual_kl(q_all, logmu.clamp(min=-1e9), avail)
    np.testing.assert_allclose(same, torch.zeros_like(same), atol=1e-5)
    uniform = torch.log(avail.float() / avail.sum(-1, keepdim=True)).clamp(min=-1e9)
    kl = cfcql.counterfactual_kl(q_all, uniform, avail)
    # KL(mu || uniform over m actions) = log m - H(mu)
    ent = -(logmu.exp() * logmu.masked_fill(~avail, 0)).sum(-1)
    np.testing.assert_allclose(kl, torch.log(avail.sum(-1).float()) - ent, rtol=1e-5, atol=1e-6)
    assert (kl >= -1e-6).all()


def test_qmix_mixer_is_monotonic_in_every_agent_value():
    torch.manual_seed(0)
    mixer = cfcql.QMixer(4, 3, 8, 16)
    q = torch.randn(64, 7, 3, requires_grad=True)
    mixer(q, torch.randn(64, 4)).sum().backward()
    assert (q.grad >= 0).all() and q.grad.shape == (64, 7, 3)


def test_learns_the_optimum_of_a_separable_game(monkeypatch, tmp_path):
    separable_matrix(monkeypatch)
    data = matrix_dataset(tmp_path / "data", [(0, 0), (0, 1), (1, 0), (1, 1)], task="separable")
    s = cfcql.main(cfcql.Args(env="matrix", task="separable", quality="test", dataset=str(data), device="cpu",
                              total_steps=200, batch_size=64, hidden=64, lr=3e-3, gamma=0.5, cql_alpha=1.0,
                              behaviour_steps=100, target_update_interval=20, eval_every=300, eval_episodes=1,
                              final_eval_episodes=1, eval_envs=1, run_dir=str(tmp_path / "run")))
    assert s["return_per_step"] == pytest.approx(1.5)  # behaviour policy: 0.75 a step


def test_smoke_matrix(tmp_path):
    data = matrix_dataset(tmp_path / "data", [(0, 1), (1, 0)])
    smoke_resume_eval(cfcql, tmp_path, data, "matrix", "penalty_xor", behaviour_steps=5, target_update_interval=2)


def test_smoke_smac_standin_and_exact_resume(monkeypatch, tmp_path):
    install_fakes(monkeypatch)
    data = fake_smac_dataset(tmp_path / "data")
    smoke_resume_eval(cfcql, tmp_path / "smoke", data, "smacv1", "3m", behaviour_steps=5)
    resume_is_exact(cfcql, tmp_path / "resume", data, "smacv1", "3m", behaviour_steps=5, target_update_interval=2)


def test_smoke_bridge(tmp_path):
    env_or_skip("bridge", "hard")
    data = rollout_dataset(tmp_path / "data", "bridge", "hard")
    smoke_resume_eval(cfcql, tmp_path, data, "bridge", "hard", behaviour_steps=5, softmax_temp=0.0)


def test_smoke_mamujoco_and_exact_resume(monkeypatch, tmp_path):
    data, env, task = continuous_smoke_data(tmp_path, monkeypatch)
    smoke_resume_eval(cfcql, tmp_path / "smoke", data, env, task, behaviour_steps=5, n_action_samples=3)
    resume_is_exact(cfcql, tmp_path / "resume", data, env, task, behaviour_steps=5, n_action_samples=3)


def test_smoke_rware(tmp_path):
    env_or_skip("rware", "tiny-2ag")
    data = rollout_dataset(tmp_path / "data", "rware", "tiny-2ag", episodes=2, episode_limit=20)
    smoke_resume_eval(cfcql, tmp_path, data, "rware", "tiny-2ag", behaviour_steps=5)


def _behaviour_run(data, run_dir, **kw):
    base = dict(env="matrix", task="penalty_xor", quality="test", dataset=str(data), device="cpu", threads=1,
                total_steps=2, batch_size=32, hidden=32, behaviour_steps=40, eval_episodes=0, eval_every=2,
                log_every=1, run_dir=str(run_dir))
    cfcql.main(cfcql.Args(**{**base, **kw}))
    return torch.load(run_dir / "checkpoints" / "latest.pt", weights_only=True)["modules"]["nets"]


def test_behaviour_model_is_trained_once_per_dataset_and_settings(tmp_path, monkeypatch, capsys):
    """The behaviour model is cached under the data cache (never in the --dataset folder), keyed by
    the data's bytes and the behaviour settings: a second run (another seed) loads it, and its
    result equals a run that trained it; another setting or a changed dataset trains again; a
    crafted cache file is never unpickled."""
    monkeypatch.setenv("OFFLINE_MARL_DATA", str(tmp_path / "cache"))
    data = matrix_dataset(tmp_path / "data", [(0, 1), (1, 0), (1, 1)])
    before = sorted(p.name for p in data.iterdir())
    first = _behaviour_run(data, tmp_path / "r1")
    assert "trained (40 updates) and cached" in capsys.readouterr().err
    cached = sorted((tmp_path / "cache" / "behaviour").glob("*.pt"))
    assert len(cached) == 1 and sorted(p.name for p in data.iterdir()) == before
    # the same data and settings, another seed: loaded, the same weights
    again = _behaviour_run(data, tmp_path / "r2", seed=1)
    assert f"loaded from {cached[0]}" in capsys.readouterr().err
    beh = [k for k in first if k.startswith("behaviour.")]
    assert beh and all(torch.equal(first[k], again[k]) for k in beh)
    # a run that loads it is the run that trained it, to the bit (the behaviour phase uses its own seed)
    same = _behaviour_run(data, tmp_path / "r3")
    assert "loaded from" in capsys.readouterr().err
    assert all(torch.equal(first[k], same[k]) for k in first)
    fresh = _behaviour_run(data, tmp_path / "r4", behaviour_cache=False)
    assert "trained (40 updates)" in capsys.readouterr().err
    assert all(torch.equal(first[k], fresh[k]) for k in first)
    # another behaviour setting: trained again, a second file
    _behaviour_run(data, tmp_path / "r5", behaviour_steps=41)
    assert "trained (41 updates) and cached" in capsys.readouterr().err
    assert len(list((tmp_path / "cache" / "behaviour").glob("*.pt"))) == 2
    # the same meta but other actions: another dataset, trained again
    other = matrix_dataset(tmp_path / "data2", [(0, 1), (1, 0), (1, 1)], seed=1)
    assert json.loads((other / "meta.json").read_text()) == json.loads((data / "meta.json").read_text())
    _behaviour_run(other, tmp_path / "r6")
    assert "trained (40 updates) and cached" in capsys.readouterr().err
    assert len(list((tmp_path / "cache" / "behaviour").glob("*.pt"))) == 3
    # a crafted file in place of the cache entry: refused by the weights-only load, trained again
    marker = tmp_path / "PWNED"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"key": None, "x": Evil()}, cached[0])
    _behaviour_run(data, tmp_path / "r7")
    assert "trained (40 updates) and cached" in capsys.readouterr().err and not marker.exists()
    assert torch.load(cached[0], weights_only=True)["schema"] == "offline-marl-behaviour/1"
