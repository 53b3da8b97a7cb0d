"""Few-shot enrollment: add a fine class from a handful of photos, with no retraining.

An artifact served by its class statistics (``hier.models.statistics``, what ``hier train`` writes)
enrolls by adding the shots' embeddings to them: the new class is scored by the same LDA formula as
every base class, in one geometry, and the base classes' statistics never change, so an old class only
loses photos that now score higher on the new class. ``base_drop_offset`` then bounds that loss by a
budget on held-out base photos, and may raise a new class where the budget allows (a five-shot mean
scores low under the shared covariance).

Artifacts served by their trained cosine head (written before the statistics, or ``--head trained``)
enroll as before: a raw mean embedding is not comparable with trained rows (trained rows point along the
directions that separate classes, a mean keeps the component every photo shares; measured: base
accuracy 76% -> 0% after enrolling 20 classes), so ``PrototypeMap`` maps it into the rows' frame (a ridge
regression from the base classes' mean embeddings, ``prototypes.npy``, to their trained rows), and
``Calibration`` (TEEN, Wang et al. 2023) can pull it toward similar base rows.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hier import artifact, fileio
from hier.data import image_files
from hier.errors import HierError, check_number
from hier.engine.predictor import artifact_predictor
from hier.metrics import answer
from hier.models import HierNet
from hier.models.statistics import STATISTICS
from hier.taxonomy import _YEAR, YEARS, Taxonomy, check_name, nfc, parse_class_name

PROTOTYPES = "prototypes.npy"   # base-class mean embeddings, written by `hier train`
ENROLLED = "enrolled.npy"       # per enrolled entry: the sum of its shots' embeddings
TRAINED_ROWS = "trained_rows.npy"   # per base class with added shots: its trained fine row, to restore
VALIDATION = "validation.npz"   # held-out base photos: embeddings and classes, written by `hier train`
BASE_PRIOR_SHOTS = 20           # photos a trained row counts for when added shots are blended into it
MAX_BASE_DROP = 0.5             # default budget (points of base accuracy) one enrolled class may cost
MAX_RAISE = 6.0                 # most an offset may raise a class's statistical score (a 5-shot mean scores low)
OWN_SHOTS = 0.5                 # a class answered on fewer of its own shots than this gets a warning
NEAR_DUPLICATE = 0.9            # ... naming the base class whose prototype is this similar (``nearest_base``)


class _Report:
    def to_dict(self) -> dict:
        """As the service returns it: ``name`` under the key ``class``, first."""
        d = asdict(self)
        return {"class": d.pop("name"), **d}


@dataclass(frozen=True)
class Enrolled(_Report):
    """What one ``enroll`` did: the CLI words it, the service returns ``to_dict()``."""

    name: str
    head: str                          # "statistics" or "trained": the head that scores the class
    mapped: bool                       # trained head only: shots mapped through the prototypes (else raw)
    base: bool                         # the shots went to a class the artifact was trained on
    new: bool                          # a class that did not exist before
    calibrated: bool                   # its offset was fitted on the artifact's validation photos
    duplicates: int                    # photos given twice, or already among its shots: dropped
    added: int                         # shots added now (0: every photo was one already)
    total: int                         # its shots in all
    classes: int                       # classes of the artifact after it
    offset: float | None = None        # its score offset (positive: lowered to keep the base-drop budget)
    own_shots_answered: float | None = None   # share of its own shots answered as it
    offset_cost: float | None = None   # share of its own shots the offset costs it
    near_duplicate: dict | None = None  # {"class", "similarity"} of a base class it looks like


@dataclass(frozen=True)
class Unenrolled(_Report):
    name: str
    classes: int                       # classes of the artifact after it
    base: bool                         # a base class's added shots were removed (the class stays)


def class_means(z: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """Mean normalised embedding per class (rows of zeros for classes without images)."""
    means = np.zeros((n, z.shape[1]), dtype=np.float32)
    np.add.at(means, labels, z)
    return (means / np.maximum(np.bincount(labels, minlength=n), 1)[:, None]).astype(np.float32)


class PrototypeMap:
    """Per-head ridge maps from base-class mean embeddings to the trained rows of that head."""

    def __init__(self, net: HierNet, taxonomy: Taxonomy, prototypes: np.ndarray, ridge: float = 0.1):
        base = len(prototypes)                       # base classes come first in the taxonomy
        p = F.normalize(torch.from_numpy(prototypes).float(), dim=1)
        self.maps = {}
        for level, groups, head in (("fine", np.arange(base), net.fine),
                                    ("model", taxonomy.fine_to_model[:base], net.model),
                                    ("brand", taxonomy.fine_to_brand[:base], net.brand)):
            used = np.unique(groups)
            x = F.normalize(torch.from_numpy(class_means(p.numpy(), groups, groups.max() + 1)[used]), dim=1)
            w = F.normalize(head.weight.detach()[torch.from_numpy(used)], dim=1)
            self.maps[level] = torch.linalg.solve(x.T @ x + ridge * torch.eye(x.shape[1]), x.T @ w)

    def __call__(self, proto: torch.Tensor, level: str) -> torch.Tensor:
        return F.normalize(F.normalize(proto, dim=-1) @ self.maps[level], dim=-1)


def save_validation(path: Path, z: np.ndarray, y: np.ndarray) -> None:
    with path.open("wb") as f:
        np.savez(f, embedding=z.astype(np.float16), label=np.asarray(y, dtype=np.int32))


def read_validation(path: Path) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Held-out base photos (embeddings, base class indices); None for artifacts trained before them."""
    if not (path / VALIDATION).is_file():
        return None
    saved = np.load(path / VALIDATION)
    return torch.from_numpy(saved["embedding"].astype(np.float32)), torch.from_numpy(saved["label"].astype(np.int64))


