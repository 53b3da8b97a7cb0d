"""The artifact directory: the one thing that moves between commands.

``model.safetensors`` + ``config.json`` (model config, temperature, metrics) + ``taxonomy.csv``
(+ ``gallery/`` and ``prototypes.npy`` once enrollment and search are used). Every file is written to a
temporary name and renamed, so a crash mid-write never leaves a half-written artifact.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from hier.errors import HierError
from hier.model import HierNet, ModelConfig
from hier.taxonomy import Taxonomy

WEIGHTS, CONFIG, TAXONOMY = "model.safetensors", "config.json", "taxonomy.csv"


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temp file beside ``path``, then rename it over ``path``."""
    atomic_write_all({Path(path): write})


def atomic_write_all(writers: dict[Path, Callable[[Path], None]]) -> None:
    """Write every file to a temp name first and rename them only once all writes succeeded, so a
    failure leaves the old files untouched and the new set lands together."""
    temps = {}
    try:
        for path, write in writers.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            temps[path] = Path(tmp)
            write(temps[path])
        for path, tmp in temps.items():
            os.replace(tmp, path)
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)


def save_npy(path: Path, array) -> None:
    """np.save through a file object: given a name, np.save would append .npy to a temp file's name."""
    import numpy as np
    with path.open("wb") as f:
        np.save(f, np.asarray(array, dtype=np.float32))


def save(out: str | Path, model: HierNet, taxonomy: Taxonomy, metrics: dict | None = None,
         extra: dict | None = None, files: dict[str, Callable[[Path], None]] | None = None) -> None:
    """Write weights, taxonomy and config; keys of an existing config.json (metrics, enrolled classes)
    are kept unless given again."""
    out = Path(out)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    config = read_config(out) if (out / CONFIG).is_file() else {"metrics": {}}
    config.update(extra or {}, model=model.cfg.to_dict())
    if metrics is not None:
        config["metrics"] = metrics
    atomic_write_all({out / WEIGHTS: lambda p: save_file(state, str(p)), out / TAXONOMY: taxonomy.to_csv,
                      out / CONFIG: lambda p: p.write_text(json.dumps(config, indent=2, ensure_ascii=False)),
                      **{out / name: w for name, w in (files or {}).items()}})


def read_config(path: str | Path) -> dict:
    return json.loads((Path(path) / CONFIG).read_text())


def load(path: str | Path, device: str = "cpu") -> tuple[HierNet, Taxonomy]:
    """Model (eval mode) and taxonomy from an artifact directory."""
    path = Path(path)
    missing = [f for f in (WEIGHTS, CONFIG, TAXONOMY) if not (path / f).is_file()]
    if missing:
        raise HierError(f"{path} is not a hier artifact (missing {', '.join(missing)})")
    cfg = ModelConfig.from_dict(read_config(path)["model"])
    taxonomy = Taxonomy.from_csv(path / TAXONOMY)
    model = HierNet(cfg, taxonomy, pretrained="none")
    model.load_state_dict(load_file(path / WEIGHTS), strict=True)
    return model.to(device).eval(), taxonomy
