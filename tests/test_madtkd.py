"""MADTKD: causality of teacher and students, what each of them may read, the distillation terms,
a student that matches its teacher after distillation on a tiny dataset, the return-conditioned
act_fn against the training forward pass, and smoke runs with save/resume on every environment
family that installs here."""

import numpy as np
import pytest
import torch

from _baselines2_common import (SMOKE_FAMILIES, continuous_bandit, load_script, one_thread, smoke_family)
from common.runs import load_checkpoint
from common.collect import bridge_optimal_dataset
from common.data import OfflineDataset

madtkd = load_script("madtkd")
_one_thread = pytest.fixture(autouse=True)(one_thread)
SMALL = dict(embed_dim=16, n_layers=1, n_heads=1, context_len=4, batch_size=4, dropout=0.0, teacher_steps=3,
             warmup_steps=1)


def _model(n_agents=3, obs_dim=5, discrete=True, seed=0):
    torch.manual_seed(seed)
    return madtkd.DecisionTransformer(obs_dim, 4, 2, discrete, n_agents, 50, 16, 2, 2, 0.0).eval()


def _inputs(B=2, T=6, N=3, obs_dim=5, discrete=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    rtg = torch.randn(B, T, generator=g)
    obs = torch.randn(B, T, N, obs_dim, generator=g)
    act = torch.randint(0, 4, (B, T, N), generator=g) if discrete else torch.rand(B, T, N, 2, generator=g) * 2 - 1
    t = torch.arange(T).expand(B, T)
    return rtg, obs, act, t


@pytest.mark.parametrize("discrete", [True, False])
@torch.no_grad()
def test_transformers_are_causal(discrete):
    for run in (madtkd.run_teacher, madtkd.run_students):
        model = _model(discrete=discrete)
        rtg, obs, act, t = _inputs(discrete=discrete)
        feat, out = run(model, rtg, obs, act, t)
        for s in range(6):
            rtg2, obs2, act2, _ = _inputs(discrete=discrete, seed=s + 1)  # new inputs after step s ...
            r, o, a = rtg.clone(), obs.clone(), act.clone()
            r[:, s + 1:], o[:, s + 1:] = rtg2[:, s + 1:], obs2[:, s + 1:]
            a[:, s:] = act2[:, s:]  # ... and new actions from step s on (a_s is what step s predicts)
            f2, out2 = run(model, r, o, a, t)
            torch.testing.assert_close(out2[:, :s + 1], out[:, :s + 1])  # outputs up to s do not change
            torch.testing.assert_close(f2[:, :s + 1], feat[:, :s + 1])
            if s < 5:
                assert not torch.allclose(out2[:, s + 1:], out[:, s + 1:])  # later ones do


@torch.no_grad()
def test_teacher_reads_every_agent_and_a_student_only_its_own():
    model = _model()
    rtg, obs, act, t = _inputs()
    obs2 = obs.clone()
    obs2[:, 3, 2] += 1.0  # agent 2's observation at step 3
    for run, others_change in ((madtkd.run_teacher, True), (madtkd.run_students, False)):
        _, out = run(model, rtg, obs, act, t)
        _, out2 = run(model, rtg, obs2, act, t)
        torch.testing.assert_close(out2[:, :3], out[:, :3])
        assert not torch.allclose(out2[:, 3, 2], out[:, 3, 2])
        assert (not torch.allclose(out2[:, 3, :2], out[:, 3, :2])) == others_change


def test_mask_layout():
    m = madtkd.time_causal_mask(2, 2)  # tokens: R0 o0 o0 a0 a0 | R1 o1 o1 a1 a1 ; True = forbidden
    seen_by_obs0 = ~m[1]
    assert seen_by_obs0.tolist() == [True, True, True, False, False] + [False] * 5
    seen_by_obs1 = ~m[6]
    assert seen_by_obs1.tolist() == [True] * 5 + [True, True, True, False, False]
    assert (~m[3]).tolist()[:5] == [True, True, True, True, False]  # an action sees its step's R, o and itself


def test_relations_and_distillation_terms():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 3, 4, 8, generator=g)
    r = madtkd.relation_matrix(h)
    torch.testing.assert_close(r, r.transpose(-1, -2))
    torch.testing.assert_close(torch.diagonal(r, dim1=-2, dim2=-1), torch.ones(2, 3, 4))
    torch.testing.assert_close(madtkd.relation_matrix(3.0 * h), r)  # scale-free
    out = torch.randn(2, 3, 4, 5, generator=g)
    avail = torch.ones(2, 3, 4, 5, dtype=torch.bool)
    mask = torch.ones(2, 3, dtype=torch.bool)
    zero = madtkd.distillation_losses(out, out, h, h, avail, mask, True)
    assert all(v.abs().item() < 1e-6 for v in zero.values())
    other = madtkd.distillation_losses(out + torch.randn(out.shape, generator=g), out, h + 1.0, h, avail, mask, True)
    assert all(v.item() > 0 for v in other.values())
    # masked steps do not count
    mask[1] = False
    part = madtkd.distillation_losses(torch.where(mask[..., None, None], out, out + 5.0), out, h, h, avail, mask, True)
    assert part["action"].abs().item() < 1e-6


