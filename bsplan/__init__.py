"""bsplan: find the exact largest batch a PyTorch training step fits, and plan global batches.

Kept free of imports: `bsplan plan` and `bsplan --help` must start without loading torch. The
library faces live in their modules: bsplan.probe.run_probe, bsplan.plan, bsplan.search.
"""

__version__ = "0.1.0"
