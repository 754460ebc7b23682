"""The `subclone` command line (`python -m subclone_core.cli`): main.py, one module per subcommand in commands/."""
