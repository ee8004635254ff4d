"""bsplan: find the exact largest batch a PyTorch training step fits, and plan global batches.

Kept free of imports: `bsplan plan` and `bsplan --help` must start without loading torch. The
layers are subpackages (docs/architecture.md): planning (no torch), backends, measure, runtime and
cli. The library faces: bsplan.measure.probe.run_probe, bsplan.planning.planner.make_plan,
bsplan.measure.search.find_max_batch, and bsplan.autobatch.AutoBatch.
"""

__version__ = "0.1.0"
