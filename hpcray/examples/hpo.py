"""HPO job: a Ray Tune sweep over the training example's MLP; every trial is an MLflow run under one parent.

The parent run holds the best config and its validation loss; `mlflow ui` shows the trials nested under it.

Resumable (`resume: true` in the profile's job): Tune keeps the experiment in $HPCRAY_RESULTS_DIR (a directory on the
shared filesystem that outlives the cluster) under $HPCRAY_RESUME_NAME, which hpcray gives every attempt alike; an
attempt that finds it there restores it (`Tuner.restore(..., resume_errored=True)`: finished trials stay finished,
the others continue from their last epoch's checkpoint), logs to the parent run $HPCRAY_MLFLOW_PARENT_RUN_ID (the one the first attempt announced),
and a trial run again logs to the MLflow run it had. SIGTERM (`ray job stop`, which hpcray sends before the
walltime) stops the sweep as Ctrl-C does: Tune saves its state and the job exits with 1.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile

import mlflow
import numpy as np
import ray
from mlflow.tracking import MlflowClient
from ray import tune
from ray.air.integrations.mlflow import MLflowLoggerCallback

from model import MLP, make_data, train_epochs


class OneRunPerTrial(MLflowLoggerCallback):
    """MLflowLoggerCallback that gives a trial restored by `Tuner.restore` the MLflow run it had (found by its
    trial_name tag under the same parent), instead of a second run: each trial is counted once."""

    def log_trial_start(self, trial: tune.experiment.Trial) -> None:
        if trial not in self._trial_runs:
            parent = (self.tags or {}).get("mlflow.parentRunId")
            client = MlflowClient(tracking_uri=self.tracking_uri)
            earlier = client.search_runs(
                [self.mlflow_util.experiment_id],
                filter_string=f"tags.mlflow.parentRunId = '{parent}' and tags.trial_name = '{trial}'")
            if earlier:
                self._trial_runs[trial] = earlier[0].info.run_id
                client.update_run(earlier[0].info.run_id, status="RUNNING")
        super().log_trial_start(trial)


def trainable(config: dict) -> None:
    """Train, reporting each epoch with a checkpoint (the model's arrays), so that a trial stopped by the walltime
    continues from its last epoch when the sweep is restored."""
    data = make_data(config["samples"])
    model, done = MLP.init(data[0].shape[1], config["hidden"]), 0
    checkpoint = tune.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            saved = np.load(os.path.join(d, "model.npz"))
            model, done = MLP(saved["w1"], saved["b1"], saved["w2"], saved["b2"]), int(saved["epoch"])
    for epoch, train_loss, val_loss in train_epochs(model, data, config["epochs"] - done, config["lr"],
                                                    config["batch"], seed=done):
        with tempfile.TemporaryDirectory() as d:
            np.savez(os.path.join(d, "model.npz"), epoch=done + epoch, **vars(model))
            tune.report({"train_loss": train_loss, "val_loss": val_loss},
                        checkpoint=tune.Checkpoint.from_directory(d))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--samples", type=int, default=2000)
    args = ap.parse_args()

    # Trial workers print nothing of their own (Tune reports a failed trial here, with its traceback), but Ray
    # SIGTERMs them as the sweep ends, which now and then prints a spurious `SystemExit: 1` traceback: their
    # output stays in Ray's worker logs.
    stopped: list[int] = []

    def as_ctrl_c(signum: int, frame: object) -> None:  # Tune's SIGINT handler ends the sweep and saves its state
        stopped.append(signum)
        os.kill(os.getpid(), signal.SIGINT)

    signal.signal(signal.SIGTERM, as_ctrl_c)
    ray.init(log_to_driver=False)
    signal.signal(signal.SIGTERM, as_ctrl_c)  # again: ray.init installs its own, which only dumps a stack
    experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "hpcray-demo")
    mlflow.set_experiment(experiment)
    parent_id = os.environ.get("HPCRAY_MLFLOW_PARENT_RUN_ID")
    with mlflow.start_run(run_id=parent_id) if parent_id else mlflow.start_run(run_name="hpo") as parent:
        print(f"MLFLOW_RUN_ID={parent.info.run_id}", flush=True)  # hpcray resumes this run after a walltime stop
        if not parent_id:
            mlflow.log_params({"trials": args.trials, "epochs": args.epochs, "samples": args.samples})
        # hpcray gives each job a results directory (HPCRAY_RESULTS_DIR) and archives it at `down`; a resumable job
        # sets it to a directory on the shared filesystem, which outlives the allocation
        storage = os.path.abspath(os.environ.get("HPCRAY_RESULTS_DIR") or "tune-results")
        name = os.environ.get("HPCRAY_RESUME_NAME")  # None: a new experiment, named by Tune
        if name and tune.Tuner.can_restore(os.path.join(storage, name)):
            print(f"restoring the sweep from {os.path.join(storage, name)}", flush=True)
            tuner = tune.Tuner.restore(os.path.join(storage, name), trainable, resume_errored=True)
        else:
            space = {
                "lr": tune.loguniform(1e-3, 2e-1),
                "hidden": tune.choice([8, 16, 32, 64]),
                "batch": tune.choice([32, 64, 128]),
                "epochs": args.epochs,
                "samples": args.samples,
            }
            callback = OneRunPerTrial(
                tracking_uri=mlflow.get_tracking_uri(), experiment_name=experiment,
                tags={"mlflow.parentRunId": parent.info.run_id}, save_artifact=False)
            tuner = tune.Tuner(
                trainable,
                param_space=space,
                # one trial after another in the same worker: no worker start-up per trial
                tune_config=tune.TuneConfig(num_samples=args.trials, metric="val_loss", mode="min", reuse_actors=True),
                run_config=tune.RunConfig(name=name, callbacks=[callback], verbose=0, storage_path=storage,
                                          checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
            )
        results = tuner.fit()
        if stopped:
            print(f"sweep stopped by SIGTERM; its state is saved in {results.experiment_path}", flush=True)
            sys.exit(1)
        best = results.get_best_result()
        best_config = {k: best.config[k] for k in ("lr", "hidden", "batch")}
        mlflow.log_params({f"best_{k}": v for k, v in best_config.items()})
        mlflow.log_metric("best_val_loss", best.metrics["val_loss"])
        print(f"best trial: val_loss {best.metrics['val_loss']:.4f} with {best_config}")
        print(f"MLFLOW_RUN_ID={parent.info.run_id}")


if __name__ == "__main__":
    main()
