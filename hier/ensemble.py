"""Ensembles of artifacts (``hier ensemble A B C --out E``): the competitors' recipe, as one artifact.

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

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hier import artifact, fileio
from hier.engine.predictor import Predictor, artifact_predictor
from hier.engine.trainer import CHECKPOINT, OOF, read_oof
from hier.errors import HierError, check_number
from hier.metrics import answer_class, evaluate_probs, fit_temperature, log_softmax, softmax
from hier.recognizer import Recognizer
from hier.taxonomy import Taxonomy

ENSEMBLE = artifact.ENSEMBLE
MEMBERS = "members"
NOT_COPIED = (CHECKPOINT, fileio.LOCK, artifact.GALLERY)   # resume state, the lock, the listing index
CHUNK = 1024            # photos each member predicts before they are combined: bounded memory
KEYS = ("joint", "fine", "model", "brand")


def is_ensemble(path: str | Path) -> bool:
    return (Path(path) / ENSEMBLE).is_file()


# --- serving ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EnsembleConfig:
    """What callers read from ``snapshot().net.cfg``: E's temperature, the largest member input size (the
    service decodes uploads down to it) and the members' TTA when they agree (None when they differ)."""

    temperature: float
    img_size: int
    tta: bool | None


@dataclass
class Member:
    name: str           # the path it was built from
    dir: Path           # its copy inside E
    net: object         # HierNet
    weight: float


@dataclass
class Ensemble:
    """What an ensemble's snapshot holds where an artifact's holds its net."""

    path: Path
    members: list[Member]
    temperature: float
    taxonomy: Taxonomy

    @property
    def cfg(self) -> EnsembleConfig:
        ttas = {m.net.cfg.tta for m in self.members}
        return EnsembleConfig(self.temperature, max(m.net.cfg.img_size for m in self.members),
                              ttas.pop() if len(ttas) == 1 else None)

    def fingerprint(self) -> str:
        """MD5 of the members' fingerprints, weights and E's temperature."""
        text = json.dumps([[m.net.fingerprint(), m.weight] for m in self.members] + [self.temperature])
        return hashlib.md5(text.encode()).hexdigest()


class _OneRow:
    """One progress row for every member's pass (each Predictor adds its own task otherwise)."""

    def __init__(self, progress, total: int):
        self.progress, self.task = progress, progress.add_task("predict (ensemble)", total=total, info="")

    def add_task(self, *args, **kwargs):
        return self.task

    def advance(self, task, n) -> None:
        self.progress.advance(task, n)


class EnsemblePredictor:
    """``Predictor``'s interface over the members' own predictors: ``joint`` = sum_i w_i log_softmax(
    joint_i / T_i) (E's scores before its temperature), ``probs`` = softmax(joint / T), ``answer`` as
    ``metrics.answer``; ``fine``/``model``/``brand`` are the weighted geometric means of each member
    head's distribution (for ``evaluate``'s independent-heads figure). No ``embedding``: members embed
    in spaces of their own."""

    def __init__(self, ensemble: Ensemble, predictors: list[Predictor]):
        self.ensemble, self.predictors = ensemble, predictors
        ttas = {p.tta for p in predictors}
        self.tta = ttas.pop() if len(ttas) == 1 else None
        self.weights = [m.weight for m in ensemble.members]
        self.temperatures = [m.net.cfg.temperature for m in ensemble.members]
        self.maps = (ensemble.taxonomy.fine_to_model, ensemble.taxonomy.fine_to_brand)

    def combine(self, outs: list[dict]) -> dict[str, np.ndarray]:
        """The ensemble's outputs from each member's (same photos, same class order)."""
        out = {k: sum(w * log_softmax(o[k].astype(np.float64), axis=1) for w, o in zip(self.weights, outs))
               for k in ("fine", "model", "brand")}
        out["joint"] = sum(w * log_softmax(o["joint"].astype(np.float64) / t, axis=1)
                           for w, t, o in zip(self.weights, self.temperatures, outs))
        out["probs"] = softmax(out["joint"], self.ensemble.temperature)
        out["answer"] = answer_class(out["probs"], *self.maps)
        return out

    def batches(self, images: list, progress=None):
        images = list(images)
        shared = _OneRow(progress, len(images) * len(self.predictors)) if progress is not None else None
        for start in range(0, len(images), CHUNK):
            chunk = images[start:start + CHUNK]
            yield self.combine([p(chunk, shared, keep=KEYS) for p in self.predictors])

    __call__ = Predictor.__call__

    def probs_of(self, embeddings: np.ndarray) -> np.ndarray:
        raise HierError(refusal(self.ensemble.path, "answer stored embeddings", "search"))


