"""bsplan: find the exact largest batch a PyTorch training step fits, and plan global batches.

`bsplan.probe`, `bsplan.estimate` and `bsplan.plan` run on Python callables (bsplan/api.py,
docs/api.md); `bsplan.autobatch.AutoBatch` keeps a global batch through an out-of-memory during
training, and `bsplan.NoiseScale` (bsplan/runtime/noise.py) follows the gradient noise scale in a
training loop, loaded with torch on first use. Importing bsplan loads no torch: `bsplan plan` and `bsplan --help` start without it. The
layers are subpackages (docs/architecture.md): planning (no torch), backends, models, measure,
runtime and cli.
"""

from bsplan.api import estimate, plan, probe

__version__ = "0.1.0"
__all__ = ["NoiseScale", "estimate", "plan", "probe"]


def __getattr__(name: str) -> object:
    """bsplan.NoiseScale, imported (with torch) only when asked for."""
    if name == "NoiseScale":
        from bsplan.runtime.noise import NoiseScale

        return NoiseScale
    raise AttributeError(f"module 'bsplan' has no attribute {name!r}")
