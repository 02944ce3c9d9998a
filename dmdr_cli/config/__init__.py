"""Typed configuration: schema, presets, strict overrides."""
