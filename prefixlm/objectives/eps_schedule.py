"""The eps schedule: eps as a function of the training step (``objective.eps_schedule``).

    constant:     eps
    linear:       eps max(0, 1 - step / (decay total))
    hold_linear:  eps for step < hold total, then eps max(0, 1 - (step - hold total) / (decay
                  total)), so 0 from (hold + decay) total on

with total = train.steps, decay = ``objective.eps_decay_fraction`` and hold =
``objective.eps_hold_fraction``. ``hold_linear`` is modded-nanogpt's 2026-07 record schedule for
its prefix auxiliary loss (hold 1/3, decay 1/3). The objective's target is linear in eps, so the
step computes eps as a traced scalar and no table is rebuilt (``prefixlm.objectives``).
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp

SCHEDULES = ("constant", "linear", "hold_linear")


def _fraction(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def validate(schedule, decay_fraction, hold_fraction) -> None:
    """ValueError naming the ``objective.*`` field and the fix."""
    if schedule not in SCHEDULES:
        raise ValueError(f"objective.eps_schedule={schedule!r}; use one of {SCHEDULES}")
    if not _fraction(decay_fraction) or not 0.0 < decay_fraction <= 1.0:
        raise ValueError(f"objective.eps_decay_fraction={decay_fraction!r} must be in (0, 1]"
                         " (the share of train.steps over which eps decays to 0); e.g. 0.5")
    if not _fraction(hold_fraction) or not 0.0 <= hold_fraction < 1.0:
        raise ValueError(f"objective.eps_hold_fraction={hold_fraction!r} must be in [0, 1) (the "
                         "share of train.steps eps is held before it decays); e.g. 0.3333")
    if hold_fraction and schedule != "hold_linear":
        raise ValueError(f"objective.eps_hold_fraction={hold_fraction!r} applies only to "
                         f"eps_schedule=hold_linear, not {schedule!r}; set it to 0 or use "
                         "eps_schedule=hold_linear")
    if schedule == "hold_linear" and hold_fraction + decay_fraction > 1.0 + 1e-9:
        raise ValueError(f"objective.eps_hold_fraction={hold_fraction!r} + eps_decay_fraction="
                         f"{decay_fraction!r} exceed 1: eps would not reach 0 by the last step; "
                         "lower one of them")


def normalized(schedule, decay_fraction, hold_fraction) -> tuple[str, float, float]:
    """(schedule, decay, hold) with the fractions a schedule ignores set to their defaults, so
    equal schedules hash (and compile) alike."""
    decay = float(decay_fraction) if schedule != "constant" else 1.0
    hold = float(hold_fraction) if schedule == "hold_linear" else 0.0
    return schedule, decay, hold


def eps_at(eps: float, step, total_steps: int, schedule: str, decay_fraction: float,
           hold_fraction: float) -> jax.Array:
    """float32 eps of the update at ``step`` (0-based, may be traced) of ``total_steps``."""
    eps32 = jnp.float32(eps)
    if schedule == "constant":
        return eps32
    hold_steps = jnp.float32(hold_fraction * total_steps if schedule == "hold_linear" else 0.0)
    decay_steps = jnp.float32(decay_fraction * total_steps)
    since = jnp.asarray(step, jnp.float32) - hold_steps
    return eps32 * jnp.clip(1.0 - since / decay_steps, 0.0, 1.0)


def fraction_tag(x: float) -> str:
    """0.5 -> "0p5", 1/3 -> "0p3333": run-name spelling, four decimals at most."""
    return repr(round(float(x), 4)).replace(".", "p")


def tag(schedule: str, decay_fraction: float, hold_fraction: float) -> str:
    """The run-name part of a schedule: "" (constant), "lin0p5", "hold0p3333_lin0p3333"."""
    if schedule == "constant":
        return ""
    lin = f"lin{fraction_tag(decay_fraction)}"
    return lin if schedule == "linear" else f"hold{fraction_tag(hold_fraction)}_{lin}"
