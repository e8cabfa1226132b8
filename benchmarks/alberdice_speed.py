"""Iterations per second of alberdice.py next to the published AlberDICE code (not a test).

    git clone https://github.com/dematsunaga/alberdice /tmp/alberdice_ref       # any checkout of it
    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE python benchmarks/alberdice_speed.py --reference /tmp/alberdice_ref

One iteration = every agent takes one best-response step (Algorithm 1; the published code's
``learner.train``: one batch, then agent 0, 1, ... updated once each), including drawing the batch.
Both run at the published code's network width (128) on random data of the published shapes,
in one process, one thread, interleaved in blocks of ``--seconds``:

- ``bridge``: 2 agents, obs = state = 8, 5 actions; the published code's Bridge batch, 128 episodes
  x 20 steps = 2,560 rows per step.
- ``5 agents``: obs 92, state 130, 11 actions (SMACv2 protoss_5_vs_5 shapes), 32 episodes x 60 steps
  = 1,920 rows per step.

alberdice.py is measured with the ratios computed on a pool of those rows (``--rho-pool``) and
two gradient batches: its default (256 resampled rows) and the published code's (as many rows as
the pool); with more than two agents also with each ``--kl-samples`` value and with Eq. 8's
per-sample KL (``--kl-estimator sample``, the published code's cost profile) instead of the exact
expectation. The published code is imported from ``--reference`` at run time (its
``pymarl-master/src``); only its learner, controllers, networks and episode buffer are used (PyTorch
only: no sacred, no environment). Its data are random tensors of the shapes its own loader produces
(absorbing-state flag included, every slot filled).

Each block reports iterations per second of wall time and of the process's CPU time: with one
thread, CPU time leaves out the time spent waiting for a core held by other processes, so it is the
figure to compare on a shared machine; the load average is printed before and after every block.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import alberdice as A  # noqa: E402
from common.data import OfflineDataset  # noqa: E402

SETUPS = {
    "bridge": dict(n_agents=2, obs_dim=8, state_dim=8, n_actions=5, episodes=128, steps=20, buffer=1000),
    "5 agents": dict(n_agents=5, obs_dim=92, state_dim=130, n_actions=11, episodes=32, steps=60, buffer=1000),
}
HIDDEN = 128


# ------------------------------------------------------------------ ours
def ours(setup: dict, batch_size: int, kl_samples: int, kl_estimator: str = "policy"):
    N, O, S, K, T, E = (setup[k] for k in ("n_agents", "obs_dim", "state_dim", "n_actions", "steps", "buffer"))
    rng = np.random.default_rng(0)
    ds = OfflineDataset.from_padded(
        obs=rng.normal(size=(E, T + 1, N, O)).astype(np.float32),
        state=rng.normal(size=(E, T + 1, S)).astype(np.float32),
        actions=rng.integers(0, K, size=(E, T, N)), reward=rng.normal(size=(E, T)).astype(np.float32),
        lengths=np.full(E, T), terminated=np.zeros(E, bool), avail=np.ones((E, T + 1, N, K), bool),
        meta={"env": "bench", "task": "t", "quality": "q", "discrete": True, "n_actions": K}).to("cpu").seed(0)
    pool = setup["episodes"] * T
    args = A.Args(hidden=HIDDEN, batch_size=batch_size, rho_pool=pool, kl_samples=kl_samples, lr=1e-4,
                  alpha=5.0, alpha_end=0.001, total_steps=150_000, kl_estimator=kl_estimator)
    assert A.uses_pool(args, ds)
    torch.manual_seed(0)
    model = A.AlberDICE(N, O, S, K, HIDDEN)
    opts = A.make_optimizers(model, args.lr)
    lpo = A.dataset_log_probs(model, ds, "ar")
    gen = torch.Generator().manual_seed(0)
    state = {"step": 0}

    def iteration():
        A.train_iteration(model, opts, ds, args, state["step"], None, lpo, gen)
        state["step"] += 1

    return iteration


# ------------------------------------------------------------- reference
class _Logger:
    def log_stat(self, *a, **k):
        pass


def reference(setup: dict, path: str, grad_penalty: float = 0.1):
    src = Path(path) / "pymarl-master" / "src"
    if not (src / "learners" / "alberdice_learner.py").is_file():
        raise SystemExit(f"--reference {path}: no pymarl-master/src/learners/alberdice_learner.py there")
    if str(src) not in sys.path:
        sys.path.insert(0, str(src))
    from components.episode_buffer import ReplayBuffer
    from components.transforms import OneHot
    from controllers.basic_controller import BasicMAC
    from learners.alberdice_learner import AlberDiceLearner

    N, O, S, K, T, E = (setup[k] for k in ("n_agents", "obs_dim", "state_dim", "n_actions", "steps", "buffer"))
    B = setup["episodes"]
    # the published Bridge config (src/config/algs/alberdice.yaml, envs/bridge.yaml, default.yaml)
    args = SimpleNamespace(
        n_agents=N, n_actions=K, agent="sep_mlp", rnn_hidden_dim=HIDDEN, obs_agent_id=False, obs_last_action=False,
        agent_output_type="pi_logits", action_selector="multinomial", epsilon_start=0.0, epsilon_finish=0.0,
        epsilon_anneal_time=50000, mask_before_softmax=True, name="alberdice", tabular_network=False, lr=1e-4,
        nu_lr=1e-4, alpha_start=5.0, alpha_end=0.001, nu_grad_penalty_coeff=grad_penalty, cql_coeff=0.1,
        num_iter_inner_loop=1, batch_size=B, t_max=3_100_000, gamma=0.99, reward_weight=1,
        other_policy_ratio_max=100, learner_log_interval=10 ** 12, env="bridge", device="cpu", use_cuda=False,
        test_greedy=False, absorbing_state=True)
    scheme = {"state": {"vshape": S + 1}, "obs": {"vshape": O + 1, "group": "agents"},
              "actions": {"vshape": (1,), "group": "agents", "dtype": torch.long},
              "avail_actions": {"vshape": (K,), "group": "agents", "dtype": torch.int},
              "reward": {"vshape": (1,)}, "terminated": {"vshape": (1,), "dtype": torch.uint8}}
    groups = {"agents": N}
    buffer = ReplayBuffer(scheme, groups, E, T + 1, E, preprocess={"actions": ("actions_onehot", [OneHot(K)])},
                          device="cpu", absorbing_state=True)
    g = torch.Generator().manual_seed(0)
    d = buffer.data.transition_data
    acts = torch.randint(0, K, (E, T + 1, N, 1), generator=g)
    # what its loader leaves (load_numpy_data with absorbing states): float tensors, every slot filled
    d["state"] = torch.randn(E, T + 1, S + 1, generator=g)
    d["obs"] = torch.randn(E, T + 1, N, O + 1, generator=g)
    d["actions"] = acts.float()
    d["actions_onehot"] = torch.nn.functional.one_hot(acts[..., 0], K).float()
    d["avail_actions"] = torch.ones(E, T + 1, N, K)
    d["reward"] = torch.randn(E, T + 1, 1, generator=g)
    d["terminated"] = torch.zeros(E, T + 1, 1, dtype=torch.uint8)
    d["filled"] = torch.ones(E, T + 1, 1, dtype=torch.long)
    buffer.episodes_in_buffer = E
    torch.manual_seed(0)
    np.random.seed(0)
    mac = BasicMAC(buffer.scheme, groups, args)
    data_mac = BasicMAC(buffer.scheme, groups, args, data_policy=True)
    ar_mac = BasicMAC(buffer.scheme, groups, args, data_policy=True, autoregressive=True)
    learner = AlberDiceLearner(mac, data_mac, ar_mac, buffer.scheme, _Logger(), args)

    def sample_batch():  # as its run.py
        batch = buffer.sample(args.batch_size)
        return batch[:, :batch.max_t_filled()]

    state = {"t_env": 0}

    def iteration():
        learner.train(sample_batch, state["t_env"], 0)
        state["t_env"] += T  # its t_env grows by the filled steps per episode

    return iteration


# ----------------------------------------------------------------- timing
def timed(fn, seconds: float) -> tuple[float, float, int]:
    """Iterations per second of wall time and per second of this process's CPU time (one thread: the CPU
    time excludes the time spent waiting for a core that other processes hold), and the count."""
    n, t0, c0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    return n / (time.perf_counter() - t0), n / (time.process_time() - c0), n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference", required=True, help="a checkout of github.com/dematsunaga/alberdice")
    p.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    p.add_argument("--seconds", type=float, default=5.0, help="length of one timed block")
    p.add_argument("--rounds", type=int, default=8, help="interleaved rounds (every variant once per round)")
    p.add_argument("--kl-samples", type=int, nargs="+", default=[16],
                   help="alberdice.py --kl-samples values to measure at batch 256 (the first also at the full batch; "
                        "two agents: the KL is exact and this has no effect)")
    p.add_argument("--out", default="", help="write the results as JSON here")
    p.add_argument("--flops", action="store_true",
                   help="only count the matmul FLOPs of one iteration of each variant (forward and backward; the "
                        "published code without its nu gradient penalty, which the counter cannot follow)")
    a = p.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    results = []
    for name in a.setups:
        setup = SETUPS[name]
        rows = setup["episodes"] * setup["steps"]
        variants = {"reference": reference(setup, a.reference)}
        for ks in a.kl_samples if setup["n_agents"] > 2 else a.kl_samples[:1]:
            variants[f"ours, batch 256, kl {ks}"] = ours(setup, 256, ks)
        if setup["n_agents"] > 2:  # what the exact-expectation KL costs: Eq. 8's per-sample log-ratio instead
            variants["ours, batch 256, kl Eq. 8"] = ours(setup, 256, a.kl_samples[0], "sample")
        variants[f"ours, batch {rows}, kl {a.kl_samples[0]}"] = ours(setup, rows, a.kl_samples[0])
        if a.flops:
            from torch.utils.flop_counter import FlopCounterMode

            variants["reference"] = reference(setup, a.reference, grad_penalty=0.0)
            for k, fn in variants.items():
                fn()
                with FlopCounterMode(display=False) as fc:
                    fn()
                print(f"[{name}] {k:>28}: {fc.get_total_flops() / 1e9:6.2f} GFLOP per iteration")
                results.append({"setup": name, "variant": k, "gflop": fc.get_total_flops() / 1e9})
            continue
        for fn in variants.values():  # warm-up
            timed(fn, 2.0)
        wall, cpu = {k: [] for k in variants}, {k: [] for k in variants}
        for r in range(a.rounds):
            for k, fn in variants.items():
                load0 = os.getloadavg()[0]
                its, its_cpu, n = timed(fn, a.seconds)
                load1 = os.getloadavg()[0]
                wall[k].append(its)
                cpu[k].append(its_cpu)
                print(f"[{name}] round {r}: {k:>28}: {its:7.2f} it/s wall, {its_cpu:7.2f} it/s CPU "
                      f"({n} iterations; load {load0:.2f} -> {load1:.2f})", flush=True)
        ref_w, ref_c = float(np.median(wall["reference"])), float(np.median(cpu["reference"]))
        for k in variants:
            mw, mc = float(np.median(wall[k])), float(np.median(cpu[k]))
            results.append({"setup": name, "variant": k, "rows_per_step": rows, "wall_its_per_s": wall[k],
                            "cpu_its_per_s": cpu[k], "median_wall": mw, "median_cpu": mc,
                            "vs_reference_wall": mw / ref_w, "vs_reference_cpu": mc / ref_c})
            print(f"[{name}] {k:>28}: median {mw:7.2f} it/s wall = {mw / ref_w:5.1f}x, "
                  f"{mc:7.2f} it/s CPU = {mc / ref_c:5.1f}x the reference")
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
