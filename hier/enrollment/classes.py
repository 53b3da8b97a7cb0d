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

from pathlib import Path

import numpy as np
import torch

from hier import artifact, fileio
from hier.artifact.files import PROTOTYPES
from hier.artifact.records import read_validation
from hier.artifact.store import check_writable
from hier.enrollment.heads import Calibration, imprint, rebuild_heads
from hier.enrollment.mapped import enroll_mapped, prototype_map, trained_row_index
from hier.enrollment.names import new_row, parse_years
from hier.enrollment.offsets import MAX_BASE_DROP, MAX_RAISE, base_drop_offset
from hier.enrollment.state import (
    OWN_SHOTS,
    Enrolled,
    Unenrolled,
    distinct_shots,
    enrolled_state,
    save_state,
    usable_statistics,
)
from hier.errors import HierError, NotFound, check_number
from hier.export import artifact_predictor
from hier.metrics import served_answer
from hier.models import HierNet
from hier.outputs import is_inside
from hier.taxonomy import Taxonomy, check_name, nfc

NEAR_DUPLICATE = 0.9            # ... naming the base class whose prototype is this similar (``nearest_base``)


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
    path, name = check_writable(path), check_name("--class", nfc(name))
    brand = None if brand is None else check_name("--brand", nfc(brand))
    model = None if model is None else check_name("--model", nfc(model))
    span = parse_years(years)
    shots, digests, copies = distinct_shots(images)
    inside = next((s for s in shots if isinstance(s, Path) and is_inside(s, path)), None)
    if inside is not None:                 # `--images ART`: the artifact's own curves.png is no car photo
        raise HierError(f"{inside} is a file of the artifact {path}, not a photo of {name!r}; give the shots' "
                        "folder or files")
    if len(shots) < min_shots:
        raise HierError(f"{len(shots)} shot(s) given for {name!r}"
                        + (f" ({copies} more were copies of them)" if copies else "") + f"; --min-shots is {min_shots}")
    with fileio.locked(path):
        net, taxonomy = artifact.load(path)
        stats = usable_statistics(path, net)    # None: an artifact served by its trained head
        entries, sums, trained = enrolled_state(path, stats)
        names = [e["class"] for e in entries]
        is_base = name in taxonomy and (name not in names or entries[names.index(name)].get("base"))
        if is_base and not add_shots:
            raise HierError(f"{name!r} is a base class of this artifact; pass --add-shots (add_shots over HTTP) to add photos to it")
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
        before = held_out_answers(net, taxonomy, validation)[1] if validation is not None else None
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
            new_taxonomy, sums, trained = enroll_mapped(path, net, taxonomy, name, row, z, entries, k, sums,
                                                         trained, mapping, calibration)
        entries[k]["shots"] += len(z)
        entries[k]["md5"] = sorted(seen) + digests
        if not is_base and validation is not None:          # the (new or changed) class's own offset
            entries[k]["offset"] = base_drop_offset(net, new_taxonomy.class_index[name], validation, max_base_drop,
                                                    max_raise=MAX_RAISE if stats is not None else 0.0)
        own, cost = own_answers(net, new_taxonomy, name, entries[k].get("offset") or 0.0, z)
        answered, after = held_out_answers(net, new_taxonomy, validation) if validation is not None else (None, None)
        taken = taken_from_base(answered, validation[1].numpy(), new_taxonomy, name) \
            if not is_base and validation is not None else None
        near = None
        if not is_base and own < OWN_SHOTS and (stats is not None or mapping is not None):
            base_names = stats.base_classes() if stats is not None else taxonomy.classes
            base_means = stats.means(base_names) if stats is not None else np.load(path / PROTOTYPES)
            x, similarity = nearest_base(base_means, z.sum(0), base_names)
            near = {"class": x, "similarity": round(similarity, 3)} if similarity >= NEAR_DUPLICATE else None
        save_state(path, net, new_taxonomy, entries, sums, trained, stats)
    return Enrolled(**result, added=len(z), total=entries[k]["shots"], classes=len(new_taxonomy),
                    offset=entries[k].get("offset"), own_shots_answered=own, offset_cost=cost, near_duplicate=near,
                    base_photos_taken=None if taken is None else taken["share"],
                    taken_most_from=None if taken is None else taken["most"],
                    base_accuracy_before=before, base_accuracy_after=after)


