"""Checkpoints: what ``save_checkpoint`` writes loads back, and a format this version cannot read fails clearly."""

import json

import pytest
import torch

import distributed_je
from distributed_je.artifact import FORMAT_FILE, FORMAT_VERSION, load_model, load_training_state, save_checkpoint
from distributed_je.config import load_config
from distributed_je.loop import TrainState, build_model, build_optimizer

GENES = [f"gene{i}" for i in range(20)]


@pytest.fixture
def checkpoint(tmp_path):
    config = load_config(None, ["model.n_hidden=16", "model.n_latent=4"])
    model = build_model(config, len(GENES), 1)
    optimizer = build_optimizer(model, config.optim)
    state = TrainState(epoch=3, step=30, history=[{"epoch": 3.0}])
    save_checkpoint(tmp_path, model=model, optimizer=optimizer, state=state, config=config, gene_names=GENES,
                    batch_categories=["0"])
    return tmp_path, config, model


def test_a_saved_checkpoint_loads_back(checkpoint):
    directory, config, model = checkpoint
    assert json.loads((directory / FORMAT_FILE).read_text()) == {"format_version": FORMAT_VERSION}
    loaded = distributed_je.load_model(directory)  # the package's entry point, as the README shows it
    assert loaded.gene_names == GENES and loaded.state.epoch == 3
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[name], tensor), name
    fresh = build_model(config, len(GENES), 1)
    assert load_training_state(directory, fresh, build_optimizer(fresh, config.optim)).step == 30


@pytest.mark.parametrize("written", [None, FORMAT_VERSION + 1], ids=["no format file", "a newer format"])
def test_a_checkpoint_in_another_format_is_refused_by_name(checkpoint, written):
    directory, config, model = checkpoint
    if written is None:
        (directory / FORMAT_FILE).unlink()
    else:
        (directory / FORMAT_FILE).write_text(json.dumps({"format_version": written}))
    expected = f"format_version={written or 0}; this distributed_je reads format_version={FORMAT_VERSION}"
    with pytest.raises(ValueError, match=expected):
        load_model(directory)
    with pytest.raises(ValueError, match=expected):
        load_training_state(directory, model, build_optimizer(model, config.optim))


def test_an_unknown_name_in_the_package_raises_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'load_modle'"):
        distributed_je.load_modle


def test_a_directory_without_a_model_is_not_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a checkpoint"):
        load_model(tmp_path)
