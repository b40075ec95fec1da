"""Checkpoints and the trained model as an artifact.

A checkpoint directory holds everything needed to continue training exactly or to use the
model: ``model.pt`` and ``optimizer.pt`` (tensors only, loaded with ``weights_only=True``, so a
checkpoint cannot run code), ``state.json`` (epochs, steps, history), ``config.json`` (the
resolved config), ``genes.json`` (gene names in model order, and the batch categories) and
``format.json`` (the checkpoint format, so that a checkpoint this version cannot read fails
by saying so, not with a tensor shape mismatch).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from distributed_je.config import Config
from distributed_je.loop import TrainState, build_model
from distributed_je.module import JESCVI

MODEL_FILE, OPTIMIZER_FILE, STATE_FILE, CONFIG_FILE, GENES_FILE, FORMAT_FILE = (
    "model.pt", "optimizer.pt", "state.json", "config.json", "genes.json", "format.json")
# Raised whenever what a checkpoint holds changes meaning or layout; format 1 is the first
# with FORMAT_FILE (weights stored (n_in, n_out) by nn.BatchLinear). One without the file reads as 0.
FORMAT_VERSION = 1


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
    (directory / FORMAT_FILE).write_text(json.dumps({"format_version": FORMAT_VERSION}))


def checked_checkpoint(directory: str | Path) -> Path:
    """``directory`` as a Path if it holds a checkpoint in the format this version reads; a clear
    error otherwise."""
    directory = Path(directory)
    if not (directory / MODEL_FILE).is_file():
        raise FileNotFoundError(f"{directory} is not a checkpoint: it has no {MODEL_FILE}")
    format_file = directory / FORMAT_FILE
    version = json.loads(format_file.read_text())["format_version"] if format_file.is_file() else 0
    if version != FORMAT_VERSION:
        raise ValueError(f"checkpoint {directory} has format_version={version}; this distributed_je reads "
                         f"format_version={FORMAT_VERSION} only: load it with the release that wrote it, "
                         "or train the model again")
    return directory


def load_training_state(directory: str | Path, model: JESCVI, optimizer: torch.optim.Optimizer) -> TrainState:
    """Restore model and optimizer in place from a checkpoint; return where training stopped."""
    directory = checked_checkpoint(directory)
    model.load_state_dict(torch.load(directory / MODEL_FILE, map_location="cpu", weights_only=True))
    optimizer.load_state_dict(torch.load(directory / OPTIMIZER_FILE, map_location="cpu", weights_only=True))
    return TrainState(**json.loads((directory / STATE_FILE).read_text()))


@dataclass(frozen=True)
class CellBlock:
    start: int                    # first row
    raw_counts: sp.csr_matrix     # as read: the data's own genes
    counts: sp.csr_matrix         # the model's genes, in model order
    batch_codes: np.ndarray
    cell_names: np.ndarray
    obs: dict[str, np.ndarray]    # requested obs columns, as strings


def _check_columns(keys, available) -> None:
    missing = [key for key in keys if key not in available]
    if missing:
        raise KeyError(f"obs has no column {missing[0]!r}; available: {', '.join(map(str, available))}")


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

    def cell_blocks(self, data, *, block_rows: int = 8192, obs_keys: tuple[str, ...] = ()):
        """``CellBlock`` per block of rows of an AnnData, an h5ad path or a store path, read in
        blocks (backed for h5ad): the counts as read and in model gene order, batch codes, cell
        names and the ``obs_keys`` columns (missing ones fail listing those there)."""
        import anndata

        from distributed_je.store import open_store

        batch_key = self.config.data.batch_key
        keys = ([batch_key] if batch_key else []) + list(obs_keys)
        if isinstance(data, (str, os.PathLike)) and not str(data).endswith(".h5ad"):
            store = open_store(str(data))
            n_cells, columns = store.n_cells, self.gene_columns(store.gene_names)
            _check_columns(keys, store.obs_columns)
            obs = {key: store.obs_strings(key) for key in keys}
            names = store.cell_names()

            def read(start, stop):
                block = store.read_rows(start, stop)
                return sp.csr_matrix((block.data, block.indices, block.indptr), shape=(stop - start, store.n_genes))
        else:
            if isinstance(data, (str, os.PathLike)):
                data = anndata.read_h5ad(data, backed="r")
            n_cells, columns = data.n_obs, self.gene_columns(data.var_names)
            _check_columns(keys, data.obs.columns)
            obs = {key: data.obs[key].to_numpy().astype(str) for key in keys}
            names = data.obs_names.to_numpy().astype(str)

            def read(start, stop):
                return sp.csr_matrix(data.X[start:stop])
        for start in range(0, n_cells, block_rows):
            stop = min(start + block_rows, n_cells)
            counts = read(start, stop)
            batches = obs[batch_key][start:stop] if batch_key else np.zeros(stop - start)
            yield CellBlock(start, counts, counts[:, columns], self.batch_codes(batches), names[start:stop],
                            {key: obs[key][start:stop] for key in obs_keys})

    def latent_blocks(self, data, *, block_rows: int = 8192):
        """(start, counts as read, latent) per block of rows; see ``cell_blocks``."""
        for block in self.cell_blocks(data, block_rows=block_rows):
            yield block.start, block.raw_counts, self.encode(block.counts, block.batch_codes)

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
    directory = checked_checkpoint(location.removeprefix("file://"))
    config = Config.from_dict(json.loads((directory / CONFIG_FILE).read_text()))
    genes = json.loads((directory / GENES_FILE).read_text())
    module = build_model(config, len(genes["genes"]), len(genes["batch_categories"]))
    module.load_state_dict(torch.load(directory / MODEL_FILE, map_location="cpu", weights_only=True))
    state = TrainState(**json.loads((directory / STATE_FILE).read_text()))
    return TrainedModel(module, config, genes["genes"], genes["batch_categories"], state)
