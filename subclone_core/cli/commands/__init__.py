"""Subcommands of the `subclone` CLI. Each module defines `register(subparsers)`, which adds its parser
and sets `func` (args -> exit status) with `set_defaults`. Modules starting with "_" are shared helpers."""