def refusal(path: Path, what: str, verb: str) -> str:
    return f"{path} is an ensemble: it cannot {what}; {verb} with a member artifact (then build the ensemble again)"


class EnsembleRecognizer(Recognizer):
    """``Recognizer(E)`` for an ensemble folder: the same answers through ``EnsemblePredictor``; what
    edits or searches one artifact is refused in one line."""

    REQUIRED = (ENSEMBLE, artifact.CONFIG, artifact.TAXONOMY)

    def _open(self):
        spec = read(self.path)
        taxonomy = Taxonomy.from_csv(self.path / artifact.TAXONOMY)
        members = []
        for m in spec["members"]:
            folder = self.path / m["dir"]
            _, net, tax = artifact.snapshot(folder, self.device)
            if tax.table.to_dict("list") != taxonomy.table.to_dict("list"):
                raise HierError(f"{self.path} is damaged: the taxonomy of {folder} is not the ensemble's")
            members.append(Member(m["name"], folder, net, float(m["weight"])))
        model = Ensemble(self.path, members, float(spec["temperature"]), taxonomy)
        return model, taxonomy, self._predictor(model)

    def _predictor(self, net: Ensemble, tta: bool | None = None) -> EnsemblePredictor:
        return EnsemblePredictor(net, [artifact_predictor(m.dir, m.net, self.backend, tta=tta,
                                                          batch_size=self.batch_size) for m in net.members])

    def report(self, data, out, layout: str = "auto", progress=None) -> dict:
        """The report without activation maps (whose would they be?)."""
        from hier.report import report
        return report(self, data, out, layout, cams=0, progress=progress)

    def _refuse(self, what: str, verb: str):
        raise HierError(refusal(self.path, what, verb))

    REFUSED = ("enroll", "unenroll", "embed", "embed_shard", "explain", "export", "similar", "gallery", "index",
               "index_add", "index_rebuild", "index_remove", "index_from_embeddings")

    def check_supports(self, method: str) -> None:
        if method in self.REFUSED:
            getattr(self, method)()

    def enroll(self, *args, **kwargs):
        self._refuse("enroll classes", "enroll")

    def unenroll(self, *args, **kwargs):
        self._refuse("unenroll classes", "unenroll")

    def embed(self, *args, **kwargs):
        self._refuse("embed photos (its members embed in spaces of their own)", "embed")

    def embed_shard(self, *args, **kwargs):
        self._refuse("embed listings", "embed")

    def explain(self, *args, **kwargs):
        self._refuse("draw activation maps", "explain")

    def export(self, *args, **kwargs):
        self._refuse("be exported (each member has its own export)", "export")

    def similar(self, *args, **kwargs):
        self._refuse("search listings", "search")

    def gallery(self):
        self._refuse("hold a listing index", "index listings")

    def listing_photo(self, listing_id):
        return None

    def index(self, *args, **kwargs):
        self._refuse("hold a listing index", "index listings")

    index_add = index_rebuild = index_remove = index_from_embeddings = index


