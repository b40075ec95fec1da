"""A worker's node dies mid-training on a 3-node Ray cluster: the run restores its latest
checkpoint on the surviving nodes and finishes with the right number of epochs."""

import threading
import time
from pathlib import Path

import pytest

from distributed_je.artifact import load_model
from distributed_je.config import load_config
from distributed_je.convert import convert

pytestmark = [pytest.mark.ray, pytest.mark.distributed, pytest.mark.data]


def test_losing_a_worker_node_recovers_from_the_latest_checkpoint(tmp_path):
    import ray
    from conftest import recorded_checkpoints, shared_data
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors

    from distributed_je.training import run_training

    store = str(tmp_path / "pbmc3k.zarr")
    convert(shared_data("pbmc3k_labeled.h5ad"), store, n_top_genes=300, progress=False)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        config = load_config(None, [
            f"data.store={store}", f"experiment.storage_path={tmp_path / 'results'}", "experiment.name=ft",
            "data.batch_size=16", "train.max_epochs=4", "train.max_failures=2", "scaling.num_workers=2",
            "scaling.placement_strategy=SPREAD",
        ])
        outcome = {}
        thread = threading.Thread(target=lambda: outcome.update(result=run_training(config)), daemon=True)
        thread.start()
        run_dir = tmp_path / "results" / "ft"
        deadline = time.monotonic() + 300
        while "epoch_00001" not in recorded_checkpoints(run_dir):
            assert time.monotonic() < deadline, "no checkpoint after epoch 1"
            time.sleep(0.2)
        first_epoch = load_model(run_dir / "epoch_00001").state.history[0]
        # the node of a training worker (not the head), during epoch 2
        worker_nodes = {a.node_id for a in list_actors(filters=[("class_name", "=", "RayTrainWorker"),
                                                                  ("state", "=", "ALIVE")])}
        victim = next(node for node in workers if node.node_id in worker_nodes)
        assert not (run_dir / "epoch_00002").exists()
        cluster.remove_node(victim)
        cluster.add_node(num_cpus=1)  # a replacement, as an autoscaler would bring
        thread.join(timeout=400)
        assert not thread.is_alive(), "training did not finish after the node loss"
        result = outcome["result"]
        assert int(result.metrics["epoch"]) == 4
        # every checkpoint left in storage is complete and loads
        for checkpoint in sorted(run_dir.glob("epoch_*")):
            assert load_model(checkpoint).state.epoch == int(checkpoint.name.split("_")[1])
        final = load_model(result.checkpoint.path)
        assert Path(result.checkpoint.path).name == "epoch_00004"
        assert [int(m["epoch"]) for m in final.state.history] == [1, 2, 3, 4]
        # resumed, not restarted: epoch 1's record, its timing included, is the one from before the loss
        assert final.state.history[0] == first_epoch
    finally:
        ray.shutdown()
        cluster.shutdown()
