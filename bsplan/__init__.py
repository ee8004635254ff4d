"""bsplan: find the exact largest batch a PyTorch training step fits, and plan global batches.

`bsplan.probe`, `bsplan.estimate` and `bsplan.plan` run on Python callables (bsplan/api.py,
docs/api.md); `bsplan.autobatch.AutoBatch` keeps a global batch through an out-of-memory during
training. Importing bsplan loads no torch: `bsplan plan` and `bsplan --help` start without it. The
layers are subpackages (docs/architecture.md): planning (no torch), backends, models, measure,
runtime and cli.
"""

from bsplan.api import estimate, plan, probe

__version__ = "0.1.0"
__all__ = ["estimate", "plan", "probe"]
