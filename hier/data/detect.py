"""Car crops with an ultralytics detector: the largest car / bus / truck box of a photo, with a margin.

``CarDetector(weights)`` loads any ultralytics detection weights (``YOLO(path, task="detect")``: a
``yolov8n.pt`` / ``yolo11n.pt``, or the offline int8 TFLite export in ``../shared/models``, which needs
the ``ai-edge-litert`` package). Boxes are cached by the photo's content hash (MD5), so a photo is
detected once whatever its name. A photo with no vehicle keeps its full frame, and that fallback is
counted. ``crop_folder`` writes cropped copies of a dataset (``hier crop``); ``crops`` turns photos into
``Crop`` items for ``--crop yolo`` on train and predict.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image

from hier import fileio
from hier.data.files import image_files
from hier.data.images import Crop, to_rgb
from hier.errors import HierError
from hier.fileio import file_md5 as md5

VEHICLES = {"car", "bus", "truck"}     # COCO classes 2, 5, 7
MARGIN = 0.08                          # of the box's width and height, on every side: keep the badge and wheels
CACHE = Path(os.environ.get("HIER_CACHE", Path.home() / ".cache" / "hier"))


def _import_yolo():
    """``ultralytics.YOLO``, with PIL's own ``Image.open`` put back: ultralytics replaces it on import
    with one that, on any file Pillow cannot identify, tries to install and import pi-heif at run time
    (raising ModuleNotFoundError offline), which would turn hier's skip-and-count into a crash."""
    from PIL import Image
    original = Image.open
    from ultralytics import YOLO
    if getattr(original, "__module__", "").startswith("ultralytics"):       # imported by the user earlier
        import ultralytics.utils.patches as patches
        original = patches._image_open
    Image.open = original
    return YOLO


