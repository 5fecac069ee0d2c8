"""Test-session settings. One torch thread per process: the suite's models are tiny, and on a
2-core machine OpenMP threads that share a core with another process (a data worker, a
subprocess run) wait on each other at every op and stall. Subprocess runs
inherit OMP_NUM_THREADS."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")

import torch  # noqa: E402

torch.set_num_threads(1)
