"""Thin Typer commands: parse options, resolve the config, call a recipe."""
