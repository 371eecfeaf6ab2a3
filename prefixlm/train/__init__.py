"""Training: the jitted step, the loop and its hooks, the validation loss, the driver.

- ``trainer.Trainer``: mesh, optimizer and the jitted train step.
- ``loop.run_loop``: one step, then the loop ``Hook``s that are due; ``loop.Evaluation`` is how
  evaluation plugs in without this package importing it.
- ``hooks``: the built-in loop hooks (checkpoints, log rows, progress, preemption, profiling).
- ``memory_plan``: does a step fit on a device, and what fixes it (``make_plan``, ``check_fits``).
- ``validation_loss``: the validation loss on fixed windows (``window_sums``).
- ``driver.train_and_evaluate``: resolve, claim the run directory, resume, run the loop.
  ``python -m prefixlm.train summary DIR`` prints a run's summary.
"""
