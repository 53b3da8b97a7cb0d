"""The gallery on disk, ``ARTIFACT/gallery/``: whether there is one, its ``gallery.json``, its files, its
listing rows read without any index, and a ``Gallery`` saved (one atomic set, under the artifact's lock)
and loaded (checked against the artifact's weights; a gallery of an older hier migrated as it is read).

gallery.json holds the kind, the weights' fingerprint, the labels' digest, the next id, the shards and
their counts, and the digests tying each pq shard's vectors to its listings; each shard's files are
``SHARD_FILES`` (``BASE``'s in the folder itself), and ``TEMPLATE`` is the trained empty index every new
shard starts as."""
from __future__ import annotations

import warnings
from pathlib import Path

import faiss
import numpy as np
import pandas as pd

from hier import fileio
from hier.artifact.files import CONFIG, GALLERY, GALLERY_META, INDEX, LISTINGS, SHARD_FILES, SHARDS, TEMPLATE, VECTORS
from hier.errors import HierError, HierWarning
from hier.gallery.introspect import index_bytes, kind_of
from hier.gallery.kinds import KINDS
from hier.gallery.listings import AS_GIVEN, ID, PREFIX
from hier.gallery.shards import BASE, Shard, shard_folder
from hier.gallery.vectors import ids_digest, mapped_rows, prefetch, save_array, whole


def exists(artifact_dir: str | Path) -> bool:
    """Whether the artifact has a gallery (its base shard's index)."""
    return (Path(artifact_dir) / GALLERY / INDEX).is_file()


def read_meta(folder: Path, missing=None):
    """The gallery.json of the gallery in ``folder``; ``missing`` when there is none."""
    return fileio.read_json(folder / GALLERY_META) if (folder / GALLERY_META).is_file() else missing


def saved_gallery(artifact_dir: str | Path) -> Path:
    """ARTIFACT/gallery, or one line saying there is no index yet."""
    if not exists(artifact_dir):
        raise HierError(f"{artifact_dir} has no index; run `hier index build {artifact_dir} LISTINGS` first")
    return Path(artifact_dir) / GALLERY


def read_saved(folder: Path, artifact_dir, read):
    """``read()`` of one of the gallery's files; a missing, cut or foreign file is one line naming the
    rebuild, not a pandas or FAISS traceback."""
    try:
        return read()
    except (OSError, RuntimeError, ValueError, EOFError) as e:
        raise HierError(f"{folder} is damaged ({str(e).splitlines()[0][:120]}); build it again with "
                        f"`hier index build {artifact_dir} LISTINGS`") from None


def saved_rows(artifact_dir: str | Path, columns: list[str] | None = None) -> dict[str, pd.DataFrame]:
    """Each shard's listings.csv (only ``columns``), under the lock, no index read; HierError without
    a gallery."""
    folder = saved_gallery(artifact_dir)
    with fileio.locked(artifact_dir):
        meta = read_meta(folder, {})
        return {name: read_saved(folder, artifact_dir, lambda: pd.read_csv(
                    shard_folder(folder, name) / LISTINGS, encoding="utf-8", usecols=columns, **AS_GIVEN))
                for name in (meta.get("shards") or {BASE: None})}


def saved_listing_ids(artifact_dir: str | Path) -> set[str]:
    """The listing_ids of the saved gallery, every shard's (one column read, under the lock)."""
    return {i for rows in saved_rows(artifact_dir, ["listing_id"]).values() for i in rows["listing_id"].astype(str)}


def shard_counts(artifact_dir: str | Path) -> dict[str, int]:
    """Each shard's listings, from gallery.json (no index read)."""
    folder = saved_gallery(artifact_dir)
    with fileio.locked(artifact_dir):
        meta = read_meta(folder, {})
    listed = meta.get("shards")
    if not listed:
        return {name: len(rows) for name, rows in saved_rows(artifact_dir, ["listing_id"]).items()}
    return {name: int(n or 0) for name, n in listed.items()}


def gallery_files(artifact_dir: str | Path) -> list[Path]:
    """The files whose stamps say whether a held gallery is still what is on disk: index.faiss first
    (missing: no gallery), every shard's."""
    folder = Path(artifact_dir) / GALLERY
    files = [folder / f for f in SHARD_FILES] + [folder / GALLERY_META]
    if (folder / SHARDS).is_dir():
        files += [d / f for d in sorted((folder / SHARDS).iterdir()) for f in SHARD_FILES]
    return files


