"""A PyTorch training loop on synthetic data that reports its throughput (samples/s) and the GPU it saw.

Run bare (`python gpu_train.py`) or as a Ray job through `hpcray submit --num-gpus 1`; prints one JSON line
prefixed with GPU_RESULT= and, when MLFLOW_TRACKING_URI is set, logs it as an MLflow run.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from torch import nn


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--label", default="bare")
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(8), nn.Flatten(), nn.Linear(128 * 64, 512), nn.ReLU(), nn.Linear(512, 10),
    ).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(args.batch, 3, 64, 64, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        return loss

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    result = {
        "label": args.label,
        "samples_per_s": args.steps * args.batch / elapsed,
        "seconds": elapsed,
        "final_loss": float(loss),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
    if os.environ.get("MLFLOW_TRACKING_URI"):
        import mlflow

        with mlflow.start_run(run_name=f"gpu-{args.label}") as run:
            mlflow.log_params({k: result[k] for k in ("label", "device_name", "cuda_visible_devices")})
            mlflow.log_metrics({"samples_per_s": result["samples_per_s"], "final_loss": result["final_loss"]})
            result["mlflow_run_id"] = run.info.run_id
    print("GPU_RESULT=" + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
