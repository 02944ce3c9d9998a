"""The ``dmdr`` command line: registers the thin commands, nothing else.

Importing this module must not import torch (``dmdr --help`` stays fast); commands import their
recipes lazily.
"""

from __future__ import annotations

import typer

from dmdr_cli import __version__
from dmdr_cli.commands import data, evaluate, export, presets, sample, training

app = typer.Typer(
    name="dmdr",
    help="Distil a multi-step text-to-image diffusion model into a fast few-step generator with DMDR "
         "(distribution matching distillation + reinforcement learning).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

app.command("distill")(training.distill)
app.command("finetune-rl")(training.finetune_rl)
app.command("sample")(sample.sample)
app.command("eval")(evaluate.evaluate)
app.command("export")(export.export)
app.add_typer(presets.app, name="presets")
app.add_typer(data.app, name="data")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dmdr {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version.")) -> None:
    """dmdr: DMDR distillation for SD3 / SD3.5 / SDXL."""


def main() -> None:
    app()
