"""How well a trained model keeps low-count cells' identity: the depth response.

Held-out cells are binomially thinned to fixed depths and embedded; a kNN classifier fit on
full-depth reference cells predicts their labels, and their distance to the bias point f(0)
shows whether they collapse onto it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from distributed_je.augment import binomial_thin
from distributed_je.counts import CountMatrix, minibatches
from distributed_je.keys import BATCH_INDEX, COUNTS
from distributed_je.metrics import balanced_accuracy, knn_predict
from distributed_je.module import JESCVI
from distributed_je.seeding import STREAM_EVALUATION, torch_generator

DEPTHS = (20, 50, 100, 200, 500, 1000)
EMBED_BATCH = 1024
KNN_K = 15


def embed(model: JESCVI, matrix: CountMatrix, *, depth: float | None = None, seed: int = 0) -> np.ndarray:
    """Posterior means of every cell, after thinning each to ``depth`` UMIs when it is given."""
    generator = torch_generator(seed, stream=STREAM_EVALUATION)
    parts = []
    for batch in minibatches(matrix, batch_size=EMBED_BATCH):
        counts = batch[COUNTS]
        if depth is not None:
            library = counts.sum(1)
            p = torch.clamp(depth / torch.clamp(library, min=1.0), max=1.0)
            counts = binomial_thin(counts, p, generator=generator)
        parts.append(model.encode(counts, batch[BATCH_INDEX]).numpy())
    return np.concatenate(parts)


@dataclass(frozen=True)
class DepthRow:
    depth: str
    balanced_accuracy: float
    accuracy: float
    distance_to_bias_point: float  # median over cells
    distance_to_origin: float      # median over cells


def depth_response(model: JESCVI, reference: CountMatrix, query: CountMatrix, *, depths=DEPTHS,
                   seed: int = 0) -> list[DepthRow]:
    """One row per depth (and one at full depth) for the labelled cells of ``query``."""
    if reference.label_codes is None or query.label_codes is None:
        raise ValueError("the depth response needs labels: give a labels key")
    ref_labelled = reference.subset_cells(np.flatnonzero(reference.label_codes >= 0))
    query = query.subset_cells(np.flatnonzero(query.label_codes >= 0))
    ref_latent = embed(model, ref_labelled)
    bias_point = model.bias_point().numpy()
    rows = []
    for depth in (*depths, None):
        latent = embed(model, query, depth=depth, seed=seed)
        predicted = knn_predict(ref_latent, ref_labelled.label_codes, latent, k=min(KNN_K, len(ref_latent)))
        rows.append(DepthRow(
            depth="full" if depth is None else str(depth),
            balanced_accuracy=balanced_accuracy(query.label_codes, predicted),
            accuracy=float((predicted == query.label_codes).mean()),
            distance_to_bias_point=float(np.median(np.linalg.norm(latent - bias_point, axis=1))),
            distance_to_origin=float(np.median(np.linalg.norm(latent, axis=1))),
        ))
    return rows
