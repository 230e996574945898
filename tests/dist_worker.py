"""Run by tests/test_distributed.py under torchrun: one training run through the Python API,
optionally stopped after a given step as if the launcher had sent SIGTERM to every rank.

usage: torchrun --standalone --nproc-per-node N tests/dist_worker.py '<json options>' [STOP_STEP]
"""

import json
import os
import sys

from conftest import stop_after  # tests/ is on the path: this script lives there

import softprompt
from softprompt.train import Interrupted


def main() -> int:
    options = json.loads(sys.argv[1])
    if len(sys.argv) > 2:
        stop_after(setattr, int(sys.argv[2]))
    try:
        softprompt.train(**options)
    except Interrupted as e:
        print(f"rank {os.environ.get('RANK')}: {e}", file=sys.stderr, flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
