"""Runs a script of the examples with each epoch of model.train_epochs taking at least PACE seconds, so that a sweep
lasts as long in wall-clock time on a fast machine as on a slow one: `python paced.py PACE hpo.py ARGS...`.
tests/test_walltime.py copies it into the job's working dir beside the examples."""

from __future__ import annotations

import runpy
import sys
import time
from typing import Any, Iterator

import model

PACE = float(sys.argv[1])
_train = model.train_epochs


def paced(*args: Any, **kwargs: Any) -> Iterator[Any]:
    for item in _train(*args, **kwargs):
        time.sleep(PACE)
        yield item


model.train_epochs = paced
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
