"""Its process is killed with SIGKILL, as the kernel's out-of-memory killer ends one past a cgroup's
limit, from KILLED_BATCH samples up."""

import os
import signal

import torch

LIMIT = int(os.environ.get("KILLED_BATCH", "10"))


def build_model():
    return torch.nn.Linear(8, 8)


def make_batch(batch_size):
    if batch_size >= LIMIT:
        os.kill(os.getpid(), signal.SIGKILL)
    return torch.randn(batch_size, 8)