@torch.no_grad()
def own_answers(net: HierNet, taxonomy: Taxonomy, name: str, offset: float, z: np.ndarray) -> tuple[float, float]:
    """Share of the shots ``z`` answered as ``name`` with its score offset, and the share its offset
    costs it (answered as it without the offset, not with it)."""
    net.offsets[name] = offset
    net.set_taxonomy(taxonomy)
    c = taxonomy.class_index[name]
    joint = net.heads(torch.from_numpy(z))["joint"].numpy()
    # as served: the artifact's temperature, then the one answer rule (the answer depends on both)
    maps = taxonomy.fine_to_model, taxonomy.fine_to_brand
    answered = lambda j: float((served_answer(j, net.cfg.temperature, *maps)[1] == c).mean())  # noqa: E731
    own = answered(joint)
    joint[:, c] += offset
    return own, max(0.0, answered(joint) - own)


def taken_from_base(answer: np.ndarray, y: np.ndarray, taxonomy: Taxonomy, name: str) -> dict:
    """Of the artifact's held-out base photos (``validation.npz``: true classes ``y``, served answers
    ``answer``, ``held_out_answers``), the share now answered as ``name``, and the base class most of them
    are photos of: {"share", "most": {"class", "photos", "of", "share"} or None}."""
    hit = answer == taxonomy.class_index[name]
    if not hit.any():
        return {"share": 0.0, "most": None}
    counts = np.bincount(y[hit], minlength=int(y.max()) + 1)
    b = int(counts.argmax())
    of = int((y == b).sum())
    return {"share": float(hit.mean()), "most": {"class": taxonomy.classes[b], "photos": int(counts[b]), "of": of,
                                                  "share": float(counts[b] / of)}}


@torch.no_grad()
def held_out_answers(net: HierNet, taxonomy: Taxonomy, validation) -> tuple[np.ndarray, float]:
    """The fine class ``hier predict`` answers for each of the artifact's held-out base photos
    (``validation.npz``; the artifact's temperature, then the one answer rule, ``served_answer``), and the
    share answered right: what an enrollment changes, through its own class or through the model and
    brand sums it joins."""
    z, y = validation
    maps = taxonomy.fine_to_model, taxonomy.fine_to_brand
    answer = served_answer(net.heads(z)["joint"].numpy(), net.cfg.temperature, *maps)[1]
    return answer, float((answer == y.numpy()).mean())


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


def unenroll(path: str | Path, name: str) -> Unenrolled:
    """Remove an enrolled class (model/brand rows that no remaining class uses go with it), or the shots
    added to a base class (its trained row comes back exactly)."""
    path, name = check_writable(path), nfc(name)
    with fileio.locked(path):
        net, taxonomy = artifact.load(path)
        stats = usable_statistics(path, net)
        entries, sums, trained = enrolled_state(path, stats)
        names = [e["class"] for e in entries]
        if name not in names:
            raise NotFound(f"{name!r} is not an enrolled class"
                            + (" (it is a base class with no added shots)" if name in taxonomy else ""))
        k = names.index(name)
        base = bool(entries[k].get("base"))
        if stats is not None:                     # its shots leave the statistics (a base class keeps its own)
            stats.remove_shots(name)
            new_taxonomy = taxonomy if base else taxonomy.drop(name)
            rebuild_heads(net, taxonomy, new_taxonomy)
            save_state(path, net, new_taxonomy, entries[:k] + entries[k + 1:], None, None, stats)
            return Unenrolled(name, len(new_taxonomy), base)
        if base:
            b = trained_row_index(entries, k)
            rebuild_heads(net, taxonomy, taxonomy, {name: torch.from_numpy(trained[b])})
            new_taxonomy, trained = taxonomy, np.delete(trained, b, axis=0)
        else:
            new_taxonomy = taxonomy.drop(name)
            rebuild_heads(net, taxonomy, new_taxonomy)
        save_state(path, net, new_taxonomy, entries[:k] + entries[k + 1:], np.delete(sums, k, axis=0), trained)
    return Unenrolled(name, len(new_taxonomy), base)
