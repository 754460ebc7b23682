"""Run every benchmark in turn; each writes its own section of docs/BENCHMARKS.md.

Run: make bench (about 45 minutes on 2 CPU cores, plus bench_scale.py's synthetic 0.1-3B parents and its
sequential calibration of the 1B one, about 3 minutes, and bench_fsdp.py's sharded training of 0.25B and 1B
children, about 10 minutes; pass --gpu through to the training benchmark on a GPU).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["bench_core.py", "measure_defaults.py", "bench_training.py", "bench_scale.py", "bench_scale.py --sequential",
           "bench_scale.py --ablation", "bench_fsdp.py"]


def main() -> int:
    for script in SCRIPTS:
        name, *flags = script.split()
        extra = sys.argv[1:] if name == "bench_training.py" else []
        print(f"== {script}", flush=True)
        code = subprocess.call([sys.executable, str(HERE / name), *flags, *extra])
        if code:
            print(f"{script} failed with exit status {code}", file=sys.stderr)
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
