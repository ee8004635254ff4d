"""Where a model comes from: a model file, a Hugging Face config (`hf:`), or a factory
(`MODULE:CALLABLE`), and the knobs that change its memory (sequence length, gradient checkpointing,
LoRA). source.py describes one without torch; measure/workload.py turns it into the functions a trial
calls, with huggingface.py and factory.py for those two kinds and knobs.py for the knobs."""
