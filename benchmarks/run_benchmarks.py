"""Entry point of the speed benchmarks: writes its tables to docs/benchmarks.md.

    python benchmarks/run_benchmarks.py                 # S k3 3D, 64^3, batch 2 on the CPU
    python benchmarks/run_benchmarks.py --model L --kernel 5 --patch 128 --device cuda

Same options as ``mednext benchmark``; this script only adds ``--write docs/benchmarks.md``.
"""

import sys
from pathlib import Path

from mednext.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if "--write" not in args:
        args += ["--write", str(Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md")]
    sys.exit(main(["benchmark", *args]))
