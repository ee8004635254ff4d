"""bsplan inside the trainers people use: `lightning.BatchSizeFinder` for a Lightning Trainer,
`transformers.fit_batch` for a Hugging Face Trainer and
`accelerate.find_executable_batch_size` for a loop of one's own (docs/integrations.md). Each module
imports its framework; nothing here is imported by `import bsplan`."""
