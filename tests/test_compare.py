"""``dje compare`` on real pbmc3k, short: the report's files and fields (not the scientific outcome)."""

import json

import pytest

from distributed_je.cli import main

pytestmark = [pytest.mark.ray, pytest.mark.data]


@pytest.mark.usefixtures("shutdown_ray")
def test_short_compare_writes_table_claims_and_sweep(pbmc_store, tmp_path, capsys):
    out = tmp_path / "compare"
    assert main(["compare", "tune_configs/protocol.yaml", "--set", f"data.store={pbmc_store}",
                 "--set", "data.labels_key=cell_type", "--set", "train.max_epochs=2", "--set", "data.batch_size=256",
                 "--variants", "scvi,je", "--seeds", "0,1", "--kl-factors", "0.1,1", "--diversify-depth",
                 "--out", str(out)]) == 0
    assert "## The paper's claims" in capsys.readouterr().out
    report = json.loads((out / "compare.json").read_text())
    assert report["store"] == str(out / "diversified.zarr")
    assert sorted((r["variant"], r["seed"]) for r in report["runs"]) == [("je", 0), ("je", 1), ("scvi", 0), ("scvi", 1)]
    for run in report["runs"]:
        assert run["epochs"] == 2 and 0 <= run["balanced_accuracy"] <= 1 and run["n_reference"] >= 15
        assert set(run["by_bin"]) <= {"[20, 50)", "[50, 100)", "[100, 200)", "[200, 500)", "[500, 1000)"}
    mean, spread = report["summary"]["je"]["balanced_accuracy"]
    assert 0 <= mean <= 1 and spread >= 0
    assert [c["claim"].split(" ")[0] for c in report["claims"]] == ["je", "reconstruction"]
    assert [(r["variant"], r["kl_factor"]) for r in report["kl_sweep"]] == [
        ("scvi", 0.1), ("scvi", 1.0), ("je", 0.1), ("je", 1.0)]
    assert report["kl_sweep"][0]["kl_weight"] == pytest.approx(0.1)
    assert (out / "compare.md").is_file() and (out / "compare.png").stat().st_size > 0


def test_unknown_variant_is_refused(tmp_path, capsys):
    assert main(["compare", "tune_configs/protocol.yaml", "--set", "data.store=x.zarr", "--set",
                 "data.labels_key=l", "--variants", "scvi,jee", "--out", str(tmp_path)]) == 2
    assert "--variants 'scvi,jee': choose among scvi, thinning_only, denoising, je, je_only" in capsys.readouterr().err