@torch.no_grad()
def base_drop_offset(net: HierNet, c: int, validation: tuple[torch.Tensor, torch.Tensor], max_base_drop: float,
                     floor: float = 0.1, max_raise: float = 0.0) -> float:
    """Score offset for enrolled class ``c`` of ``net`` (``budget_offset`` on its held-out base photos'
    scores, ``c``'s own current offset taken out)."""
    z, y = validation
    joint = net.heads(z)["joint"]
    joint[:, c] += net.fine_offset[c]
    return budget_offset(joint, y, c, max_base_drop, floor, max_raise)


def budget_offset(scores: torch.Tensor, y: torch.Tensor, c: int, max_base_drop: float, floor: float = 0.1,
                  max_raise: float = 0.0) -> float:
    """The smallest offset subtracted from column ``c`` of ``scores`` (held-out base photos, true classes
    ``y``) such that the photos answered right without it are expected to lose at most ``max_base_drop``
    percent of all to ``c`` (at least ``floor`` photos, so that 0 stays finite). Down to ``-max_raise``:
    a negative offset raises a class the budget allows to score higher (a few-shot mean under the
    shared covariance scores low, far below what its photos deserve).

    Each base class's photos are modelled as leads (``c``'s score minus the best other) drawn from a
    normal with that class's mean lead and the spread pooled over classes (widened for the class's few
    photos): the largest lead among a few validation photos understates how far unseen photos of a
    near sibling reach, and cost several times its budget on them (see README, enrollment benchmark).
    Each new class gets its own offset: one far from every base photo needs none, a next-year version
    of a known model needs one. Held-out photos, not training ones: those sit closer to their own class."""
    others = scores.clone()
    others[:, c] = -torch.inf
    right = others.argmax(1) == y
    lead = (scores[:, c] - others.max(1).values)[right].double()
    if not len(lead):
        return -max_raise
    _, cls, n = torch.unique(y[right], return_inverse=True, return_counts=True)
    mean = torch.zeros(len(n), dtype=lead.dtype).index_add_(0, cls, lead) / n
    spread = ((lead - mean[cls]) ** 2).sum() / max(1, len(lead) - len(n))
    sd = (spread * (1 + 1 / n)).sqrt().clamp_min(1e-6)
    allowed = max(max_base_drop / 100 * len(y), floor)

    def taken(offset: float) -> float:                        # expected photos lost to c at this offset
        return float((n * torch.special.ndtr((mean - offset) / sd)).sum())

    lo, hi = -max_raise, float((mean + 8 * sd).max().clamp_min(0))
    if taken(lo) <= allowed:
        return lo
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if taken(mid) <= allowed else (mid, hi)
    return hi


def raw_frame(proto: torch.Tensor, level: str) -> torch.Tensor:
    """No map (artifacts without prototypes.npy): the normalised prototype itself."""
    return F.normalize(proto, dim=-1)


