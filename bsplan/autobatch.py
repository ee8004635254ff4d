"""AutoBatch's public name, as the README gives it: the code lives in bsplan/runtime/autobatch.py."""

from bsplan.runtime.autobatch import AutoBatch, AutoBatchError, MicroBatchChange, NoMicroBatchFits, batch_size, split_batch

__all__ = ["AutoBatch", "AutoBatchError", "MicroBatchChange", "NoMicroBatchFits", "batch_size", "split_batch"]
