"""``Recognizer``: an artifact held in memory, and everything a user does with it.

    rec = Recognizer("runs/stanford")
    preds = rec.predict(["a.jpg", pil_image, array], topk=5)
    preds[0].brand, preds[0].model, preds[0].fine, preds[0].p
    rec.enroll("신형모델_2025", "shots/", brand="현대")
    rec.similar("query.jpg", k=10, same_brand=True)
    rec.evaluate("data/val")
    Recognizer.train("data/train", out="runs/x", preset="cpu")

The CLI, the demo and the service are thin layers over it. Every photo goes through one
``Predictor`` with the artifact's TTA and temperature. A long-lived recognizer notices when its artifact
changed on disk (another process ran ``hier enroll``) and reloads before answering; while another
command holds the artifact's lock it keeps answering with the version it holds (``snapshot``), so a
service never stalls behind a writer. The listing gallery is held the same way.
"""
from __future__ import annotations

import json
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from hier import artifact, enroll as enrollment, fileio, index as gallery_ops
from hier.data import ImageSet, image_files, read_test_csv
from hier.data.detect import CarDetector
from hier.data.readers import create_reader
from hier.engine.predictor import Predictor, artifact_predictor, device
from hier.errors import HierError
from hier.competitions.hecto import read_sample, write_submission
from hier.metrics import answer, evaluate_probs
from hier.models import HierNet
from hier.taxonomy import Taxonomy