def read(path: Path) -> dict:
    try:
        spec = fileio.read_json(path / ENSEMBLE)
        assert spec["members"] and all({"dir", "weight", "name"} <= set(m) for m in spec["members"])
        float(spec["temperature"])
    except (HierError, AssertionError, KeyError, TypeError, ValueError):
        raise HierError(f"{path} is damaged: {ENSEMBLE} does not read as an ensemble") from None
    return spec


# --- building -----------------------------------------------------------------------------------------

@dataclass
class Candidate:
    """A member as given, checked: its config, taxonomy, recipe and out-of-fold scores."""

    name: str
    path: Path
    config: dict
    taxonomy: Taxonomy
    run: dict | None            # train.json
    oof: dict | None            # read_oof; then (``_calibrate_oof``) paths, labels, log_softmax(logits / T)

    @property
    def temperature(self) -> float:
        return float(self.config["model"].get("temperature", 1.0))

    @property
    def fold(self) -> int | None:
        return (self.run or {}).get("train", {}).get("fold")

    def recipe(self) -> str | None:
        """Everything that made the run but its fold: the folds of one run share it."""
        if self.run is None or self.fold is None:
            return None
        return json.dumps({**self.run, "train": {**self.run["train"], "fold": None}}, sort_keys=True, default=str)


def _candidate(path: Path) -> Candidate:
    if is_ensemble(path):
        raise HierError(f"{path} is an ensemble; give its members (an ensemble of ensembles is not flattened)")
    missing = [f for f in (artifact.WEIGHTS, artifact.CONFIG, artifact.TAXONOMY) if not (path / f).is_file()]
    if missing:
        raise HierError(f"{path} is not a hier artifact (missing {', '.join(missing)})")
    with fileio.locked(path):
        config = artifact.read_config(path)
        taxonomy = Taxonomy.from_csv(path / artifact.TAXONOMY)
        run = fileio.read_json(path / "train.json") if (path / "train.json").is_file() else None
        oof = read_oof(path / OOF) if (path / OOF).is_file() else None
    return Candidate(str(path), path, config, taxonomy, run, oof)


def _calibrate_oof(c: Candidate, needed: bool) -> None:
    """The member's OOF logits as its calibrated log-probabilities (its own temperature); OOF scores of
    other classes are refused when weights are to be fitted, else left out (no temperature refit)."""
    oof = c.oof
    if oof is None:
        return
    if list(oof["classes"]) != c.taxonomy.classes:
        if not needed:
            c.oof = None
            return
        raise HierError(f"{c.name}/{OOF} was written for other classes than its taxonomy.csv (classes enrolled "
                        "since?); give --weights equal or w1,w2,... to build without it")
    c.oof = {"paths": list(map(str, oof["paths"])), "labels": oof["labels"].astype(np.int64),
             "scores": log_softmax(oof["logits"].astype(np.float64) / c.temperature, axis=1)}


def _same_taxonomy(a: Candidate, b: Candidate) -> None:
    """Refuse ``b`` unless its taxonomy is ``a``'s row for row, naming the first difference."""
    ta, tb = a.taxonomy.table, b.taxonomy.table
    if len(ta) != len(tb):
        raise HierError(f"{b.name} has {len(tb)} classes, {a.name} {len(ta)}: members need one taxonomy")
    for i, (ra, rb) in enumerate(zip(ta.to_dict("records"), tb.to_dict("records"))):
        for col in sorted(set(ra) | set(rb)):
            if ra.get(col) != rb.get(col):
                raise HierError(f"{b.name}'s taxonomy differs from {a.name}'s: row {i + 1} {col} is "
                                f"{rb.get(col)!r}, not {ra.get(col)!r}; members need one taxonomy")


