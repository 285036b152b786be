#!/usr/bin/env python3
"""Do periodic all-thread stack dumps survive busy threads on this Python?

    python scripts/stackdump/stress_check.py [--trials 5] [--seconds 6] [--every 0.002]

Runs a child with four threads that call Python functions as fast as they can while stacks are
dumped every ``--every`` seconds, ``--trials`` times for each way of dumping:

* ``faulthandler``: ``faulthandler.dump_traceback_later(repeat=True)`` (what sitecustomize used
  before 24 Nov 2026): its watchdog thread reads the other threads' frames without the GIL;
* ``gil-thread``: this folder's sitecustomize with ``DDTREE_STACKS_EVERY_S`` (a Python thread,
  frames read under the GIL).

Prints one JSON line: the Python version and each way's child exit codes (negative: killed by
that signal, -11 = SIGSEGV). Exit status 1 when a ``gil-thread`` child did not exit 0.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

CHILD = r"""
import faulthandler, os, sys, threading, time
if os.environ.get("STRESS_WAY") == "faulthandler":
    faulthandler.dump_traceback_later(float(os.environ["STRESS_EVERY"]), repeat=True,
                                      file=open(os.devnull, "w"))
def depth(n):
    return n if n < 2 else depth(n - 1) + 1
def busy(end):
    while time.monotonic() < end:
        depth(25)
        (lambda: [depth(3) for _ in range(5)])()
end = time.monotonic() + float(os.environ["STRESS_SECONDS"])
ts = [threading.Thread(target=busy, args=(end,), name=f"busy-{i}") for i in range(4)]
[t.start() for t in ts]
busy(end)
[t.join() for t in ts]
"""


def run(way: str, seconds: float, every: float) -> int:
    env = dict(os.environ, STRESS_WAY=way, STRESS_SECONDS=str(seconds), STRESS_EVERY=str(every))
    env.pop("DDTREE_STACKS_ON_SIGUSR1", None)
    if way == "gil-thread":
        env.update(PYTHONPATH=str(HERE), DDTREE_STACKS_EVERY_S=str(every))
    else:
        env.pop("DDTREE_STACKS_EVERY_S", None)
    p = subprocess.run([sys.executable, "-c", CHILD], env=env, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=seconds * 20 + 60)
    return p.returncode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--every", type=float, default=0.002)
    a = ap.parse_args()
    doc = {"python": platform.python_version(), "seconds": a.seconds, "every": a.every}
    for way in ("faulthandler", "gil-thread"):
        doc[way] = [run(way, a.seconds, a.every) for _ in range(a.trials)]
    print(json.dumps(doc), flush=True)
    sys.exit(1 if any(doc["gil-thread"]) else 0)


if __name__ == "__main__":
    main()
