"""hier's whitening inside a FAISS index: a linear map ``z -> z @ W`` and a renormalisation in front of
the index (``IndexPreTransform``), so queries go in as plain embeddings and an older gallery keeps
answering as it was built; and the way back from a stored vector to the embedding."""
from __future__ import annotations

import faiss
import numpy as np


def whitened(index: faiss.Index, whitening: np.ndarray) -> faiss.Index:
    """``index`` behind the linear map ``z -> z @ W`` and a renormalisation (FAISS applies both to every
    vector added and every query)."""
    d = whitening.shape[0]
    linear = faiss.LinearTransform(d, d, False)
    faiss.copy_array_to_vector(np.ascontiguousarray(whitening.T, dtype=np.float32).ravel(), linear.A)
    linear.is_trained = True
    out = faiss.IndexPreTransform(faiss.NormalizationTransform(d, 2.0), index)
    out.prepend_transform(linear)          # faiss's Python layer keeps both parts referenced
    return out


def whitening_of(index: faiss.Index):
    """hier's whitening pre-transform (``whitened``: a linear map, then a renormalisation) of ``index``:
    (the linear map, the index behind it), or None (another pre-transform, e.g. an OPQ rotation, is
    no whitening)."""
    index = faiss.downcast_index(index)
    if not isinstance(index, faiss.IndexPreTransform) or index.chain.size() != 2:
        return None
    if not isinstance(faiss.downcast_VectorTransform(index.chain.at(1)), faiss.NormalizationTransform):
        return None
    return faiss.downcast_VectorTransform(index.chain.at(0)), faiss.downcast_index(index.index)


def transformed(index: faiss.Index, vectors: np.ndarray) -> np.ndarray:
    """``vectors`` as ``index`` compares them: through its pre-transform (hier's whitening and
    renormalisation), as FAISS applies it to every vector added and every query."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    index = faiss.downcast_index(index)
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            x = faiss.downcast_VectorTransform(index.chain.at(i)).apply(x)
    return x


def unwhitening(linear) -> np.ndarray:
    """The matrix that takes a whitened vector ``y = z @ a.T`` back to the direction of ``z``
    (``linear``: the map of ``whitening_of``)."""
    a = faiss.vector_to_array(linear.A).reshape(linear.d_out, linear.d_in)     # y = z @ a.T
    return np.linalg.inv(a.T).astype(np.float32)
