"""The ground floor: what every other package may use, with no JAX and nothing of prefixlm's own.

- ``errors``: the expected failures (``UserError``, ``ConfigError``, ``DataError``, ``SchemaError``,
  ``UnsafePathError``) that the commands print as one line and exit 2 on.
- ``cli``: the one error boundary and argument parser of the commands (``cli.command``).
- ``atomic``: files written whole or not at all (``write_text``, ``save_figure``).
- ``safe_files``: opening files in run directories without following symlinks or blocking on
  FIFOs; ``is_remote`` (gs:// paths) and ``cache_dir``.
- ``schemas``: one schema per file format and the one JSONL reader (``read_jsonl``).
- ``hardware``: the one device table (peak FLOP/s, HBM, bandwidth, topologies), each number sourced.
- ``xla_flags``: checks a run's XLA flags before JAX starts.
"""
