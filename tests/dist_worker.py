"""Run by tests/test_distributed.py under torchrun: one training run through the Python API,
optionally stopped after a given step as if the launcher had sent SIGTERM to every rank.

usage: torchrun --standalone --nproc-per-node N tests/dist_worker.py '<json options>' [STOP_STEP]
"""

import json
import os
import sys

import softprompt


def main() -> int:
    import importlib

    t = importlib.import_module("softprompt.train")
    options = json.loads(sys.argv[1])
    stop_step = int(sys.argv[2]) if len(sys.argv) > 2 else 0
    if stop_step:
        state = {"stop": False}
        original = t.Metrics.write

        def write(self, record):  # step N-1's record is written just before step N runs
            original(self, record)
            if record.get("step") == stop_step - 1 and "loss" in record:
                state["stop"] = True

        class Flag(t.StopFlag):
            requested = property(lambda self: state["stop"], lambda self, v: None)

        t.Metrics.write = write
        t.StopFlag = Flag
    try:
        softprompt.train(**options)
    except t.Interrupted as e:
        print(f"rank {os.environ.get('RANK')}: {e}", file=sys.stderr, flush=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
