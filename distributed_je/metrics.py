"""Label-transfer metrics on embeddings: kNN votes, balanced accuracy and ROC AUC (numpy only)."""

from __future__ import annotations

import numpy as np

KNN_BLOCK = 2048  # query rows per distance block: bounds memory at KNN_BLOCK x n_reference floats


def knn_vote_share(reference: np.ndarray, reference_codes: np.ndarray, n_classes: int, query: np.ndarray,
                   k: int = 15) -> np.ndarray:
    """(n_query, n_classes): the share of each query cell's k nearest reference cells (Euclidean)
    in each class; ``reference_codes`` are class numbers in [0, n_classes)."""
    if not 1 <= k <= len(reference):
        raise ValueError(f"k={k} is out of range: allowed [1, {len(reference)}] for this reference")
    ref_sq = (reference**2).sum(1)
    shares = np.zeros((len(query), n_classes))
    for start in range(0, len(query), KNN_BLOCK):
        q = query[start : start + KNN_BLOCK]
        dist = (q**2).sum(1)[:, None] - 2 * q @ reference.T + ref_sq[None, :]
        nearest = np.argpartition(dist, k - 1, axis=1)[:, :k]
        np.add.at(shares[start : start + len(q)], (np.arange(len(q))[:, None], reference_codes[nearest]), 1 / k)
    return shares


def knn_predict(reference: np.ndarray, reference_labels: np.ndarray, query: np.ndarray, k: int = 15) -> np.ndarray:
    """Majority label among the k nearest reference cells (Euclidean); ties go to the smallest label."""
    classes, codes = np.unique(reference_labels, return_inverse=True)
    return classes[knn_vote_share(reference, codes, len(classes), query, k).argmax(1)]


def balanced_accuracy(true: np.ndarray, predicted: np.ndarray) -> float:
    """Mean over the classes present in ``true`` of the fraction of that class predicted right."""
    classes = np.unique(true)
    if len(classes) == 0:
        raise ValueError("balanced_accuracy needs at least one cell")
    return float(np.mean([(predicted[true == c] == c).mean() for c in classes]))


def roc_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve: the chance that a random positive outscores a random negative
    (ties count one half). NaN when either class is missing."""
    positive = np.asarray(positive, bool)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score))
    sorted_scores = np.asarray(score)[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts + 1) / 2
    ranks[order] = np.repeat(average, counts)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
