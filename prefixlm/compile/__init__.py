"""Compiling for the real targets without them: the memory plan, AOT compiles and the roofline.

It sits above ``train`` and ``evaluation`` because it compiles exactly the programs they run
(the train step, validation's window program, JaxLM's scoring functions).

- ``plan``: ``--dry_run`` (``train.memory_plan``'s plan, and XLA's accounting of the compiled step).
- ``aot`` and ``aot_check``: ``--dry_run=aot`` for TPU and GPU targets (``aot_check.dry_run``).
- ``hlo``: the one HLO reader; ``hlo_collectives`` counts collectives with it.
- ``roofline``: step time and MFU bounds from the compiled HLO.
- ``eval_cost``: what in-loop evaluation costs beside training (``eval_fraction``).
"""
