"""What the audit finds: exact duplicates (MD5), near-duplicates (embedding cosine, or a perceptual hash
a few bits apart: a resized or re-encoded copy; FAISS k-NN searches), outliers (a robust z-score of each photo's cosine to the rest of its class), and the exclude list."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from hier.models import HierNet, ModelConfig
from hier.runtime import Predictor
from hier.taxonomy import Taxonomy

OUTLIER_Z = -3.5            # modified z-score below which a photo is flagged (Iglewicz & Hoaglin)
MIN_CLASS = 5               # fewer photos than this: no robust spread to judge an outlier by
NEAR_PER_PHOTO = 16         # near-duplicates looked for among each photo's nearest (memory linear in photos)
PHASH_BITS = 4              # pHashes at most this many of 64 bits apart are copies of one photo
FLAT_BITS = 4               # ... unless a hash has this few bits set (or unset): a flat photo's says nothing


def imagenet_net():
    """The offline ImageNet ``efficientnet_lite0`` whose embedding is its pooled 1280 features: no
    untrained projection in between, which would only blur the cosines duplicates are judged by."""
    one = Taxonomy(pd.DataFrame([{"class": "photo", "brand": "photo", "model": "photo",
                                  "year_start": 2000, "year_end": 2000}]))
    net = HierNet(ModelConfig(trunk="efficientnet_lite0", embed_dim=1280), one, pretrained="efficientnet_lite0")
    net.neck = torch.nn.Identity()
    return net.eval()


def embed(items: list, predictor=None, batch_size: int = 64, progress=None) -> np.ndarray:
    """Unit embeddings (N, D) through the one ``Predictor``: the artifact's (``predictor``) or the
    ImageNet trunk's."""
    predictor = predictor or Predictor(imagenet_net(), batch_size=batch_size)
    return predictor(items, progress, keep=("embedding",))["embedding"]


def find(files: pd.DataFrame, z: np.ndarray, near: float) -> dict:
    """Exact duplicate groups, near-duplicate pairs, and every photo's outlier score, ranked."""
    exact = exact_duplicates(files)
    codes = phash_codes(files["phash"])
    pairs = sorted({(i, j) for i, j, _ in near_duplicates(z, near)} | set(hash_duplicates(codes)),
                   key=lambda ij: (-float(z[ij[0]] @ z[ij[1]]), ij))
    md5 = files["md5"].to_numpy()
    paths, classes = files["path"].tolist(), files["class"].tolist()
    near_rows = [{"a": paths[i], "b": paths[j], "class_a": classes[i], "class_b": classes[j],
                  "cosine": round(float(z[i] @ z[j]), 4), "phash_bits": _bits(codes[i], codes[j]),
                  "cross_class": classes[i] != classes[j]}
                 for i, j in pairs if md5[i] != md5[j]]           # identical bytes are exact duplicates
    cos, score = outlier_scores(z, files["class"].to_numpy())
    order = np.lexsort((cos, np.where(np.isnan(score), np.inf, score)))      # lowest z first, nan last
    ranked = [{"path": paths[i], "class": classes[i], "cosine": round(float(cos[i]), 4),
               "z": round(float(score[i]), 2),
               "flagged": bool(score[i] < OUTLIER_Z)} for i in order if not np.isnan(score[i])]
    return {"exact": exact, "near": near_rows, "cosine": cos, "z": score, "ranked_outliers": ranked}


def exact_duplicates(files: pd.DataFrame) -> list[dict]:
    """Groups of photos with identical bytes, paths sorted (the first is the copy kept), cross-class
    groups (label errors) first."""
    groups = []
    for md5, g in files.groupby("md5", sort=False):
        if len(g) > 1:
            g = g.sort_values("path")
            groups.append({"md5": md5, "paths": g["path"].tolist(), "classes": g["class"].tolist(),
                           "cross_class": g["class"].nunique() > 1})
    return sorted(groups, key=lambda g: (not g["cross_class"], g["paths"][0]))


def near_duplicates(z: np.ndarray, near: float, per_photo: int = NEAR_PER_PHOTO) -> list[tuple[int, int, float]]:
    """Pairs (i < j, cosine) with cosine >= ``near`` among each photo's ``per_photo`` nearest, most similar
    first: one FAISS k-NN search of the unit embeddings against themselves (inner product = cosine), so
    memory stays linear in the photos however many are alike (every pair of 2,000 near-identical photos
    was 313k pairs and 1.95 GB; now at most ``per_photo`` a photo, and each is still linked to its copies)."""
    import faiss
    z = np.ascontiguousarray(z, dtype=np.float32)
    index = faiss.IndexFlatIP(z.shape[1])
    index.add(z)
    sims, found = index.search(z, min(per_photo + 1, len(z)))       # +1: itself
    query = np.repeat(np.arange(len(z)), found.shape[1])
    sims, found = sims.ravel(), found.ravel()
    keep = (found >= 0) & (query != found) & (sims >= np.float32(near))
    i, j = np.minimum(query, found)[keep], np.maximum(query, found)[keep]
    pairs = np.unique(np.stack([i, j], 1), axis=0, return_index=True)[1]    # a pair found from both ends once
    i, j, s = i[pairs], j[pairs], sims[keep][pairs]
    order = np.lexsort((j, i, -s))
    return [(int(a), int(b), float(c)) for a, b, c in zip(i[order], j[order], s[order])]


