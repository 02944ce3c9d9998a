"""Terminal UI: console messages, progress bars, dashboards (the only rich importer)."""
