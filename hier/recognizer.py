"""``Recognizer``: an artifact held in memory, and everything a user does with it.

    rec = Recognizer("runs/stanford")
    preds = rec.predict(["a.jpg", pil_image, array], topk=5)
    preds[0].brand, preds[0].model, preds[0].fine, preds[0].p
    rec.enroll("신형모델_2025", "shots/", brand="현대")
    rec.similar("query.jpg", k=10, same_brand=True)
    rec.evaluate("data/val")
    Recognizer.train("data/train", out="runs/x", preset="cpu")

The CLI, the demo (and later the service) are thin layers over it. Every photo goes through one
``Predictor`` with the artifact's TTA and temperature. A long-lived recognizer notices when its artifact
changed on disk (another process ran ``hier enroll``) and reloads before answering.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from hier import artifact, enroll as enrollment, index as gallery_ops
from hier.data import ImageSet, image_files, read_test_csv
from hier.data.detect import CarDetector
from hier.data.readers import create_reader
from hier.errors import HierError
from hier.infer import top_k, write_submission
from hier.metrics import decode, evaluate_probs
from hier.engine.predictor import Predictor, artifact_predictor, device


@dataclass
class Prediction:
    """One photo's answer: the consistent top-down path (brand -> model -> fine class) with its
    probabilities (P(fine) <= P(model) <= P(brand)), and the top-k fine classes."""

    image: str
    brand: str
    model: str
    fine: str
    years: str
    p: float
    p_model: float
    p_brand: float
    topk: list[dict] = field(default_factory=list)


class Results(list):
    """A list of ``Prediction``, one per photo, with table and JSON views."""

    def to_frame(self) -> pd.DataFrame:
        """One row per (photo, rank), as ``hier predict --format csv`` prints."""
        return pd.DataFrame([{"image": r.image, **row} for r in self for row in r.topk])

    def to_json(self) -> str:
        return json.dumps([asdict(r) for r in self], ensure_ascii=False, indent=1)


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


class Recognizer:
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
        missing = [f for f in (artifact.WEIGHTS, artifact.CONFIG, artifact.TAXONOMY) if not (self.path / f).is_file()]
        if missing:
            raise HierError(f"{self.path} is not a hier artifact (missing {', '.join(missing)})")
        self._loaded = None        # (stamp, net, taxonomy, predictor), read on first use

    # --- the artifact in memory: read on first use, again whenever it changed on disk ----------------
    def _disk_stamp(self):
        try:
            st = (self.path / artifact.CONFIG).stat()
        except FileNotFoundError:
            raise HierError(f"{self.path} is no longer a hier artifact") from None
        return st.st_ino, st.st_mtime_ns

    def reload(self) -> "Recognizer":
        """Read the artifact now (done by itself on first use and whenever it changed on disk)."""
        stamp = self._disk_stamp()
        net, taxonomy = artifact.load(self.path, self.device)
        self._loaded = (stamp, net, taxonomy, artifact_predictor(self.path, net, self.backend,
                                                                 batch_size=self.batch_size))
        return self

    def _current(self):
        if self._loaded is None or self._loaded[0] != self._disk_stamp():
            self.reload()
        return self._loaded

    @property
    def net(self):
        return self._current()[1]

    @property
    def taxonomy(self):
        return self._current()[2]

    @property
    def predictor(self) -> Predictor:
        return self._current()[3]

    @property
    def metrics(self) -> dict:
        """Validation figures written at the end of training (empty without a validation split)."""
        f = self.path / "metrics.json"
        return json.loads(f.read_text()) if f.is_file() else {}

    def embed(self, images: list, progress=None, tta: bool | None = None) -> dict[str, np.ndarray]:
        """Raw predictor output for photos: embedding, joint/fine/model/brand logits, probs. ``tta``
        overrides the artifact's setting (for answers only: enroll, index and similar always embed as
        the artifact was calibrated)."""
        return self._embed(images, progress, tta)[0]

    def _embed(self, images: list, progress=None, tta: bool | None = None):
        """Predictor output and the taxonomy of the very weights that produced it."""
        _, net, taxonomy, predictor = self._current()
        if self.detector is not None:
            images, self.crop_fallback = self.detector.crops(list(images))
        if tta is not None and tta != predictor.tta:
            predictor = artifact_predictor(self.path, net, self.backend, tta=tta, batch_size=self.batch_size)
        return predictor(images, progress), taxonomy

    # --- answers ------------------------------------------------------------------------------------
    def predict(self, images, topk: int = 5, tta: bool | None = None, progress=None) -> Results:
        """Paths, folders, PIL images, arrays or an ``ImageSet`` -> ``Results``."""
        if topk < 1:
            raise HierError(f"topk must be at least 1, not {topk}")
        items = _expand(images)
        out, tax = self._embed(items, progress, tta)
        probs = out["probs"]
        model_p, brand_p = tax.marginals(probs)
        brand, model, fine = decode(probs, tax)
        names = [_name(x, i) for i, x in enumerate(items)]
        table = top_k(probs, tax, names, topk)
        results = Results()
        for i, name in enumerate(names):
            c = tax.classes[fine[i]]
            results.append(Prediction(
                image=name, brand=tax.brands[brand[i]], model=tax.models[model[i]], fine=c, years=tax.years(c),
                p=float(probs[i, fine[i]]), p_model=float(model_p[i, model[i]]), p_brand=float(brand_p[i, brand[i]]),
                topk=table[table["image"] == name].drop(columns="image").to_dict("records")))
        return results

    def evaluate(self, data: str | Path, tta: bool | None = None, progress=None, layout: str = "auto") -> dict:
        """The figures ``hier evaluate`` prints, on a labelled dataset (``hier.data.readers`` layouts)."""
        images, _ = create_reader(data, layout)()
        unknown = sorted({c for c in images.labels if c not in self.taxonomy})
        if unknown:
            raise HierError(f"class {unknown[0]!r} of {data} is not in the artifact's taxonomy "
                            f"({len(unknown)} unknown)")
        out, tax = self._embed(images.paths, progress, tta)
        y = np.array([tax.class_index[c] for c in images.labels])
        metrics = evaluate_probs(out["probs"], y, tax, logits=out["joint"], heads=out)
        metrics["temperature"] = self.net.cfg.temperature
        metrics["skipped"] = images.skipped_message()
        return metrics

    def submission(self, test_csv: str | Path | ImageSet, sample_submission: str | Path, out: str | Path,
                   tta: bool | None = None, progress=None) -> pd.DataFrame:
        """A competition submission in the sample file's column and row order (``test_csv``: the
        ``ID,img_path`` CSV, or ``read_test_csv``'s checked result)."""
        inputs = test_csv if isinstance(test_csv, ImageSet) else read_test_csv(test_csv)
        scores, tax = self._embed(inputs.paths, progress, tta)
        return write_submission(scores["probs"], inputs.ids, tax, sample_submission, out)

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

    def export(self, format: str = "onnx") -> Path:
        """ARTIFACT/model.onnx: the trunk and embedding (with the flipped view when the artifact serves
        with TTA), run by ONNX Runtime from then on; the heads stay in PyTorch, so enrolling needs no
        re-export, retraining does (a stale export is ignored)."""
        if format != "onnx":
            raise HierError(f"unknown export format {format!r}; onnx is the one supported")
        from hier.engine.predictor import export
        out = export(self.path)
        self._loaded = None
        return out

    def similar(self, image, k: int = 10, same_brand: bool = False) -> pd.DataFrame:
        """The k nearest listings (sellers' columns + hier_*), best first (``Gallery.results`` checks k)."""
        gallery = gallery_ops.Gallery.load(self.path)
        out, tax = self._embed(_expand(image)[:1])
        where = None
        if same_brand:
            brand = tax.brands[decode(out["probs"], tax)[0][0]]
            where = lambda rows: rows[gallery_ops.BRAND] == brand  # noqa: E731
        return gallery.results(out["embedding"], k, where)[0].drop(columns=[gallery_ops.ID])

    # --- changes: each holds the artifact's lock from reading to its atomic save; the next answer sees
    # them, as the artifact changed on disk ------------------------------------------------------------
    def enroll(self, name: str, images, brand: str | None = None, model: str | None = None,
               years: str | None = None, add_shots: bool = False, min_shots: int = 1,
               calibrate: float = 0.0, max_base_drop: float = enrollment.MAX_BASE_DROP) -> dict:
        """A new class from a few photos (``hier.enroll.enroll``): it is expected to cost at most
        ``max_base_drop`` points of accuracy on photos of the known classes."""
        images = images if isinstance(images, (list, tuple)) else [images]
        return enrollment.enroll(self.path, name, images, brand, model, years, add_shots, min_shots,
                                 enrollment.Calibration(calibrate), max_base_drop)

    def unenroll(self, name: str) -> dict:
        return enrollment.unenroll(self.path, name)

    def index(self, listings, kind: str = "flat", progress=None) -> gallery_ops.Gallery:
        """(Re)build the similar-listing index from a folder, a CSV or a ``read_listings`` table."""
        return gallery_ops.build(self.path, listings, kind, progress)

    def index_add(self, listings, progress=None) -> tuple[int, gallery_ops.Gallery]:
        return gallery_ops.add(self.path, listings, progress)

    def index_remove(self, ids: list[str]) -> tuple[int, gallery_ops.Gallery]:
        return gallery_ops.remove(self.path, ids)

    # --- training -----------------------------------------------------------------------------------
    @classmethod
    def train(cls, data: str | Path, out: str | Path, preset: str | None = None, taxonomy=None,
              resume: bool = False, console=None, **flags) -> "Recognizer":
        """Train on a folder-per-class dataset into ``out`` and hold the result. ``flags`` are the
        ``hier train`` options (``epochs=``, ``trunk=``, ``freeze_stages=``...); with ``resume`` only
        ``epochs`` (to extend the run) is taken."""
        from hier.taxonomy import Taxonomy
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


def _check_resume_flags(out: Path, preset, taxonomy, flags: dict) -> None:
    """``--resume`` continues a run with its saved settings: repeating them is fine, changing one (other
    than a larger ``--epochs``) is refused rather than silently ignored."""
    if preset is not None or taxonomy is not None:
        raise HierError("--resume uses the run's saved settings and taxonomy; drop --preset / --taxonomy")
    saved_file = out / "train.json"
    saved = json.loads(saved_file.read_text()) if saved_file.is_file() else {"model": {}, "train": {}}
    for key, value in flags.items():
        if key == "epochs":
            continue
        was = saved["model"].get(key, saved["train"].get(key, value))
        if was != value:
            raise HierError(f"--resume keeps the run's saved settings: --{key.replace('_', '-')} {value} differs "
                            f"from the saved {was}; train into a new --out to change it")
