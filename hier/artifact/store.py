"""Reading and writing an artifact's model: weights, heads, config, taxonomy and class statistics.

``model.safetensors`` (the trunk and embedding: immutable after training) + ``heads.safetensors`` (the
rows that follow the taxonomy, keyed by class/model/brand name) + ``config.json`` (model config,
temperature, metrics, the trunk's fingerprint) + ``taxonomy.csv`` + ``statistics.safetensors`` (the serving head's class statistics, written by
``hier train`` and updated by ``hier enroll``) (+ ``gallery/`` once search is used). Every file is written to a
temporary name and renamed, so a crash mid-write never leaves a half-written artifact; and every reader
and writer holds the artifact's lock file (``.hier.lock``), so two commands never interleave a
read-modify-write (both enrolls land) and a reader never sees weights of one version with the taxonomy
of another. Text files (JSON, CSV) are UTF-8 whatever the locale.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

from hier.artifact.files import CONFIG, HEAD_PARTS, HEADS, MEMBERS, STATISTICS, TAXONOMY, WEIGHTS, is_ensemble, missing
from hier.errors import ArtifactGone, HierError, HierWarning
from hier.fileio import atomic_write_all, file_stamp, locked, read_json, write_json
from hier.models import HierNet, ModelConfig
from hier.models.statistics import ClassStatistics
from hier.taxonomy import Taxonomy


def save(out: str | Path, model: HierNet, taxonomy: Taxonomy, metrics: dict | None = None,
         extra: dict | None = None, files: dict[str, Callable[[Path], None]] | None = None,
         remove: tuple[str, ...] = ()) -> None:
    """Write the heads, taxonomy and config, and the trunk weights when they are not already those on
    disk (training; an artifact of the older one-file layout): enrolling rewrites kilobytes, not the
    trunk. Keys of an existing config.json (metrics, enrolled classes) are kept unless given again.
    ``files``: more files of the artifact written in the same set ({name: writer}); ``remove``: its files
    the new version no longer has. Everything commits in one step (``fileio.atomic_write_all``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    trunk = {k: v for k, v in state.items() if not k.startswith(HEAD_PARTS)}
    heads = {k: v for k, v in state.items() if k.startswith(HEAD_PARTS)}
    with locked(out):
        config = read_config(out) if (out / CONFIG).is_file() else {"metrics": {}}
        same_trunk = (out / HEADS).is_file() and (out / WEIGHTS).is_file() and \
            config.get("fingerprint") == model.fingerprint()
        config.update(extra or {}, model=model.cfg.to_dict(), fingerprint=model.fingerprint())
        if metrics is not None:
            config["metrics"] = metrics
        writes = {out / HEADS: lambda p: p.write_bytes(safetensors_bytes(
                      heads, metadata={part: json.dumps(list(names), ensure_ascii=False)
                                       for part, names in head_rows(taxonomy).items()})),
                  out / TAXONOMY: taxonomy.to_csv, out / CONFIG: lambda p: write_json(p, config),
                  **{out / name: w for name, w in (files or {}).items()}}
        if not same_trunk:
            writes[out / WEIGHTS] = lambda p: p.write_bytes(safetensors_bytes(trunk))
        # bytes written by Python, not safetensors' own writer: a full disk then raises OSError(ENOSPC)
        atomic_write_all(writes, [out / name for name in remove if (out / name).exists()])


def head_rows(taxonomy: Taxonomy) -> dict[str, list[str]]:
    """The names of each head's rows, in order: what ``HEADS`` stores beside the rows."""
    return {"fine": taxonomy.classes, "model": taxonomy.models, "brand": taxonomy.brands}


def _heads_by_name(path: Path, taxonomy: Taxonomy) -> dict:
    """``heads.safetensors`` with its rows put in ``taxonomy``'s order by their names (the file lists
    the class, model and brand of each row): a row never lands on another class by position."""
    with safe_open(path, "pt") as f:
        names = {part: json.loads(v) for part, v in (f.metadata() or {}).items()}
        state = {k: f.get_tensor(k) for k in f.keys()}
    for part, wanted in head_rows(taxonomy).items():
        saved = names.get(part, [])
        where = {n: i for i, n in enumerate(saved)}
        missing = [n for n in wanted if n not in where]
        if missing or len(saved) != len(wanted):
            raise HierError(f"{path.parent} is damaged: {HEADS} does not hold the {part} rows of its taxonomy.csv "
                            f"({len(missing)} missing, e.g. {missing[0]!r})" if missing else
                            f"{path.parent} is damaged: {HEADS} has {len(saved)} {part} rows, taxonomy.csv {len(wanted)}")
        index = torch.tensor([where[n] for n in wanted], dtype=torch.long)
        for k in [k for k in state if k.startswith(f"{part}.") and state[k].ndim >= 1]:
            state[k] = state[k][index]
    return state


def stamp(path: str | Path) -> tuple:
    """The version of the artifact on disk: every save (train, enroll, unenroll, export) rewrites
    config.json in its atomic set, so its (inode, mtime, size) changes with each one."""
    found = file_stamp(Path(path) / CONFIG)
    if found[0] is None:
        raise ArtifactGone(f"{path} is no longer a hier artifact (no {CONFIG})")
    return found


class Version(NamedTuple):
    """One version of the artifact in memory, read under one lock: what a call uses from start to end."""

    stamp: tuple
    net: HierNet
    taxonomy: Taxonomy


def snapshot(path: str | Path, device: str = "cpu") -> Version:
    """The artifact's version of now (``stamp``) with its net and taxonomy, read under its lock."""
    check_artifact(path)                # before the lock: a folder that is no artifact gets no lock file
    with locked(path):
        return Version(stamp(path), *load(path, device))


def check_artifact(path: str | Path) -> Path:
    """``path`` as a Path when it holds one artifact; else HierError naming what it is (an ensemble) or
    lacks (the missing files)."""
    path = Path(path)
    if is_ensemble(path):
        raise HierError(f"{path} is an ensemble, not one artifact: this command takes one of its members "
                        f"({path / MEMBERS}/<i>) or the artifact it was built from")
    lacks = missing(path)
    if lacks:
        raise HierError(f"{path} is not a hier artifact (missing {', '.join(lacks)})")
    return path


def check_writable(path: str | Path) -> Path:
    """``check_artifact``, and not a member of an ensemble: a member changed after the ensemble was built
    would no longer be what the ensemble's weights were fitted on (every command on it says it is damaged)."""
    path = check_artifact(path)
    parent = Path(os.path.realpath(path)).parent
    if parent.name == MEMBERS and is_ensemble(parent.parent):
        raise HierError(f"{path} is a member of the ensemble {parent.parent}: change the artifact it was built "
                        "from, then build the ensemble again")
    return path


def read_config(path: str | Path) -> dict:
    return read_json(Path(path) / CONFIG)


def load(path: str | Path, device: str = "cpu") -> tuple[HierNet, Taxonomy]:
    """Model (eval mode) and taxonomy from an artifact directory, read under its lock."""
    path = check_artifact(path)
    with locked(path):
        config = read_config(path)
        taxonomy = Taxonomy.from_csv(path / TAXONOMY)
        try:
            state = load_file(path / WEIGHTS)
            if (path / HEADS).is_file():            # else the one-file layout of older artifacts
                state.update(_heads_by_name(path / HEADS, taxonomy))
        except (SafetensorError, json.JSONDecodeError, IndexError, TypeError, ValueError) as e:
            raise HierError(f"{path} is damaged: its weights do not read ({str(e)[:120]}); copy it again or "
                            "retrain") from None
        statistics = ClassStatistics.load(path / STATISTICS) if (path / STATISTICS).is_file() else None
    model = HierNet(ModelConfig.from_dict(config["model"]), taxonomy, pretrained="none")
    model.offsets = {e["class"]: e["offset"] for e in config.get("enrolled", []) if e.get("offset")}
    if not (path / HEADS).is_file() and not any(k.startswith(HEAD_PARTS) for k in state):
        raise HierError(f"{path} is damaged: {HEADS} is missing (the head rows); copy the artifact again")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise HierError(f"{path} is damaged: its weights do not fit its taxonomy.csv "
                        f"({str(e).splitlines()[-1].strip()[:160]})") from None
    if model.cfg.head != "statistics":
        if "fingerprint" not in config:
            warnings.warn(f"{path} was trained by an older hier, without class statistics: it answers with its "
                          "trained head and enrolls by mapped prototypes; retrain it for the statistical head "
                          "(better on base and enrolled classes alike)", HierWarning, stacklevel=2)
        statistics = None
    elif statistics is None or statistics.fingerprint != config.get("fingerprint"):
        warnings.warn(f"{path}: {'its' if statistics is None else 'stale'} class statistics ({STATISTICS}) "
                      f"{'are missing' if statistics is None else 'were computed for other weights'} (a training "
                      "run that has not finished?), so it answers with its trained head", HierWarning, stacklevel=2)
        statistics = None
    model.set_statistics(statistics, taxonomy)          # the offsets and the serving head, once
    return model.to(device).eval(), taxonomy
