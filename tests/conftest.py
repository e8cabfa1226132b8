"""Test-session settings: one CPU thread per test process.

The suite runs with pytest-xdist (`-n 2` on 2 cores); torch's default of one thread per core
in every worker oversubscribes the CPU and slows every test. Subprocesses started by tests
(smoke runs, the benchmark runner) inherit OMP_NUM_THREADS."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("MUJOCO_GL", "egl")  # off-screen rendering (--capture-video tests), before mujoco loads
os.environ.setdefault("WANDB_MODE", "offline")  # --track tests never reach the network

import torch  # noqa: E402

torch.set_num_threads(1)
