"""A run directory and everything that keeps it whole: nothing here imports the model.

- ``workdir``: run paths (local or gs://), the run's identity, config.json and pinned data.
- ``lock``: one run per directory (a local lock or a lease on object stores).
- ``checkpoint``: orbax checkpoints with manifests, quarantine of broken steps, ``restore_params``.
- ``manifest``: per-file digests of a checkpoint step.
- ``sinks``: metrics.jsonl, TensorBoard and wandb (``MetricsWriter``).
- ``preflight``: the checks before anything is written (``claimed``).
- ``hosts``: agreement between processes (lock, checkpoint and preflight use it, hence here).
"""
