"""The small helpers that several algorithm files carry (each file stands alone, so each has its
own copy): one body per helper, word for word the same in every file, and that body's numerical
properties.

- ``masked_log_softmax``: unavailable actions get probability exactly 0, a row with no available
  action gives a distribution (never NaN, in value or gradient), the dataset's action can be kept
  available, and log-ratios never cancel catastrophically.
- ``tanh_gaussian_log_prob``: the density of tanh(N(mean, std^2)), finite at the box edge and in
  float32 for any pre-tanh value.
- ``dims_of``: the same dictionary everywhere.
"""
from __future__ import annotations

import ast
import functools
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from _baselines_common import load_file as load

ROOT = Path(__file__).resolve().parents[1]
FILES = ["comadice.py", "alberdice.py", "omcda.py", "common/behaviour.py"] + [
    f"baselines/{n}.py" for n in ("bc", "optidice", "omiga", "bcq", "cql", "cfcql", "icq", "omar", "madtkd")]
HELPERS = ("masked_log_softmax", "tanh_gaussian_log_prob", "dims_of")


@functools.lru_cache(maxsize=None)
def sources(name: str) -> dict[str, str]:
    """file -> source of the top-level function ``name``, for the files that define it."""
    out = {}
    for f in FILES:
        src = (ROOT / f).read_text()
        for node in ast.parse(src).body:
            if isinstance(node, ast.FunctionDef) and node.name == name:
                out[f] = ast.get_source_segment(src, node)
    return out


@pytest.mark.parametrize("name", HELPERS)
def test_one_body_per_helper(name):
    found = sources(name)
    assert len(found) >= 2, f"{name} is expected in several files, found in {sorted(found)}"
    variants: dict[str, list[str]] = {}
    for f, src in found.items():
        variants.setdefault(src, []).append(f)
    assert len(variants) == 1, f"{name} has {len(variants)} variants: " + " | ".join(
        ", ".join(v) for v in variants.values())


def test_helpers_are_used_where_the_pattern_appears():
    """No file computes a masked log-softmax or a tanh-Gaussian log-density by hand any more."""
    patterns = {"masked_log_softmax": (r"(?<!masked_)log_softmax\(", r"cross_entropy\("),
                "tanh_gaussian_log_prob": (r"softplus\(-2",)}
    for f in FILES:
        src = (ROOT / f).read_text()
        for name, pats in patterns.items():
            body = sources(name).get(f, "")
            rest = src.replace(body, "") if body else src
            for p in pats:
                assert not re.search(p, rest), f"{f} computes {p} outside its {name}"


mls = load("omcda.py").masked_log_softmax  # every file's copy is this one (test above)
tgl = load("omcda.py").tanh_gaussian_log_prob


# ------------------------------------------------------------------ masked_log_softmax
def test_masked_log_softmax_is_the_softmax_over_available_actions():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 3, 6, generator=g, dtype=torch.float64) * 4
    avail = torch.rand(64, 3, 6, generator=g) > 0.5
    avail[:4, 0] = False  # rows with nothing available
    logp = mls(logits, avail)
    eff = avail | ~avail.any(-1, keepdim=True)
    ref = torch.where(eff, logits, torch.full_like(logits, -math.inf)).log_softmax(-1)
    torch.testing.assert_close(logp[eff], ref[eff], rtol=0, atol=1e-12)
    assert (logp.exp()[~eff] == 0).all() and torch.isfinite(logp).all()
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(64, 3, dtype=torch.float64))
    # a row with nothing available is the plain softmax of its logits
    torch.testing.assert_close(logp[:4, 0], logits[:4, 0].log_softmax(-1))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_masked_log_softmax_gradients_are_finite_and_zero_at_masked_actions(dtype):
    logits = torch.randn(8, 5).to(dtype).requires_grad_()
    avail = torch.rand(8, 5) > 0.5
    avail[0] = False
    keep = torch.randint(0, 5, (8,))
    logp = mls(logits, avail, keep)
    # the usual consumers: an expectation under pi, a KL against a second masked policy, a likelihood
    other = mls(torch.randn(8, 5).to(dtype), avail, keep)
    loss = (logp.exp() * (logp - other)).sum() + logp.gather(-1, keep[:, None]).sum() + (0.5 * logp).sum()
    loss.float().backward()
    grad = logits.grad.float()
    eff = avail.scatter(-1, keep[:, None], True)
    eff = eff | ~eff.any(-1, keepdim=True)
    assert torch.isfinite(grad).all() and (grad[~eff] == 0).all()
    assert torch.isfinite(logp.float()).all() and (logp.float().exp()[~eff] == 0).all()


def test_keep_makes_the_dataset_action_available():
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0]])
    avail = torch.tensor([[True, True, False, False]])
    act = torch.tensor([2])
    lp = mls(logits, avail, act)
    ref = torch.tensor([[2.0, 0.5, -1.0]]).log_softmax(-1)
    torch.testing.assert_close(lp[0, :3], ref[0])
    assert lp[0, 3].exp() == 0
    assert mls(logits, avail)[0, 2].exp() == 0  # without keep it has no mass


