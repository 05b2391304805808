"""Ratio table from a pytest-benchmark JSON file: `python bench/ratios.py results.json`.

For each group: the median of every benchmark, then ours / floor (how close to the work
that cannot be avoided; lower is better, 1.0 is the floor) and baseline / ours (speed-up;
higher is better). Only ratios within one group of one run are printed.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict


def table(path: str) -> str:
    data = json.load(open(path))
    groups = defaultdict(list)
    for b in data["benchmarks"]:
        groups[b["group"] or b["name"]].append(b)
    lines = ["| group | ours | compared with | its median | ratio |", "|---|---|---|---|---|"]
    for b in data["benchmarks"]:  # suites parametrised by backend: the torch composite is the baseline
        b["extra_info"].setdefault("role", "baseline" if "[torch" in b["name"] else "ours")
    for group, items in groups.items():
        ours = [b for b in items if b["extra_info"]["role"] == "ours"]
        others = [b for b in items if b["extra_info"]["role"] in ("floor", "baseline")]
        for o in ours:
            om = o["stats"]["median"]
            for b in others:
                bm = b["stats"]["median"]
                if b["extra_info"]["role"] == "floor":
                    ratio = f"{om / bm:.2f}x the floor"
                else:
                    ratio = f"{bm / om:.2f}x faster"
                lines.append(
                    f"| {group} | {o['name'].removeprefix('test_')} {om * 1e3:.1f} ms "
                    f"| {b['name'].removeprefix('test_')} | {bm * 1e3:.1f} ms | {ratio} |"
                )
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(sys.argv[1]))
