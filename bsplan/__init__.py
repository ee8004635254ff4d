"""bsplan: find the exact largest batch a PyTorch training step fits, and plan global batches.

Kept free of imports: `bsplan plan` and `bsplan --help` must start without loading torch. The
library faces live in their modules: bsplan.probe.run_probe, bsplan.plan, bsplan.search, and
bsplan.autobatch.AutoBatch (micro-batches that shrink on out-of-memory during training).
"""

__version__ = "0.1.0"
