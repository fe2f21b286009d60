"""How soon `hpcray up` / `hpcray down` notice the cluster is ready / gone (goal ≤ 0.5 s each), against the 5 s
`kubectl get pods` polling loops users write by hand.

Real helm against tests/fake_kube_api.py (its fake KubeRay operator in manual mode): the clock starts when the
fake API commits the change that makes the last pod Ready (or deletes the last pod) and stops when the command has
exited. The polling loops start at a random phase of their 5 s period, as they would for a user. Rounds are
interleaved (hpcray up, hpcray down, polling up, polling down, …) so that both sides see the same load.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

from common import HEADER, QUIET, REPO, Result, Stats, loadavg, machine, prepare_environment

sys.path.insert(0, str(REPO))
from tests.fake_kube_api import MINIMAL_RAYCLUSTER_CRD, PODS, FakeKubeAPI  # noqa: E402
from tests.fixtures_tools import helm_path  # noqa: E402

CLUSTER = "bench-kuberay"
WORKERS = 2
POLL_S = 5
KUBECTL_READY = (f"until [ \"$(kubectl get pods -l ray.io/cluster={CLUSTER} -o jsonpath='{{range .items[*]}}"
                 "{.status.conditions[?(@.type==\"Ready\")].status}{\"\\n\"}{end}' | grep -c True)\" "
                 f"-ge {WORKERS + 1} ]; do sleep {POLL_S}; done")
COMMAND = "python bench/bench_lifecycle.py"
KUBECTL_GONE = f"while [ -n \"$(kubectl get pods -l ray.io/cluster={CLUSTER} -o name)\" ]; do sleep {POLL_S}; done"


class LastPodChange:
    """Records (on the fake API's thread) when the last pod of the cluster became Ready or was deleted."""

    def __init__(self, api: FakeKubeAPI) -> None:
        self.ready_at: float | None = None
        self.gone_at: float | None = None
        api.store.listeners.append(self)

    def __call__(self, change: Any) -> None:
        if change.res is not PODS:
            return
        obj = change.new or change.old
        if obj["metadata"].get("labels", {}).get("ray.io/cluster") != CLUSTER:
            return
        if change.new is None:
            self.gone_at = time.perf_counter()
        elif _ready(change.new) and not _ready(change.old or {}):
            self.ready_at = time.perf_counter()


def _ready(pod: dict[str, Any]) -> bool:
    status = pod.get("status", {})
    return status.get("phase") == "Running" and any(
        c["type"] == "Ready" and c["status"] == "True" for c in status.get("conditions", []))


def hpcray_up(api: FakeKubeAPI, clock: LastPodChange, profile: Path, env: dict[str, str]) -> float:
    assert api.operator is not None
    clock.ready_at = None
    api.operator.keep_pending(cluster=CLUSTER)  # until make_ready below (the latest rule wins)
    proc = subprocess.Popen([sys.executable, "-m", "hpcray.cli", "up", "-p", str(profile)], env=env, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    for line in proc.stderr:
        if "waiting for the head" in line:
            break
    time.sleep(0.5)  # hpcray is now in its watch
    api.operator.make_ready(cluster=CLUSTER)
    threading.Thread(target=proc.stderr.read, daemon=True).start()
    if proc.wait(timeout=60) != 0:
        raise SystemExit("hpcray up failed")
    assert clock.ready_at is not None
    return time.perf_counter() - clock.ready_at


def hpcray_down(clock: LastPodChange, profile: Path, env: dict[str, str]) -> float:
    clock.gone_at = None
    done = subprocess.run([sys.executable, "-m", "hpcray.cli", "down", "-p", str(profile)], env=env,
                          capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise SystemExit(f"hpcray down failed: {done.stderr}")
    assert clock.gone_at is not None
    return time.perf_counter() - clock.gone_at


def polling_loop(script: str, env: dict[str, str], change: Any, stamp: Any) -> float:
    """Start the loop, make the change at a random phase of its period, time from the change to the loop's end."""
    proc = subprocess.Popen(["bash", "-c", script], env=env)
    time.sleep(1.5 + random.uniform(0, POLL_S))  # kubectl's first call (discovery) takes ~1 s
    change()
    if proc.wait(timeout=60) != 0:
        raise SystemExit("polling loop failed")
    return time.perf_counter() - stamp()


def results(runs: int = 5, helm_major: int = 4) -> list[Result]:
    helm = helm_path(helm_major)
    charts = os.environ.get("HPCRAY_CHARTS_DIR") or str(REPO.parent / "shared" / "charts")
    if helm is None:
        raise SystemExit(f"helm {helm_major} not installed: `make test` fetches it into .tools/")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        crd = work / "crd.json"
        crd.write_text(json.dumps(MINIMAL_RAYCLUSTER_CRD))
        api = FakeKubeAPI(crds=[crd]).start()
        assert api.operator is not None
        api.operator.mode = "manual"
        api.operator.terminating_delay = 1.0
        kubeconfig = api.write_kubeconfig(work / "kubeconfig")
        profile = work / "bench.yaml"
        profile.write_text(textwrap.dedent(f"""\
            name: bench
            backend: kuberay
            kubernetes: {{namespace: default, kubeconfig: {kubeconfig}}}
            image: {{dir: /opt/sif}}
            head: {{cpu: "1", memory: 2G}}
            workers: {{cpu: {{replicas: {WORKERS}, cpu: "1", memory: 2G}}}}
            mlflow: {{credentials: none}}
            """))
        env = {**os.environ, **QUIET, "HPCRAY_HELM": helm, "HPCRAY_CHARTS_DIR": charts,
               "HPCRAY_STATE_DIR": str(work / "state"), "KUBECONFIG": str(kubeconfig)}
        clock = LastPodChange(api)
        up, down, poll_up, poll_down = [], [], [], []

        def ready() -> None:
            assert api.operator is not None
            clock.ready_at = None
            api.operator.make_ready(cluster=CLUSTER)

        def uninstall() -> None:
            clock.gone_at = None
            subprocess.run([helm, "uninstall", "bench"], env=env, check=True, capture_output=True)

        try:
            for _ in range(runs):  # interleaved: both sides under the same load
                up.append(hpcray_up(api, clock, profile, env))
                down.append(hpcray_down(clock, profile, env))
                api.operator.keep_pending(cluster=CLUSTER)
                subprocess.run([helm, "upgrade", "--install", "bench", f"{charts}/ray-cluster-1.2.2.tgz",
                                "--set", f"worker.replicas={WORKERS}"], env=env, check=True, capture_output=True)
                poll_up.append(polling_loop(KUBECTL_READY, env, ready, lambda: clock.ready_at))
                poll_down.append(polling_loop(KUBECTL_GONE, env, uninstall, lambda: clock.gone_at))
        finally:
            api.stop()
    note = f"helm {helm_major}, fake API + fake KubeRay operator, {WORKERS + 1} pods; usual way: {POLL_S} s kubectl loop"
    return [
        Result(f"`hpcray up`: last pod Ready → command returns ({note})", Stats(up), Stats(poll_up), "≤ 0.5 s",
               COMMAND, 0.5, on="seconds"),
        Result(f"`hpcray down`: last pod deleted → command returns ({note})", Stats(down), Stats(poll_down),
               "≤ 0.5 s", COMMAND, 0.5, on="seconds"),
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--helm", type=int, default=4, choices=(3, 4))
    args = ap.parse_args()
    prepare_environment()
    load = loadavg()
    rows = results(args.runs, args.helm)
    print(f"<!-- {machine()}; load average at start {load} -->")
    print(HEADER)
    print("\n".join(r.row() for r in rows))


if __name__ == "__main__":
    main()
