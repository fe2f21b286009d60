"""Training job: a small MLP on generated data, logging params, per-epoch metrics and the model to MLflow.

Runs as a Ray job (hpcray submit/run): MLFLOW_TRACKING_URI and MLFLOW_EXPERIMENT_NAME come from the profile,
credentials (if any) from the cluster's environment. Sizes come from the command line the profile gives.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import mlflow
import numpy as np

from model import MLP, make_data, train_epochs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--hidden", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()

    mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "hpcray-demo"))
    data = make_data(args.samples)
    model = MLP.init(data[0].shape[1], args.hidden)
    with mlflow.start_run(run_name="training") as run:
        mlflow.log_params(vars(args))
        first = model.loss(data[2], data[3])
        mlflow.log_metric("val_loss", first, step=0)
        last = first
        for epoch, train_loss, val_loss in train_epochs(model, data, args.epochs, args.lr, args.batch):
            mlflow.log_metrics({"train_loss": train_loss, "val_loss": val_loss}, step=epoch)
            print(f"epoch {epoch:3d}  train_loss {train_loss:.4f}  val_loss {val_loss:.4f}", flush=True)
            last = val_loss
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "mlp.npz")
            np.savez(path, w1=model.w1, b1=model.b1, w2=model.w2, b2=model.b2)
            mlflow.log_artifact(path, artifact_path="model")
        mlflow.log_metric("final_val_loss", last)
        print(f"val_loss fell from {first:.4f} (untrained) to {last:.4f}")
        print(f"MLFLOW_RUN_ID={run.info.run_id}")


if __name__ == "__main__":
    main()
