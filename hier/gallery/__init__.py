"""Similar-listing search, storage and search only (no model): a FAISS index of listing embeddings plus a
metadata table, in ``ARTIFACT/gallery/`` (file names: ``hier.artifact.files``), moving with the artifact.

Embeddings are L2-normalised, so inner product is cosine similarity. An artifact served by its class
statistics searches in the *whitened* embedding (``S^-1/2 z``, renormalised, with ``S`` the base
classes' shared within-class covariance): directions along which photos of one car differ count less,
those that tell cars apart count more (docs/benchmarks/enroll.md: Recall@1 on unseen classes). The
transform is inside the FAISS index (``whitening``), so queries go in as plain embeddings and an older
gallery keeps answering as it was built. Each listing image gets a stable int64 id (``add_with_ids``),
so removing listings never renumbers the rest.

Sharding by time (``shards``): a gallery is one or more shards, each a FAISS index of the gallery's kind
(``kinds``) with its listing rows. A day's listings go into a small shard of their own, which starts as
the trained empty index (``TEMPLATE``: the IVF kinds' coarse quantizer and codebooks, so nothing is
trained again and nothing else is rewritten); listings that expire together go as one shard (dropped:
gallery.json stops listing it, O(1), where ``remove_ids`` on a big IVF scans its lists); small shards
are compacted by ``Gallery.merge`` (FAISS's ``merge_from``: the inverted lists appended, nothing
re-encoded). A search (``search``, ``results``) is one search over all of them with the shards' own ids
(unique across the gallery): the IVF kinds as one IVF index reading every shard's inverted lists
(``joining.stacked``: the same quantizer, so the top k is that of one index of everything, at the cost
of one), flat and HNSW by FAISS's ``IndexShards``. The seller's columns are kept as given; hier's own
(FAISS id, predicted class/brand/model, similarity) are named ``hier_*`` (``listings``), a prefix
listings may not use. On disk: ``store``; the pq kind's re-rank vectors: ``vectors``; GPUs: ``gpu``.

What needs the model (embedding listings, the transactions that embed and save under the artifact's
lock) is ``hier.services.indexing``.
"""
from hier.gallery.gallery import Gallery
from hier.gallery.gpu import faiss_gpus, placement
from hier.gallery.introspect import index_bytes, ivf_of, kind_of, search_parameters
from hier.gallery.kinds import (
                                EF_SEARCH,
                                KINDS,
                                NPROBE,
                                PQ_BITS,
                                PQ_DIMS,
                                PQ_MIN,
                                TRAIN_MIN,
                                TRAIN_PER_LIST,
                                check_size,
                                factory_string,
                                lists,
                                training_sample,
)
from hier.gallery.listings import (
                                AS_GIVEN,
                                BRAND,
                                CLASS,
                                ID,
                                MODEL,
                                PREFIX,
                                SIMILARITY,
                                answer_columns,
                                label_columns,
                                read_listings,
)
from hier.gallery.results import LABEL_CHUNK
from hier.gallery.search import GPU_MAX_K, RERANK
from hier.gallery.shards import BASE, SHARD_NAME, Shard, shard_folder, shard_name
from hier.gallery.store import (
                                exists,
                                gallery_files,
                                read_meta,
                                read_saved,
                                saved_gallery,
                                saved_listing_ids,
                                saved_rows,
                                shard_counts,
)
from hier.gallery.vectors import ids_digest, mapped_rows, memory_bytes, prefetch, whole
from hier.gallery.whitening import whitened, whitening_of

__all__ = [
    "AS_GIVEN", "BASE", "BRAND", "CLASS", "EF_SEARCH", "GPU_MAX_K", "Gallery", "ID", "KINDS", "LABEL_CHUNK", "MODEL",
    "NPROBE", "PQ_BITS", "PQ_DIMS", "PQ_MIN", "PREFIX", "RERANK", "SHARD_NAME", "SIMILARITY", "Shard", "TRAIN_MIN",
    "TRAIN_PER_LIST", "answer_columns", "check_size", "exists", "factory_string", "faiss_gpus", "gallery_files",
    "ids_digest", "index_bytes", "ivf_of", "kind_of", "label_columns", "lists", "mapped_rows", "memory_bytes",
    "placement", "prefetch", "read_listings", "read_meta", "read_saved", "saved_gallery", "saved_listing_ids",
    "saved_rows", "search_parameters", "shard_counts", "shard_folder", "shard_name", "training_sample", "whitened",
    "whitening_of", "whole"]
