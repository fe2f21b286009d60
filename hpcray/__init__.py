"""hpcray: Ray training and HPO on HPC GPUs, from a profile to a torn-down cluster."""

__version__ = "0.1.0"
