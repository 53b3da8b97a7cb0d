"""``Recognizer``: an artifact held in memory, and everything a user does with it.

    rec = Recognizer("runs/stanford")
    preds = rec.predict(["a.jpg", pil_image, array], topk=5)
    preds[0].brand, preds[0].model, preds[0].fine, preds[0].p
    rec.enroll("신형모델_2025", "shots/", brand="현대")
    rec.similar("query.jpg", k=10, same_brand=True)
    rec.evaluate("data/val")
    Recognizer.train("data/train", out="runs/x", preset="cpu")

The CLI, the demo and the service are thin layers over it. Every photo goes through one predictor with
the artifact's TTA and temperature, and every answer is the served one (``hier.metrics.served_answer``).
The folder's kind (an artifact, an ensemble) is looked up in ``hier.folders.FOLDER_KINDS``; a method that needs
a capability the kind lacks is refused in one line (``hier.folders.needs``). A long-lived recognizer
notices when its artifact changed on disk (another process ran ``hier enroll``) and reloads before
answering; while another command holds the artifact's lock it keeps answering with the version it holds
(``snapshot``), so a service never stalls behind a writer. The listing gallery is held the same way.
The report and training stacks (matplotlib, scikit-learn, timm's optimisers) are imported by the
methods that use them, so a predicting process starts without them.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from hier import enrollment
from hier.artifact import files
from hier.artifact.records import read_metrics
from hier.artifact.store import read_config
from hier.competitions.hecto import read_sample, write_submission
from hier.data import ImageSet, photo_items, read_test_csv
from hier.data.detect import CarDetector
from hier.data.readers import create_reader
from hier.errors import HierError
from hier.export import CALIBRATION_PHOTOS, export, export_int8
from hier.folders import ANSWER, EDIT, EMBED, EXPLAIN, EXPORT, folder_kind, needs
from hier.listing_search import ListingSearch
from hier.metrics import evaluate_probs
from hier.results import Prediction, Results, photo_name, results_of
from hier.runtime import device as default_device
from hier.services.held_artifact import HeldArtifact, Snapshot
from hier.services.held_gallery import HeldGalleries
from hier.taxonomy import Taxonomy

if TYPE_CHECKING:                 # the training stack is imported when training: predicting does without it
    from typing_extensions import Unpack

    from hier.training.config import TrainFlags

__all__ = ["Prediction", "Recognizer", "Results", "Snapshot"]


class Recognizer(ListingSearch):
    """An artifact (or ensemble) folder held in memory: answers, search, enrollment and training.

    Args:
        path: the folder ``hier train`` (or ``hier ensemble``) wrote.
        device: ``cpu`` or ``cuda`` (default: CUDA when available).
        batch_size: photos per forward pass.
        detector: a ``hier.data.detect.CarDetector`` (or its weights' path) to answer on the largest
            vehicle box of each photo path (predict, evaluate, submission, similar's query).
        backend: ``auto`` runs the artifact's ONNX export when it is up to date (writing it on first use),
            ``torch``, ``onnx``, ``onnx-int8``, ``openvino`` or ``openvino-bf16`` force one.

    Raises:
        HierError: ``path`` is not an artifact (the missing files are named). Every method raises
            HierError (one line) for a user's mistake; on an ensemble, the methods that edit, embed,
            search, explain or export refuse in one line before any work (``check_supports``).

    Example:
        >>> rec = Recognizer("runs/x")
        >>> rec.predict("car.jpg")[0].brand
    """

    def __init__(self, path: str | Path, device: str | None = None, batch_size: int = 64, detector=None,
                 backend: str = "auto"):
        self.path = Path(path)
        self.kind = folder_kind(self.path)
        self.device, self.batch_size, self.backend = device or default_device(), batch_size, backend
        if detector is not None and not isinstance(detector, CarDetector):
            detector = CarDetector(detector)
        self.detector, self.crop_fallback = detector, None
        lacks = files.missing(self.path)
        if lacks:
            raise HierError(f"{self.path} is not a hier artifact (missing {', '.join(lacks)})")
        self._held = HeldArtifact(self.path, lambda: self.kind.opener(self.path, self.device, self.backend,
                                                                     self.batch_size))
        self._galleries = HeldGalleries(self.path)

    def __repr__(self) -> str:
        """Its folder and kind, the classes once read (repr reads nothing), where it runs."""
        loaded = self.loaded
        classes = f", {len(loaded.taxonomy)} classes" if loaded is not None else ""
        return (f"Recognizer({str(self.path)!r}, {self.kind.name}{classes}, device={self.device!r}, "
                f"backend={self.backend!r})")

    def check_supports(self, method: str) -> None:
        """Raise now the refusal ``method`` would raise on this folder (an ensemble answers but does not
        edit, embed, search, explain or export), so a command refuses before it prints or writes anything."""
        capability = getattr(getattr(type(self), method, None), "capability", None)
        refusal = None if capability is None else self.kind.refusal(self.path, capability)
        if refusal is not None:
            raise HierError(refusal)

    # --- the folder in memory: read on first use, again whenever it changed on disk (``HeldArtifact``) --
    def reload(self) -> "Recognizer":
        """Read the artifact now (done by itself on first use and whenever it changed on disk); waits
        for a command writing it, as every command does."""
        self._held.read(force=True)
        return self

    def snapshot(self, wait_for_readers: bool = True) -> Snapshot:
        """The version answers come from (``HeldArtifact.snapshot``): read again if the artifact changed
        on disk, unless another command holds its lock; a long-lived recognizer never stalls behind one."""
        return self._held.snapshot(wait_for_readers)

    @property
    def loaded(self) -> Snapshot | None:
        """The version in memory, without looking at the disk (None before the first read)."""
        return self._held.loaded

    @property
    def stale(self) -> bool:
        """The artifact changed on disk since the version in memory was read (a writer still holds it)."""
        return self._held.stale

    @property
    def net(self):
        """The ``HierNet`` of the version of now (an ensemble's ``Ensemble``)."""
        return self.snapshot().net

    @property
    def taxonomy(self) -> Taxonomy:
        """The classes of the version of now, enrolled ones included (class -> model -> brand)."""
        return self.snapshot().taxonomy

    @property
    def predictor(self):
        """The predictor of the version of now (the backend ``backend`` chose)."""
        return self.snapshot().predictor

    @property
    def metrics(self) -> dict:
        """Validation figures written at the end of training (empty without a validation split)."""
        return read_metrics(self.path)

    @property
    def classes_(self) -> list[str]:
        """The fine classes, in the order of ``predict_proba``'s columns (scikit-learn's name)."""
        return list(self.taxonomy.classes)

    @property
    def merged_classes(self) -> dict[str, str]:
        """Classes learned as an equivalent one (``hier train --merge-classes``): submission column -> class."""
        return read_config(self.path).get("merged_classes", {})

    def _embed(self, images: list, progress=None, tta: bool | None = None) -> tuple[dict, Snapshot]:
        """Predictor output and the snapshot (weights, taxonomy) that produced it."""
        snap = self.snapshot()
        predictor = snap.predictor
        if self.detector is not None:
            images, self.crop_fallback = self.detector.crops(list(images))
        if tta is not None and tta != predictor.tta:
            predictor = self.kind.predictor(self.path, snap.net, self.backend, tta, self.batch_size)
        return predictor(images, progress), snap

    # --- answers ------------------------------------------------------------------------------------
    @needs(EMBED)
    def embed(self, images: list, progress=None, tta: bool | None = None) -> dict[str, np.ndarray]:
        """Raw predictor output for photos: embedding, joint/fine/model/brand logits, probs, answer.
        ``tta`` overrides the artifact's setting (for answers only: enroll, index and similar always
        embed as the artifact was calibrated)."""
        return self._embed(images, progress, tta)[0]

    @needs(ANSWER)
    def predict(self, images, topk: int = 5, tta: bool | None = None, progress=None) -> Results:
        """Answer photos.

        Args:
            images: a path, folder, PIL image or array, a list of them, or an ``ImageSet``.
            topk: the likeliest fine classes listed per photo.
            tta: override the artifact's flip TTA.

        Returns:
            ``Results``: a ``Prediction`` per photo (brand, model, fine class, years, probabilities).

        Raises:
            HierError: a missing or unreadable photo, ``topk`` below 1.
        """
        if topk < 1:
            raise HierError(f"topk must be at least 1, not {topk}")
        items = photo_items(images)
        start = time.perf_counter()
        self.snapshot().predictor               # the model read and compiled: once, and when the artifact changes
        loaded = time.perf_counter()
        out, snap = self._embed(items, progress, tta)
        results = results_of(out, [photo_name(x, i) for i, x in enumerate(items)], snap.taxonomy, topk)
        results.speed = {"photos": len(items), "load_ms": 1000 * (loaded - start),
                         "ms_per_photo": 1000 * (time.perf_counter() - loaded) / max(1, len(items))}
        return results

    @needs(ANSWER)
    def predict_proba(self, images, tta: bool | None = None, progress=None) -> np.ndarray:
        """(N, C) calibrated fine-class probabilities, columns in ``classes_`` order (scikit-learn's
        convention); brand and model probabilities are sums of columns (``taxonomy.marginals``).

        Example:
            >>> probs = rec.predict_proba(["a.jpg", "b.jpg"])     # probs.sum(1) == 1
        """
        return self._embed(photo_items(images), progress, tta)[0]["probs"]

    @needs(ANSWER)
    def evaluate(self, data: str | Path, tta: bool | None = None, progress=None, layout: str = "auto") -> dict:
        """The figures ``hier evaluate`` prints, on a labelled dataset (``hier.data.readers`` layouts).

        Returns:
            {"top1", "log_loss", "top5", "brand_acc", "model_acc", "ece", ...} of the served answer.

        Raises:
            HierError: a class of ``data`` the artifact does not know.
        """
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

    @needs(ANSWER)
    def submission(self, test_csv: str | Path | ImageSet, sample_submission: str | Path, out: str | Path,
                   tta: bool | None = None, progress=None) -> pd.DataFrame:
        """A competition submission in the sample file's column and row order, written to ``out``.

        Args:
            test_csv: the ``ID,img_path`` CSV, or ``read_test_csv``'s checked result.
            sample_submission: the organiser's sample (its columns, row order and encoding are kept).
            out: the CSV to write (atomically).

        Returns:
            The submission table (probabilities floored, rows summing to 1; merged classes split).

        Raises:
            HierError: a CSV that does not read or does not match, a class the artifact lacks.

        Example:
            >>> rec.submission("test.csv", "sample_submission.csv", "submission.csv")
        """
        inputs = test_csv if isinstance(test_csv, ImageSet) else read_test_csv(test_csv)
        sample = read_sample(sample_submission, inputs.ids, self.taxonomy, self.merged_classes)   # before any photo
        scores, snap = self._embed(inputs.paths, progress, tta)
        return write_submission(scores["probs"], inputs.ids, snap.taxonomy, sample, out, self.merged_classes)

    @needs(ANSWER)
    def report(self, data: str | Path, out: str | Path, layout: str = "auto", progress=None) -> dict:
        """``out/index.html`` (+ PNGs, metrics.json) judging the artifact on labelled photos
        (``hier.report``); without activation maps where the kind cannot draw them (an ensemble)."""
        from hier.report import report  # matplotlib and scikit-learn: a predicting process does without
        cams = {} if EXPLAIN in self.kind.capabilities else {"cams": 0}
        return report(self, data, out, layout, progress=progress, **cams)

    @needs(EXPLAIN)
    def explain(self, images, out: str | Path) -> list[Path]:
        """``out/<photo name>.png`` per photo: the class-activation map of its top-1 answer over it."""
        from hier.report import save_overlays  # matplotlib: a predicting process does without
        items = photo_items(images)
        names = [Path(x).stem if isinstance(x, (str, Path)) else f"image{i}" for i, x in enumerate(items)]
        names = [n if names.count(n) == 1 else f"{n}_{i}" for i, n in enumerate(names)]
        return save_overlays(self.net, items, Path(out), names)

    @needs(EXPORT)
    def export(self, format: str = "onnx", int8: bool = False, data=None, photos: int | None = None,
               keep_float: tuple[str, ...] = ("stem", "head"), reduce_range: bool = True):
        """ARTIFACT/model.onnx: the trunk and embedding, run by ONNX Runtime from then on; the heads stay
        in PyTorch, so enrolling needs no re-export, retraining does (a stale export is written again on
        first use). ``int8``: also model.int8.onnx (``hier.export.export_int8``; returns its config.json
        record, with what it changes on the validation photos), for ``backend="onnx-int8"``."""
        if format != "onnx":
            raise HierError(f"unknown export format {format!r}; onnx is the one supported")
        out = export_int8(self.path, data, photos or CALIBRATION_PHOTOS, keep_float, reduce_range) if int8 \
            else export(self.path)
        self._held.loaded = None
        return out

    # --- changes: each holds the artifact's lock from reading to its atomic save; the next answer sees
    # them, as the artifact changed on disk ------------------------------------------------------------
    @needs(EDIT)
    def enroll(self, name: str, images, brand: str | None = None, model: str | None = None,
               years: str | None = None, add_shots: bool = False, min_shots: int = 1,
               calibrate: float = 0.0, max_base_drop: float = enrollment.MAX_BASE_DROP) -> enrollment.Enrolled:
        """A new class from a few photos, no retraining (``hier.enrollment.classes``).

        Args:
            name: the class (e.g. ``신형모델_2025``); brand, model and years are read from it where they can be.
            images: shot paths or folders.
            brand, model, years: what the name does not tell (``years``: ``2025-2026``).
            add_shots: add photos to an existing (base or enrolled) class.
            max_base_drop: the points of accuracy on known classes' photos the class may cost.

        Returns:
            ``Enrolled``: shots added, its offset, the share of its shots now answered as it.

        Example:
            >>> Recognizer("runs/x").enroll("그랜저_GN7_2025_2026", "shots/", brand="현대")
        """
        images = images if isinstance(images, (list, tuple)) else [images]
        return enrollment.enroll(self.path, name, images, brand, model, years, add_shots, min_shots,
                                 enrollment.Calibration(calibrate), max_base_drop)

    @needs(EDIT)
    def unenroll(self, name: str) -> enrollment.Unenrolled:
        """Remove an enrolled class (or the shots added to a base class: its trained state comes back).

        Raises:
            HierError: ``name`` is not an enrolled class.
        """
        return enrollment.unenroll(self.path, name)

    # --- training -----------------------------------------------------------------------------------
    @classmethod
    def train(cls, data: str | Path, out: str | Path, preset: str | None = None, taxonomy=None,
              resume: bool = False, console=None, **flags: Unpack[TrainFlags]) -> "Recognizer":
        """Train on a folder-per-class dataset into ``out`` and hold the result.

        Args:
            data: a labelled dataset (folder per class, or another ``hier.data.readers`` layout).
            out: an empty (or absent) folder for the artifact.
            preset: a named flag set (``cpu``, ``cpu-cached``, ``cpu-max``).
            taxonomy: a ``Taxonomy`` or its CSV (default: parsed from the class names).
            resume: continue the run in ``out`` (only ``epochs``, to extend it, is taken from ``flags``).
            flags: the ``hier train`` options (``epochs=``, ``trunk=``, ``freeze_stages=``...; their
                names and types: ``hier.training.config.TrainFlags``).

        Raises:
            HierError: an unknown flag, a value out of range, a dataset or ``out`` hier cannot use.

        Example:
            >>> rec = Recognizer.train("data/train", out="runs/x", preset="cpu")
        """
        from hier.training import TrainConfig, configs, train  # the training stack: predicting does without
        from hier.training.run import check_resume_flags
        if isinstance(taxonomy, (str, Path)):
            taxonomy = Taxonomy.from_csv(taxonomy)
        flags = {k: v for k, v in flags.items() if v is not None}
        if resume:
            check_resume_flags(Path(out), preset, taxonomy, flags)
            epochs = flags.get("epochs")
            train(data, out, None, None, TrainConfig(epochs=epochs) if epochs else None, True, console)
        else:
            model_cfg, train_cfg = configs(preset, **flags)
            train(data, out, taxonomy, model_cfg, train_cfg, console=console)
        return cls(out)
