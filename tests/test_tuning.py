"""The search: space parsing, the Optuna bookkeeping of ASHA-stopped trials, choosing the best
trial, and (on real Ray) a smoke tune submitted as a job and a killed-then-resumed tune."""

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from distributed_je.config import ConfigError, load_config
from distributed_je.tuning import Domain, _make_searcher, best_row, parse_search_space
from processes import kill_session

REPO = Path(__file__).resolve().parents[1]
SPACE = {
    "loss.kl_weight": {"loguniform": [0.1, 10]},
    "loss.je_weight": {"uniform": [10, 1000]},
    "model.n_latent": {"int": [8, 32]},
    "model.likelihood": {"choice": ["nb", "zinb"]},
}


def config_with(space, *overrides):
    return load_config(None, [f"tune.search_space={json.dumps(space)}", *overrides])


def test_a_flat_space_parses_into_domains():
    space = parse_search_space(config_with(SPACE))
    assert space == {
        "loss.kl_weight": Domain("loguniform", (0.1, 10)), "loss.je_weight": Domain("uniform", (10, 1000)),
        "model.n_latent": Domain("int", (8, 32)), "model.likelihood": Domain("choice", ("nb", "zinb")),
    }


@pytest.mark.parametrize("space, message", [
    ({"loss.kl_wieght": {"uniform": [0, 1]}}, "unknown key in section 'loss': 'kl_wieght'"),
    ({"los.kl_weight": {"uniform": [0, 1]}}, "unknown section: 'los'"),
    ({"loss.kl_weight": {"loguniform": {"uniform": [0, 1]}}}, "must be a non-empty list"),
    ({"loss.kl_weight": {"choice": [{"uniform": [0, 1]}, 1.0]}}, "nested domains are not supported"),
    ({"loss.kl_weight": {"uniform": [0, 1], "choice": [1]}}, "is not a domain"),
    ({"loss.kl_weight": {"normal": [0, 1]}}, "unknown domain 'normal'"),
    ({"loss.kl_weight": {"loguniform": [0, 1]}}, "low must be > 0"),
    ({"loss.kl_weight": {"uniform": [2, 1]}}, "low < high"),
    ({"loss.kl_weight": {"uniform": [-1, 1]}}, "loss.kl_weight=-1.0 is out of range"),
    ({"model.n_latent": {"int": [8, 32.5]}}, "must be integers"),
    ({"model.likelihood": {"choice": ["nb", "gamma"]}}, "choose one of nb, zinb, poisson"),
    ({"data.batch_size": {"choice": [128, 256]}}, "may not vary the experiment, data, tune sections"),
])
def test_a_bad_space_fails_before_any_trial(space, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        parse_search_space(config_with(space))


def test_an_objective_holding_a_searched_weight_is_refused():
    with pytest.raises(ConfigError, match="val_loss contains the searched weights loss.kl_weight"):
        parse_search_space(config_with(SPACE, "tune.metric=val_loss"))
    parse_search_space(config_with({"optim.lr": {"loguniform": [1e-4, 1e-2]}}, "tune.metric=val_loss"))


def test_start_points_must_be_in_the_space():
    config = config_with(SPACE, 'tune.points_to_evaluate=[{"loss.kl_weight": 1.0, "loss.kl": 2}]')
    with pytest.raises(ConfigError, match=r"\['loss.kl'\] are not in tune.search_space"):
        _make_searcher(config, parse_search_space(config))


def test_asha_stopped_trials_reach_optuna_as_pruned_with_their_epoch_values():
    import optuna

    config = config_with({"loss.kl_weight": {"loguniform": [0.1, 10]}}, "tune.metric=val_combined_nll")
    space = parse_search_space(config)
    searcher = _make_searcher(config, space)
    searcher.set_search_properties(None, None, {key: domain.to_tune() for key, domain in space.items()})
    for trial_id in ("stopped", "finished", "failed"):
        assert searcher.suggest(trial_id) is not None
    for epoch, value in ((1, 900.0), (2, 850.0)):
        searcher.on_trial_result("stopped", {"epoch": epoch, "val_combined_nll": value, "training_iteration": 1})
    searcher.on_trial_complete("stopped", {"epoch": 2, "val_combined_nll": 850.0, "run_complete": 0.0})
    searcher.on_trial_complete("finished", {"epoch": 4, "val_combined_nll": 800.0, "run_complete": 1.0})
    searcher.on_trial_complete("failed", None, error=True)
    trials = {t.number: t for t in searcher._ot_study.trials}
    assert trials[0].state == optuna.trial.TrialState.PRUNED
    assert trials[0].intermediate_values == {1: 900.0, 2: 850.0}  # keyed by training epoch
    assert trials[1].state == optuna.trial.TrialState.COMPLETE and trials[1].value == 800.0
    assert trials[2].state == optuna.trial.TrialState.FAIL


def test_several_objectives_reach_optuna_as_values_and_stopped_trials_as_pruned():
    import optuna

    config = config_with({"loss.kl_weight": {"loguniform": [0.1, 10]}},
                         "tune.metric=[val_recon_nll, val_knn_kept]", "tune.mode=[min, max]")
    space = parse_search_space(config)
    searcher = _make_searcher(config, space)
    searcher.set_search_properties(None, None, {key: domain.to_tune() for key, domain in space.items()})
    searcher.suggest("stopped"), searcher.suggest("finished")
    searcher.on_trial_result("stopped", {"epoch": 1, "val_recon_nll": 3.0, "val_knn_kept": 0.4})
    searcher.on_trial_complete("stopped", {"epoch": 1, "val_recon_nll": 3.0, "val_knn_kept": 0.4, "run_complete": 0.0})
    searcher.on_trial_complete("finished", {"epoch": 2, "val_recon_nll": 2.0, "val_knn_kept": 0.5, "run_complete": 1.0})
    stopped, finished = searcher._ot_study.trials
    assert stopped.state == optuna.trial.TrialState.PRUNED
    assert finished.state == optuna.trial.TrialState.COMPLETE and finished.values == [2.0, 0.5]


def _row(trial, status, a, b=0.0):
    return {"trial": trial, "status": status, "val_recon_nll": a, "val_knn_kept": b}


def test_the_best_trial_is_a_complete_one_and_pareto_optimal():
    rows = [_row("early", "stopped early (ASHA)", 1.0), _row("x", "complete", 3.0, 0.5),
            _row("y", "complete", 2.0, 0.4), _row("z", "complete", 2.5, 0.3)]
    single = load_config(None, ["tune.metric=val_recon_nll"])
    assert best_row(rows, single)["trial"] == "y"  # the stopped trial's early value does not count
    multi = load_config(None, ["tune.metric=[val_recon_nll, val_knn_kept]", "tune.mode=[min, max]"])
    assert best_row(rows, multi)["trial"] == "y"   # front {x, y}: z is dominated by y; y is best on the first
    assert best_row(rows[:2] + rows[3:], multi)["trial"] == "z"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _smoke_overrides(store, storage):
    return ["--set", f"data.store={store}", "--set", f"experiment.storage_path={storage}"]


def _read_results(path: Path) -> list[dict]:
    with open(path) as handle:
        return list(csv.DictReader(handle))


@pytest.mark.ray
@pytest.mark.data
def test_smoke_tune_submitted_as_a_job_to_a_ray_head(pbmc_store, tmp_path, monkeypatch):
    from ray.job_submission import JobStatus, JobSubmissionClient

    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # token authentication, as on a real cluster
    temp_dir = tempfile.mkdtemp(prefix="dje-ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    dashboard = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    head = subprocess.Popen(
        [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={_free_port()}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         "--num-cpus=2", f"--temp-dir={temp_dir}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:  # the head's token (written by `ray start` when missing), sent as a real client sends it
                token = (Path.home() / ".ray" / "auth_token").read_text().strip()
                client = JobSubmissionClient(f"http://127.0.0.1:{dashboard}",
                                             headers={"authorization": f"Bearer {token}"})
                break
            except Exception:
                assert time.monotonic() < deadline and head.poll() is None, "the Ray head did not come up"
                time.sleep(1)
        storage = tmp_path / "results"
        command = [sys.executable, "-m", "distributed_je.cli", "tune", str(REPO / "tune_configs" / "smoke.yaml"),
                   *_smoke_overrides(pbmc_store, storage)]
        job = client.submit_job(entrypoint=" ".join(command), runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
        deadline = time.monotonic() + 400
        while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
            assert time.monotonic() < deadline, "the tuning job did not finish"
            time.sleep(2)
        logs = client.get_job_logs(job)
        assert status == JobStatus.SUCCEEDED, logs[-3000:]
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # `ray start --block` takes its cluster down with it
        head.wait(timeout=60)

    report = storage / "smoke"
    rows = _read_results(report / "results.csv")
    assert len(rows) == 2
    assert {row["status"] for row in rows} <= {"complete", "stopped early (ASHA)"}
    assert any(row["status"] == "complete" and row["epochs"] == "2" for row in rows)
    best = load_config(report / "best_config.yaml")
    assert best.experiment.name == "smoke-best" and best.data.store == pbmc_store
    assert str(best.loss.kl_weight) in {row["loss.kl_weight"] for row in rows}
    assert (report / "objective.png").stat().st_size > 0 and (report / "params.png").stat().st_size > 0
    assert "best config:" in logs


@pytest.mark.ray
@pytest.mark.data
def test_kill_the_tune_driver_and_resume_loses_and_reruns_no_trial(pbmc_store, tmp_path):
    storage = tmp_path / "results"
    overrides = [*_smoke_overrides(pbmc_store, storage), "--set", "tune.num_samples=3",
                 "--set", "tune.max_concurrent_trials=1", "--set", "tune.grace_period=2"]
    command = [sys.executable, "-m", "distributed_je.cli", "tune", str(REPO / "tune_configs" / "smoke.yaml"),
               *overrides]
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "PYTHONUNBUFFERED": "1"}
    experiment = storage / "smoke"

    def finished_trials() -> dict[str, list]:
        """Trial directory -> the epochs it trained, for trials that ran to the end. A trial that
        had finished before Tune recorded it is restarted and reports its last epoch again (the
        same epoch and train_seconds): that is not training again."""
        done = {}
        for result in experiment.glob("run_trial_*/result.json"):
            rows = [json.loads(line) for line in result.read_text().splitlines()]
            if rows and rows[-1].get("run_complete"):
                done[result.parent.name] = list(dict.fromkeys((row["epoch"], row["train_seconds"]) for row in rows))
        return done

    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                             start_new_session=True)
    deadline = time.monotonic() + 300
    while not finished_trials():
        assert time.monotonic() < deadline and first.poll() is None, "no trial finished before the kill"
        time.sleep(0.5)
    time.sleep(2)  # let Tune save the experiment state that records the finished trial
    kill_session(first.pid)  # the driver and the local Ray it started, workers included
    first.wait()
    before = finished_trials()
    assert not (experiment / "results.csv").exists()

    second = subprocess.run([*command, "--resume"], capture_output=True, text=True, env=env, timeout=400)
    assert second.returncode == 0, second.stderr[-3000:]
    after = finished_trials()
    assert len(after) == 3
    assert {trial: after[trial] for trial in before} == before  # finished trials were not run again
    rows = _read_results(experiment / "results.csv")
    assert len(rows) == 3 and all(row["status"] == "complete" for row in rows)
