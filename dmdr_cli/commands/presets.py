"""``dmdr presets list|show|copy|validate``: inspect and copy the built-in presets."""

from __future__ import annotations

from typing import Annotated

import typer

from dmdr_cli.commands.common import guarded

app = typer.Typer(help="List, show, copy and validate presets.", no_args_is_help=True)


@app.command("list")
@guarded
def list_presets() -> None:
    """List the built-in presets."""
    from dmdr_cli.config import presets
    from dmdr_cli.ui import console

    rows = []
    for name in presets.names():
        data = presets.load(name)
        m = data.get("model", {})
        rows.append([name, m.get("family", ""), m.get("hub_id", "") or f"tiny ({m.get('tiny', '')})",
                     str(data.get("student", {}).get("steps", 4)), str(data.get("description", ""))])
    console.table("dmdr presets", ["name", "family", "base model", "steps", "description"], rows)


@app.command("show")
@guarded
def show(name: Annotated[str, typer.Argument(help="Preset name.")],
         resolved: Annotated[bool, typer.Option("--resolved", help="Show every key with schema defaults filled in.")] = False) -> None:
    """Print a preset (its deltas, or the fully resolved config)."""
    from dmdr_cli.config import loader, presets
    from dmdr_cli.ui import console

    console.syntax_yaml(loader.dump_yaml(loader.resolve(name)) if resolved else presets.path_of(name).read_text())


@app.command("copy")
@guarded
def copy(name: Annotated[str, typer.Argument(help="Preset name.")],
         dest: Annotated[str, typer.Argument(help="Destination file or folder.")],
         force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False) -> None:
    """Copy a preset to edit it; use it again with --config FILE."""
    from dmdr_cli.config import presets
    from dmdr_cli.ui import console

    console.success(f"wrote {presets.copy(name, dest, force)}")


@app.command("validate")
@guarded
def validate(file: Annotated[str, typer.Argument(help="YAML config file.")],
             base: Annotated[str, typer.Option("--base", "-b", help="Preset to layer the file on.")] = "tiny-sd3") -> None:
    """Check a config file: unknown keys, wrong types and bad values are errors (exit 2)."""
    from dmdr_cli.config import loader
    from dmdr_cli.ui import console

    loader.resolve(base, [file])
    console.success(f"{file}: valid (on top of {base})")
