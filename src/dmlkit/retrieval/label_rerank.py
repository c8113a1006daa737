"""Label-aware (discriminative) re-ranking for retrieval, GLR2019 retrieval 1st, over arrays.

Every query and index image carries a label predicted by kNN voting against the training set
(-1: none, e.g. a vote below the confidence floor). For a query with a label, the index images
predicted to share it come first: those the chain returned in the chain's order (so a verified,
fused order survives), then those it missed by their cosine to the query; the other candidates
follow in the chain's order. The returned scores are each image's own (the chain's, or the
cosine for an inserted one): the order is the ranking, the scores of the groups not comparable.
"""

from __future__ import annotations

import numpy as np


def _members_by_label(labels: np.ndarray) -> dict[int, np.ndarray]:
    """label -> the (ascending) positions holding it, for labels ≥ 0: one sort, not a scan per label
    (GLDv2's index: 762k images over ~100k landmarks)."""
    order = np.argsort(labels, kind="stable")
    values, starts = np.unique(labels[order], return_index=True)
    groups = np.split(order, starts[1:])
    return {int(v): g for v, g in zip(values, groups, strict=True) if v >= 0}


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
    members = _members_by_label(index_labels)
    out_ids = np.full((len(ids), k), -1, np.int64)
    out_sims = np.full((len(ids), k), -np.inf, np.float32)
    for q in range(len(ids)):
        valid = ids[q] >= 0
        row_ids, row_sims = ids[q][valid], sims[q][valid]
        agreeing = members.get(int(query_labels[q]), np.zeros(0, np.int64)) if query_labels[q] >= 0 else []
        if len(agreeing):
            found = np.isin(row_ids, agreeing)
            missed = agreeing[~np.isin(agreeing, row_ids)]
            missed_sims = (index[missed] @ queries[q]).astype(np.float32)
            order = np.argsort(-missed_sims, kind="stable")
            row_ids = np.concatenate([row_ids[found], missed[order], row_ids[~found]])
            row_sims = np.concatenate([row_sims[found], missed_sims[order], row_sims[~found]])
        n = min(k, len(row_ids))
        out_ids[q, :n], out_sims[q, :n] = row_ids[:n], row_sims[:n]
    return out_sims, out_ids