def save(gallery, artifact_dir: str | Path, only: list[str] | None = None) -> None:
    """gallery.json, the template and the files of the shards ``only`` names (default: every one)
    land together (one atomic set, gallery.json renamed last), under the artifact's lock; then the
    folders of shards no longer listed are removed (a crash before that leaves a folder nothing
    lists, removed by the next save)."""
    folder = Path(artifact_dir) / GALLERY
    names = list(gallery.shards) if only is None else only
    meta = {"kind": gallery.kind, "fingerprint": gallery.fingerprint, "labels": gallery.labels_digest,
            "next_id": gallery.next_id, "shards": {n: len(s) for n, s in gallery.shards.items()},
            "vectors": {n: d for n, s in gallery.shards.items() if (d := s.vectors_of()) is not None}}
    writers = {}
    for name in names:
        shard, at = gallery.shards[name], shard_folder(folder, name)
        # bytes written by Python, not FAISS's own writer: a full disk then raises OSError(ENOSPC)
        writers[at / INDEX] = lambda p, s=shard: p.write_bytes(index_bytes(s.index))
        writers[at / LISTINGS] = lambda p, s=shard: s.listings.to_csv(p, index=False, encoding="utf-8")
        if shard.exact is not None:
            writers[at / VECTORS] = lambda p, s=shard: save_array(p, whole(s.exact))
    with fileio.locked(artifact_dir):
        if only is None or not (folder / TEMPLATE).is_file():
            if gallery.template is None and gallery.loaded():
                gallery.empty_index()              # derived once from a gallery of an older hier
            if gallery.template is not None:
                writers[folder / TEMPLATE] = lambda p: p.write_bytes(gallery.template)
        writers[folder / GALLERY_META] = lambda p: fileio.write_json(p, meta)
        # a shard saved without re-rank vectors keeps none from before; shards no longer listed go
        removals = [shard_folder(folder, name) / VECTORS for name in names if gallery.shards[name].exact is None]
        if (folder / SHARDS).is_dir():
            removals += [old for old in (folder / SHARDS).iterdir() if old.name not in gallery.shards]
        fileio.atomic_write_all(writers, [p for p in removals if p.exists()])


