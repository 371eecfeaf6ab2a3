"""The grain input pipeline: token shards -> shuffled, process-sharded [batch, seq_len] batches.

The token stream of a split is the concatenation of its shards in ``stats.json`` order (documents
are already separated by EOS). Window i is ``stream[i*L : i*L + L + 1]`` (L = seq_len): inputs
are its first L tokens and targets its last L, so consecutive windows overlap by exactly one token
and every stream token from position 1 to ``num_windows*L`` is a target exactly once per epoch
(token 0 has no predecessor; the last ``(N-1) % L`` tokens, too few for a window, are dropped
rather than padded, so no window ever contains padding). Windows may span a shard boundary: the
stream is one sequence.

Order of operations, and why:

1. ``shuffle(seed)`` a global permutation of windows, reseeded each epoch by grain
   (``seed + epoch``), identical on every process because it depends on the seed only;
2. ``repeat(num_epochs)`` (None = forever);
3. ``[process_index::process_count]`` so processes read disjoint windows that, together, cover
   every window of every epoch (with a finite ``num_epochs`` the total is first cut to a multiple
   of ``process_count * batch_size`` so all processes yield the same number of batches and no
   process waits on a collective another never joins);
4. ``batch(batch_size, drop_remainder=True)`` and split into int32 inputs/targets.

Everything is a ``grain.MapDataset`` indexed by position, so the iterator state is one integer:
``get_state()``/``set_state()`` (or the orbax handler, see :func:`checkpoint_args`) restore the
exact batch sequence of an uninterrupted run.
"""

from __future__ import annotations

import logging
import os
import pathlib
import sys
from typing import Any

import numpy as np

from prefixlm.core import cli
from prefixlm.data import shards

log = logging.getLogger("prefixlm.data")


