"""Where a gallery's index lives: the GPUs faiss-gpu sees, and the placement policy per kind and purpose."""
from __future__ import annotations

import faiss


def faiss_gpus() -> int:
    """GPUs faiss-gpu sees (0 with the CPU build)."""
    return getattr(faiss, "get_num_gpus", lambda: 0)()


def placement(kind: str, gpus: int, purpose: str) -> str:
    """Where a gallery's index lives (``cpu`` | ``gpu``) for ``purpose`` (``search`` | ``edit``): edits
    and saves on the CPU (GPU indexes have no ``remove_ids`` and FAISS writes CPU indexes), HNSW always
    on the CPU (FAISS has no GPU HNSW), pq too (its IVFPQ of 6-bit codes never ran on a GPU here, and its filtered
    searches need the CPU's ID selectors), searches on the GPUs when there are any. Pure: tested on CPU."""
    if purpose not in ("search", "edit"):
        raise ValueError(f"purpose is search or edit, not {purpose!r}")
    return "gpu" if purpose == "search" and gpus > 0 and kind not in ("hnsw", "pq") else "cpu"
