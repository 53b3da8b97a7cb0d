"""Levers of issue 32 on the enrollment benchmark's cached embeddings, over many episodes.

Reads what ``bench_enroll.py --out OUT`` cached (the base artifact, ``embeddings.npz`` and, for the
more-views lever, ``views.npz``: six extra views of each held-out class's first ten photos, written by
``--write-views``) and measures each lever with the episode protocol of ``enroll_episodes.py``: 5 and 1
shots, budgets 0.25 / 0.5 / 1 / 2 and none, the served (top-down) and the flat answer.

    python scripts/bench_enroll_levers.py --out runs/bench_enroll --levers shipped,debias1,lunch1k3

Every lever's offsets go through ``served_offset`` (the served answers' check, as ``hier enroll``) but
``unchecked``'s: the shipped head with ``budget_offset`` alone, as shipped before it.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from benchlib import machine
from bench_enroll import NEAR_SIBLING, NO_SIBLING, POOL, SHARED, held_out_split
from enroll_episodes import Episode, Protocol, StatisticsHead, draw, fmt
from PIL import Image

from hier import artifact
from hier.data import scan_folder, split_indices
from hier.models.statistics import HeadConfig
from hier.runtime import Predictor
from hier.taxonomy import Taxonomy

class Variant(StatisticsHead):
    """The statistical head with the levers tried on the new classes' means: a Free-Lunch mean
    (``lam`` pseudo-shots at the mean of the ``knn`` nearest base means, Yang et al. 2021) and
    ``debias`` (the n-shot mean's expected deficit given back). Either lever set: no TEEN."""

    def __init__(self, *a, lam=0.0, knn=3, debias=0.0, **kw):
        super().__init__(*a, **kw)
        self.lam, self.knn, self.debias = lam, knn, debias
        idx = [self.stats.index[c] for c in self.base]
        self.mu = (self.stats.sums / self.stats.counts[:, None])[idx]
        s = self.stats.scatter / self.stats.dof
        self.noise = float(np.trace(np.linalg.solve(self.stats.covariance(), s)))

    def fit(self, new):
        if not (self.lam or self.debias):
            return super().fit(new)
        cov = self.stats.covariance()
        mus = [self.mu]
        for c, z in new.items():
            z = self.transform(z)
            m, n = z.mean(0), len(z)
            if self.lam:
                b = self.mu / np.linalg.norm(self.mu, axis=1, keepdims=True)
                near = np.argsort(-(b @ (m / np.linalg.norm(m))))[: self.knn]
                m = (n * m + self.lam * self.mu[near].mean(0)) / (n + self.lam)
            mus.append(m[None])
        mu = np.vstack(mus)
        pm = np.linalg.solve(cov, mu.T).T
        bias = -0.5 * np.einsum("cd,cd->c", mu, pm)
        nb = len(self.mu)
        for i, (c, z) in enumerate(new.items()):
            n = len(z) + (self.lam or 0)
            bias[nb + i] += self.debias * 0.5 * self.noise / n
        return pm, bias


def tukey(beta: float):
    """Tukey's power transform, signed (the embedding has negative coordinates), then unit length."""
    def f(z):
        z = np.sign(z) * np.abs(z) ** beta
        return z / np.linalg.norm(z, axis=1, keepdims=True)
    return f


def levers(classes):
    """Each lever's head, built on demand."""
    return {
        "pool": lambda: Variant(z_base[tr], labels, classes, debias=1.0),
        "before": lambda: Variant(z_base[tr], labels, classes, HeadConfig(debias=0.0)),    # TEEN 0.1
        "shipped": lambda: Variant(z_base[tr], labels, classes),                           # TEEN 0.1 + debias 1
        "unchecked": lambda: Variant(z_base[tr], labels, classes),      # shipped, offsets without served_offset
        "teen0": lambda: Variant(z_base[tr], labels, classes, HeadConfig(teen=0.0, debias=0.0)),
        "teen0.3": lambda: Variant(z_base[tr], labels, classes, HeadConfig(teen=0.3, debias=0.0)),
        "shrink0.3": lambda: Variant(z_base[tr], labels, classes, HeadConfig(shrink=0.3, debias=0.0)),
        "lunch1k3": lambda: Variant(z_base[tr], labels, classes, HeadConfig(teen=0.0), lam=1.0, knn=3),
        "lunch2k3": lambda: Variant(z_base[tr], labels, classes, HeadConfig(teen=0.0), lam=2.0, knn=3),
        "lunch1k1": lambda: Variant(z_base[tr], labels, classes, HeadConfig(teen=0.0), lam=1.0, knn=1),
        "debias0.5": lambda: Variant(z_base[tr], labels, classes, debias=0.5),
        "debias1": lambda: Variant(z_base[tr], labels, classes, debias=1.0),
        "lunch1k3+debias1": lambda: Variant(z_base[tr], labels, classes, HeadConfig(teen=0.0), lam=1.0, knn=3, debias=1.0),
        "lunch0.5k3+debias1": lambda: Variant(z_base[tr], labels, classes, HeadConfig(teen=0.0), lam=0.5, knn=3, debias=1.0),
        "teen0.3+debias1": lambda: Variant(z_base[tr], labels, classes, HeadConfig(teen=0.3), debias=1.0),
        "debias1.5": lambda: Variant(z_base[tr], labels, classes, debias=1.5),
        "tukey0.5": lambda: Variant(z_base[tr], labels, classes, HeadConfig(debias=0.0), transform=tukey(0.5)),
    }


def views_of(path: Path) -> list[Image.Image]:
    """Six more views of a shot: the four corner crops and the centre crop at 85%, and the photo padded
    to 115% (a smaller car)."""
    im = Image.open(path).convert("RGB")
    w, h = im.size
    cw, ch = int(w * 0.85), int(h * 0.85)
    out = [im.crop((x, y, x + cw, y + ch)) for x, y in ((0, 0), (w - cw, 0), (0, h - ch), (w - cw, h - ch),
                                                          ((w - cw) // 2, (h - ch) // 2))]
    pad = Image.new("RGB", (int(w * 1.15), int(h * 1.15)), (124, 116, 104))
    pad.paste(im, (int(w * 0.075), int(h * 0.075)))
    return out + [pad]


def write_views(out: Path, net, held: list[str]) -> None:
    pool, _ = held_out_split(SHARED / "stanford-cars-dev" / "train", 0)
    predictor = Predictor(net)
    arrays = {}
    for i, c in enumerate(held):
        shots = [v for f in pool[c] for v in views_of(f)]
        arrays[f"views{i}"] = predictor(shots)["embedding"].reshape(len(pool[c]), -1, net.cfg.embed_dim)
    np.savez(out / "views.npz", **arrays)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="bench_enroll.py's --out (its cached embeddings)")
    ap.add_argument("--levers", default="before,shipped,teen0,teen0.3,lunch1k3,lunch2k3,debias0.5,debias1,"
                                          "lunch1k3+debias1,lunch0.5k3+debias1,tukey0.5")
    ap.add_argument("--episodes", type=int, default=10)
    ap.add_argument("--write-views", action="store_true", help="embed the extra views of the pool photos first")
    args = ap.parse_args()
    global z_base, tr, va, labels, base_tax, photos
    full_tax = Taxonomy.from_csv(SHARED / "stanford_cars_taxonomy.csv")
    net, base_tax = artifact.load(args.out / "base")
    images = scan_folder(args.out / "base_data")
    tr, va = split_indices(images.labels, 0.2, 0)
    cached = np.load(args.out / "embeddings.npz")
    held = [*NEAR_SIBLING, *NO_SIBLING]
    z_base = cached["base"]
    photos = {c: np.concatenate([cached[f"pool{i}"], cached[f"test{i}"]]) for i, c in enumerate(held)}
    y_base = np.array([base_tax.class_index[c] for c in images.labels])
    labels = [base_tax.classes[i] for i in y_base[tr]]
    if args.write_views:
        write_views(args.out, net, held)
    shot_photos = {}
    if (args.out / "views.npz").is_file():       # shots averaged with their extra views (first POOL photos)
        saved = np.load(args.out / "views.npz")
        for name, extra in (("pool:views_all", 1.0), ("pool:views_half", 0.5), ("pool:plain", 0.0)):
            shot_photos[name] = {}
            for i, c in enumerate(held):
                z = photos[c].copy()
                v = saved[f"views{i}"]
                m = (z[:POOL] + extra * v.sum(1)) / (1 + extra * v.shape[1])
                z[:POOL] = m / np.linalg.norm(m, axis=1, keepdims=True)
                shot_photos[name][c] = z
    variants = levers(base_tax.classes)
    rows = []
    for name in args.levers.split(","):
        head = variants["pool" if name.startswith("pool:") else name]()
        protocol = Protocol(photos, set(NEAR_SIBLING), z_base[va], y_base[va], full_tax, shot_photos.get(name))
        for k in (1, 5):
            eps = draw_pool(k, args.episodes, 200 + k, len(va)) if name.startswith("pool:") else \
                draw(photos, len(va), k, args.episodes, 100 + k)
            for budget in (None, 0.25, 0.5, 1.0, 2.0):
                for rule in (("top-down", "flat") if budget in (None, 0.5, 1.0) else ("top-down",)):
                    t = time.time()
                    m = protocol.measure(head, eps, budget, alone=budget is not None, rule=rule,
                                         served=name != "unchecked")
                    rows.append({"lever": name, "k": k, "budget": budget, "rule": rule, **m})
                    print(json.dumps({**rows[-1], **{c: fmt(v) for c, v in m.items()}}, ensure_ascii=False),
                          f"{time.time() - t:.0f} s", flush=True)
    result = {"machine": machine(), "command": " ".join(["python", *sys.argv]), "rows": rows}
    (args.out / f"levers_{args.levers.replace(',', '_').replace(':', '-')}.json").write_text(json.dumps(result))
    print(json.dumps(result["machine"]))


def draw_pool(k: int, episodes: int, seed: int, n_val: int) -> list[Episode]:
    """Episodes whose shots are among the first POOL photos of each class (those with extra views)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(episodes):
        shots, tests = {}, {}
        for c, z in photos.items():
            pick = rng.permutation(POOL)[:k]
            shots[c], tests[c] = pick, np.setdiff1d(np.arange(len(z)), pick)
        half = rng.permutation(n_val)
        out.append(Episode(shots, tests, half[: n_val // 2], half[n_val // 2:]))
    return out


if __name__ == "__main__":
    main()
