"""Label-transfer metrics on embeddings: kNN prediction and balanced accuracy (numpy only)."""

from __future__ import annotations

import numpy as np

KNN_BLOCK = 2048  # query rows per distance block: bounds memory at KNN_BLOCK x n_reference floats


def knn_predict(reference: np.ndarray, reference_labels: np.ndarray, query: np.ndarray, k: int = 15) -> np.ndarray:
    """Majority label among the k nearest reference cells (Euclidean); ties go to the smallest label."""
    if not 1 <= k <= len(reference):
        raise ValueError(f"k={k} is out of range: allowed [1, {len(reference)}] for this reference")
    classes, codes = np.unique(reference_labels, return_inverse=True)
    ref_sq = (reference**2).sum(1)
    predictions = np.empty(len(query), dtype=reference_labels.dtype)
    for start in range(0, len(query), KNN_BLOCK):
        q = query[start : start + KNN_BLOCK]
        dist = (q**2).sum(1)[:, None] - 2 * q @ reference.T + ref_sq[None, :]
        nearest = np.argpartition(dist, k - 1, axis=1)[:, :k]
        votes = np.zeros((len(q), len(classes)))
        np.add.at(votes, (np.arange(len(q))[:, None], codes[nearest]), 1)
        predictions[start : start + len(q)] = classes[votes.argmax(1)]
    return predictions


def balanced_accuracy(true: np.ndarray, predicted: np.ndarray) -> float:
    """Mean over the classes present in ``true`` of the fraction of that class predicted right."""
    classes = np.unique(true)
    if len(classes) == 0:
        raise ValueError("balanced_accuracy needs at least one cell")
    return float(np.mean([(predicted[true == c] == c).mean() for c in classes]))
