import json
import subprocess
import sys

import pytest

from distributed_je.cli import EXIT_BAD_INPUT, build_parser, main

SUBCOMMANDS = ("convert", "synth", "train", "tune", "embed", "evaluate", "compare", "demo")


def test_dje_help_runs_as_a_console_script():
    result = subprocess.run([sys.executable, "-m", "distributed_je.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for name in SUBCOMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_subcommand_describes_every_argument(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([name, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    subparsers = next(a for a in build_parser()._actions if a.dest == "command")
    for action in subparsers.choices[name]._actions:
        assert action.help, f"dje {name}: argument {action.dest} has no help"
        shown = action.option_strings[-1] if action.option_strings else action.metavar or action.dest
        assert shown in text, f"dje {name} --help does not show {shown}"


@pytest.mark.parametrize("argv, message", [
    (["tune", "missing.yaml"], "config file 'missing.yaml' does not exist"),
    (["compare", "missing.yaml"], "config file 'missing.yaml' does not exist"),
    (["evaluate", "no_model", "d.zarr", "--labels-key", "l", "--out", "o"], "no_model is not a checkpoint"),
    # a wrong store fails at the driver, before Ray starts, naming the absolute path
    (["train", "tune_configs/smoke.yaml", "--set", "data.store=nowhere.zarr"], "nowhere.zarr does not exist"),
    (["tune", "tune_configs/smoke.yaml", "--set", "data.store=nowhere.zarr"], "nowhere.zarr does not exist"),
])
def test_bad_input_names_itself(argv, message, capsys):
    assert main(argv) == EXIT_BAD_INPUT
    assert message in capsys.readouterr().err


def test_bad_config_value_is_reported_not_raised(capsys):
    assert main(["demo", "--set", "model.n_latent=0"]) == EXIT_BAD_INPUT
    assert "model.n_latent=0 is out of range" in capsys.readouterr().err


@pytest.mark.ray
@pytest.mark.usefixtures("shutdown_ray")
def test_demo_smoke_on_tiny_settings(tmp_path, capsys):
    """The whole demo (synthetic data -> store -> 2-trial tune -> je and scvi trained -> reports), tiny."""
    code = main(["demo", "tune_configs/demo.yaml", "--set", "train.max_epochs=2", "--set", "tune.num_samples=2",
                 "--set", "tune.grace_period=1", "--tune-epochs", "1", "--out", str(tmp_path)])
    assert code == 0
    summary = json.loads((tmp_path / "demo_report.json").read_text())
    assert set(summary["depth_response"]) == {"je", "scvi"}
    assert set(summary["best_params"]) == {"loss.kl_weight", "loss.je_weight", "augment.min_library_size"}
    for variant in ("je", "scvi"):
        assert (tmp_path / variant / "report.md").is_file()
        rows = summary["depth_response"][variant]
        assert rows[-1]["depth"] == "full" and all(0 <= r["balanced_accuracy"] <= 1 for r in rows)
    assert len((tmp_path / "runs" / "tune" / "results.csv").read_text().splitlines()) == 3
    assert "kNN kept" in capsys.readouterr().out
