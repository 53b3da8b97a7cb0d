"""Every file name of an artifact directory: the one place they are spelled.

An artifact is a folder that moves between commands. ``hier train`` writes the weights, heads, config,
taxonomy and class statistics; ``hier enroll`` rewrites the heads, statistics and enrollment state;
``hier export`` adds ONNX files; ``hier index`` adds ``gallery/``; ``hier ensemble`` writes a folder of
member artifacts instead (``ENSEMBLE``). The lock file is the generic per-folder lock of
``hier.fileio`` (``fileio.LOCK``).
"""
from __future__ import annotations

from pathlib import Path

# --- the model: written by `hier train`, heads and statistics rewritten by `hier enroll` ---------------
WEIGHTS = "model.safetensors"      # the trunk and embedding: immutable after training
HEADS = "heads.safetensors"        # the rows that follow the taxonomy, keyed by name; all enrollment rewrites
HEAD_PARTS = ("fine.", "model.", "brand.")   # HierNet's parameters in HEADS (the rest: the trunk, in WEIGHTS)
CONFIG = "config.json"             # model config, temperature, metrics, fingerprint, enrolled classes, exports
TAXONOMY = "taxonomy.csv"
STATISTICS = "statistics.safetensors"   # the serving head's class statistics (``hier.models.statistics``)
REQUIRED = (WEIGHTS, CONFIG, TAXONOMY)  # a folder without one of these is not an artifact

# --- the training run ---------------------------------------------------------------------------------
TRAIN_RUN = "train.json"           # the run's settings and data folder: what --resume and --int8 read
CHECKPOINT = "checkpoint.pt"       # the last epoch's state, for --resume
LOG = "log.csv"                    # one row per epoch
CURVES = "curves.png"              # LOG drawn at the end of the run
METRICS = "metrics.json"           # the validation figures of the end of training
OOF = "oof.npz"                    # the validation photos' served scores: what `hier ensemble` fits weights on
VALIDATION = "validation.npz"      # held-out base photos' embeddings: what enrollment sets offsets on

# --- enrollment into an artifact served by its trained head -------------------------------------------
PROTOTYPES = "prototypes.npy"      # base-class mean embeddings, written by `hier train`
ENROLLED = "enrolled.npy"          # per enrolled entry: the sum of its shots' embeddings
TRAINED_ROWS = "trained_rows.npy"  # per base class with added shots: its trained fine row, to restore

# --- exports: `hier export` -----------------------------------------------------------------------------
ONNX = "model.onnx"                # the trunk + embedding for ONNX Runtime / OpenVINO
INT8 = "model.int8.onnx"           # the same graph, weights and activations in int8 (--int8)
EXPORTS = {"onnx": ONNX, "int8": INT8}   # config.json key -> file

# --- the listing gallery: `hier index` ------------------------------------------------------------------
GALLERY = "gallery"                # the folder; the base shard's files directly in it
GALLERY_META = "gallery.json"      # kind, dimensions, fingerprint, next id, shards and their counts
INDEX = "index.faiss"              # one shard's FAISS index
LISTINGS = "listings.csv"          # one shard's listings table (sellers' columns + hier_*)
VECTORS = "vectors.npy"            # a pq shard's full vectors, for re-ranking
SHARDS = "shards"                  # the other shards: gallery/shards/NAME/{INDEX, LISTINGS[, VECTORS]}
TEMPLATE = "empty.faiss"           # the trained empty index every new shard starts as (in the folder only)
SHARD_FILES = (INDEX, LISTINGS, VECTORS)

# --- ensembles: `hier ensemble` ---------------------------------------------------------------------------
ENSEMBLE = "ensemble.json"         # the members and their weights; a folder with it is not one artifact
MEMBERS = "members"                # members/<i>: each member artifact
ENSEMBLE_REQUIRED = (ENSEMBLE, CONFIG, TAXONOMY)   # a folder with ENSEMBLE lacking one of these is damaged


def is_ensemble(path: str | Path) -> bool:
    """The folder is an ensemble (``hier ensemble``'s), not one artifact."""
    return (Path(path) / ENSEMBLE).is_file()


def missing(path: str | Path) -> list[str]:
    """The files that make ``path`` a folder hier reads (an artifact; an ensemble when it has ``ENSEMBLE``)
    that it lacks: [] for one."""
    path = Path(path)
    required = ENSEMBLE_REQUIRED if is_ensemble(path) else REQUIRED
    return [f for f in required if not (path / f).is_file()]
