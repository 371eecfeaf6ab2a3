"""The ``prefix_longest`` objective (eps on the longest proper prefix only; not one of the seed's
seven runs); ARGS as in configs/base.py, e.g. ``demo,seed=1``, plus ``record``:

    configs/prefix_longest.py:record  -> prefix_longest_aux_eps0p25_hold0p3333_lin0p3333_seed0

modded-nanogpt's 2026-07 speedrun record "prefix token prediction auxiliary loss" exactly:
CE(y) + w CE(longest proper prefix of y) where one exists, CE(y) elsewhere, w = 0.25 held for
the first third of training and decayed linearly to 0 over the second third. Values after
``record`` override it (``record,eps=0.5``)."""

from configs import base

# The record's setting (objective fields); see prefixlm/objectives/families.py and eps_schedule.py.
RECORD = dict(prefix_longest_form="aux", eps=0.25, eps_schedule="hold_linear",
              eps_hold_fraction=1 / 3, eps_decay_fraction=1 / 3)


def get_config(arg=None):
    items = [s.strip() for s in (arg or "").split(",") if s.strip()]
    c = base.family_config("prefix_longest", None)
    if "record" in items:
        c.objective.update(RECORD)
    return base.apply_args(c, ",".join(s for s in items if s != "record"))