def test_student_matches_its_teacher_after_distillation_on_a_tiny_dataset(tmp_path):
    """20 Bridge episodes of the scripted optimal policy; the students get no behaviour-cloning loss
    (--bc-coef 0): what they know of the data comes from the teacher."""
    data = bridge_optimal_dataset(seed=0)
    data = data.select_episodes(np.arange(20), meta={**data.meta, "quality": "test"})
    data.save(tmp_path / "data")
    args = madtkd.Args(env="bridge", task="hard", quality="test", dataset=str(tmp_path / "data"), device="cpu",
                       total_steps=300, teacher_steps=150, batch_size=16, context_len=5, embed_dim=32, n_layers=1,
                       n_heads=2, dropout=0.0, lr=3e-3, warmup_steps=10, bc_coef=0.0, eval_every=300,
                       eval_episodes=1, final_eval_episodes=1, eval_envs=1, run_dir=str(tmp_path / "run"))
    madtkd.main(args)
    ck = load_checkpoint(tmp_path / "run", "madtkd")
    nets = madtkd.build_networks(args, ck["dims"])
    nets.load_state_dict(ck["modules"]["nets"])
    nets.eval()
    ds = OfflineDataset.load(tmp_path / "data").seed(1)
    rtg_all = torch.as_tensor(ds.returns_to_go() / ck["dims"]["rtg_scale"])
    es = ds.episode_start
    t_all = torch.as_tensor(np.arange(ds.n_rows) - np.repeat(es[:-1], np.diff(es)))
    b = ds.sample_sequences(256, 5)
    rows, m = b["rows"][:, :5], b["mask"]
    with torch.no_grad():
        args_ = (rtg_all[rows], b["obs"][:, :5], b["actions"], t_all[rows])
        _, t_out = madtkd.run_teacher(nets["teacher"], *args_)
        _, s_out = madtkd.run_students(nets["student"], *args_)
    av = b["avail"][:, :5]
    t_act = t_out.masked_fill(~av, -1e10).argmax(-1)[m]
    s_act = s_out.masked_fill(~av, -1e10).argmax(-1)[m]
    # the teacher learned the data (the scripted policy's random choices cap what can be predicted) ...
    assert (t_act == b["actions"][m]).float().mean() > 0.6
    assert (s_act == t_act).float().mean() > 0.85  # ... and the student its teacher
    kl = madtkd.distillation_losses(s_out, t_out, t_out.new_zeros(*t_out.shape[:3], 1),
                                    t_out.new_zeros(*t_out.shape[:3], 1), av, m, True)["action"]
    assert kl < 0.05


