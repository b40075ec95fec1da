"""Checkpoints and the trained model as an artifact.

A checkpoint directory holds everything needed to continue training exactly or to use the
model: ``model.pt`` and ``optimizer.pt`` (tensors only, loaded with ``weights_only=True``, so a
checkpoint cannot run code), ``state.json`` (epochs, steps, history), ``config.json`` (the
resolved config) and ``genes.json`` (gene names in model order, and the batch categories).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from distributed_je.config import Config
from distributed_je.loop import TrainState, build_model
from distributed_je.module import JESCVI

MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, CONFIG_FILE, GENES_FILE = (
    "model.pt", "optimizer.pt", "state.json", "config.json", "genes.json")


def save_checkpoint(directory: str | Path, *, model: JESCVI, optimizer: torch.optim.Optimizer | None,
                    state: TrainState, config: Config, gene_names, batch_categories) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), directory / MODEL_FILE)
    if optimizer is not None:
        torch.save(optimizer.state_dict(), directory / OPTIMIZER_FILE)
    (directory / STATE_FILE).write_text(json.dumps(asdict(state)))
    (directory / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=1))
    (directory / GENES_FILE).write_text(json.dumps({"genes": [str(g) for g in gene_names],
                                                    "batch_categories": [str(b) for b in batch_categories]}))


def load_training_state(directory: str | Path, model: JESCVI, optimizer: torch.optim.Optimizer) -> TrainState:
    """Restore model and optimizer in place from a checkpoint; return where training stopped."""
    directory = Path(directory)
    model.load_state_dict(torch.load(directory / MODEL_FILE, map_location="cpu", weights_only=True))
    optimizer.load_state_dict(torch.load(directory / OPTIMIZER_FILE, map_location="cpu", weights_only=True))
    return TrainState(**json.loads((directory / STATE_FILE).read_text()))


class TrainedModel:
    """A trained JE-SCVI model with the genes it was trained on."""

    def __init__(self, module: JESCVI, config: Config, gene_names: list[str], batch_categories: list[str],
                 state: TrainState) -> None:
        self.module, self.config, self.state = module.eval(), config, state
        self.gene_names, self.batch_categories = list(gene_names), list(batch_categories)

    def gene_columns(self, gene_names) -> np.ndarray:
        """Where each of the model's genes sits among ``gene_names``; missing genes fail clearly."""
        position = {str(g): i for i, g in enumerate(gene_names)}
        missing = [g for g in self.gene_names if g not in position]
        if missing:
            raise KeyError(f"{len(missing)} of the model's {len(self.gene_names)} genes are missing from the data, "
                           f"e.g. {missing[:5]}: embed data measured on the same genes")
        return np.array([position[g] for g in self.gene_names])

    def batch_codes(self, batch_values) -> np.ndarray:
        """Codes of the training batches for each cell (all 0 when the model has no batch key)."""
        if not self.config.data.batch_key:
            return np.zeros(len(batch_values), dtype=np.int64)
        lookup = {b: i for i, b in enumerate(self.batch_categories)}
        unknown = sorted({str(b) for b in batch_values} - set(lookup))
        if unknown:
            raise KeyError(f"batches {unknown[:5]} were not seen in training; known: {self.batch_categories}")
        return np.array([lookup[str(b)] for b in batch_values], dtype=np.int64)

    def encode(self, counts, batch_codes: np.ndarray) -> np.ndarray:
        """Posterior means of counts (dense or CSR, in model gene order)."""
        dense = counts.toarray() if hasattr(counts, "toarray") else np.asarray(counts)
        return self.module.encode(torch.as_tensor(dense, dtype=torch.float32), torch.as_tensor(batch_codes)).numpy()

    def latent_blocks(self, data, *, block_rows: int = 8192):
        """(start, counts, latent) per block of rows of an AnnData, an h5ad path or a store path.

        ``counts`` is the block as read (CSR, the data's own genes), for callers that also copy it.
        """
        import anndata

        from distributed_je.store import open_store

        batch_key = self.config.data.batch_key
        if isinstance(data, (str, os.PathLike)) and not str(data).endswith(".h5ad"):
            store = open_store(str(data))
            columns = self.gene_columns(store.gene_names)
            if batch_key:
                codes, names = store.obs_codes(batch_key)
                batches = np.asarray(names, dtype=object)[codes]
            else:
                batches = np.zeros(store.n_cells)
            for start in range(0, store.n_cells, block_rows):
                stop = min(start + block_rows, store.n_cells)
                block = store.read_rows(start, stop)
                counts = sp.csr_matrix((block.data, block.indices, block.indptr), shape=(stop - start, store.n_genes))
                yield start, counts, self.encode(counts[:, columns], self.batch_codes(batches[start:stop]))
            return
        if isinstance(data, (str, os.PathLike)):
            data = anndata.read_h5ad(data, backed="r")
        columns = self.gene_columns(data.var_names)
        batches = data.obs[batch_key].to_numpy() if batch_key else np.zeros(data.n_obs)
        for start in range(0, data.n_obs, block_rows):
            stop = min(start + block_rows, data.n_obs)
            counts = sp.csr_matrix(data.X[start:stop])
            yield start, counts, self.encode(counts[:, columns], self.batch_codes(batches[start:stop]))

    def get_latent_representation(self, data) -> np.ndarray:
        """Posterior means (n_cells, n_latent) of an AnnData, an h5ad path or a store path, genes aligned by name."""
        return np.concatenate([latent for _, _, latent in self.latent_blocks(data)])

    def get_normalized_expression(self, data) -> np.ndarray:
        """Decoded gene proportions (n_cells, n_genes) at each cell's posterior mean, summing to 1 per
        cell, as the first training batch would show them."""
        latent = torch.as_tensor(self.get_latent_representation(data))
        with torch.no_grad():
            h = self.module.decoder.body(latent, self.module._one_hot(None, len(latent), latent.device))
            return torch.softmax(self.module.decoder.scale(h), dim=-1).numpy()

    def bias_point(self) -> np.ndarray:
        """f(0): where an all-zero cell is embedded."""
        return self.module.bias_point().numpy()


def load_model(path: str | Path) -> TrainedModel:
    """The model in a checkpoint directory (a local path, or a URL that ``Checkpoint`` can fetch)."""
    location = str(path)
    if "://" in location and not location.startswith("file://"):
        from ray.train import Checkpoint

        location = Checkpoint(location).to_directory()
    directory = Path(location.removeprefix("file://"))
    if not (directory / MODEL_FILE).is_file():
        raise FileNotFoundError(f"{directory} is not a checkpoint: it has no {MODEL_FILE}")
    config = Config.from_dict(json.loads((directory / CONFIG_FILE).read_text()))
    genes = json.loads((directory / GENES_FILE).read_text())
    module = build_model(config, len(genes["genes"]), len(genes["batch_categories"]))
    module.load_state_dict(torch.load(directory / MODEL_FILE, map_location="cpu", weights_only=True))
    state = TrainState(**json.loads((directory / STATE_FILE).read_text()))
    return TrainedModel(module, config, genes["genes"], genes["batch_categories"], state)