def parse_weights(text: str, count: int) -> str | list[float]:
    """``fit`` | ``equal`` | ``w1,w2,...`` (one per member, non-negative, not all zero; normalised)."""
    if text in ("fit", "equal"):
        return text
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != count:
        raise HierError(f"--weights gives {len(parts)} weight(s) for {count} members")
    try:
        values = [check_number("--weights", float(p), 0) for p in parts]
    except ValueError:
        raise HierError(f"--weights {text!r}: give fit, equal or {count} numbers like 0.5,0.3,0.2") from None
    if not sum(values) > 0:
        raise HierError("--weights are all zero")
    return [v / sum(values) for v in values]


def groups_of(candidates: list[Candidate]) -> list[list[int]]:
    """Members by recipe: the folds of one run (same recipe, disjoint OOF photos) form one group; any
    other member is a group of its own."""
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(candidates):
        groups.setdefault(c.recipe() or f"member {i}", []).append(i)
    out = []
    for members in groups.values():
        photos = [set(candidates[i].oof["paths"]) if candidates[i].oof else set() for i in members]
        disjoint = sum(map(len, photos)) == len(set().union(*photos))
        out.extend([members] if disjoint else [[i] for i in members])
    return out


def group_oof(candidates: list[Candidate], group: list[int]) -> dict:
    """The group's whole-data OOF: each photo scored by its own out-of-fold member."""
    oofs = [candidates[i].oof for i in group]
    return {"paths": [p for o in oofs for p in o["paths"]], "labels": np.concatenate([o["labels"] for o in oofs]),
            "scores": np.concatenate([o["scores"] for o in oofs])}


