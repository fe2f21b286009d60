"""The examples the demo runs, through `hpcray run --profile local` as `make demo` does, checked in MLflow's store:
the training loss falls and its model is logged; the HPO sweep makes one MLflow run per trial under one parent that
holds the best config, which is also printed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_training_and_hpo_examples_log_what_the_summary_says(tmp_path: Path) -> None:
    env = {**os.environ, "HPCRAY_STATE_DIR": str(tmp_path / "state")}
    done = subprocess.run([sys.executable, "-m", "hpcray.cli", "run", "--profile", "local", "training", "hpo",
                           "--json"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["torn_down"] and [j["status"] for j in report["jobs"]] == ["SUCCEEDED", "SUCCEEDED"]
    training, hpo = report["jobs"]
    assert len(training["mlflow_run_ids"]) == 1 and len(hpo["mlflow_run_ids"]) == 1
    assert "Traceback" not in done.stderr, done.stderr  # a clean demo: no spurious tracebacks from Ray workers

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=report["tracking_uri"])
    train_run = client.get_run(training["mlflow_run_ids"][0])
    losses = [m.value for m in client.get_metric_history(train_run.info.run_id, "val_loss")]
    assert len(losses) == int(train_run.data.params["epochs"]) + 1 and losses[-1] < losses[0] / 2  # step 0: untrained
    assert "model" in [a.path for a in client.list_artifacts(train_run.info.run_id)]

    parent = client.get_run(hpo["mlflow_run_ids"][0])
    trials = client.search_runs([parent.info.experiment_id],
                                filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(trials) == int(parent.data.params["trials"]) >= 8
    assert all("val_loss" in t.data.metrics for t in trials)
    best = min(t.data.metrics["val_loss"] for t in trials)
    assert parent.data.metrics["best_val_loss"] == pytest.approx(best)
    assert {"best_lr", "best_hidden", "best_batch"} <= set(parent.data.params)
    assert len(hpo["highlights"]) == 1 and hpo["highlights"][0].startswith(f"best trial: val_loss {best:.4f} with ")
