"""Where and how a run computes: devices and processes, precision, CUDA graphs, memory, files written whole,
checkpoints, and the one error type a user sees."""
