"""Loaded tiny base models shared by the family and sampler tests (loaded once per session, read-only:
tests must not change their weights or adapter state)."""

from __future__ import annotations

import pytest


def _load(preset: str, *sets: str):
    from dmdr_cli.config.loader import resolve
    from dmdr_cli.families.loading import load_base

    cfg = resolve(preset, [], ["runtime.device=cpu", *sets])
    return cfg, load_base(cfg)


@pytest.fixture(scope="session")
def sd3_loaded(tiny_sd3_dir):
    """(resolved tiny-sd3-random config, Bundle) on the CPU in fp32."""
    return _load("tiny-sd3-random")


@pytest.fixture(scope="session")
def sdxl_loaded(tiny_sdxl_dir):
    """(resolved tiny-sdxl config, Bundle) on the CPU in fp32."""
    return _load("tiny-sdxl")

