"""Options shared by every command and the error boundary that turns DmdrError into exit code 2."""

from __future__ import annotations

import functools
from typing import Annotated, Optional

import typer

from dmdr_cli.errors import DmdrError

BaseOpt = Annotated[Optional[str], typer.Option("--base", "-b", help="Preset name (see `dmdr presets list`), a local diffusers folder, or a hub id in the HF cache.")]
ConfigOpt = Annotated[Optional[list[str]], typer.Option("--config", "-c", help="YAML file layered over the preset (repeatable, applied in order).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", "-s", help="Override any key: --set distill.lr=1e-6 (repeatable; unknown keys and wrong types are errors).")]


def guarded(fn):
    """Run a command body; a DmdrError becomes one red line and exit code 2, Ctrl-C exit 130."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from dmdr_cli.ui import console

        try:
            return fn(*args, **kwargs)
        except DmdrError as err:
            console.error(str(err))
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            console.error("interrupted")
            raise typer.Exit(130) from None

    return wrapper


def resolve_config(base, config, sets, extra_sets: list[str] | None = None):
    """Resolve the layered config (schema < preset < --config < --set < command-specific options)."""
    from dmdr_cli.config.loader import resolve

    return resolve(base, list(config or []), list(sets or []) + list(extra_sets or []))
