"""The one way the tests run the command line: in this process, its output captured, exit status returned.

In-process rather than a subprocess so that monkeypatches and fixtures reach the command; capturing with
``redirect_stdout``/``redirect_stderr`` (not ``capsys``) so that it also works in module-scoped fixtures.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterable

from subclone_core.cli.main import main
from subclone_core.io.devices import cpu_multiplies_bfloat16

# how the plan line ends its refit for a float32 parent: in bfloat16 where this CPU multiplies it in hardware
# (workflow.children.refit_dtype_for)
REFIT_IN = " in bfloat16" if cpu_multiplies_bfloat16() else ""


def run_cli(args: Iterable[object]) -> tuple[int, str, str]:
    """Run ``subclone <args>`` (each argument str()-ed) in this process: (exit code, stdout, stderr).

    A flag that argparse refuses while parsing raises SystemExit; its code counts as the exit code, as it
    would for the installed command.
    """
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as stop:
            code = stop.code
    return code, out.getvalue(), err.getvalue()


def run_cli_json(args: Iterable[object]) -> dict:
    """Run a command that must succeed with ``--json`` and return the object it printed."""
    code, out, err = run_cli(args)
    assert code == 0, err
    return json.loads(out)