@dataclass
class Prediction:
    """One photo's answer, read top-down (``hier.metrics.answer``: the likeliest brand, its likeliest
    model, that model's likeliest class) with the probabilities of each (P(fine) <= P(model) <= P(brand)),
    the top-k fine classes (ranked by P(class), so the first can differ from ``fine``), and ``probs``,
    the whole calibrated distribution over ``Results.classes`` (a view into ``Results.probs``)."""

    image: str
    brand: str
    model: str
    fine: str
    years: str
    p: float
    p_model: float
    p_brand: float
    topk: list[dict] = field(default_factory=list)
    probs: np.ndarray | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        """The answer as JSON-ready values (without the full distribution)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "probs"}


class Results(list):
    """``Prediction`` per photo, in the order given (an in-memory image given twice is answered twice; a
    path given twice once, as ``image_files`` reads each file once), with the
    (N, C) matrix ``probs`` over ``classes``, ``speed`` (milliseconds per photo for the whole call) and
    one schema behind ``to_frame``, ``to_csv`` and ``to_json``."""

    def __init__(self, predictions=(), probs: np.ndarray | None = None, classes: list[str] | None = None,
                 speed: dict | None = None):
        super().__init__(predictions)
        self.probs, self.classes, self.speed = probs, classes or [], speed or {}

    def to_frame(self) -> pd.DataFrame:
        """One row per (photo, rank), as ``hier predict --format csv`` prints, each with the photo's
        answer (``answer``, ``answer_brand``, ``answer_model``: read top-down, so it can differ from
        rank 1, the likeliest single class)."""
        return pd.DataFrame([{"image": r.image, **row, "answer": r.fine, "answer_brand": r.brand,
                              "answer_model": r.model} for r in self for row in r.topk],
                            columns=["image", *TOPK_COLUMNS, "answer", "answer_brand", "answer_model"])

    def to_csv(self, path: str | Path) -> None:
        """``to_frame`` as a UTF-8 CSV, written atomically."""
        frame = self.to_frame()
        fileio.atomic_write(path, lambda p: frame.to_csv(p, index=False, encoding="utf-8"))

    def to_json(self) -> str:
        return json.dumps([r.to_dict() for r in self], ensure_ascii=False, indent=1)


TOPK_COLUMNS = ["rank", "class", "brand", "model", "years", "p", "p_model", "p_brand"]


def ranked(probs: np.ndarray, tax: Taxonomy, k: int) -> list[list[dict]]:
    """Each photo's k likeliest fine classes, with their model's and brand's probability: one sort of
    the whole matrix, rows built in one pass (linear in the photos)."""
    model_p, brand_p = tax.marginals(probs)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    n = np.arange(len(probs))[:, None]
    p, pm, pb = probs[n, top], model_p[n, tax.fine_to_model[top]], brand_p[n, tax.fine_to_brand[top]]
    per_class = [{"class": c, "brand": tax.brands[tax.fine_to_brand[i]], "model": tax.models[tax.fine_to_model[i]],
                  "years": tax.years(c)} for i, c in enumerate(tax.classes)]
    return [[{"rank": r + 1, **per_class[c], "p": float(p[i, r]), "p_model": float(pm[i, r]), "p_brand": float(pb[i, r])}
             for r, c in enumerate(top[i])] for i in range(len(probs))]


def _expand(images) -> list:
    """One photo or a list of them; paths and folders are checked and expanded (``image_files``),
    PIL images and arrays pass as they are, and an ``ImageSet`` was checked already."""
    if isinstance(images, ImageSet):
        return images.paths
    items = list(images) if isinstance(images, (list, tuple)) else [images]
    paths = [x for x in items if isinstance(x, (str, Path))]
    if len(paths) == len(items):
        return image_files(paths).paths
    return [y for x in items for y in (image_files([x]).paths if isinstance(x, (str, Path)) else [x])]


def _name(image, i: int) -> str:
    return str(image) if isinstance(image, (str, Path)) else f"<image {i}>"


class Snapshot(NamedTuple):
    """One version of the artifact in memory (``artifact.Snapshot``) with its predictor, read under one
    lock: what one call answers with from start to end, so it never mixes two versions."""

    stamp: tuple
    net: HierNet
    taxonomy: Taxonomy
    predictor: Predictor


class HeldGallery(NamedTuple):
    """The listing index in memory, its files' stamps, and each listing's photo path."""

    stamp: tuple
    gallery: gallery_ops.Gallery
    photos: dict[str, str]


class Recognizer:
    REQUIRED = (artifact.WEIGHTS, artifact.CONFIG, artifact.TAXONOMY)

    def __new__(cls, path: str | Path, *args, **kwargs):
        """A ``hier ensemble`` folder is held by ``hier.ensemble.EnsembleRecognizer`` (same answers, no edits)."""
        if cls is Recognizer and (Path(path) / artifact.ENSEMBLE).is_file():
            from hier.ensemble import EnsembleRecognizer
            cls = EnsembleRecognizer
        return super().__new__(cls)

    def __init__(self, path: str | Path, device_: str | None = None, batch_size: int = 64, detector=None,
                 backend: str = "auto"):
        """``detector``: a ``hier.data.detect.CarDetector`` (or its weights' path) to answer on the largest
        vehicle box of each photo path (predict, evaluate, submission, similar's query). ``backend``:
        ``auto`` runs the artifact's ONNX export (``hier export``) when it is up to date, ``torch`` or
        ``onnx`` force one."""
        self.path = Path(path)
        self.device, self.batch_size, self.backend = device_ or device(), batch_size, backend
        if detector is not None and not isinstance(detector, CarDetector):
            detector = CarDetector(detector)
        self.detector, self.crop_fallback = detector, None
        missing = [f for f in self.REQUIRED if not (self.path / f).is_file()]
        if missing:
            raise HierError(f"{self.path} is not a hier artifact (missing {', '.join(missing)})")
        self._loaded: Snapshot | None = None          # read on first use
        self._gallery: HeldGallery | None = None
        self._reading, self._reading_gallery = threading.Lock(), threading.Lock()

    def check_supports(self, method: str) -> None:
        """Raise now the refusal ``method`` would raise on this artifact (an ensemble answers but does not
        edit, embed or explain), so a command refuses before it prints or writes anything."""

    # --- the artifact in memory: read on first use, again whenever it changed on disk ----------------
    def _gallery_stamp(self) -> tuple:
        """Stamps of the gallery's files, every shard's (``index.faiss`` first: None, no gallery)."""
        return fileio.file_stamp(*gallery_ops.gallery_files(self.path))

    def reload(self) -> "Recognizer":
        """Read the artifact now (done by itself on first use and whenever it changed on disk); waits
        for a command writing it, as every command does."""
        self._read(force=True)
        return self

    def snapshot(self, wait_for_readers: bool = True) -> Snapshot:
        """The version answers come from: read again first if the artifact changed on disk, unless
        another command holds its lock (then the version in memory, read again on a later call). Only
        the very first read waits for a writer, so a long-lived recognizer never stalls behind one.
        ``wait_for_readers=False`` does not wait for another thread reading the new version either (a
        health check)."""
        loaded = self._loaded
        if loaded is not None and loaded.stamp == artifact.stamp(self.path):
            return loaded
        return self._read(block=wait_for_readers)

    @property
    def loaded(self) -> Snapshot | None:
        """The version in memory, without looking at the disk (None before the first read)."""
        return self._loaded

    @property
    def stale(self) -> bool:
        """The artifact changed on disk since the version in memory was read (a writer still holds it)."""
        return self._loaded is None or self._loaded.stamp != artifact.stamp(self.path)

    def _read(self, force: bool = False, block: bool = True) -> Snapshot:
        loaded = self._loaded
        if not self._reading.acquire(blocking=block or force or loaded is None):
            return loaded                         # another thread is reading it
        try:                                      # one thread reads; the others use what it read
            loaded = self._loaded
            if not force and loaded is not None and loaded.stamp == artifact.stamp(self.path):
                return loaded
            with ExitStack() as held:
                if not _hold_lock(held, self.path, wait=force or loaded is None):
                    return loaded                 # busy: answer with the version in memory
                net, taxonomy, predictor = self._open()
                stamp = artifact.stamp(self.path)   # after an export on first use
            self._loaded = Snapshot(stamp, net, taxonomy, predictor)
            return self._loaded
        finally:
            self._reading.release()

    def _open(self) -> tuple[HierNet, Taxonomy, Predictor]:
        """Net, taxonomy and predictor of the artifact on disk (the caller holds its lock)."""
        _, net, taxonomy = artifact.snapshot(self.path, self.device)
        return net, taxonomy, self._predictor(net)

    def _predictor(self, net: HierNet, tta: bool | None = None) -> Predictor:
        return artifact_predictor(self.path, net, self.backend, tta=tta, batch_size=self.batch_size)

    def gallery(self) -> gallery_ops.Gallery:
        """The listing index (``hier index build``), held in memory and read again when its files
        change on disk, as ``snapshot`` (a busy artifact keeps the one in memory)."""
        return self._held_gallery().gallery

    def listing_photo(self, listing_id: str) -> str | None:
        """The photo path of a listing of the gallery (None if it lists no such id)."""
        return self._held_gallery().photos.get(listing_id)

    def _held_gallery(self) -> HeldGallery:
        held, stamp = self._gallery, self._gallery_stamp()
        if held is not None and held.stamp == stamp:
            return held
        with self._reading_gallery:
            held, stamp = self._gallery, self._gallery_stamp()
            if held is not None and held.stamp == stamp:
                return held
            if stamp[0] is None:                      # no index (any more): Gallery.load says so
                self._gallery = None
                gallery_ops.Gallery.load(self.path)
            with ExitStack() as locked:
                if not _hold_lock(locked, self.path, wait=held is None):
                    return held
                stamp = self._gallery_stamp()
                gallery = gallery_ops.Gallery.load(self.path)
            gallery.on_gpus()                         # searches only: edits load their own CPU copy
            listings = gallery.listings
            photos = dict(zip(listings["listing_id"].astype(str), listings["image"].astype(str))) \
                if "image" in listings else {}
            self._gallery = HeldGallery(stamp, gallery, photos)
            return self._gallery

    @property
    def net(self) -> HierNet:
        return self.snapshot().net

    @property
    def taxonomy(self) -> Taxonomy:
        return self.snapshot().taxonomy

    @property
    def predictor(self) -> Predictor:
        return self.snapshot().predictor

    @property
    def metrics(self) -> dict:
        """Validation figures written at the end of training (empty without a validation split)."""
        f = self.path / "metrics.json"
        return fileio.read_json(f) if f.is_file() else {}

    def embed(self, images: list, progress=None, tta: bool | None = None) -> dict[str, np.ndarray]:
        """Raw predictor output for photos: embedding, joint/fine/model/brand logits, probs. ``tta``
        overrides the artifact's setting (for answers only: enroll, index and similar always embed as
        the artifact was calibrated)."""
        return self._embed(images, progress, tta)[0]

    def _embed(self, images: list, progress=None, tta: bool | None = None) -> tuple[dict, Snapshot]:
        """Predictor output and the snapshot (weights, taxonomy) that produced it."""
        snap = self.snapshot()
        predictor = snap.predictor
        if self.detector is not None:
            images, self.crop_fallback = self.detector.crops(list(images))
        if tta is not None and tta != predictor.tta:
            predictor = self._predictor(snap.net, tta)
        return predictor(images, progress), snap

    # --- answers ------------------------------------------------------------------------------------
    def predict(self, images, topk: int = 5, tta: bool | None = None, progress=None) -> Results:
        """Paths, folders, PIL images, arrays or an ``ImageSet`` -> ``Results``."""
        if topk < 1:
            raise HierError(f"topk must be at least 1, not {topk}")
        items = _expand(images)
        start = time.perf_counter()
        out, snap = self._embed(items, progress, tta)
        probs, tax = out["probs"], snap.taxonomy
        model_p, brand_p = tax.marginals(probs)
        brand, model, fine = answer(probs, tax)
        rows = ranked(probs, tax, topk)
        results = Results(probs=probs, classes=list(tax.classes))
        for i, x in enumerate(items):
            c = tax.classes[fine[i]]
            results.append(Prediction(
                image=_name(x, i), brand=tax.brands[brand[i]], model=tax.models[model[i]], fine=c, years=tax.years(c),
                p=float(probs[i, fine[i]]), p_model=float(model_p[i, model[i]]), p_brand=float(brand_p[i, brand[i]]),
                topk=rows[i], probs=probs[i]))
        results.speed = {"photos": len(items), "ms_per_photo": 1000 * (time.perf_counter() - start) / max(1, len(items))}
        return results

    def predict_proba(self, images, tta: bool | None = None, progress=None) -> np.ndarray:
        """(N, C) calibrated fine-class probabilities, columns in ``classes_`` order (scikit-learn's
        convention); brand and model probabilities are sums of columns (``taxonomy.marginals``)."""
        return self._embed(_expand(images), progress, tta)[0]["probs"]

    @property
    def classes_(self) -> list[str]:
        return list(self.taxonomy.classes)

    def evaluate(self, data: str | Path, tta: bool | None = None, progress=None, layout: str = "auto") -> dict:
        """The figures ``hier evaluate`` prints, on a labelled dataset (``hier.data.readers`` layouts)."""
        images, _ = create_reader(data, layout)()
        unknown = sorted({c for c in images.labels if c not in self.taxonomy})
        if unknown:
            raise HierError(f"class {unknown[0]!r} of {data} is not in the artifact's taxonomy "
                            f"({len(unknown)} unknown)")
        out, snap = self._embed(images.paths, progress, tta)
        y = np.array([snap.taxonomy.class_index[c] for c in images.labels])
        metrics = evaluate_probs(out["probs"], y, snap.taxonomy, logits=out["joint"], heads=out)
        metrics["temperature"] = snap.net.cfg.temperature
        metrics["skipped"] = images.skipped_message()
        return metrics

    def submission(self, test_csv: str | Path | ImageSet, sample_submission: str | Path, out: str | Path,
                   tta: bool | None = None, progress=None) -> pd.DataFrame:
        """A competition submission in the sample file's column and row order (``test_csv``: the
        ``ID,img_path`` CSV, or ``read_test_csv``'s checked result)."""
        inputs = test_csv if isinstance(test_csv, ImageSet) else read_test_csv(test_csv)
        sample = read_sample(sample_submission, inputs.ids, self.taxonomy, self.merged_classes)   # before any photo
        scores, snap = self._embed(inputs.paths, progress, tta)
        return write_submission(scores["probs"], inputs.ids, snap.taxonomy, sample, out, self.merged_classes)

    @property
    def merged_classes(self) -> dict[str, str]:
        """Classes learned as an equivalent one (``hier train --merge-classes``): submission column -> class."""
        return artifact.read_config(self.path).get("merged_classes", {})

    def report(self, data: str | Path, out: str | Path, layout: str = "auto", progress=None) -> dict:
        """``out/index.html`` (+ PNGs, metrics.json) judging the artifact on labelled photos
        (``hier.report``)."""
        from hier.report import report
        return report(self, data, out, layout, progress=progress)

    def explain(self, images, out: str | Path) -> list[Path]:
        """``out/<photo name>.png`` per photo: the class-activation map of its top-1 answer over it."""
        from hier.report import save_overlays
        items = _expand(images)
        names = [Path(x).stem if isinstance(x, (str, Path)) else f"image{i}" for i, x in enumerate(items)]
        names = [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]
        return save_overlays(self.net, items, Path(out), names)

    def export(self, format: str = "onnx", int8: bool = False, data=None, photos: int | None = None,
               keep_float: tuple[str, ...] = ("stem", "head"), reduce_range: bool = True):
        """ARTIFACT/model.onnx: the trunk and embedding (with the flipped view when the artifact serves
        with TTA), run by ONNX Runtime from then on; the heads stay in PyTorch, so enrolling needs no
        re-export, retraining does (a stale export is written again on first use). ``int8``: also
        model.int8.onnx (``predictor.export_int8``; returns its config.json record, with what it
        changes on the validation photos), for ``backend="onnx-int8"``."""
        if format != "onnx":
            raise HierError(f"unknown export format {format!r}; onnx is the one supported")
        from hier.engine.predictor import CALIBRATION_PHOTOS, export, export_int8
        out = export_int8(self.path, data, photos or CALIBRATION_PHOTOS, keep_float, reduce_range) if int8 \
            else export(self.path)
        self._loaded = None
        return out

    def similar(self, image, k: int = 10, same_brand: bool = False) -> pd.DataFrame:
        """The k nearest listings (sellers' columns + hier_*), best first (``Gallery.results`` checks k).
        hier_class/brand/model (and ``same_brand``'s filter) are the head of now's: the gallery's columns
        when its listings were labelled by this very head (``answers_digest``), else every candidate (or,
        to filter, every listing, once per version of the artifact) answered again from its stored vector."""
        gallery = self.gallery()
        out, snap = self._embed(_expand(image)[:1])
        tax = snap.taxonomy
        where = None
        if same_brand:
            brand = tax.brands[answer(out["probs"], tax)[0][0]]
            where = lambda rows: rows[gallery_ops.BRAND] == brand  # noqa: E731
        current = gallery.labels_digest is not None and gallery.labels_digest == self._answers_digest(snap)

        def labels(vectors: np.ndarray) -> dict:
            """The listings' answers by the head of now (the snapshot that answered the query)."""
            return gallery_ops.label_columns(snap.predictor.probs_of(vectors), tax)
        return gallery.results(out["embedding"], k, where, None if current else labels,
                               labels_key=snap.stamp)[0].drop(columns=[gallery_ops.ID])

    def _answers_digest(self, snap: Snapshot) -> str:
        """``answers_digest`` of the snapshot's head, computed once per version of the artifact."""
        held = getattr(self, "_digest", None)
        if held is None or held[0] != snap.stamp:
            held = self._digest = (snap.stamp, gallery_ops.answers_digest(snap.net, snap.taxonomy))
        return held[1]

    # --- changes: each holds the artifact's lock from reading to its atomic save; the next answer sees
    # them, as the artifact changed on disk ------------------------------------------------------------
    def enroll(self, name: str, images, brand: str | None = None, model: str | None = None,
               years: str | None = None, add_shots: bool = False, min_shots: int = 1,
               calibrate: float = 0.0, max_base_drop: float = enrollment.MAX_BASE_DROP) -> enrollment.Enrolled:
        """A new class from a few photos (``hier.enroll.enroll``): it is expected to cost at most
        ``max_base_drop`` points of accuracy on photos of the known classes."""
        images = images if isinstance(images, (list, tuple)) else [images]
        return enrollment.enroll(self.path, name, images, brand, model, years, add_shots, min_shots,
                                 enrollment.Calibration(calibrate), max_base_drop)

    def unenroll(self, name: str) -> enrollment.Unenrolled:
        return enrollment.unenroll(self.path, name)

    def index(self, listings, kind: str = "flat", progress=None) -> gallery_ops.Gallery:
        """(Re)build the similar-listing index from a folder, a CSV or a ``read_listings`` table."""
        return gallery_ops.build(self.path, listings, kind, progress)

    def embed_shard(self, listings, out: str | Path, shard: tuple[int, int] = (0, 1), progress=None) -> Path:
        """Shard ``i`` of ``N`` of the listings' embeddings as Parquet (``hier.embed``)."""
        from hier import embed
        return embed.embed(self.path, gallery_ops._table(listings), out, shard, self.backend, self.batch_size,
                           progress=progress)

    def index_from_embeddings(self, folder: str | Path, kind: str = "flat") -> gallery_ops.Gallery:
        """(Re)build the index from ``hier embed`` shards, without running the network."""
        from hier import embed
        return embed.build_gallery(self.path, folder, kind)

    def index_add(self, listings, progress=None, shard: str | None = None) -> tuple[int, gallery_ops.Gallery]:
        """Listings into shard ``shard`` (``gallery_ops.shard_name``: default the base, ``today`` the UTC
        date's); only that shard is read and written."""
        return gallery_ops.add(self.path, listings, progress, shard)

    def index_rebuild(self, kind: str | None = None, progress=None) -> gallery_ops.Gallery:
        """Re-embed the gallery's listings with the weights of now (a stale gallery is refused until then)."""
        return gallery_ops.rebuild(self.path, kind, progress)

    def index_remove(self, ids: list[str]) -> tuple[int, gallery_ops.Gallery]:
        return gallery_ops.remove(self.path, ids)

    def index_drop(self, shard: str) -> tuple[int, gallery_ops.Gallery]:
        """Forget a whole shard of the gallery (its listings expired): no index read or written."""
        return gallery_ops.drop(self.path, shard)

    def index_merge(self, shards: list[str], into: str) -> tuple[int, gallery_ops.Gallery]:
        """Compact shards of the gallery into one (``into``: new or existing)."""
        return gallery_ops.merge(self.path, shards, into)

    # --- training -----------------------------------------------------------------------------------
    @classmethod
    def train(cls, data: str | Path, out: str | Path, preset: str | None = None, taxonomy=None,
              resume: bool = False, console=None, **flags) -> "Recognizer":
        """Train on a folder-per-class dataset into ``out`` and hold the result. ``flags`` are the
        ``hier train`` options (``epochs=``, ``trunk=``, ``freeze_stages=``...); with ``resume`` only
        ``epochs`` (to extend the run) is taken."""
        from hier.engine.trainer import TrainConfig, configs, train

        if isinstance(taxonomy, (str, Path)):
            taxonomy = Taxonomy.from_csv(taxonomy)
        flags = {k: v for k, v in flags.items() if v is not None}
        if resume:
            _check_resume_flags(Path(out), preset, taxonomy, flags)
            epochs = flags.get("epochs")
            train(data, out, None, None, TrainConfig(epochs=epochs) if epochs else None, True, console)
        else:
            model_cfg, train_cfg = configs(preset, **flags)
            train(data, out, taxonomy, model_cfg, train_cfg, console=console)
        return cls(out)


def _hold_lock(stack: ExitStack, path: Path, wait: bool) -> bool:
    """Enter the artifact's lock on ``stack``: waiting for a writer as commands do, or (``wait=False``)
    only if it is free now. False when it is busy."""
    try:
        stack.enter_context(fileio.locked(path, timeout=None if wait else 0))
    except HierError:
        if wait:
            raise
        return False
    return True


def _check_resume_flags(out: Path, preset, taxonomy, flags: dict) -> None:
    """``--resume`` continues a run with its saved settings: repeating them is fine, changing one (other
    than a larger ``--epochs``) is refused rather than silently ignored."""
    if preset is not None or taxonomy is not None:
        raise HierError("--resume uses the run's saved settings and taxonomy; drop --preset / --taxonomy")
    saved_file = out / "train.json"
    saved = fileio.read_json(saved_file) if saved_file.is_file() else {"model": {}, "train": {}}
    for key, value in flags.items():
        if key == "epochs":
            continue
        was = saved["model"].get(key, saved["train"].get(key, value))
        if was != value:
            raise HierError(f"--resume keeps the run's saved settings: --{key.replace('_', '-')} {value} differs "
                            f"from the saved {was}; train into a new --out to change it")
