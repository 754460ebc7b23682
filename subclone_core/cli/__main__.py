"""`python -m subclone_core.cli`: the same entry point as the `subclone` console script."""

import sys

from subclone_core.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
