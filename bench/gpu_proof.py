"""The GPU proof (`make bench-gpu`): the same PyTorch training bare on the GPU and as a job submitted through
`hpcray submit --num-gpus 1` to hpcray's local backend, alternately, in one run. Goal: hpcray ≥ 0.95× bare
samples/s.

Needs an NVIDIA GPU, torch with CUDA in this venv (`.venv/bin/pip install torch`), and hpcray installed. Prints a
Markdown section and puts it in place of the GPU section of docs/BENCHMARKS.md (--out '' only prints it). The local
head runs in a state dir of its own and is taken down by `hpcray down` whatever happens.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import BIN, QUIET, REPO, loadavg, machine

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- gpu-proof -->", "<!-- /gpu-proof -->"


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


def check_gpu() -> None:
    probe = ("import torch; assert torch.cuda.is_available(), 'torch sees no CUDA device'; "
             "print(torch.__version__, torch.cuda.get_device_name(0))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or ["?"])[-1]
        raise SystemExit(f"the GPU proof needs an NVIDIA GPU and torch with CUDA in {sys.prefix} "
                         f"(`{BIN / 'pip'} install torch`): {why}")
    print(f"torch {done.stdout.strip()}", file=sys.stderr)


def write_section(path: Path, section: str) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{BEGIN}\n{section.rstrip()}\n{END}"
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
    print(f"wrote the GPU section of {path}", file=sys.stderr)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default=str(REPO / "docs" / "BENCHMARKS.md"), help="'' to print only")
    args = ap.parse_args()
    check_gpu()

    state = Path(tempfile.mkdtemp(prefix="hpcray-gpu-"))
    store = f"sqlite:///{state}/mlflow.db"
    env = {**os.environ, **QUIET, "HPCRAY_STATE_DIR": str(state), "MLFLOW_TRACKING_URI": store,
           "MLFLOW_EXPERIMENT_NAME": "gpu-proof"}
    profile = state / "gpu.yaml"
    profile.write_text("name: gpu-proof\nbackend: local\nlocal: {num_gpus: 1}\n"
                       f"mlflow: {{tracking_uri: '{store}', experiment: gpu-proof, credentials: none}}\n")
    train = [sys.executable, str(HERE / "gpu_train.py"), "--steps", str(args.steps)]
    hpcray = str(BIN / "hpcray")
    load = loadavg()
    bare, ours = [], []
    run([hpcray, "up", "--profile", str(profile)], env)
    try:
        for i in range(args.runs):  # alternately, so both see the same GPU clocks and host load
            bare.append(result_of(run(train + ["--label", "bare"], env)))
            out = run([hpcray, "submit", "--profile", str(profile), "--num-gpus", "1", "--working-dir", str(HERE),
                       "--", "python", "gpu_train.py", "--steps", str(args.steps), "--label", "hpcray"], env)
            ours.append(result_of(out))
            print(f"  run {i + 1}/{args.runs}: bare {bare[-1]['samples_per_s']:,.0f} samples/s, "
                  f"hpcray {ours[-1]['samples_per_s']:,.0f} samples/s", file=sys.stderr, flush=True)
    finally:
        run([hpcray, "down", "--profile", str(profile)], env)
    b = statistics.median(r["samples_per_s"] for r in bare)
    o = statistics.median(r["samples_per_s"] for r in ours)
    last = ours[-1]
    lines = [
        "## GPU proof (`make bench-gpu`)",
        "",
        f"Machine: {machine()}; load average at start {load}. GPU seen by the job: {last['device_name']} "
        f"(CUDA_VISIBLE_DEVICES={last['cuda_visible_devices']}); bare: {bare[-1]['device_name']} "
        f"(CUDA_VISIBLE_DEVICES={bare[-1]['cuda_visible_devices']}). MLflow run of the last job: "
        f"{last.get('mlflow_run_id')} in {store} (experiment gpu-proof).",
        "",
        f"| training ({args.steps} steps, batch 512) | samples/s (median of {args.runs}) | min | max |",
        "|---|---|---|---|",
    ]
    for label, rows, med in (("bare on the GPU", bare, b), ("`hpcray submit --num-gpus 1`", ours, o)):
        vals = [r["samples_per_s"] for r in rows]
        lines.append(f"| {label} | {med:,.0f} | {min(vals):,.0f} | {max(vals):,.0f} |")
    lines += ["", f"Ratio hpcray/bare: **{o / b:.3f}×** (goal ≥ 0.95×: {'met' if o / b >= 0.95 else '**missed**'}). "
              f"Reproduce: `make bench-gpu` (`python bench/gpu_proof.py --runs {args.runs} --steps {args.steps}`)."]
    section = "\n".join(lines)
    print(section)
    if args.out:
        write_section(Path(args.out), section)


if __name__ == "__main__":
    main()
