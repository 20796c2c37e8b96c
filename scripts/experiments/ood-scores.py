"""Compares out-of-distribution scores on the features `trainer ood RUN --dump DIR FOLDERS`
wrote: the threshold of each at the 99th percentile of validation, the share of each other
folder beyond it, and the AUROC against the test photos.
  python scripts/experiments/ood-scores.py runs/ood-dump hymenoptera [synthetic ...]"""
import sys
import numpy as np

d = sys.argv[1]
def load(name, k):
    f = np.fromfile(f"{d}/{name}.features.f32", dtype=np.float32).reshape(-1, 2048).astype(np.float64)
    l = np.fromfile(f"{d}/{name}.logits.f32", dtype=np.float32).reshape(len(f), k).astype(np.float64)
    y = open(f"{d}/{name}.labels.txt").read().split()
    return f, l, y

classes = sorted(set(open(f"{d}/train.labels.txt").read().split()))
k = len(classes)
tr, trl, try_ = load("train", k)
sets = {n: load(n, k) for n in ["validation", "test"] + sys.argv[2:]}
ytr = np.array([classes.index(c) for c in try_])

def ledoit_wolf(x):
    n, p = x.shape
    s = x.T @ x / n
    mu = np.trace(s) / p
    x2 = x ** 2
    beta_ = (x2.T @ x2).sum() / n
    delta_ = ((x.T @ x) ** 2).sum() / n ** 2
    beta = (beta_ - delta_) / (p * n)
    delta = (delta_ - 2 * mu * np.trace(s) * 1 + p * mu ** 2) / p
    a = min(beta, delta) / delta
    return (1 - a) * s + a * mu * np.eye(p)

def unit(f):
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
def fit_maha(x):
    means = np.stack([x[ytr == c].mean(0) for c in range(k)])
    prec = np.linalg.inv(ledoit_wolf(x - means[ytr]))
    return lambda f: np.min(np.stack([np.einsum("ij,jk,ik->i", f - m, prec, f - m) for m in means]), 0) / 2048
maha = fit_maha(tr)
# Mahalanobis++ (Mueller & Hein, 2025): the same on L2-normalised features, so that an image whose
# features are small everywhere (a flat colour) is not near every class mean.
maha_unit_fit = fit_maha(unit(tr))
def maha_unit(f):
    return maha_unit_fit(unit(f))
trn = tr / np.linalg.norm(tr, axis=1, keepdims=True)
def knn(f, kk=1):
    fn = f / np.linalg.norm(f, axis=1, keepdims=True)
    sims = fn @ trn.T
    return -np.sort(sims, 1)[:, -kk]
def msp(l):
    p = np.exp(l - l.max(1, keepdims=True)); p /= p.sum(1, keepdims=True)
    return -p.max(1)
def energy(l):
    m = l.max(1); return -(m + np.log(np.exp(l - m[:, None]).sum(1)))
scores = {
    "max softmax probability": lambda f, l: msp(l),
    "energy (-logsumexp logits)": lambda f, l: energy(l),
    "Mahalanobis, shared covariance (Ledoit-Wolf)": lambda f, l: maha(f),
    "Mahalanobis on L2-normalised features (Mahalanobis++)": lambda f, l: maha_unit(f),
    "1-NN cosine to training features": lambda f, l: knn(f, 1),
    "10-NN cosine to training features": lambda f, l: knn(f, 10),
}
def auroc(pos, neg):
    s = np.concatenate([pos, neg]); r = s.argsort().argsort() + 1
    return (r[:len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg))
print(f"| score | test rejected | " + " | ".join(f"{n} rejected | AUROC {n} vs test" for n in sys.argv[2:]) + " |")
for name, fn in scores.items():
    v = fn(*sets["validation"][:2]); t = np.quantile(v, 0.99)
    te = fn(*sets["test"][:2])
    row = [f"{(te > t).mean():.2%}"]
    for n in sys.argv[2:]:
        o = fn(*sets[n][:2])
        row += [f"{(o > t).mean():.2%} ({(o > t).sum()}/{len(o)})", f"{auroc(o, te):.4f}"]
    print(f"| {name} | " + " | ".join(row) + " |")