def load(cls, artifact_dir: str | Path, only: list[str] | None = None):
    """The saved gallery (a ``cls``, i.e. ``Gallery``) on the CPU (``on_gpus`` for serving), refused when
    the artifact's weights are no longer those that embedded it (``hier train --resume`` since): its
    vectors would not be comparable with new queries. ``only``: the shards to read (the others are
    listed, not read: a writer of one shard never reads the rest; a gallery without a template reads
    ``BASE`` too, to make it)."""
    folder = saved_gallery(artifact_dir)
    with fileio.locked(artifact_dir):
        meta = read_meta(folder)
        weights = fileio.read_json(Path(artifact_dir) / CONFIG).get("fingerprint")
        template = (folder / TEMPLATE).read_bytes() if (folder / TEMPLATE).is_file() else None
        listed = (meta.get("shards") if isinstance(meta, dict) else None) or {BASE: None}
        vectors_of = meta.get("vectors") if isinstance(meta, dict) else None
        vectors_of = vectors_of if isinstance(vectors_of, dict) else {}
        wanted = set(listed if only is None else only) | ({BASE} if template is None else set())
        shards, legacy = {}, None
        for name, rows in listed.items():
            if name not in wanted:
                shards[name] = Shard(None, None, rows or 0, vectors_of=vectors_of.get(name))
                continue
            at = shard_folder(folder, name)
            listings = read_saved(folder, artifact_dir, lambda: pd.read_csv(at / LISTINGS, encoding="utf-8",
                                                                               **AS_GIVEN))
            index = read_saved(folder, artifact_dir, lambda: faiss.read_index(str(at / INDEX)))
            exact = read_saved(folder, artifact_dir, lambda: mapped_rows(at / VECTORS)) \
                if (at / VECTORS).is_file() else None
            if name == BASE and meta is None and ID not in listings and "kind" in listings:
                legacy, listings = _migrated(listings)
            shards[name] = (index, listings, exact)
    meta = legacy or meta
    if not isinstance(meta, dict) or meta.get("kind") not in KINDS or \
            any(ID not in s[1] for s in shards.values() if isinstance(s, tuple)):
        raise HierError(f"{folder} is damaged ({GALLERY_META} {'missing' if meta is None else 'unreadable'}, or "
                        f"{LISTINGS} without {ID}); build it again with `hier index build {artifact_dir} LISTINGS`")
    if meta.get("fingerprint") and weights and meta["fingerprint"] != weights:
        raise HierError(f"{artifact_dir}/{GALLERY} was embedded by other weights than the artifact's (trained "
                        f"again since?); re-embed its listings with `hier index rebuild {artifact_dir}`")
    if not meta.get("fingerprint"):
        warnings.warn(f"{artifact_dir}/{GALLERY} was built by an older hier, which did not record the weights it "
                      f"embedded with; if the artifact was trained again since, `hier index rebuild {artifact_dir}`",
                      HierWarning, stacklevel=3)
    for name, s in shards.items():
        if not isinstance(s, tuple):
            continue
        index, listings, exact = s
        ids = pd.to_numeric(listings[ID], errors="coerce")
        if ids.isna().any():
            raise HierError(f"{shard_folder(folder, name)}/{LISTINGS} has a {ID} that is not a number; build "
                            f"it again with `hier index build {artifact_dir} LISTINGS`")
        found = kind_of(index)
        if name != BASE and found != meta["kind"]:
            raise HierError(f"{folder} is damaged: shard {name!r} is {found or 'an unknown'} index, the gallery "
                            f"{meta['kind']}; drop it (`hier index drop {artifact_dir} {name}`) or build again")
        ids = ids.astype(np.int64)
        if index.ntotal != len(listings) or listed.get(name) not in (None, len(listings)):
            raise HierError(f"{folder} is damaged: shard {name!r}'s files are of two versions ({INDEX} holds "
                            f"{index.ntotal}, {LISTINGS} {len(listings)}, {GALLERY_META} {listed.get(name)}); "
                            f"`hier index rebuild {artifact_dir}` embeds its listings again")
        if meta["kind"] == "pq" and (exact is None or exact.shape != (len(listings), index.d)
                                     or not np.issubdtype(exact.dtype, np.floating)
                                     or vectors_of.get(name) != ids_digest(ids.to_numpy())):
            why = "is missing" if exact is None else "was not written with its listings"
            warnings.warn(f"{shard_folder(folder, name) / VECTORS} {why}: the gallery is searched by its codes "
                          f"alone, less exactly; `hier index rebuild {artifact_dir}` writes it again",
                          HierWarning, stacklevel=3)
            exact = None
        shards[name] = Shard(index, listings.assign(**{ID: ids}), exact=exact)
        if exact is not None:
            prefetch(shard_folder(folder, name) / VECTORS)
    next_id = meta.get("next_id")
    if next_id is None:                    # before shards: one index, its largest id + 1
        ids = shards[BASE].listings[ID]
        next_id = int(ids.max()) + 1 if len(ids) else 0
    read = [s.listings[ID] for s in shards.values() if s.listings is not None]
    every = pd.concat(read) if read else pd.Series([], dtype=np.int64)
    if every.duplicated().any() or (len(every) and int(every.max()) >= int(next_id)):
        raise HierError(f"{folder} is damaged: its shards and {GALLERY_META} are of two versions (a listing id "
                        f"{'is in two shards' if every.duplicated().any() else 'past the next id'}); "
                        f"`hier index rebuild {artifact_dir}` embeds its listings again")
    return cls(shards, meta["kind"], meta.get("fingerprint"), meta.get("labels"), template, int(next_id))


def _migrated(listings: pd.DataFrame) -> tuple[dict, pd.DataFrame]:
    """A base listings.csv written before hier_* columns and gallery.json (id/class/brand/model/kind were
    hier's): the gallery.json it stands for, and the listings with hier's columns renamed."""
    legacy = {"kind": listings.pop("kind").iloc[0] if len(listings) else "flat"}
    return legacy, listings.rename(columns={c: PREFIX + c for c in ("id", "class", "brand", "model")})
