"""What runs a model: the model file, out-of-memory classification, one trial, the pure search,
the trial sources (this process, other processes), the probe and the estimate's CPU measurement.
Imports planning/ and backends/."""
