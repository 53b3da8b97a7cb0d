"""Building an ensemble (``hier ensemble A B C --out E``): the competitors' recipe, as one artifact.

E holds copies of its members (``E/members/<i>/``, hard links where the filesystem allows, so E
survives deleting A, B, C), ``ensemble.json`` (members, weights, temperature, how they were fitted, the
out-of-fold figures), the shared ``taxonomy.csv``, ``metrics.json`` and a ``config.json`` whose stamp
is E's version. Serving: every member's own predictor (its img_size, TTA, backend) computes its joint
scores; the ensemble's are ``sum_i w_i * log_softmax(joint_i / T_i)`` (a weighted geometric mean of
the members' calibrated distributions), divided by E's own temperature; answers, brand/model sums and
submissions are then those of any artifact (``hier.metrics``).

Weights and temperature are fitted on the members' out-of-fold scores (``oof.npz``, written by every
training run with validation photos). Members are grouped by recipe (``train.json`` without its fold):
the folds of one run, whose OOF photos are disjoint, weigh equally and their OOF scores are
concatenated (each photo scored by the one fold model that did not train on it: the per-member
calibration applied to a fold-average, as the competitors did); weights *between* groups (different
recipes or seeds on the same photos) minimise the log loss of the geometric mean on the photos every
group scored, jointly with the temperature, starting from equal weights (so never worse than them).

An ensemble answers (predict, predict_proba, evaluate, submissions, report without activation maps,
serve) but is not edited or searched: enroll, index/similar, embed, explain and export are refused.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from hier import artifact, fileio, outputs
from hier.artifact.files import CHECKPOINT, ENSEMBLE, GALLERY, MEMBERS, METRICS
from hier.errors import HierError
from hier.services.ensemble.fitting import calibrate_oof, candidate, check_same_taxonomy, parse_weights, plan

NOT_COPIED = (CHECKPOINT, fileio.LOCK, GALLERY)   # resume state, the lock, the listing index


def _link_or_copy(src: str, dst: str) -> None:
    """A hard link (artifacts are rewritten by renames, so E's copy never changes), else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def build(members: list[str | Path], out: str | Path, weights: str = "fit") -> dict:
    """Check the members, fit weights and temperature on their OOF scores, write E; returns ensemble.json."""
    out = Path(out)
    if len(members) < 2:
        raise HierError(f"an ensemble needs at least 2 members, not {len(members)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise HierError(f"--out {out} exists and is not empty; choose another folder")
    for m in members:               # copying a member into itself would recurse
        if outputs.is_inside(out, m):
            raise HierError(f"--out {out} is inside the member {m}; write the ensemble elsewhere")
    outputs.writable_destination(Path(os.path.realpath(out)), out)
    chosen = parse_weights(weights, len(members))
    candidates = [candidate(Path(m)) for m in members]
    seen: dict[str, str] = {}
    for c in candidates:
        check_same_taxonomy(candidates[0], c)
        f = c.config.get("fingerprint")
        if f is not None and f in seen:
            raise HierError(f"{c.name} has the same weights as {seen[f]}: give each model once")
        seen.setdefault(f, c.name)
    for c in candidates:
        calibrate_oof(c, chosen == "fit")
    fitted = plan(candidates, chosen)
    spec = {"members": [{"name": c.name, "dir": f"{MEMBERS}/{i}", "weight": fitted["weights"][i],
                         "temperature": c.temperature, "fold": c.fold,
                         "folds": (c.run or {}).get("train", {}).get("folds") if c.fold is not None else None,
                         "group": next(k for k, g in enumerate(fitted["groups"]) if i in g),
                         "fingerprint": c.config.get("fingerprint"), "oof": fitted["members"].get(c.name)}
                        for i, c in enumerate(candidates)],
            "temperature": fitted["temperature"], "weights": weights, "fitted": fitted["fitted"],
            "oof": fitted["oof"],
            "serving": "joint = sum_i weight_i * log_softmax(member_i joint / T_i); probs = softmax(joint / temperature)"}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        os.chmod(tmp, 0o777 & ~fileio.UMASK)      # mkdtemp's 0700 would hide it from a server's account
        for i, c in enumerate(candidates):
            with fileio.locked(c.path):             # one version of each member, not half of an enroll
                shutil.copytree(c.path, tmp / MEMBERS / str(i), copy_function=_link_or_copy,
                                ignore=shutil.ignore_patterns(*NOT_COPIED))
        candidates[0].taxonomy.to_csv(tmp / artifact.TAXONOMY)
        fileio.write_json(tmp / ENSEMBLE, spec)
        fileio.write_json(tmp / METRICS, fitted["oof"] or {})
        fileio.write_json(tmp / artifact.CONFIG, {"ensemble": ENSEMBLE, "members": len(candidates),
                                                  "metrics": fitted["oof"] or {}})
        os.rename(tmp, out)                       # out absent or an empty folder
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise HierError(f"could not write {out} ({e.strerror or e})") from None
    return spec
