"""TEMPORARY shim: ``hier.embed`` moved to ``hier.services.embedding``. This module only re-exports the
names it had, for consumers not yet moved; import from ``hier.services.embedding`` instead."""
from hier.services.embedding import (CHUNK, EMBEDDING, META, PART, BatchEmbedder, _arrow, _as_text,  # noqa: F401
                                     build_gallery, embed, parse_shard, part_name, read_embeddings)
