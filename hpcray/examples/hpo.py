"""HPO job: a Ray Tune sweep over the training example's MLP; every trial is an MLflow run under one parent.

The parent run holds the best config and its validation loss; `mlflow ui` shows the trials nested under it.
"""

from __future__ import annotations

import argparse
import os

import mlflow
import ray
from ray import tune
from ray.air.integrations.mlflow import MLflowLoggerCallback

from model import MLP, make_data, train_epochs


def trainable(config: dict) -> None:
    data = make_data(config["samples"])
    model = MLP.init(data[0].shape[1], config["hidden"])
    for _, train_loss, val_loss in train_epochs(model, data, config["epochs"], config["lr"], config["batch"]):
        tune.report({"train_loss": train_loss, "val_loss": val_loss})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--samples", type=int, default=2000)
    args = ap.parse_args()

    # Trial workers print nothing of their own (Tune reports a failed trial here, with its traceback), but Ray
    # SIGTERMs them as the sweep ends, which now and then prints a spurious `SystemExit: 1` traceback: their
    # output stays in Ray's worker logs.
    ray.init(log_to_driver=False)
    experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", "hpcray-demo")
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name="hpo") as parent:
        mlflow.log_params({"trials": args.trials, "epochs": args.epochs, "samples": args.samples})
        space = {
            "lr": tune.loguniform(1e-3, 2e-1),
            "hidden": tune.choice([8, 16, 32, 64]),
            "batch": tune.choice([32, 64, 128]),
            "epochs": args.epochs,
            "samples": args.samples,
        }
        callback = MLflowLoggerCallback(
            tracking_uri=mlflow.get_tracking_uri(), experiment_name=experiment,
            tags={"mlflow.parentRunId": parent.info.run_id}, save_artifact=False)
        tuner = tune.Tuner(
            trainable,
            param_space=space,
            # one trial after another in the same worker: no worker start-up per trial
            tune_config=tune.TuneConfig(num_samples=args.trials, metric="val_loss", mode="min", reuse_actors=True),
            # hpcray gives each job a results directory on the head (HPCRAY_RESULTS_DIR) and archives it at `down`
            run_config=tune.RunConfig(callbacks=[callback], verbose=0,
                                      storage_path=os.environ.get("HPCRAY_RESULTS_DIR")
                                      or os.path.abspath("tune-results")),
        )
        best = tuner.fit().get_best_result()
        best_config = {k: best.config[k] for k in ("lr", "hidden", "batch")}
        mlflow.log_params({f"best_{k}": v for k, v in best_config.items()})
        mlflow.log_metric("best_val_loss", best.metrics["val_loss"])
        print(f"best trial: val_loss {best.metrics['val_loss']:.4f} with {best_config}")
        print(f"MLFLOW_RUN_ID={parent.info.run_id}")


if __name__ == "__main__":
    main()