@dataclass
class Calibration:
    """TEEN-style: p' = normalize(p + strength * sum_b softmax(tau * cos(p, w_b)) w_b)."""

    strength: float = 0.0
    tau: float = 16.0

    def __post_init__(self) -> None:
        self.strength = check_number("--calibrate", self.strength, 0, 100)
        self.tau = check_number("calibration tau", self.tau, 1e-3, 1e3)

    def __call__(self, proto: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        if not self.strength:
            return F.normalize(proto, dim=-1)
        p, w = F.normalize(proto, dim=-1), F.normalize(base, dim=-1)
        mix = torch.softmax(self.tau * p @ w.T, dim=-1) @ w
        return F.normalize(p + self.strength * mix, dim=-1)


def rebuild_heads(net: HierNet, old: Taxonomy, new: Taxonomy, fine_rows: dict | None = None,
                  model_rows: dict | None = None, brand_rows: dict | None = None) -> None:
    """Give every head one row per name of ``new``: the old row by name, or a supplied row."""
    for head, old_names, new_names, extra in ((net.fine, old.classes, new.classes, fine_rows or {}),
                                              (net.model, old.models, new.models, model_rows or {}),
                                              (net.brand, old.brands, new.brands, brand_rows or {})):
        index = {n: i for i, n in enumerate(old_names)}
        w = head.weight.detach()        # kept as they are: forward normalises rows, so scale is moot
        head.set_rows(torch.stack([extra[n].to(w) if n in extra else w[index[n]] for n in new_names]))
    net.set_taxonomy(new)


def _enrolled(path: Path, stats) -> tuple[list[dict], np.ndarray | None, np.ndarray | None]:
    """Enrolled entries (config.json: class, shots, their MD5s, offset, whether it is a base class) and,
    for an artifact served by its trained head (``stats`` None), their shot sums and, for shots added to
    base classes, the trained rows they replaced (so ``unenroll`` restores them exactly). Class
    statistics hold the shots themselves."""
    entries = artifact.read_config(path).get("enrolled", [])
    if stats is not None:
        return entries, None, None
    sums = np.load(path / ENROLLED) if entries else None
    trained = np.load(path / TRAINED_ROWS) if any(e.get("base") for e in entries) else None
    return entries, sums, trained


def _usable_statistics(path: Path, net: HierNet):
    """The statistics enrollment updates; None for an artifact served by its trained head. One meant to
    be served by statistics whose statistics are missing or stale is refused: enrolling into it would
    mix the two heads."""
    if net.cfg.head == "statistics" and net.statistics is None:
        raise HierError(f"{path} has no up-to-date class statistics ({STATISTICS}: a training run that has not "
                        "finished?); finish it with `hier train --resume` before enrolling")
    return net.statistics


def prototype_map(path: Path, net: HierNet, taxonomy: Taxonomy) -> PrototypeMap | None:
    """The artifact's map into weight space; None for artifacts trained before prototypes were saved."""
    return PrototypeMap(net, taxonomy, np.load(path / PROTOTYPES)) if (path / PROTOTYPES).is_file() else None


def _save(path: Path, net: HierNet, taxonomy: Taxonomy, entries: list[dict], sums: np.ndarray | None,
          trained: np.ndarray | None, stats=None) -> None:
    """Save heads, taxonomy and enrollment state (the class statistics, or for an artifact served by its
    trained head the shot sums and trained rows); a nan or inf anywhere in them (a score offset, a row)
    would poison every later answer and enrollment, so it is refused here whatever produced it (the
    statistics refuse their own in ``ClassStatistics.save``)."""
    finite = all(math.isfinite(e.get("offset") or 0.0) for e in entries) and all(
        bool(torch.isfinite(h.weight).all()) for h in (net.fine, net.model, net.brand)) and all(
        a is None or bool(np.isfinite(a).all()) for a in (sums, trained))
    if not finite:
        raise HierError(f"refusing to save {path}: enrollment produced a value that is not a finite number; "
                        "the artifact is unchanged")
    if stats is not None:
        artifact.save(path, net, taxonomy, extra={"enrolled": entries}, files={STATISTICS: stats.save})
        return
    files = {ENROLLED: lambda p: fileio.save_npy(p, sums)} if entries else {}
    if any(e.get("base") for e in entries):
        files[TRAINED_ROWS] = lambda p: fileio.save_npy(p, trained)
    artifact.save(path, net, taxonomy, extra={"enrolled": entries}, files=files)
    for name in {ENROLLED, TRAINED_ROWS} - set(files):
        (path / name).unlink(missing_ok=True)


@torch.no_grad()
def blend_shots(net: HierNet, i: int, trained_row: torch.Tensor, mapped_shots: torch.Tensor, shots: int,
                prototypes: np.ndarray) -> torch.Tensor:
    """Base class ``i``'s row after ``--add-shots``: its trained row nudged toward the mapped mean of the
    new photos, weighted as ``shots`` photos against ``BASE_PRIOR_SHOTS`` for the trained row. Both
    vectors live in the trained rows' frame. The weight halves (down to 0, the trained row) until no
    other base class's mean embedding is answered as class ``i`` where it was not before: added shots
    may sharpen a class, never let it take its neighbours."""
    z = F.normalize(torch.from_numpy(prototypes).float(), dim=1)
    others = torch.arange(len(z)) != i
    weight, keep = net.fine.weight, net.fine.weight[i].clone()
    taken_before = net.heads(z)["joint"].argmax(1) == i
    w0 = shots / (shots + BASE_PRIOR_SHOTS)
    for w in [w0 / 2 ** j for j in range(6)] + [0.0]:
        row = F.normalize((1 - w) * F.normalize(trained_row, dim=0) + w * F.normalize(mapped_shots, dim=0), dim=0)
        weight[i] = row
        if not ((net.heads(z)["joint"].argmax(1) == i) & others & ~taken_before).any():
            break
    weight[i] = keep
    return row


def parse_years(years: str | None) -> tuple[int, int] | None:
    """``--years 2025-2026`` (or ``2025``) as (first, last), both model years hier can hold."""
    if years is None:
        return None
    a, _, b = str(years).strip().partition("-")
    try:
        a, b = int(a), int(b or a)
    except ValueError:
        raise HierError(f"--years must look like 2025-2026, not {years!r}") from None
    for y in (a, b):
        check_number("--years", y, *YEARS, integer=True)
    if a > b:
        raise HierError(f"--years {years}: the first year comes after the last")
    return a, b


def _brand_model(name: str, known: dict[str, str], brand: str | None) -> dict | None:
    """Brand and model from a ``<brand>_<model>_..._<years>`` name (the demo's, e.g. ``Aurora_Nova_2024_2025``)
    when its first tokens are a known brand (or ``--brand``): the longest known model of that brand that
    follows, else the next token as a new model of it."""
    parts = name.split("_")
    while len(parts) > 1 and _YEAR.match(parts[-1]):
        parts.pop()
    brands = set(known.values()) | ({brand} if brand else set())
    for i in range(1, len(parts)):
        b = "_".join(parts[:i])
        if b not in brands or (brand and b != brand):
            continue
        rest = parts[i:]
        j = next((j for j in range(len(rest), 0, -1) if known.get("_".join(rest[:j])) == b), 1)
        return {"brand": b, "model": "_".join(rest[:j]), "generation": " ".join(rest[j:])}
    return None


def new_row(name: str, taxonomy: Taxonomy, brand: str | None, model: str | None,
            years: tuple[int, int] | None) -> dict:
    """Taxonomy row for a new class: flags win, then the class name (a Hecto ``<model>_..._<years>`` whose
    model is known, or a ``<brand>_<model>_..._<years>`` whose brand is), then the model's known brand."""
    try:
        row = parse_class_name(name)
    except HierError:
        row = {"class": name, "brand": "", "model": name, "generation": ""}
        if not years:
            raise HierError(f"cannot read years from {name!r}; pass --years 2025-2025") from None
    if years:
        row["year_start"], row["year_end"] = years
    known = dict(zip(taxonomy.table["model"], taxonomy.table["brand"]))
    if not model and row["model"] not in known and "_" in name:
        row.update(_brand_model(name, known, brand) or {})
    if model:
        row["model"] = model
    row["brand"] = brand or known.get(row["model"]) or row["brand"]
    if not row["brand"]:
        raise HierError(f"brand of {name!r} is unknown; pass --brand")
    if row["model"] in known and known[row["model"]] != row["brand"]:
        raise HierError(f"model {row['model']!r} already belongs to brand {known[row['model']]!r}")
    return row


def distinct_shots(images: list[str | Path]) -> tuple[list[Path], list[str], int]:
    """The shots' files, one per distinct content (MD5 of the bytes: three copies of a photo are one
    shot), their digests, and how many copies were dropped."""
    first: dict[str, Path] = {}
    paths = image_files(images, strict=True).paths        # a broken shot is refused, never skipped
    for p in paths:
        first.setdefault(fileio.file_md5(p), Path(p))
    return list(first.values()), list(first), len(paths) - len(first)


def imprint(net: HierNet, taxonomy: Taxonomy, rows: list[dict], protos: dict[str, torch.Tensor],
            calibration: Calibration | None = None, mapping: PrototypeMap | None = None) -> Taxonomy:
    """Append new classes in memory: one fine row per class (its calibrated prototype), and a model or
    brand row (the mean of its classes' prototypes) where the model or brand is new. Returns the new
    taxonomy; the base rows are untouched."""
    calibration = calibration or Calibration()
    base_rows = net.fine.weight.detach()
    new_taxonomy = taxonomy.extend(rows)
    frame = mapping or raw_frame
    fine_rows = {r["class"]: calibration(frame(protos[r["class"]], "fine"), base_rows) for r in rows}
    groups: dict[str, dict[str, list]] = {"model": {}, "brand": {}}
    for r in rows:
        for level, known in (("model", taxonomy.models), ("brand", taxonomy.brands)):
            if r[level] not in known:
                groups[level].setdefault(r[level], []).append(F.normalize(protos[r["class"]], dim=0))
    mean = {level: {n: frame(torch.stack(v).mean(0), level) for n, v in g.items()} for level, g in groups.items()}
    rebuild_heads(net, taxonomy, new_taxonomy, fine_rows, mean["model"], mean["brand"])
    return new_taxonomy


def enroll(path: str | Path, name: str, images: list[str | Path], brand: str | None = None,
           model: str | None = None, years: str | None = None, add_shots: bool = False, min_shots: int = 1,
           calibration: Calibration | None = None, max_base_drop: float = MAX_BASE_DROP) -> Enrolled:
    """Add (or add shots to) class ``name``. The artifact is locked from reading to the atomic save, so
    concurrent enrollments queue instead of losing each other's classes. A new class's scores are
    offset so that it is expected to cost at most ``max_base_drop`` points of accuracy on photos like the
    artifact's held-out base photos (``base_drop_offset``; artifacts trained before ``validation.npz`` get no offset).

    Shots count by content: copies of one photo, and photos already among the class's shots, are dropped
    (``duplicates``). Returns ``added`` (shots new this time; also ``shots``) and ``total`` (the class's shots
    in all), ``new`` (the class did not exist), ``own_shots_answered`` (share of this time's shots answered as
    the class afterwards, its offset included), ``offset_cost`` (the share its offset costs it) and
    ``near_duplicate`` ({"class", "similarity"}: when it keeps fewer than ``OWN_SHOTS`` of its shots, the
    base class whose prototype is at least ``NEAR_DUPLICATE`` similar to its shots, ``nearest_base``)."""
    max_base_drop = check_number("--max-base-drop", max_base_drop, 0, 100)
    min_shots = check_number("--min-shots", min_shots, 1, 100_000, integer=True)
    path, name = Path(path), check_name("--class", nfc(name))
    brand = None if brand is None else check_name("--brand", nfc(brand))
    model = None if model is None else check_name("--model", nfc(model))
    span = parse_years(years)
    shots, digests, copies = distinct_shots(images)
    if len(shots) < min_shots:
        raise HierError(f"{len(shots)} shot(s) given for {name!r}"
                        + (f" ({copies} more were copies of them)" if copies else "") + f"; --min-shots is {min_shots}")
    with fileio.locked(path):
        net, taxonomy = artifact.load(path)
        stats = _usable_statistics(path, net)    # None: an artifact served by its trained head
        entries, sums, trained = _enrolled(path, stats)
        names = [e["class"] for e in entries]
        is_base = name in taxonomy and (name not in names or entries[names.index(name)].get("base"))
        if is_base and not add_shots:
            raise HierError(f"{name!r} is a base class of this artifact; pass --add-shots to add photos to it")
        mapping = prototype_map(path, net, taxonomy) if stats is None else None
        if is_base and stats is None and mapping is None:
            raise HierError(f"{path} has no {PROTOTYPES} (trained by an older hier), so shots cannot be added to "
                            f"base class {name!r} without harming it; retrain, or enroll under a new name")
        row = None if name in taxonomy else new_row(name, taxonomy, brand, model, span)     # refusals first
        seen = set(entries[names.index(name)].get("md5", [])) if name in names else set()
        fresh = [i for i, d in enumerate(digests) if d not in seen]
        validation = read_validation(path)
        result = dict(name=name, head="trained" if stats is None else "statistics", mapped=mapping is not None,
                      base=bool(is_base), new=row is not None, calibrated=validation is not None,
                      duplicates=copies + len(digests) - len(fresh))
        if not fresh:                             # every photo is already one of its shots: nothing to do
            entry = entries[names.index(name)]
            return Enrolled(**result, added=0, total=entry["shots"], classes=len(taxonomy), offset=entry.get("offset"))
        shots, digests = [shots[i] for i in fresh], [digests[i] for i in fresh]
        z = artifact_predictor(path, net)(shots)["embedding"]     # as the artifact serves: TTA included
        if name not in names:
            entries.append({"class": name, "shots": 0, **({"base": True} if is_base else {})})
            names.append(name)
        k = names.index(name)
        if stats is not None:                    # one head for every class: the class's mean moves
            stats.add_shots(name, z)
            if row is None:
                new_taxonomy = taxonomy
                net.set_statistics(stats, taxonomy)        # its mean moved: score it again
            else:                                        # heads rebuilt, the new class scored from stats
                new_taxonomy = imprint(net, taxonomy, [row], {name: torch.from_numpy(z.sum(0))})
        else:
            new_taxonomy, sums, trained = _enroll_mapped(path, net, taxonomy, name, row, z, entries, k, sums,
                                                         trained, mapping, calibration)
        entries[k]["shots"] += len(z)
        entries[k]["md5"] = sorted(seen) + digests
        if not is_base and validation is not None:          # the (new or changed) class's own offset
            entries[k]["offset"] = base_drop_offset(net, new_taxonomy.class_index[name], validation, max_base_drop,
                                                    max_raise=MAX_RAISE if stats is not None else 0.0)
        own, cost = own_answers(net, new_taxonomy, name, entries[k].get("offset") or 0.0, z)
        near = None
        if not is_base and own < OWN_SHOTS and (stats is not None or mapping is not None):
            base_names = stats.base_classes() if stats is not None else taxonomy.classes
            base_means = stats.means(base_names) if stats is not None else np.load(path / PROTOTYPES)
            x, similarity = nearest_base(base_means, z.sum(0), base_names)
            near = {"class": x, "similarity": round(similarity, 3)} if similarity >= NEAR_DUPLICATE else None
        _save(path, net, new_taxonomy, entries, sums, trained, stats)
    return Enrolled(**result, added=len(z), total=entries[k]["shots"], classes=len(new_taxonomy),
                    offset=entries[k].get("offset"), own_shots_answered=own, offset_cost=cost, near_duplicate=near)


def _enroll_mapped(path: Path, net: HierNet, taxonomy: Taxonomy, name: str, row: dict | None, z: np.ndarray,
                   entries: list[dict], k: int, sums, trained, mapping: PrototypeMap | None,
                   calibration: Calibration | None):
    """Enrollment into an artifact served by its trained head (trained before the class statistics, or
    ``--head trained``): the shots' mean mapped into the trained rows' frame."""
    frame = mapping or raw_frame
    if len(entries) > (0 if sums is None else len(sums)):    # a new entry: its shot sum starts at zero
        sums = _stack(sums, np.zeros_like(z[:1]))
        if entries[k].get("base"):                          # first shots for a base class: keep its row
            i = taxonomy.class_index[name]
            trained = _stack(trained, net.fine.weight.detach()[i:i + 1].numpy())
    sums[k] += z.sum(0)
    if row is not None:
        return imprint(net, taxonomy, [row], {name: torch.from_numpy(z.sum(0))}, calibration, mapping), sums, trained
    i = taxonomy.class_index[name]
    rows = net.fine.weight.detach()
    proto = frame(torch.from_numpy(sums[k]), "fine")
    if entries[k].get("base"):
        trained_row = torch.from_numpy(trained[_trained_row(entries, k)])
        new_fine = blend_shots(net, i, trained_row, proto, entries[k]["shots"] + len(z), np.load(path / PROTOTYPES))
    else:
        new_fine = (calibration or Calibration())(proto, torch.cat([rows[:i], rows[i + 1:]]))
    rebuild_heads(net, taxonomy, taxonomy, {name: new_fine})
    return taxonomy, sums, trained


@torch.no_grad()
def own_answers(net: HierNet, taxonomy: Taxonomy, name: str, offset: float, z: np.ndarray) -> tuple[float, float]:
    """Share of the shots ``z`` answered as ``name`` with its score offset, and the share its offset
    costs it (answered as it without the offset, not with it)."""
    net.offsets[name] = offset
    net.set_taxonomy(taxonomy)
    c = taxonomy.class_index[name]
    joint = net.heads(torch.from_numpy(z))["joint"]
    answered = lambda j: float((answer(torch.softmax(j, 1).numpy(), taxonomy)[2] == c).mean())  # noqa: E731
    own = answered(joint)
    joint[:, c] += offset
    return own, max(0.0, answered(joint) - own)


def nearest_base(prototypes: np.ndarray, shot_sum: np.ndarray, classes: list[str]) -> tuple[str, float]:
    """The base class whose mean training embedding is nearest the shots' mean, and their cosine, both
    centred on the base prototypes' mean: every raw embedding shares one component, so raw cosines are
    ~0.99 to every class (measured on the tiny test artifact: median 0.991 to the nearest *other* class).

    Centred, the shots of a base class enrolled under a new name sit at 0.94-0.98 from their own class's
    prototype on that artifact, stripes unlike any car at 0.79; a next-year sibling can reach 0.96 too,
    which is why this only names the class once the answers show the new class losing its own shots."""
    mu = prototypes.mean(0)
    p = prototypes - mu
    p = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
    m = shot_sum / max(float(np.linalg.norm(shot_sum)), 1e-12) - mu
    cos = p @ (m / max(float(np.linalg.norm(m)), 1e-12))
    b = int(cos.argmax())
    return classes[b], float(cos[b])


def _trained_row(entries: list[dict], k: int) -> int:
    """Row of ``trained_rows.npy`` that belongs to entry ``k`` (a base class with added shots)."""
    return sum(bool(e.get("base")) for e in entries[:k])


def _stack(rows: np.ndarray | None, more: np.ndarray) -> np.ndarray:
    return more.astype(np.float32) if rows is None else np.vstack([rows, more]).astype(np.float32)


def unenroll(path: str | Path, name: str) -> Unenrolled:
    """Remove an enrolled class (model/brand rows that no remaining class uses go with it), or the shots
    added to a base class (its trained row comes back exactly)."""
    path, name = Path(path), nfc(name)
    with fileio.locked(path):
        net, taxonomy = artifact.load(path)
        stats = _usable_statistics(path, net)
        entries, sums, trained = _enrolled(path, stats)
        names = [e["class"] for e in entries]
        if name not in names:
            raise HierError(f"{name!r} is not an enrolled class"
                            + (" (it is a base class with no added shots)" if name in taxonomy else ""))
        k = names.index(name)
        base = bool(entries[k].get("base"))
        if stats is not None:                     # its shots leave the statistics (a base class keeps its own)
            stats.remove_shots(name)
            new_taxonomy = taxonomy if base else taxonomy.drop(name)
            rebuild_heads(net, taxonomy, new_taxonomy)
            _save(path, net, new_taxonomy, entries[:k] + entries[k + 1:], None, None, stats)
            return Unenrolled(name, len(new_taxonomy), base)
        if base:
            b = _trained_row(entries, k)
            rebuild_heads(net, taxonomy, taxonomy, {name: torch.from_numpy(trained[b])})
            new_taxonomy, trained = taxonomy, np.delete(trained, b, axis=0)
        else:
            new_taxonomy = taxonomy.drop(name)
            rebuild_heads(net, taxonomy, new_taxonomy)
        _save(path, net, new_taxonomy, entries[:k] + entries[k + 1:], np.delete(sums, k, axis=0), trained)
    return Unenrolled(name, len(new_taxonomy), base)
