"""Benchmarks: GenEval, FID/KID, reward metrics, DPG-Bench, reports."""
