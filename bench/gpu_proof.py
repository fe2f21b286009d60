"""The GPU proof (`make bench-gpu`): the same PyTorch training bare on the GPU and as a job submitted through
`hpcray submit --num-gpus 1` to hpcray's local backend, in one run. Goal: hpcray ≥ 0.95× bare samples/s.

Needs an NVIDIA GPU, torch with CUDA, and hpcray installed. Prints a Markdown section for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import BIN, QUIET, REPO, machine

HERE = Path(__file__).resolve().parent


def result_of(output: str) -> dict:
    for line in output.splitlines():
        if "GPU_RESULT=" in line:
            return json.loads(line.split("GPU_RESULT=", 1)[1])
    raise SystemExit(f"no GPU_RESULT line in:\n{output[-3000:]}")


def run(argv: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(argv)}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done.stdout + done.stderr


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()

    state = Path(tempfile.mkdtemp(prefix="hpcray-gpu-"))
    env = {**os.environ, **QUIET, "HPCRAY_STATE_DIR": str(state)}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{state}/mlflow.db"
    profile = state / "gpu.yaml"
    profile.write_text(
        "name: gpu-proof\nbackend: local\nlocal: {num_gpus: 1}\n"
        f"mlflow: {{tracking_uri: 'sqlite:///{state}/mlflow.db', experiment: gpu-proof, credentials: none}}\n")
    train = [sys.executable, str(HERE / "gpu_train.py"), "--steps", str(args.steps)]
    hpcray = str(BIN / "hpcray")
    bare, ours = [], []
    run([hpcray, "up", "--profile", str(profile)], env)
    try:
        for _ in range(args.runs):
            bare.append(result_of(run(train + ["--label", "bare"], env)))
            out = run([hpcray, "submit", "--profile", str(profile), "--num-gpus", "1", "--working-dir", str(HERE),
                       "--", "python", "gpu_train.py", "--steps", str(args.steps), "--label", "hpcray"], env)
            ours.append(result_of(out))
    finally:
        run([hpcray, "down", "--profile", str(profile)], env)
    b = statistics.median(r["samples_per_s"] for r in bare)
    o = statistics.median(r["samples_per_s"] for r in ours)
    last = ours[-1]
    print(f"## GPU proof\n\nMachine: {machine()}; GPU seen by the job: {last['device_name']} "
          f"(CUDA_VISIBLE_DEVICES={last['cuda_visible_devices']}); MLflow run of the last job: "
          f"{last.get('mlflow_run_id')}.\n")
    print("| training | samples/s (median of %d) | min | max |\n|---|---|---|---|" % args.runs)
    for label, rows, med in (("bare on the GPU", bare, b), ("`hpcray submit --num-gpus 1`", ours, o)):
        vals = [r["samples_per_s"] for r in rows]
        print(f"| {label} | {med:,.0f} | {min(vals):,.0f} | {max(vals):,.0f} |")
    print(f"\nRatio hpcray/bare: **{o / b:.3f}×** (goal ≥ 0.95×). Reproduce: `make bench-gpu` "
          f"(`python bench/gpu_proof.py --runs {args.runs} --steps {args.steps}`) in {REPO.name}.")


if __name__ == "__main__":
    main()
