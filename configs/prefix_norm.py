"""The ``prefix_norm`` objective; ARGS as in configs/base.py, e.g. ``demo,seed=1``."""

from configs import base


def get_config(arg=None):
    return base.family_config("prefix_norm", arg)
