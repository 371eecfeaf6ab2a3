"""The ``label_smoothing`` objective; ARGS as in configs/base.py, e.g. ``demo,seed=1``."""

from configs import base


def get_config(arg=None):
    return base.family_config("label_smoothing", arg)