def common_photos(oofs: list[dict], names: list[str]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Labels of the photos every group scored, and each group's scores on them, in one order."""
    where = [{p: j for j, p in enumerate(o["paths"])} for o in oofs]
    shared = [p for p in oofs[0]["paths"] if all(p in w for w in where[1:])]
    if not shared:
        raise HierError(f"the members' out-of-fold photos do not overlap ({names[0]} and {names[1]} scored no photo "
                        "in common: other data, or runs of an older hier that named photos as given); give "
                        "--weights equal or w1,w2,...")
    rows = [np.array([w[p] for p in shared]) for w in where]
    y = oofs[0]["labels"][rows[0]]
    for o, r, name in zip(oofs[1:], rows[1:], names[1:]):
        if (o["labels"][r] != y).any():
            raise HierError(f"{name} labels some out-of-fold photos differently from {names[0]}; members need one "
                            "labelling of the data")
    return y, [o["scores"][r] for o, r in zip(oofs, rows)]


def nll(joint: np.ndarray, y: np.ndarray) -> float:
    return float(-log_softmax(joint, axis=1)[np.arange(len(y)), y].mean())


def fit_weights(scores: list[np.ndarray], y: np.ndarray) -> np.ndarray:
    """Simplex weights (softmax of free parameters) minimising the log loss of softmax(sum_g w_g s_g / T)
    jointly with T, from equal weights and their best T: the result is never worse than equal weights."""
    from scipy.optimize import minimize                  # fitting's alone: serving an ensemble needs no scipy
    from scipy.special import softmax as np_softmax
    s = np.stack(scores)
    g = len(scores)

    def loss(x: np.ndarray) -> float:
        return nll(np.tensordot(np_softmax(x[:g]), s, 1) / np.exp(x[g]), y)
    start = np.r_[np.zeros(g), np.log(fit_temperature(s.mean(0), y))]
    x = minimize(loss, start, method="L-BFGS-B").x
    return np_softmax(x[:g]) if loss(x) <= loss(start) else np.full(g, 1 / g)


def plan(candidates: list[Candidate], weights: str | list[float]) -> dict:
    """Member weights, E's temperature, and the OOF figures (members, groups, ensemble) behind them."""
    names = [c.name for c in candidates]
    groups = groups_of(candidates)
    no_oof = [c.name for c in candidates if c.oof is None]
    tax = candidates[0].taxonomy
    figures = {c.name: _figures(softmax(c.oof["scores"]), c.oof["labels"], tax) for c in candidates if c.oof}
    n = len(candidates)
    if no_oof and weights == "fit":
        raise HierError(f"{no_oof[0]} has no oof.npz (trained with --val-frac 0, or by an older hier), so no weight "
                        "can be fitted; give --weights equal or w1,w2,...")
    if no_oof:
        w = np.full(n, 1 / n) if weights == "equal" else np.asarray(weights)
        return {"weights": w.tolist(), "temperature": 1.0, "groups": groups, "members": figures, "oof": None,
                "fitted": f"weights {weights if weights == 'equal' else 'given'}; temperature 1 (not refitted: "
                          f"{no_oof[0]} has no out-of-fold scores)"}
    oofs = [group_oof(candidates, g) for g in groups]
    y, scores = common_photos(oofs, [names[g[0]] for g in groups])
    equal_group = np.array([len(g) / n for g in groups])
    if weights == "fit":
        gw = fit_weights(scores, y) if len(groups) > 1 else np.ones(1)
        w = np.zeros(n)
        for k, g in enumerate(groups):
            w[g] = gw[k] / len(g)
    else:
        w = np.full(n, 1 / n) if weights == "equal" else np.asarray(weights, dtype=np.float64)
        gw = np.array([w[g].sum() for g in groups])

    def combined(group_weights: np.ndarray) -> np.ndarray:
        return np.tensordot(group_weights, np.stack(scores), 1)
    joint = combined(gw)
    t = fit_temperature(joint, y)
    oof = {**_figures(softmax(joint, t), y, tax), "temperature": t}
    eq = combined(equal_group)
    oof["equal_weights_log_loss"] = nll(eq / fit_temperature(eq, y), y)
    how = {"fit": "group weights fitted (L-BFGS-B on the simplex, jointly with T) to minimise the OOF log loss of "
                  "the geometric mean" if len(groups) > 1 else "one group: equal weights",
           "equal": "equal weights"}.get(weights if isinstance(weights, str) else "", "weights given")
    folds = [g for g in groups if len(g) > 1]
    return {"weights": w.tolist(), "temperature": t, "groups": groups, "members": figures, "oof": oof,
            "fitted": how + ("; the folds of a run weigh equally, their OOF scores concatenated (each photo scored "
                             "by its own out-of-fold member: the per-member calibration applied to a fold-average)"
                             if folds else "") +
                      f"; temperature refitted on the combined OOF scores of {len(y)} photos"}


def _figures(probs: np.ndarray, y: np.ndarray, tax: Taxonomy) -> dict:
    m = evaluate_probs(probs, y, tax)
    return {k: m[k] for k in ("images", "log_loss", "top1", "ece")}


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
    chosen = parse_weights(weights, len(members))
    candidates = [_candidate(Path(m)) for m in members]
    seen: dict[str, str] = {}
    for c in candidates:
        _same_taxonomy(candidates[0], c)
        f = c.config.get("fingerprint")
        if f is not None and f in seen:
            raise HierError(f"{c.name} has the same weights as {seen[f]}: give each model once")
        seen.setdefault(f, c.name)
    for c in candidates:
        _calibrate_oof(c, chosen == "fit")
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
        for i, c in enumerate(candidates):
            with fileio.locked(c.path):             # one version of each member, not half of an enroll
                shutil.copytree(c.path, tmp / MEMBERS / str(i), copy_function=_link_or_copy,
                                ignore=shutil.ignore_patterns(*NOT_COPIED))
        candidates[0].taxonomy.to_csv(tmp / artifact.TAXONOMY)
        fileio.write_json(tmp / ENSEMBLE, spec)
        fileio.write_json(tmp / "metrics.json", fitted["oof"] or {})
        fileio.write_json(tmp / artifact.CONFIG, {"ensemble": ENSEMBLE, "members": len(candidates),
                                                  "metrics": fitted["oof"] or {}})
        os.rename(tmp, out)                       # out absent or an empty folder
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise HierError(f"could not write {out} ({e.strerror or e})") from None
    return spec
