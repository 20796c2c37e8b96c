#!/usr/bin/env python3
"""Experiment (session 15, docs/training.md): would a memory of the training photos (k nearest
neighbours over the fine-tuned features, mixed with the classifier's probabilities) or class
offsets added to the logits correct the classifier's validation errors?

  /tmp/venv/bin/python scripts/experiments/knn_and_offsets.py /tmp/knn/train.npz /tmp/knn/val.npz

(the two files from features.py). Every setting is chosen on one half of validation (every other
photo) and scored on the other half, both ways round; the best on all of validation is printed
too, as an upper bound that chose on the photos it scores.
"""
import itertools
import sys

import numpy as np

tr, va = np.load(sys.argv[1]), np.load(sys.argv[2])
yt, yv, pv = tr["labels"], va["labels"], va["probabilities"]
wrong = pv.argmax(1) != yv
halves = np.arange(len(yv)) % 2
print(f"classifier: {wrong.sum()} errors of {len(yv)}; per half {wrong[halves == 0].sum()}, {wrong[halves == 1].sum()}")


def report(name, errors, grid, gentleness):
    """gentleness(g): how far g moves from the classifier alone; ties go to the gentler setting."""
    best = sorted(grid, key=lambda g: (errors[g].sum(), gentleness(g)))[:3]
    print(f"  {name} best on all of validation (optimistic): {[(g, int(errors[g].sum())) for g in best]}")
    for h in (0, 1):
        tune, score = halves == h, halves != h
        g = min(grid, key=lambda g: (errors[g][tune].sum(), gentleness(g)))
        print(f"  {name} chosen on half {h}: {g}: {errors[g][tune].sum()} errors there (classifier "
              f"{wrong[tune].sum()}), {errors[g][score].sum()} on the other half (classifier {wrong[score].sum()})")


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


for feat in ["avg_pool", "head_dense_relu"]:
    sim = unit(va[feat]) @ unit(tr[feat]).T
    order = np.argsort(-sim, axis=1)[:, :50]
    top = np.take_along_axis(sim, order, 1)
    print(f"\n{feat}: nearest training photo's cosine similarity: median {np.median(top[:, 0]):.3f}, "
          f"above 0.98 for {(top[:, 0] > 0.98).sum()} photos")
    print(f"  the classifier's errors whose nearest training photo has the true class: "
          f"{(yt[order[wrong, 0]] == yv[wrong]).sum()} of {wrong.sum()}")
    grid = list(itertools.product([1, 3, 5, 10, 20, 50], [0.02, 0.05, 0.1], [0.25, 0.5, 0.75, 1.0]))
    errors = {}
    for k, t, a in grid:  # k neighbours, softmax temperature over similarities, weight of the kNN
        w = np.exp((top[:, :k] - top[:, :1]) / t)
        pk = np.stack([(w * (yt[order[:, :k]] == c)).sum(1) for c in range(pv.shape[1])], 1)
        errors[(k, t, a)] = ((1 - a) * pv + a * pk / pk.sum(1, keepdims=True)).argmax(1) != yv
    report("kNN (k, temperature, weight)", errors, grid, lambda g: g[2])

print("\nclass offsets added to the logits (sandal, shoe; boot 0):")
grid = list(itertools.product([i / 4 for i in range(-6, 7)], repeat=2))
errors = {g: (va["logits"] + np.array([0, *g])).argmax(1) != yv for g in grid}
report("offsets", errors, grid, lambda g: abs(g[0]) + abs(g[1]))
