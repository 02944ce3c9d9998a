"""Model families, registered in a plain dict. Adding one = its module, one entry here, a tiny builder, a preset."""

from __future__ import annotations

from typing import Callable

from dmdr_cli.errors import ConfigError, did_you_mean


def _sd3(cfg):
    from dmdr_cli.families.sd3 import SD3Family

    m = cfg.model
    return SD3Family(shift=m.shift, x0_end=m.x0_end, max_sequence_length=m.max_sequence_length, use_t5=m.use_t5)


def _sdxl(cfg):
    from dmdr_cli.families.sdxl import SDXLFamily

    return SDXLFamily(resolution=cfg.model.resolution)


FAMILIES: dict[str, Callable] = {"sd3": _sd3, "sdxl": _sdxl}


def make_family(cfg, name: str | None = None):
    """The family object for a resolved config (``name`` overrides ``cfg.model.family``)."""
    name = name or cfg.model.family
    if name not in FAMILIES:
        raise ConfigError(f"unknown model family '{name}'.{did_you_mean(name, FAMILIES)}",
                          f"set model.family to one of {', '.join(FAMILIES)}")
    return FAMILIES[name](cfg)
