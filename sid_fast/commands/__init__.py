"""Subcommands of `sid-fast` (see `sid_fast/cli.py`)."""
