"""Keys of a minibatch, as every loader yields it and the model reads it."""

COUNTS = "counts"            # (n_cells, n_genes) float32 raw counts
BATCH_INDEX = "batch_index"  # (n_cells,) int64 batch of each cell
LABELS = "labels"            # (n_cells,) int64 label code (-1 where missing), only when asked for
LIBRARY = "library"          # (n_cells,) float32 UMIs over the stored genes (store loader only)
ROW = "row"                  # (n_cells,) int64 row of each cell in its store (store loader, on request)
