"""One readable workflow per command."""