def phash_codes(hashes) -> np.ndarray:
    """(N, 8) uint8: the 64-bit pHashes (hex) as FAISS binary codes."""
    return np.frombuffer(b"".join(bytes.fromhex(h) for h in hashes), np.uint8).reshape(-1, 8)


def hash_duplicates(codes: np.ndarray, bits: int = PHASH_BITS, per_photo: int = NEAR_PER_PHOTO) -> list[tuple[int, int]]:
    """Pairs (i < j) whose pHashes are at most ``bits`` apart, among each photo's ``per_photo`` nearest
    by Hamming distance (FAISS binary k-NN): copies resized or re-encoded, which the embedding may place
    under ``--near`` (a half-size re-encoded copy measured cosine 0.83). A flat photo (blank, one grey)
    hashes to nearly all zeros whatever its shade, so such hashes pair with nothing."""
    import faiss
    bits_set = np.unpackbits(codes, axis=1).sum(1) if len(codes) else np.zeros(0)
    telling = np.flatnonzero((bits_set > FLAT_BITS) & (bits_set < 64 - FLAT_BITS))   # a flat photo hashes ~0
    if len(telling) < 2:
        return []
    index = faiss.IndexBinaryFlat(64)
    index.add(np.ascontiguousarray(codes[telling]))
    dist, found = index.search(np.ascontiguousarray(codes[telling]), min(per_photo + 1, len(telling)))
    query = np.repeat(np.arange(len(telling)), found.shape[1])
    keep = (found.ravel() >= 0) & (query != found.ravel()) & (dist.ravel() <= bits)
    a, b = telling[query[keep]], telling[found.ravel()[keep]]
    return sorted({(int(min(i, j)), int(max(i, j))) for i, j in zip(a, b)})


def _bits(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.unpackbits(a ^ b).sum())


def outlier_scores(z: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per photo: cosine to the mean of the *other* photos of its class (an outlier does not pull its
    own reference), and the modified z-score of that cosine within the class, 0.6745 (c - median) / MAD;
    nan in classes of fewer than ``MIN_CLASS`` photos."""
    cos, score = np.full(len(z), np.nan), np.full(len(z), np.nan)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < 2:
            continue
        rest = z[idx].sum(0, keepdims=True) - z[idx]
        cos[idx] = (z[idx] * rest).sum(1) / np.maximum(np.linalg.norm(rest, axis=1), 1e-12)
        if len(idx) >= MIN_CLASS:
            med = np.median(cos[idx])
            mad = max(float(np.median(np.abs(cos[idx] - med))), 1e-6)
            score[idx] = 0.6745 * (cos[idx] - med) / mad
    return cos, score


def exclude_list(exact: list[dict], outliers: list[dict], near: list[dict] = ()) -> list[str]:
    """What training should drop: the later copies of a within-class duplicate, every photo of a
    cross-class group (which label is right is for a person to say), the given outliers, and both
    photos of each cross-class pair in ``near``."""
    drop = set()
    for g in exact:
        drop.update(g["paths"] if g["cross_class"] else g["paths"][1:])
    drop.update(o["path"] for o in outliers)
    drop.update(p for r in near if r["cross_class"] for p in (r["a"], r["b"]))
    return sorted(drop)


def counts(files: pd.DataFrame, result: dict, rejected: list, listed: list) -> dict:
    within = [g for g in result["exact"] if not g["cross_class"]]
    cross = [g for g in result["exact"] if g["cross_class"]]
    near = result["near"]
    return {"images": len(files), "classes": int(files["class"].nunique()), "unreadable": len(rejected),
            "exact_groups": len(within), "exact_extra_copies": sum(len(g["paths"]) - 1 for g in within),
            "cross_class_groups": len(cross), "cross_class_files": sum(len(g["paths"]) for g in cross),
            "near_pairs": len(near), "near_cross_class_pairs": sum(p["cross_class"] for p in near),
            "near_pairs_by_embedding_alone": sum(p["phash_bits"] > PHASH_BITS for p in near),
            "near_photos": len({p for r in near for p in (r["a"], r["b"])}),
            "outliers": sum(o["flagged"] for o in result["ranked_outliers"]), "excluded": len(listed)}


def per_class(files: pd.DataFrame, result: dict) -> list[dict]:
    dup = {p for g in result["exact"] for p in g["paths"]}
    near = {p for r in result["near"] for p in (r["a"], r["b"])}
    flagged = {o["path"] for o in result["ranked_outliers"] if o["flagged"]}
    rows = []
    for c, g in files.groupby("class", sort=True):
        rows.append({"class": c, "images": len(g), "median_width": int(g["width"].median()),
                     "median_height": int(g["height"].median()), "brightness": round(float(g["brightness"].mean()), 1),
                     "exact_duplicates": int(g["path"].isin(dup).sum()), "near_duplicates": int(g["path"].isin(near).sum()),
                     "outliers": int(g["path"].isin(flagged).sum())})
    return rows
