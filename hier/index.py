"""TEMPORARY shim: ``hier.index`` was split into ``hier.gallery`` (storage and search, no model) and
``hier.services.indexing`` / ``hier.services.labelling`` (what needs the model). This module only
re-exports the names it had, for consumers not yet moved; import from the new modules instead."""
from hier.artifact.files import GALLERY, SHARDS, TEMPLATE, VECTORS  # noqa: F401
from hier.export import artifact_predictor  # noqa: F401
from hier.gallery.gallery import Gallery  # noqa: F401
from hier.gallery.gpu import faiss_gpus, placement  # noqa: F401
from hier.gallery.introspect import index_bytes, ivf_of, kind_of, search_parameters  # noqa: F401
from hier.gallery.joining import (joined as _joined, merge_into as _merge_into, stacked as _stacked,  # noqa: F401
                                  sync_ntotal as _sync_ntotal)
from hier.gallery.kinds import (EF_SEARCH, KINDS, NPROBE, PQ_BITS, PQ_DIMS, PQ_MIN, TRAIN_MIN,  # noqa: F401
                                TRAIN_PER_LIST, check_size, factory_string, lists, training_sample)
from hier.gallery.listings import (AS_GIVEN, BRAND, CLASS, ID, MODEL, PREFIX, SIMILARITY,  # noqa: F401
                                   answer_columns, label_columns, read_listings)
from hier.gallery.results import LABEL_CHUNK, _categories, _plain  # noqa: F401
from hier.gallery.search import GPU_MAX_K, RERANK  # noqa: F401
from hier.gallery.shards import BASE, SHARD_NAME, Shard, shard_folder, shard_name  # noqa: F401
from hier.gallery.store import (gallery_files, read_saved, saved_gallery, saved_listing_ids,  # noqa: F401
                                saved_rows, shard_counts)
from hier.gallery.vectors import (_read_ahead, ids_digest, mapped_rows, memory_bytes, prefetch,  # noqa: F401
                                  save_array as _save_array, whole)
from hier.gallery.whitening import whitened, whitening_of  # noqa: F401
from hier.runtime import Predictor, device  # noqa: F401
from hier.services.indexing import (EMBED_TRIES, _embed_and_save, add, build, drop, merge,  # noqa: F401
                                    rebuild, refuse_clashes, remove, listings_table as _table)
from hier.services.labelling import (PROBES, SEARCH_SHRINK, Embedded, answers_digest,  # noqa: F401
                                     embed_listings, search_whitening)
