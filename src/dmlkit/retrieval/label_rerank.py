"""Label-aware (discriminative) re-ranking for retrieval, GLR2019 retrieval 1st, over arrays.

Every query and index image carries a label predicted by kNN voting against the training set
(-1: none, e.g. a vote below the confidence floor). For a query with a label, the index images
predicted to share it come first, ordered by their similarity to the query — those the search
returned and those it missed alike — and the other candidates follow in their search order.
"""

from __future__ import annotations

import numpy as np


def label_aware_rerank(
    sims: np.ndarray,
    ids: np.ndarray,
    query_labels: np.ndarray,
    index_labels: np.ndarray,
    queries: np.ndarray,
    index: np.ndarray,
    k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Each query's top-k index images, (sims, ids) (Q, k) with -1 / -inf padding.

    `sims`/`ids` are the search's ranked candidates (ids -1 where missing); `queries` and
    `index` the embeddings, used to order the agreeing images the search did not return."""
    members: dict[int, np.ndarray] = {}
    for label in np.unique(index_labels[index_labels >= 0]):
        members[int(label)] = np.flatnonzero(index_labels == label)
    out_ids = np.full((len(ids), k), -1, np.int64)
    out_sims = np.full((len(ids), k), -np.inf, np.float32)
    for q in range(len(ids)):
        row_ids, row_sims = ids[q], sims[q]
        valid = row_ids >= 0
        row_ids, row_sims = row_ids[valid], row_sims[valid]
        agreeing = members.get(int(query_labels[q]), np.zeros(0, np.int64)) if query_labels[q] >= 0 else []
        if len(agreeing):
            agree_sims = index[agreeing] @ queries[q]
            order = np.argsort(-agree_sims, kind="stable")
            first_ids, first_sims = agreeing[order], agree_sims[order].astype(np.float32)
            rest = ~np.isin(row_ids, first_ids)
            row_ids = np.concatenate([first_ids, row_ids[rest]])
            row_sims = np.concatenate([first_sims, row_sims[rest]])
        n = min(k, len(row_ids))
        out_ids[q, :n], out_sims[q, :n] = row_ids[:n], row_sims[:n]
    return out_sims, out_ids