@torch.no_grad()
def test_act_fn_conditions_on_the_return_to_go_as_training_does():
    """Stepping the act_fn for K + 3 steps gives, at every step, the training forward pass on the
    last K steps with return-to-go target - rewards so far (scaled) and the actions it took."""
    N, o, K, scale, target = 2, 3, 4, 2.0, 5.0
    dims = dict(n_agents=N, obs_dim=o, discrete=True, n_actions=4)
    model = _model(n_agents=N, obs_dim=o)
    fn = madtkd.ActFn(model, dims, K, scale, target, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    fn.reset(np.ones(1, bool))
    hist_o, hist_a, hist_r, ret = [], [], [], target
    for step in range(K + 3):
        obs = torch.randn(1, N, o, generator=g)
        a = fn(obs.numpy(), np.zeros((1, 1), np.float32), np.ones((1, N, 4), bool))
        hist_o.append(obs[0])
        hist_r.append(ret / scale)
        lo = max(0, step + 1 - K)
        w_o = torch.stack(hist_o[lo:])[None]
        w_r = torch.tensor(hist_r[lo:])[None]
        w_t = torch.arange(lo, step + 1)[None]
        w_a = torch.tensor(np.array(hist_a[lo:] + [np.zeros(N, np.int64)]))[None]
        _, out = madtkd.run_students(model, w_r, w_o, w_a, w_t)
        np.testing.assert_array_equal(a[0], out[0, -1].argmax(-1).numpy())
        hist_a.append(a[0])
        reward = float(step + 1)
        fn.observe_reward(np.array([reward], np.float32))
        ret -= reward
    fn.reset(np.ones(1, bool))  # a new episode starts from the target again
    assert fn.len.item() == 0 and fn.cur_rtg.item() == pytest.approx(target / scale)


def test_evaluate_and_collect_feed_rewards_to_return_conditioned_policies():
    """common.envs.evaluate and common.collect.rollout call observe_reward after every step, with the
    rewards of exactly the steps taken, and reset at episode starts before the first action."""
    from common.collect import rollout
    from common.envs import evaluate, make_env

    class Recorder:
        def __init__(self):
            self.seen, self.resets = 0.0, 0

        def reset(self, mask):
            self.resets += int(np.sum(mask))

        def observe_reward(self, r):
            self.seen += float(np.sum(r))

        def __call__(self, obs, state, avail):
            return np.tile([0, 1], (obs.shape[0], 1))  # (A, B): +1 a step in Penalty-XOR

    env = make_env("matrix", "penalty_xor", episode_limit=7)
    rec = Recorder()
    res = evaluate(env, rec, episodes=5, n_envs=2)
    assert rec.seen == pytest.approx(sum(res["returns"])) == 35.0 and rec.resets == 5
    rec = Recorder()
    eps = rollout(env, rec, 3, n_envs=2, progress=False)
    assert rec.seen == pytest.approx(sum(float(e["reward"].sum()) for e in eps)) == 21.0 and rec.resets == 3


def test_continuous_actions_learn_the_best_action_of_a_one_step_game(monkeypatch, tmp_path):
    """Reward -(a_0 - 0.5)^2 - (a_1 + 0.3)^2, data actions uniform on [-1, 1]^2: the best joint
    action returns 0, the data's mean is -0.83."""
    data = continuous_bandit(monkeypatch, tmp_path / "data")
    s = madtkd.main(madtkd.Args(env="cbandit", task="one_step", quality="test", dataset=str(data), device="cpu",
                                total_steps=300, teacher_steps=150, batch_size=64, context_len=1, embed_dim=32,
                                n_layers=1, n_heads=2, dropout=0.0, lr=3e-3, warmup_steps=10, eval_every=300,
                                eval_episodes=1, final_eval_episodes=1, eval_envs=1, run_dir=str(tmp_path / "run")))
    assert s["return_mean"] > -0.02


@pytest.mark.parametrize("family", SMOKE_FAMILIES)
def test_smoke_every_family(family, tmp_path, monkeypatch):
    smoke_family(madtkd, family, tmp_path, monkeypatch, **SMALL)