def _reason(e: Exception) -> str:
    """ultralytics' message for a file it cannot load, as one short line (its first sentence: the rest
    lists every format it knows)."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0].replace("ERROR ❌️", "").strip()
    text = text.split(". Ultralytics supports")[0]
    return text if len(text) <= 200 else text[:197] + "..."


def _read_cache(path: Path) -> dict:
    """Boxes found before, by photo MD5; a damaged cache (a crash mid-write elsewhere) is started over."""
    try:
        cache = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


class CarDetector:
    def __init__(self, weights: str | Path, conf: float = 0.25, imgsz: int = 640, cache: Path | None = None):
        weights = Path(weights)
        if not weights.is_file():
            raise HierError(f"detector weights not found: {weights}")
        try:
            YOLO = _import_yolo()
            self.model = YOLO(str(weights), task="detect")
            names = dict(self.model.names)      # ultralytics opens the weights lazily, here
        except (ImportError, ModuleNotFoundError) as e:
            raise HierError(f"cannot load detector {weights}: {e} (a .tflite detector needs "
                            "`pip install ai-edge-litert`)") from None
        except Exception as e:  # ultralytics raises many kinds for a file it cannot read
            raise HierError(f"cannot load detector {weights}: {_reason(e)}") from None
        self.vehicle_ids = {i for i, n in names.items() if n in VEHICLES}
        if not self.vehicle_ids:
            raise HierError(f"detector {weights} has no car/bus/truck class (names: {list(names.values())[:5]}...)")
        self.conf, self.imgsz = conf, imgsz
        self.cache_file = (cache or CACHE) / f"boxes-{md5(weights)[:12]}-{imgsz}-{conf}.json"
        self._cache = _read_cache(self.cache_file)

    def boxes(self, paths: list[Path], batch: int = 16) -> list[tuple | None]:
        """The widened largest vehicle box of each photo (x1, y1, x2, y2 of the upright photo), or None."""
        keys = [md5(p) for p in paths]
        todo = [i for i, k in enumerate(keys) if k not in self._cache]
        for s in range(0, len(todo), batch):
            chunk = todo[s:s + batch]
            frames = [to_rgb(paths[i])[..., ::-1] for i in chunk]          # ultralytics takes BGR arrays
            for i, frame, result in zip(chunk, frames, self.model.predict(frames, conf=self.conf, imgsz=self.imgsz,
                                                                          verbose=False)):
                self._cache[keys[i]] = self._largest(result, frame.shape)
        if todo:
            self.cache_file.parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps(self._cache)
            fileio.atomic_write(self.cache_file, lambda p: p.write_text(text, encoding="utf-8"))
        return [tuple(self._cache[k]) if self._cache[k] else None for k in keys]

    def _largest(self, result, shape) -> list | None:
        best = None
        for cls, xyxy in zip(result.boxes.cls.tolist(), result.boxes.xyxy.tolist()):
            if int(cls) in self.vehicle_ids:
                area = (xyxy[2] - xyxy[0]) * (xyxy[3] - xyxy[1])
                if best is None or area > best[0]:
                    best = (area, xyxy)
        if best is None:
            return None
        x1, y1, x2, y2 = best[1]
        dx, dy = MARGIN * (x2 - x1), MARGIN * (y2 - y1)
        h, w = shape[:2]
        return [max(0.0, x1 - dx), max(0.0, y1 - dy), min(float(w), x2 + dx), min(float(h), y2 + dy)]

    def crops(self, paths: list) -> tuple[list, float]:
        """Photos as ``Crop`` items (full photos where no vehicle was found), and the fallback rate."""
        files = [p for p in paths if isinstance(p, (str, Path))]
        found = dict(zip(map(str, files), self.boxes([Path(p) for p in files])))
        out = [Crop(Path(p), found[str(p)]) if isinstance(p, (str, Path)) and found[str(p)] else p for p in paths]
        return out, (sum(b is None for b in found.values()) / len(found) if found else 0.0)


def crop_names(data: Path, paths: list[Path], out: Path) -> list[tuple[Path, str]]:
    """Where each photo's crop goes, and in which format: the same path below ``out``, the same name, so
    ``a.jpg`` and ``a.png`` stay two files; a format PIL cannot write (``.heic``) or an unknown name
    gets ``.jpg`` appended. Two photos that would land on one name are refused before any work."""
    formats = Image.registered_extensions()
    names, where = [], {}
    for path in paths:
        dst = out / path.relative_to(data)
        fmt = formats.get(dst.suffix.lower())
        if fmt not in Image.SAVE:
            dst, fmt = dst.with_name(dst.name + ".jpg"), "JPEG"
        if dst in where:
            raise HierError(f"{where[dst]} and {path} would both be cropped to {dst}; rename one")
        where[dst] = path
        names.append((dst, fmt))
    return names


def crop_folder(data: Path, out: Path, detector: CarDetector, progress=None) -> dict:
    """Cropped copies of every photo under ``data`` (any layout, symlinked folders followed; the tree is
    mirrored under ``out`` with the same file names, ``crop_names``), full photos where nothing was
    detected. A crop never overwrites a file. Returns counts and the fallback rate."""
    data, out = Path(data), Path(out)
    if out.exists() and any(out.iterdir()):
        raise HierError(f"{out} is not empty; choose another --out")
    if out.resolve().is_relative_to(data.resolve()):
        raise HierError(f"--out {out} is inside {data}; choose a folder outside the data")
    photos = image_files([data])
    names = crop_names(data, photos.paths, out)
    task = progress.add_task("crop", total=len(photos.paths), info="") if progress else None
    fallback = 0
    for s in range(0, len(photos.paths), 64):
        chunk = photos.paths[s:s + 64]
        for path, box, (dst, fmt) in zip(chunk, detector.boxes(chunk), names[s:s + 64]):
            dst.parent.mkdir(parents=True, exist_ok=True)
            fallback += box is None
            crop = Image.fromarray(to_rgb(Crop(path, box) if box else path))
            try:
                with dst.open("xb") as f:                  # exclusive: never over an existing file
                    crop.save(f, format=fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))
            except FileExistsError:
                raise HierError(f"{dst} exists already (two photos map to one name on this disk); "
                                f"the crops so far are in {out}") from None
        if progress:
            progress.advance(task, len(chunk))
    return {"photos": len(photos.paths), "fallback": fallback, "fallback_rate": fallback / len(photos.paths),
            "skipped": photos.skipped_message()}
