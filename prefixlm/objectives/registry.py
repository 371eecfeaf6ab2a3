"""The objective registry: what a family declares, the one list of families, and the checks and
run-name tags that read it (``prefixlm.objectives`` registers the families and re-exports all
of this; config resolution, run names and the configs read it through there).

Every family's target is linear in eps, q(eps) = (1 - eps) onehot(y) + eps s(y), with s the
smoothing distribution its table builder returns as per-gold-id tables (``ObjectiveTables``);
``Family.forms`` names the other readings a family offers (prefix_longest's "aux").
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np

from prefixlm.objectives import eps_schedule as schedules
from prefixlm.vocab import prefixes as prefixes_lib

PREFIX_SETS = ("proper", "with_gold")
EPS_SCHEDULES = schedules.SCHEDULES
HYPERPARAMS = ("eps", "temperature", "prefix_set")


class ObjectiveTables(NamedTuple):
    """Per-gold-id smoothing distribution s (the target at eps = 1); a pytree of arrays passed
    into the jitted step. The target at any eps is (1 - eps) onehot(y) + eps s.

    smooth_gold_V: float32 [V], s at the gold id (before the uniform part).
    prefix_ids_VxK: int32 [V, K] prefix ids padded with -1, or None when unused.
    smooth_prefix_VxK: float32 [V, K] s at each prefix id (0 at pads), or None when unused.
    """

    smooth_gold_V: jax.Array | np.ndarray
    prefix_ids_VxK: jax.Array | np.ndarray | None = None
    smooth_prefix_VxK: jax.Array | np.ndarray | None = None


# ---- the registry ------------------------------------------------------------------------------
class SmoothingInputs(NamedTuple):
    """What a family's table builder may read: the vocabulary and its non-eps hyper-parameters."""

    vocab_size: int
    index: prefixes_lib.PrefixIndex | None  # None unless the family uses prefixes
    temperature: float
    prefix_set: str


@dataclasses.dataclass(frozen=True)
class Family:
    """One objective family, declared once: everything else reads it from ``FAMILIES``.

    Attributes:
      name: ``objective.name``; the run name starts with it.
      summary: one line with the formula of q.
      hyperparams: which of ``HYPERPARAMS`` the target depends on; the run-name tag shows these.
      default_eps: eps of the family's config file (configs/<name>.py).
      smoothing: builds s, the target at eps = 1, as float64 tables (stored as float32); q at
        any eps is (1 - eps) onehot(y) + eps s; s is one-hot where there is nothing to smooth.
      uses_prefixes: s lives on the prefix index (the builder gets ``SmoothingInputs.index``).
      uniform: s also spreads evenly over the V - 1 non-gold ids (the loss needs a row sum).
      check: family-specific validation ``check(eps=, temperature=, prefix_set=)`` raising
        ValueError naming the config field and the fix, run after the common checks.
    """

    name: str
    summary: str
    hyperparams: tuple[str, ...]
    default_eps: float
    smoothing: Callable[[SmoothingInputs], ObjectiveTables]
    uses_prefixes: bool = False
    uniform: bool = False
    check: Callable[..., None] | None = None
    forms: tuple[str, ...] = ("smoothing",)  # ``objective.prefix_longest_form`` values; first =
    # the default: "smoothing" is q(eps) above, "aux" is onehot(y) + eps s (not normalised)

    def __post_init__(self):
        if unknown := set(self.hyperparams) - set(HYPERPARAMS):
            raise ValueError(f"family {self.name!r}: unknown hyper-parameters {sorted(unknown)}; "
                             f"use some of {HYPERPARAMS}")

    def tag(self, *, eps, temperature, prefix_set, eps_schedule="constant",
            eps_decay_fraction=1.0, eps_hold_fraction=0.0, prefix_longest_form=None) -> str:
        """The run-name part before ``_seed{N}``: the name, the form when not the default
        (``aux``), then each declared hyper-parameter that is set (eps always; tau and the
        prefix set when not the default), then the eps schedule when not constant:
        ``lin{decay}`` or ``hold{hold}_lin{decay}`` (``eps_schedule.tag``)."""
        parts = [self.name]
        if prefix_longest_form not in (None, self.forms[0]):
            parts.append(prefix_longest_form)
        if "eps" in self.hyperparams:
            parts.append(f"eps{number_tag(eps)}")
        if "temperature" in self.hyperparams and float(temperature) != 1.0:
            parts.append(f"tau{number_tag(temperature)}")
        if "prefix_set" in self.hyperparams and prefix_set != "proper":
            parts.append(prefix_set.replace("_", ""))
        if "eps" in self.hyperparams and eps_schedule != "constant":
            parts.append(schedules.tag(eps_schedule, eps_decay_fraction, eps_hold_fraction))
        return "_".join(parts)


