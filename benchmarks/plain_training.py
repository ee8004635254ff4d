"""A plain training process, as a user's script would run it: import torch, load the model file,
train a few steps at one batch size, exit. No bsplan code is imported, so nothing of bsplan's is
in its memory: it is the truth a probe under an OS limit is checked against.

Exit status: 0 when the steps ran, 3 when memory ran out (any error whose message says so, or a
MemoryError), 1 on anything else. With --vmdata it prints its VmData in bytes and its number of
threads at rest (after building the model and the optimizer, before the first step) and after the steps.

    python benchmarks/plain_training.py examples/cnn.py 64 [--steps 5] [--vmdata]
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import warnings

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
import torch  # noqa: E402

OUT_OF_MEMORY = 3


def vmdata() -> str:
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return f"{int(fields['VmData'].split()[0]) * 1024} {int(fields['Threads'])}"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_file")
    parser.add_argument("batch", type=int)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--vmdata", action="store_true")
    args = parser.parse_args()
    spec = importlib.util.spec_from_file_location("model_file", args.model_file)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    model = module.build_model()
    build = getattr(module, "build_optimizer", None)
    optimizer = build(model.parameters()) if build else torch.optim.AdamW(model.parameters())
    if args.vmdata:
        print("rest", vmdata(), flush=True)
    try:
        for _ in range(args.steps):
            batch = module.make_batch(args.batch)
            loss_fn = getattr(module, "compute_loss", None)
            if loss_fn is not None:
                loss = loss_fn(model, batch)
            else:
                output = model(**batch) if isinstance(batch, dict) else model(*batch) if isinstance(batch, tuple) else model(batch)
                loss = output.loss if hasattr(output, "loss") else output.float().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    except (MemoryError, RuntimeError) as error:
        if isinstance(error, MemoryError) or "memory" in str(error).lower() or "could not create a primitive" in str(error):
            return OUT_OF_MEMORY
        raise
    if args.vmdata:
        print("trained", vmdata(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
