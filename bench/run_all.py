"""Run every benchmark in turn; each writes its own section of docs/BENCHMARKS.md.

Run: make bench, or python -m bench.run_all [--gpu] (about 45 minutes on 2 CPU cores, plus about 13 for
bench_scale's synthetic parents and bench_fsdp's sharded children; --gpu goes to the training benchmark).
"""

from __future__ import annotations

import subprocess
import sys

from bench._report import ROOT

SCRIPTS = ["bench_core", "measure_defaults", "bench_training", "bench_scale", "bench_scale --sequential",
           "bench_scale --ablation", "bench_fsdp"]


def main() -> int:
    """Each script in turn (this command's arguments go to bench_training); the first failure's exit status."""
    for script in SCRIPTS:
        name, *flags = script.split()
        extra = sys.argv[1:] if name == "bench_training" else []
        print(f"== {script}", flush=True)
        if code := subprocess.call([sys.executable, "-m", f"bench.{name}", *flags, *extra], cwd=ROOT):
            print(f"{script} failed with exit status {code}", file=sys.stderr)
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
