"""distributed_je: joint-embedding SCVI trained on Ray, over zarr count stores.

``distributed_je.load_model(path)`` is the entry point for a trained model; it is imported on
first use, so that ``import distributed_je.config`` (say) does not pull in torch.
"""

__all__ = ["load_model"]


def __getattr__(name: str):
    if name == "load_model":
        from distributed_je.artifact import load_model

        return load_model
    raise AttributeError(f"module 'distributed_je' has no attribute {name!r}")
