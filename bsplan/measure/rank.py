"""What runs in a trial process (a rank of a strategy probe, or the one trial process of a probe
under a limit from outside the process): join the process group, build and wrap the model, run
trials on request and report each to the parent (measure/world.py).

Trial processes are forked from a template process that has imported this module, and with it
torch, once (multiprocessing's forkserver): a fresh trial process is ready in milliseconds, and it
holds what a plain training process that imported torch holds.
"""

from __future__ import annotations

import warnings

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # before torch: in the template too

import ctypes  # noqa: E402
import itertools  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
from datetime import timedelta  # noqa: E402
from multiprocessing.connection import Connection  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
import torch._dynamo  # noqa: E402, F401  # an optimizer imports it when made (~1 s): once, in the template
import torch.distributed as dist  # noqa: E402

from bsplan.backends import cuda  # noqa: E402
from bsplan.measure.oom import Failure, classify  # noqa: E402
from bsplan.measure.options import ProbeOptions  # noqa: E402
from bsplan.measure.sources import LocalTrials  # noqa: E402
from bsplan.measure.workload import Workload, load_workload, user_error  # noqa: E402
from bsplan.models.blocks import fsdp_units  # noqa: E402
from bsplan.planning.errors import BsplanError, UserCodeError, first_line  # noqa: E402


def rank_main(
    rank: int, port: int, model_file: Path, options: ProbeOptions, connection: Connection, place: tuple[dict[str, str], str]
) -> None:
    """One rank: join the process group, build and wrap the model, run trials on request. `place` is
    the parent's environment and working directory, which the template may not share."""
    environ, cwd = place
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    _first_for_the_oom_killer()
    _restart_thread_pools()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it reports, then stops the world
    os.dup2(2, 1)  # the model file's prints go to stderr: the parent's stdout carries only the result
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(options.nproc))
    on_gpu = options.device == "cuda"
    try:
        if on_gpu:
            cuda.set_device(rank)
        if options.strategy != "none":
            dist.init_process_group("nccl" if on_gpu else "gloo", rank=rank, world_size=options.nproc,
                                    timeout=timedelta(seconds=options.timeout))
        workload = load_workload(model_file)
        wrapper = None if options.strategy == "none" else lambda model, device: wrap(model, device, workload, options)
        # The one trial process of a probe under a limit from outside it runs as plain training does.
        count = options.strategy != "none"
        with LocalTrials(workload, options, f"cuda:{rank}" if on_gpu else "cpu", wrapper, count_tensors=count) as trials:
            connection.send(("ready", (trials.device, trials.notes, trials.static())))
            while True:
                batch, trials.runner.fitted_elsewhere = connection.recv()
                trial = trials(batch)
                connection.send(("trial", (trial, trials.static())))
    except (EOFError, OSError):
        pass  # the parent stopped this world
    except BsplanError as error:
        traceback_text = error.traceback_text if isinstance(error, UserCodeError) else ""
        _send(connection, ("error", (type(error).__name__, str(error), traceback_text)))
    except Exception as error:  # noqa: BLE001 - the user's code, reported with its traceback
        where = "the trial process" if options.strategy == "none" else f"rank {rank}"
        failure = user_error(f"setting up {where} of {model_file}", error)
        _send(connection, ("error", ("UserCodeError", str(failure), failure.traceback_text)))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _restart_thread_pools() -> None:
    """A forked process lacks the threads its template's libraries started when they were imported:
    OpenBLAS (numpy's, which torch imports) stops its pool at a fork and starts it only at its next
    use. A plain training process has those threads, and their stacks and heaps count against an
    address-space limit: without them a trial process fitted larger batches than plain processes
    (docs/probe.md). Setting the pool's size starts it again, as importing did, with no buffers."""
    library = next((line.split()[-1] for line in open("/proc/self/maps") if "openblas" in line.rsplit("/", 1)[-1]), None)
    if library is None:
        return
    openblas = ctypes.CDLL(library)
    for prefix, suffix in itertools.product(("openblas_", "scipy_openblas_"), ("", "64_")):
        get, set_ = (getattr(openblas, f"{prefix}{verb}_num_threads{suffix}", None) for verb in ("get", "set"))
        if get is not None and set_ is not None:
            set_(get())
            return


def _first_for_the_oom_killer() -> None:
    """A rank holds the trial's memory: past a cgroup's limit, the kernel's out-of-memory killer
    must end it, not the parent that reports the result (raising one's own score needs no privilege)."""
    try:
        Path("/proc/self/oom_score_adj").write_text("1000")
    except OSError:
        pass


def _send(connection: Connection, message: Any) -> None:
    try:
        connection.send(message)
    except (OSError, EOFError):
        pass


def _averaged_in_place(_state, bucket):  # type: ignore[no-untyped-def]  # DDP checks real annotations, not strings
    """DDP's default all-reduce as its memory goes: the bucket divided by the world size in place,
    the result the bucket itself (the fake group moves nothing)."""
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    future.set_result(bucket.buffer().div_(dist.get_world_size()))
    return future


class _KeptBuckets:
    """DDP's reducer, keeping its first buckets: rebuilding them in the order the first backward
    produced the gradients broadcasts that order, a value a fake group does not have. The rebuilt
    buckets hold the same gradients, so the bytes of a step are the same."""

    def __init__(self, reducer: Any) -> None:
        self._reducer = reducer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reducer, name)

    def _rebuild_buckets(self) -> bool:
        return False


def wrap(model: torch.nn.Module, device: torch.device, workload: Workload, options: ProbeOptions, traced: bool = False) -> torch.nn.Module:
    """The model as the strategy runs it: DDP with its defaults (or gradient_as_bucket_view), or
    FSDP2's fully_shard on each unit models/blocks.py chooses, then the root, unless the model file
    defines its own shard_model(model). `traced`: the model is fake (measure/trace.py), on a fake
    process group: DDP skips its start-up check and broadcast of the parameters, which read their
    values (and allocate nothing a step keeps)."""
    if options.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [device.index] if device.type == "cuda" else None
        ddp = DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=options.bucket_view,
                                      init_sync=not traced)
        if traced:  # the fake group's all-reduce completes with no tensor, which DDP's reducer refuses
            ddp.register_comm_hook(None, _averaged_in_place)
            ddp.reducer = _KeptBuckets(ddp.reducer)
        return ddp
    from torch._subclasses.fake_tensor import unset_fake_temporarily
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    policy = workload.shard_policy()
    if policy is not None:
        policy(model)  # the user's own policy: what it raises is their error
        return model
    with unset_fake_temporarily():  # the mesh reads its ranks' values; outside a trace this does nothing
        mesh = init_device_mesh(device.type, (options.nproc,))
    try:
        for unit in fsdp_units(model):
            fully_shard(unit, mesh=mesh)
        fully_shard(model, mesh=mesh)
    except Exception as error:
        if classify(error) is not Failure.OTHER:
            raise  # out of memory: the model does not fit (measure/sources.py)
        # bsplan chose these units, not the user: the error is bsplan's, and the user's way out is their own policy.
        raise BsplanError(
            f"bsplan's default FSDP policy failed on {workload.name} ({type(error).__name__}: {first_line(error)}): "
            "define shard_model(model) in the model file to choose the FSDP units yourself (docs/model-file.md)"
        ) from None
    return model
