"""The devices a trial runs on and the machine's limits: cuda.py is the one module that calls
torch.cuda, cpu.py counts tensor bytes on the CPU, host.py reads rlimits and cgroups (no torch),
nvml.py lists live GPUs. Imports only planning/."""
