#!/usr/bin/env python3
"""The out-of-distribution score as the written file gives it: reads `footwear predict --format csv`
outputs (columns file, label, ..., reason, ood_score, ood_threshold) of in-distribution photos and
of other sets, prints for each other set (and each of its sub-folders) the share answered
`unknown` for being out of distribution and the AUROC of `ood_score` against the first set.

    footwear predict -m model.onnx --format csv PHOTOS/test > test.csv
    footwear predict -m model.onnx --format csv OTHER > other.csv
    python3 scripts/experiments/ood-auroc.py test.csv other.csv [more.csv ...]

Standard library only.
"""

import csv
import os
import sys
from collections import defaultdict


def read(path):
    rows = list(csv.DictReader(open(path, newline="")))
    if not rows or "ood_score" not in rows[0]:
        raise SystemExit(f"{path}: no ood_score column (a file without the output, or --ood off?)")
    return rows


def score(r):
    s = r["ood_score"]
    return float("inf") if s in ("", "NaN", "nan") else float(s)


def auroc(pos, neg):
    """P(score of an out-of-distribution image > score of an in-distribution one), ties half."""
    ranked = sorted([(s, 1) for s in pos] + [(s, 0) for s in neg])
    rank_sum, i = 0.0, 0
    while i < len(ranked):
        j = i
        while j < len(ranked) and ranked[j][0] == ranked[i][0]:
            j += 1
        mid = (i + 1 + j) / 2  # the mean 1-based rank of the tie group
        rank_sum += mid * sum(1 for k in range(i, j) if ranked[k][1])
        i = j
    return (rank_sum - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))


def line(name, rows, base):
    unknown = sum(1 for r in rows if r["reason"] == "out_of_distribution")
    a = auroc([score(r) for r in rows], base)
    print(f"| {name} | {len(rows)} | {unknown}/{len(rows)} = {100 * unknown / len(rows):.2f}% | {a:.4f} |")


def main():
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    base_rows = read(sys.argv[1])
    base = [score(r) for r in base_rows]
    thresholds = {r["ood_threshold"] for r in base_rows}
    print(f"threshold {', '.join(sorted(thresholds))}; {sys.argv[1]}: ", end="")
    unknown = sum(1 for r in base_rows if r["reason"] == "out_of_distribution")
    print(f"{unknown}/{len(base_rows)} = {100 * unknown / len(base_rows):.2f}% out of distribution")
    print("| set | images | answered unknown (out of distribution) | AUROC against the first set |")
    print("|---|---|---|---|")
    for path in sys.argv[2:]:
        rows = read(path)
        name = os.path.splitext(os.path.basename(path))[0]
        line(f"**{name}**", rows, base)
        groups = defaultdict(list)
        for r in rows:
            groups[os.path.basename(os.path.dirname(r["file"]))].append(r)
        if len(groups) > 1:
            for g, rs in sorted(groups.items()):
                line(f"{name}: {g}", rs, base)


if __name__ == "__main__":
    main()
