"""Its process is killed with SIGKILL, as the kernel's out-of-memory killer ends one past a cgroup's
limit, from KILLED_BATCH samples up: on rank KILLED_RANK only, where that is set. With PEER_ERROR
set, the other ranks raise the error gloo raises when a peer is gone, just before the kill. With
SCORE_FILE set, each process appends its oom_score_adj there."""

import os
import signal
import time

import torch

LIMIT = int(os.environ.get("KILLED_BATCH", "10"))
RANK = os.environ.get("KILLED_RANK", os.environ.get("RANK"))


def build_model():
    if os.environ.get("SCORE_FILE"):  # what the kernel's out-of-memory killer weighs this process at
        with open(os.environ["SCORE_FILE"], "a") as record:
            record.write(open("/proc/self/oom_score_adj").read())
    return torch.nn.Linear(8, 8)


def make_batch(batch_size):
    if batch_size >= LIMIT and os.environ.get("RANK") == RANK:
        time.sleep(0.1 if os.environ.get("PEER_ERROR") else 0)
        os.kill(os.getpid(), signal.SIGKILL)
    if batch_size >= LIMIT and os.environ.get("PEER_ERROR"):
        raise RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:29500")
    return torch.randn(batch_size, 8)
