#!/usr/bin/env python3
"""PNG plots from one or more benchmark results.json files (benchmarks/run_profile.py).

    python benchmarks/plot_results.py benchmarks/results/h100/gpu-quick/results.json [...] \
        [--out benchmarks/results/h100/plots]

Writes (each titled with the device the numbers were measured on):
  tokps_vs_concurrency.png  output tok/s vs concurrency, one line per mode, one panel per category
  speedup_vs_dflash.png     tok/s of each mode / flat DFlash at the same category and concurrency
  acceptance_vs_budget.png  DDTree acceptance length vs budget, one line per top_k (flat DFlash as a
                            dashed reference); written only when the results hold DDTree points
Needs matplotlib (not part of the CPU test venv: run it with any python that has it).
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path


def load_points(paths: list[Path]) -> tuple[str, list[dict]]:
    devices, points = set(), []
    for p in paths:
        doc = json.loads(Path(p).read_text())
        devices.add(doc["device"]["device"])
        label = doc["models"]["label"]
        for pt in doc["points"]:
            if "error" not in pt:
                points.append({**pt, "models": label})
    if len(devices) != 1:
        raise ValueError(f"results: plots mix devices {sorted(devices)}; plot one device at a time")
    return devices.pop(), points


TREE_MODE = re.compile(r"ddtree-(best-)?b(\d+)-k(\d+)$")  # ddtree-b32-k8, ddtree-best-b32-k8


def _mode_order(name: str):
    """no-spec, flat DFlash, the DDTree grid by (budget, top_k), then the best-shape curves."""
    if name in ("nospec", "dflash"):
        return (0 if name == "nospec" else 1, 0, 0, name)
    m = TREE_MODE.match(name)
    if m is None:
        return (4, 0, 0, name)
    return (3 if m[1] else 2, int(m[2]), int(m[3]), name)


def plot(paths: list[Path], out: Path) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    device, points = load_points(paths)
    models = sorted({p["models"] for p in points})
    out.mkdir(parents=True, exist_ok=True)
    written = []
    cats = sorted({p["category"] for p in points})
    series = defaultdict(dict)                   # (mode, cat) -> {conc: tok/s}
    for p in points:
        series[(p["mode"], p["category"])][p["concurrency"]] = p.get("output_throughput") or 0.0
    modes = sorted({p["mode"] for p in points}, key=_mode_order)
    subtitle = f"{device}; models: {', '.join(models)}"

    def per_category(name: str, title: str, ylabel: str, curves) -> None:
        """One panel per prompt category; curves(cat) yields (label, xs, ys)."""
        fig, axes = plt.subplots(1, len(cats), figsize=(5.5 * len(cats), 4.2), squeeze=False)
        for ax, cat in zip(axes[0], cats):
            for label, xs, ys in curves(cat):
                ax.plot(xs, ys, marker="o", label=label)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("concurrency")
            ax.set_ylabel(ylabel)
            ax.set_title(cat)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(f"{title} — {subtitle}", fontsize=9)
        fig.tight_layout()
        path = out / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    def tokps(cat):
        for mode in modes:
            s = series.get((mode, cat))
            if s:
                xs = sorted(s)
                yield mode, xs, [s[x] for x in xs]

    def speedup(cat):
        ref = series.get(("dflash", cat), {})
        for mode in modes:
            s = series.get((mode, cat))
            if s and mode != "dflash":
                xs = sorted(x for x in s if ref.get(x))
                yield mode, xs, [s[x] / ref[x] for x in xs]
        xs = sorted(ref)
        yield "flat DFlash", xs, [1.0] * len(xs)

    per_category("tokps_vs_concurrency.png", "output tok/s vs concurrency", "output tok/s", tokps)
    if any(m == "dflash" for m in modes) and len(modes) > 1:
        per_category("speedup_vs_dflash.png", "speedup over flat DFlash", "tok/s / flat DFlash tok/s",
                     speedup)

    # the budget x top_k grid only: a best-shape curve repeats one of its shapes per concurrency
    tree = [p for p in points if (m := TREE_MODE.match(p["mode"])) and not m[1] and p.get("spec_decode")]
    if tree:
        fig, ax = plt.subplots(figsize=(6, 4.2))
        by = defaultdict(lambda: defaultdict(list))        # (k, cat, conc) -> budget -> [AL]
        for p in tree:
            m = TREE_MODE.match(p["mode"])
            by[(int(m[3]), p["category"], p["concurrency"])][int(m[2])].append(
                p["spec_decode"]["acceptance_length"])
        for (k, cat, c), d in sorted(by.items()):
            xs = sorted(d)
            ax.plot(xs, [sum(d[x]) / len(d[x]) for x in xs], marker="o", label=f"top_k={k} {cat} c={c}")
        for p in points:
            if p["mode"] == "dflash" and p.get("spec_decode"):
                ax.axhline(p["spec_decode"]["acceptance_length"], color="gray", lw=0.6, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("DDTree budget (nodes)")
        ax.set_ylabel("acceptance length")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
        ax.set_title(f"acceptance vs budget (dashed: flat DFlash)\n{subtitle}", fontsize=8)
        fig.tight_layout()
        path = out / "acceptance_vs_budget.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="default: the first file's folder")
    args = ap.parse_args()
    for p in plot(args.results, args.out or args.results[0].parent):
        print(p)


if __name__ == "__main__":
    main()
