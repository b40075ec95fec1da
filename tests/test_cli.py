import json
import subprocess
import sys

import pytest

from distributed_je.cli import EXIT_BAD_INPUT, EXIT_NOT_BUILT, NOT_BUILT, build_parser, main

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


MINIMAL_ARGV = {"tune": ["tune", "c.yaml"], "evaluate": ["evaluate", "m", "d", "--labels-key", "l", "--out", "o"], "compare": ["compare", "c.yaml"]}


@pytest.mark.parametrize("name", sorted(NOT_BUILT))
def test_unbuilt_subcommands_say_so_and_fail(name, capsys):
    assert main(MINIMAL_ARGV[name]) == EXIT_NOT_BUILT
    assert "not built yet" in capsys.readouterr().err


def test_bad_config_value_is_reported_not_raised(capsys):
    assert main(["demo", "--set", "model.n_latent=0"]) == EXIT_BAD_INPUT
    assert "model.n_latent=0 is out of range" in capsys.readouterr().err


def test_demo_smoke_on_tiny_settings(tmp_path, capsys):
    code = main(["demo", "--set", "train.max_epochs=1", "--set", "data.batch_size=128", "--out", str(tmp_path)])
    assert code == 0
    report = json.loads((tmp_path / "demo_report.json").read_text())
    assert set(report["variants"]) == {"scvi", "je"}
    depths = [row["depth"] for row in report["variants"]["je"]]
    assert depths[-1] == "full" and depths[0] == "20"
    for row in report["variants"]["je"]:
        assert 0.0 <= row["balanced_accuracy"] <= 1.0 and row["distance_to_bias_point"] >= 0.0
    assert "bal.acc" in capsys.readouterr().out