def test_log_ratios_do_not_cancel_catastrophically():
    """A log-ratio of two masked policies at an action the mask excludes: with a finite fill before
    the softmax (the old -1e10 variants) it is the difference of two ~1e10 float32 numbers, whose
    rounding (steps of 1024) swallows the answer; here it is exactly 0 between masked entries, and exact at a kept dataset action."""
    g = torch.Generator().manual_seed(3)
    p1, p2 = torch.randn(4096, 5, generator=g) * 3, torch.randn(4096, 5, generator=g) * 3
    avail = torch.ones(4096, 5, dtype=torch.bool)
    avail[:, 4] = False
    act = torch.full((4096,), 4)

    def old(x, dtype):  # the former variant: fill -1e10, then log-softmax
        return x.to(dtype).masked_fill(~avail, -1e10).log_softmax(-1)

    ratio_old32 = (old(p1, torch.float32) - old(p2, torch.float32))[:, 4].double()
    ratio_old64 = (old(p1, torch.float64) - old(p2, torch.float64))[:, 4]
    # catastrophic cancellation: the float32 value keeps nothing of the float64 one (|error| up to ~10)
    assert (ratio_old32 - ratio_old64).abs().max() > 5 and (ratio_old32 - ratio_old64).abs().mean() > 1

    r32 = (mls(p1, avail) - mls(p2, avail))[:, 4]
    assert (r32 == 0).all()
    k32 = (mls(p1, avail, act) - mls(p2, avail, act))[:, 4].double()
    k64 = (mls(p1.double(), avail, act) - mls(p2.double(), avail, act))[:, 4]
    assert torch.isfinite(k32).all() and (k32 - k64).abs().max() < 1e-5


@pytest.mark.filterwarnings("ignore:.*marked unavailable in their own row")
def test_alberdice_ratios_are_finite_when_the_data_masks_its_own_action():
    """log rho_i (Eq. 11) on data whose masks exclude some of the actions taken: the same values as
    on the data with those masks repaired (the dataset's action counts as available)."""
    A = load("alberdice.py")
    from common.data import OfflineDataset

    rng = np.random.default_rng(0)
    E, T, N, K = 6, 5, 3, 4
    actions = rng.integers(0, K, size=(E, T, N))
    avail = np.ones((E, T + 1, N, K), dtype=bool)
    for e in range(E):  # the data marks the taken action unavailable on some rows
        t, i = rng.integers(0, T), rng.integers(0, N)
        avail[e, t, i, actions[e, t, i]] = False

    obs = rng.normal(size=(E, T + 1, N, 3)).astype(np.float32)
    state = rng.normal(size=(E, T + 1, 2)).astype(np.float32)

    def dataset(av):
        return OfflineDataset.from_padded(
            obs=obs, state=state, actions=actions, reward=np.zeros((E, T), np.float32), lengths=np.full(E, T),
            terminated=np.ones(E, bool), avail=av,
            meta={"env": "toy", "task": "t", "quality": "q", "discrete": True, "n_actions": K})

    fixed_avail = avail.copy()
    fixed_avail[:, :T] |= np.eye(K, dtype=bool)[actions]
    bad, fixed = dataset(avail), dataset(fixed_avail)
    torch.manual_seed(0)
    model = A.AlberDICE(N, 3, 2, K, 8)
    lr_bad = A.log_importance_ratios(A.dataset_log_probs(model, bad, "policy"), A.dataset_log_probs(model, bad, "ar"))
    lr_fix = A.log_importance_ratios(A.dataset_log_probs(model, fixed, "policy"),
                                     A.dataset_log_probs(model, fixed, "ar"))
    assert torch.isfinite(lr_bad).all() and lr_bad.abs().max() < 1e3
    torch.testing.assert_close(lr_bad, lr_fix, rtol=0, atol=0)


# -------------------------------------------------------------- tanh_gaussian_log_prob
def test_tanh_gaussian_log_prob_is_the_density_of_tanh_of_a_gaussian():
    g = torch.Generator().manual_seed(1)
    mean = torch.randn(256, 3, generator=g, dtype=torch.float64) * 2
    log_std = torch.rand(256, 3, generator=g, dtype=torch.float64) * 3 - 2
    a = torch.rand(256, 3, generator=g, dtype=torch.float64) * 1.998 - 0.999
    dist = torch.distributions.TransformedDistribution(torch.distributions.Normal(mean, log_std.exp()),
                                                       [torch.distributions.TanhTransform()])
    torch.testing.assert_close(tgl(mean, log_std, a), dist.log_prob(a).sum(-1), rtol=1e-9, atol=1e-9)
    # given the pre-tanh value instead of the action: the same number
    torch.testing.assert_close(tgl(mean, log_std, pre_tanh=torch.atanh(a)), tgl(mean, log_std, a), rtol=1e-12,
                               atol=1e-12)


def test_tanh_gaussian_log_prob_is_stable_in_float32():
    """Sampled pre-tanh values far in the tails (tanh(u) rounds to +-1 in float32): the float32 value
    equals the float64 one; the naive log(1 - tanh(u)^2) would be -inf there."""
    u = torch.tensor([[-40.0], [-12.0], [-3.0], [0.0], [5.0], [15.0], [40.0]])
    mean, log_std = torch.zeros_like(u), torch.full_like(u, 2.0)
    lp32 = tgl(mean, log_std, pre_tanh=u)
    lp64 = tgl(mean.double(), log_std.double(), pre_tanh=u.double())
    assert torch.isfinite(lp32).all()
    torch.testing.assert_close(lp32.double(), lp64, rtol=1e-6, atol=1e-4)
    assert not torch.isfinite(torch.log(1 - torch.tanh(u[-1]) ** 2)).all()  # the naive form fails there
    # dataset actions exactly on the edge of the box: finite value and gradient
    m = torch.zeros(2, 1, requires_grad=True)
    lp = tgl(m, torch.zeros(2, 1), torch.tensor([[1.0], [-1.0]]))
    lp.sum().backward()
    assert torch.isfinite(lp).all() and torch.isfinite(m.grad).all()
