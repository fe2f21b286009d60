"""Runs a script of this directory with each epoch of model.train_epochs taking at least PACE seconds:
`python paced.py PACE hpo.py ARGS...` — a sweep as long in wall-clock time on a fast machine as on a slow one."""

import runpy
import sys
import time

import model

PACE = float(sys.argv[1])
_train = model.train_epochs


def paced(*args, **kwargs):
    for item in _train(*args, **kwargs):
        time.sleep(PACE)
        yield item


model.train_epochs = paced
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