class TokenWindows:
    """grain random-access source: window i of a split's concatenated token stream (uint32 [L+1]).

    Shards are opened lazily as ``np.memmap`` (and dropped when pickled) so the source can be sent
    to grain worker processes without copying the data.
    """

    def __init__(self, files: list[tuple[pathlib.Path, int]], seq_len: int):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.files = [str(f) for f, _ in files]
        counts = np.array([n for _, n in files], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])
        self.num_tokens = int(self.starts[-1])
        self.seq_len = int(seq_len)
        self._len = max(0, (self.num_tokens - 1) // self.seq_len)
        self._arrays: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"TokenWindows({len(self.files)} shards, {self.num_tokens} tokens, L={self.seq_len})"

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_arrays"] = None
        return state

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the concatenated stream, uint32."""
        if self._arrays is None:
            self._arrays = [np.memmap(f, dtype=shards.DTYPE, mode="r") for f in self.files]
        if not 0 <= start <= stop <= self.num_tokens:
            raise IndexError(f"token range [{start}, {stop}) outside [0, {self.num_tokens})")
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        offset = start - int(self.starts[k])
        if stop <= self.starts[k + 1]:  # the common case: one shard
            return np.asarray(self._arrays[k][offset : offset + stop - start])
        pieces = []
        while start < stop:
            end = min(stop, int(self.starts[k + 1]))
            pieces.append(self._arrays[k][start - int(self.starts[k]) : end - int(self.starts[k])])
            start, k = end, k + 1
        return np.concatenate(pieces)

    def __getitem__(self, index: int) -> np.ndarray:
        index = int(index)
        if not 0 <= index < self._len:
            raise IndexError(f"window {index} outside [0, {self._len})")
        start = index * self.seq_len
        return self.tokens(start, start + self.seq_len + 1)


def num_tokens(path: str | os.PathLike, split: str = "train") -> int:
    """Number of tokens in a split (documents plus their EOS tokens)."""
    return int(shards.read_stats(path)["splits"][split]["tokens"])


def num_windows(path: str | os.PathLike, seq_len: int, split: str = "train") -> int:
    """Number of seq_len windows per epoch of a split: (tokens - 1) // seq_len."""
    return max(0, (num_tokens(path, split) - 1) // seq_len)


def steps_per_epoch(
    path: str | os.PathLike, *, seq_len: int, batch_size: int, split: str = "train",
    process_count: int = 1,
) -> int:
    """Batches each process yields per epoch (batch_size is per process)."""
    return num_windows(path, seq_len, split) // (batch_size * process_count)


class EpochLog:
    """A grain ``map_with_index`` transform that logs when this process first reads a window of
    a new epoch of the repeated stream (grain reshuffles each epoch). Windows are read a few
    batches ahead of training (prefetch), so the line comes slightly before the step;
    :func:`prefixlm.data.budget.epoch_at_step` gives the exact epoch of a step."""

    def __init__(self, windows_per_epoch: int, split: str, path):
        self.windows_per_epoch = max(1, int(windows_per_epoch))
        self.where = f"{split} split of {path}"
        self.seen = 0

    def __call__(self, index: int, window):
        epoch = int(index) // self.windows_per_epoch
        if epoch > self.seen:
            self.seen = epoch
            log.warning("data: the %s wraps: epoch %d begins (window %d of the repeated stream, "
                        "%d windows per epoch)", self.where, epoch, index, self.windows_per_epoch)
        return window


def _split_batch(windows_BxL1: np.ndarray) -> dict[str, np.ndarray]:
    w = windows_BxL1.astype(np.int32)
    return {"inputs": w[:, :-1], "targets": w[:, 1:]}


def _ensure_absl_flags_parsed() -> None:
    # grain's multiprocessing reads absl flags; outside absl.app.run they are unparsed and grain
    # raises UnparsedFlagAccessError. Marking them parsed keeps their defaults.
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def build_dataset(
    path: str | os.PathLike,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    split: str = "train",
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    shuffle: bool = True,
    expected_tokenizer_hash: str | None = None,
    vocab_size: int | None = None,
):
    """The ``grain.MapDataset`` of batches behind :func:`build_iterator` (see the module doc)."""
    import grain

    stats = shards.read_stats(path)
    shards.check_tokenizer(stats, expected_tokenizer_hash, path)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} outside [0, process_count={process_count})")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    source = TokenWindows(shards.split_files(path, split, stats, vocab_size=vocab_size), seq_len)
    need = batch_size * process_count
    if len(source) < need:
        raise ValueError(
            f"{path} split {split!r}: {source.num_tokens} tokens give {len(source)} windows of "
            f"seq_len {seq_len}, fewer than one global batch ({batch_size} x {process_count} "
            "processes); use more data, a smaller batch or a shorter seq_len"
        )
    ds = grain.MapDataset.source(source)
    if shuffle:
        ds = ds.shuffle(seed=seed)
    if num_epochs is None:
        ds = ds.repeat(None)
    else:
        if num_epochs < 1:
            raise ValueError(f"num_epochs must be >= 1 or None, got {num_epochs}")
        if num_epochs > 1:
            ds = ds.repeat(num_epochs)
        ds = ds[: len(ds) // need * need]
    ds = ds.map_with_index(EpochLog(len(source), split, path))
    if process_count > 1:
        ds = ds[process_index::process_count]
    return ds.batch(batch_size, drop_remainder=True).map(_split_batch)


def build_iterator(
    path: str,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    split: str = "train",
    process_index: int = 0,
    process_count: int = 1,
    num_epochs: int | None = None,
    worker_count: int = 0,
    expected_tokenizer_hash: str | None = None,
    shuffle: bool = True,
    prefetch_threads: int = 2,
    vocab_size: int | None = None,
):
    """A grain ``DatasetIterator`` of ``{"inputs", "targets"}`` int32 [batch_size, seq_len].

    Args:
      path: a token directory made by ``python -m prefixlm.data.tokenize``.
      seq_len: tokens per example; windows hold seq_len + 1 tokens.
      batch_size: examples per batch on THIS process.
      seed: shuffling seed (the run's seed); the same seed gives the same order on every process.
      split: "train" or "validation".
      process_index, process_count: this JAX process and how many there are
        (``jax.process_index()``, ``jax.process_count()``); processes get disjoint windows.
      num_epochs: None repeats forever (reshuffled each epoch); an int stops after that many.
      worker_count: grain worker processes (``mp_prefetch``); 0 reads in this process, which is
        plenty for a memmap slice per example (see bench/data.py).
      expected_tokenizer_hash: the run's ``tok.vocab_hash``; shards made with another vocabulary
        are refused.
      shuffle: False keeps stream order (for inspection; validation loss does not need it).
      prefetch_threads: threads reading ahead in this process when worker_count == 0.
      vocab_size: the model's vocabulary size; shards holding an id >= it (or >= the vocab size
        recorded in stats.json, or >= 2**31) are refused with ``shards.TokenIdError``, a
        ``ValueError``, when the iterator is built.

    Returns:
      An iterator with ``get_state()``/``set_state()``; checkpoint it with
      :func:`checkpoint_args` (orbax) or by saving ``get_state()`` yourself. Restore into an
      iterator built with the same arguments: the state of a ``worker_count > 0`` iterator has
      grain's multiprocessing layout and does not fit an in-process one (and vice versa).
    """
    import grain

    ds = build_dataset(
        path, seq_len=seq_len, batch_size=batch_size, seed=seed, split=split,
        process_index=process_index, process_count=process_count, num_epochs=num_epochs,
        shuffle=shuffle, expected_tokenizer_hash=expected_tokenizer_hash, vocab_size=vocab_size,
    )
    it_ds = ds.to_iter_dataset(
        grain.ReadOptions(num_threads=prefetch_threads, prefetch_buffer_size=2 * prefetch_threads)
        if prefetch_threads > 0 else grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    )
    if worker_count > 0:
        _ensure_absl_flags_parsed()
        it_ds = it_ds.mp_prefetch(
            grain.MultiprocessingOptions(num_workers=worker_count, per_worker_buffer_size=2)
        )
    return iter(it_ds)


def checkpoint_args(iterator, *, restore: bool = False) -> Any:
    """The orbax ``CheckpointArgs`` that save/restore a pipeline iterator in a checkpoint.

    Use it as one item of a composite checkpoint, e.g.::

        mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                data=pipeline.checkpoint_args(it)))
        mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                   data=pipeline.checkpoint_args(it, restore=True)))

    These are grain's own ``grain.checkpoint.CheckpointSave`` / ``CheckpointRestore`` (handler
    ``grain.checkpoint.CheckpointHandler``), which write one JSON file per JAX process named
    ``process_<i>-of-<n>.json`` holding ``iterator.get_state()``; restore calls ``set_state`` on
    the iterator you pass (build it with the same arguments first).
    """
    import grain.checkpoint

    cls = grain.checkpoint.CheckpointRestore if restore else grain.checkpoint.CheckpointSave
    return cls(iterator)


@cli.command
def main(argv: list[str] | None = None) -> int:
    """``python -m prefixlm.data.pipeline DIR [--seq-len L]``: prints split sizes and one batch."""
    p = cli.ArgumentParser(prog="python -m prefixlm.data.pipeline", description=main.__doc__)
    p.add_argument("path")
    p.add_argument("--seq-len", type=cli.int_at_least(1, "tokens per window"), default=256)
    p.add_argument("--batch-size", type=cli.int_at_least(1, "windows per batch"), default=2)
    args = p.parse_args(argv)
    stats = shards.read_stats(args.path)
    for split in shards.SPLITS:
        n = stats["splits"][split]["tokens"]
        print(f"{split}: {stats['splits'][split]['documents']} documents, {n} tokens, "
              f"{num_windows(args.path, args.seq_len, split)} windows of {args.seq_len}")
    batch = next(build_iterator(args.path, seq_len=args.seq_len, batch_size=args.batch_size, seed=0))
    print({k: (v.shape, v.dtype) for k, v in batch.items()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