FAMILIES: dict[str, Family] = {}


def register(family: Family | None = None, /, **fields) -> Family | Callable[..., Family]:
    """Adds a family to ``FAMILIES`` (in order): ``register(Family(...))``, or as a decorator,
    ``@register(name=..., summary=..., ...)`` on the table builder, which becomes the Family.
    A name registered twice raises: two definitions of one objective would split the runs."""
    if family is None:
        return lambda smoothing: register(Family(smoothing=smoothing, **fields))
    if family.name in FAMILIES:
        raise ValueError(f"objective family {family.name!r} is already registered")
    FAMILIES[family.name] = family
    return family


def number_tag(x: float) -> str:
    """0.1 -> "0p1", 1.0 -> "1p0": the seed's run-name spelling."""
    return repr(float(x)).replace(".", "p").replace("-", "m")


def is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def family(name: str) -> Family:
    """The registered family called ``name``; the error lists the known names."""
    if name not in FAMILIES:
        raise ValueError(f"objective.name={name!r} is not an objective; use one of "
                         f"{', '.join(FAMILIES)} (or the matching configs/<name>.py)")
    return FAMILIES[name]


def config_kwargs(o) -> dict:
    """The keyword arguments of ``build``, ``validate`` and ``run_tag`` beyond name, eps,
    temperature and prefix_set, read from a config's ``objective`` node (defaults where absent),
    so callers pass ``**config_kwargs(config.objective)`` and new fields need no caller edits."""
    return dict(eps_schedule=o.get("eps_schedule", "constant"),
                eps_decay_fraction=o.get("eps_decay_fraction", 1.0),
                eps_hold_fraction=o.get("eps_hold_fraction", 0.0),
                prefix_longest_form=o.get("prefix_longest_form", "smoothing"))


def validate(name: str, *, eps, temperature, prefix_set, eps_schedule="constant",
             eps_decay_fraction=1.0, eps_hold_fraction=0.0,
             prefix_longest_form="smoothing") -> None:
    """Checks an objective's config fields; the ValueError names the field and the fix (config
    resolution wraps it in ConfigError, so a bad value fails before compiling)."""
    fam = family(name)
    if not is_number(eps) or not 0.0 <= eps <= 1.0:
        raise ValueError(f"objective.eps={eps!r} must be in [0, 1] (the smoothing mass); "
                         "e.g. eps=0.1")
    if not is_number(temperature) or temperature <= 0:
        raise ValueError(f"objective.temperature={temperature!r} must be a finite number > 0 "
                         "(tau divides the prefix lengths in the softmax); e.g. 1.0")
    if prefix_set not in PREFIX_SETS:
        raise ValueError(f"objective.prefix_set={prefix_set!r}; use one of {PREFIX_SETS} "
                         "('proper' = the seed's P(s), 'with_gold' = R(s) = P(s) + gold)")
    schedules.validate(eps_schedule, eps_decay_fraction, eps_hold_fraction)
    if prefix_longest_form not in fam.forms:
        raise ValueError(f"objective.prefix_longest_form={prefix_longest_form!r} with "
                         f"objective.name={name!r}: use one of {fam.forms}"
                         + ("" if len(fam.forms) > 1 else " (only prefix_longest has an 'aux' "
                                                          "form)"))
    if "eps" not in fam.hyperparams and eps_schedule != "constant":
        raise ValueError(f"objective.eps_schedule={eps_schedule!r} with objective.name={name!r}:"
                         f" {name} has no eps to schedule; use eps_schedule=constant")
    if fam.check is not None:
        fam.check(eps=eps, temperature=temperature, prefix_set=prefix_set)


def run_tag(name: str, *, eps, temperature, prefix_set, eps_schedule="constant",
            eps_decay_fraction=1.0, eps_hold_fraction=0.0,
            prefix_longest_form="smoothing") -> str:
    """The run-name part before ``_seed{N}``: "ce", "label_smoothing_eps0p1",
    "prefix_norm_eps0p1_tau0p5_withgold", "prefix_norm_eps1p0_lin0p5",
    "prefix_longest_aux_eps0p25_hold0p3333_lin0p3333" (see ``Family.tag``)."""
    return family(name).tag(eps=eps, temperature=temperature, prefix_set=prefix_set,
                            eps_schedule=eps_schedule, eps_decay_fraction=eps_decay_fraction,
                            eps_hold_fraction=eps_hold_fraction,
                            prefix_longest_form=prefix_longest_form)
