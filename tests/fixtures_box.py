"""The site in a box (tests/fake_site_box.py) for a test session: over the session's SLURM cluster, without MLflow;
skipped with the reason where SLURM or root is missing. Import the fixture where it is used."""

from __future__ import annotations

from typing import Iterator

import pytest

from tests.fake_site_box import SiteBox
from tests.fixtures_slurm import SlurmCluster


@pytest.fixture(scope="session")
def site_box(slurm_cluster: SlurmCluster) -> Iterator[SiteBox]:
    """An interLink virtual node (PodCIDR 127.0.100.0/24, cpu 100, no GPUs) over the session's SLURM; every job,
    network namespace and server it made is gone afterwards; fails the tests if a fake broke."""
    box = SiteBox(mlflow=False, slurm=slurm_cluster, poll_s=0.5).start()
    try:
        yield box
        assert box.vk is not None and box.api is not None and box.api.operator is not None
        errors = box.vk.errors + box.api.operator.errors
        assert not errors, "a fake failed:\n" + "\n".join(errors)
    finally:
        box.stop()
