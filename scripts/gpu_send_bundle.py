#!/usr/bin/env python3
"""Plan the device-tool calls that carry an offline GPU bundle to the GPU machine.

Each ``run`` of the device tool ships the main checkout (tracked + untracked-not-ignored files) plus
the ignored paths named in ``carry``, 64 MiB at most per call. A bundle (~190 MB) therefore travels
over several consecutive calls: this script stages its parts into the checkout's ignored ``.gpu/``
folder, one sub-folder per call, and prints each call's ``carry`` list and command. On the machine
every call moves its parts into ``/opt/bundle`` (outside the checkout; /opt survives between calls
while the machine stays warm) and reports which parts are still missing.

    python scripts/gpu_send_bundle.py --bundle build/gpu-bundle --checkout /work/main \
        [--stage .gpu/bundle] [--extra .gpu/bundle/tools] [--limit-mib 64] [--margin-mib 3]

The calls must follow each other while the machine is warm (30 s after a call returns): issue the
next one as soon as the previous returns. If a call reports every part missing, the machine was
replaced: start again from call 1. See scripts/gpu_send_bundle.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import gpu_bundle as gb  # noqa: E402

MIB = 1 << 20
REMOTE_DIR = "/opt/bundle"


def travelling_bytes(checkout: Path) -> int:
    """Bytes of the checkout that travel with every call (tracked + untracked-not-ignored, shared/)."""
    out = subprocess.run(["git", "-C", str(checkout), "ls-files", "-co", "--exclude-standard", "-z"],
                         check=True, capture_output=True).stdout
    total = 0
    for rel in filter(None, out.decode().split("\0")):
        p = checkout / rel
        if p.is_file() and not p.is_symlink():
            total += p.stat().st_size
    shared = checkout / "shared"
    if shared.is_dir():
        total += sum(p.stat().st_size for p in shared.rglob("*") if p.is_file())
    return total


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def plan_calls(part_sizes: list[int], budget: int) -> list[list[int]]:
    """Greedy: consecutive parts per call while they fit ``budget`` bytes (indices into part_sizes)."""
    calls, cur, used = [], [], 0
    for i, size in enumerate(part_sizes):
        if size > budget:
            raise ValueError(f"part {i} is {size / MIB:.1f} MiB but a call can carry only "
                             f"{budget / MIB:.1f} MiB beside the checkout: rebuild with a smaller --part-mb")
        if cur and used + size > budget:
            calls.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += size
    if cur:
        calls.append(cur)
    return calls


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, default=HERE.parent / "build" / "gpu-bundle")
    ap.add_argument("--checkout", type=Path, required=True, help="the checkout the device tool ships")
    ap.add_argument("--stage", default=".gpu/bundle", help="ignored folder inside the checkout")
    ap.add_argument("--extra", action="append", default=[],
                    help="further ignored paths (relative to the checkout) the LAST call carries")
    ap.add_argument("--limit-mib", type=float, default=64.0)
    ap.add_argument("--margin-mib", type=float, default=3.0)
    ap.add_argument("--dry-run", action="store_true", help="plan only; stage nothing")
    args = ap.parse_args(argv)

    checkout = args.checkout.resolve()
    manifest = gb.load_manifest(args.bundle)
    problems = gb.verify(args.bundle)
    if problems:
        print("bundle is not complete here: " + "; ".join(problems), file=sys.stderr)
        return 1
    ignored = subprocess.run(["git", "-C", str(checkout), "check-ignore", "-q", args.stage + "/x"])
    if ignored.returncode != 0:
        print(f"{args.stage} is not ignored in {checkout}: it would travel with every call",
              file=sys.stderr)
        return 1

    tree = travelling_bytes(checkout)
    extras = sum(dir_bytes(checkout / e) if (checkout / e).is_dir() else (checkout / e).stat().st_size
                 for e in args.extra)
    budget = int((args.limit_mib - args.margin_mib) * MIB) - tree
    # the first call carries the manifest and gpu_bundle.py (small), so every call can report what
    # is still missing; then the parts in order, then the zstandard wheel
    head = [(gb.MANIFEST, args.bundle / gb.MANIFEST), ("gpu_bundle.py", HERE / "gpu_bundle.py")]
    items = [(p["name"], args.bundle / p["name"]) for p in manifest["parts"]]
    items += [(s["name"], args.bundle / s["name"]) for s in manifest["side_files"]]
    head_bytes = sum(p.stat().st_size for _, p in head)
    sizes = [p.stat().st_size for _, p in items]
    sizes[0] += head_bytes
    calls = plan_calls(sizes, budget)
    calls[0] = [-1, -2] + calls[0]              # the head files ride with the first part
    last_used = sum(sizes[i] for i in calls[-1] if i >= 0)
    extras_alone = last_used + extras > budget
    if extras > budget:
        print(f"--extra paths are {extras / MIB:.1f} MiB, more than one call carries "
              f"({budget / MIB:.1f} MiB beside the checkout)", file=sys.stderr)
        return 1
    if extras_alone:
        calls.append([])

    stage = checkout / args.stage
    plan = {"checkout": str(checkout), "tree_mib": round(tree / MIB, 2),
            "budget_per_call_mib": round(budget / MIB, 2), "remote_dir": REMOTE_DIR, "calls": []}
    if not args.dry_run:
        shutil.rmtree(stage, ignore_errors=True)
    for k, idx in enumerate(calls):
        sub = f"{args.stage}/c{k}"
        chosen = [head[-1 - i] if i < 0 else items[i] for i in idx]
        if not args.dry_run and chosen:
            (checkout / sub).mkdir(parents=True, exist_ok=True)
            for name, src in chosen:
                dst = checkout / sub / name
                try:
                    os.link(src, dst)
                except OSError:
                    shutil.copy2(src, dst)
        last = k == len(calls) - 1
        carry = ([sub] if chosen else []) + (args.extra if last else [])
        moved = f"mv {sub}/* {REMOTE_DIR}/ && " if chosen else ""
        command = (f"mkdir -p {REMOTE_DIR} && {moved}"
                   f"python3 {REMOTE_DIR}/gpu_bundle.py verify {REMOTE_DIR} --quick; df -h /opt | tail -1")
        mib = sum(src.stat().st_size for _, src in chosen) / MIB
        plan["calls"].append({"call": k + 1, "carry": carry, "files": [n for n, _ in chosen],
                              "mib": round(mib + (extras / MIB if last else 0), 1), "command": command})
    print(json.dumps(plan, indent=1))
    print(f"\n{len(calls)} calls; tree {tree / MIB:.1f} MiB; <= {budget / MIB:.1f} MiB carried per call. "
          f"After the last: scripts/gpu_bundle_install.sh {REMOTE_DIR} /opt/vllm-site", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
