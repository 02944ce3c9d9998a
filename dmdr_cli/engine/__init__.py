"""Shared engine: runtime (devices, seeds), sampler, networks and adapters, checkpoints, metrics."""
