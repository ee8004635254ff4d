"""bsplan inside the trainers people use: `lightning.BatchSizeFinder` for a Lightning Trainer and
`transformers.fit_batch` for a Hugging Face Trainer (docs/integrations.md). Each module imports its
framework; nothing here is imported by `import bsplan`."""
