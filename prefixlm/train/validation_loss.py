"""Validation loss on fixed windows: every run scores the same tokens.

val/nll is the study's cleanest continuous metric only if every run scores the same tokens, so
the windows do not depend on ``seed``, ``data_seed``, the preset, ``grad_accum``, the device or
process count: they are the first ``eval.val_tokens`` target tokens of the validation split
(``data.val_path``, else the "validation" split of ``data.path``), in stream order, cut into
``data.seq_len`` windows the way training cuts its stream (window i holds tokens
[i L, i L + L], inputs its first L and targets its last L). The default, 2**21 tokens, is 1,024
windows of 2,048 at study scale (FineWeb-Edu's 0.5% validation split holds far more); a smaller
split gives fewer windows, with a warning.

They are scored in batches of the training microbatch (``train.batch_size / grad_accum``
sequences: the step already holds that many with activations for the backward pass, so a
forward pass fits). The last batch is padded with zero rows whose sums are dropped: the device
returns per-window sums and the host adds the N windows' sums once, in window order, in float64.
So the mean is over exactly N x L tokens and the batch size does not enter it.

``val/loss`` is the objective at the step's scheduled eps (``obj.eps_at(step, train.steps)``),
so with an eps schedule it tracks the loss being trained; ``val/nll`` is eps-free. That eps is
logged beside it as ``val/eps``: the row's ``eps`` is the training step's, the eps of the update
that led to step s (``eps_at(s - 1)``), which its ``loss`` used, one step behind.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from prefixlm.core.errors import DataError
from prefixlm.data import pipeline, shards
from prefixlm.train.loop import Evaluation
from prefixlm.train.trainer import BATCH_AXES

log = logging.getLogger("prefixlm.train.validation_loss")


def read_windows(config, vocab_hash: str | None) -> np.ndarray | None:
    """int32 [N, L + 1]: the fixed validation windows (see the module doc), or None with a
    warning when data.path has no validation split. A ``data.val_path`` that cannot be read is
    a DataError: the run would otherwise go without validation after one warning."""
    d = config.data
    path, seq_len = d.val_path or d.path, int(d.seq_len)
    want = int(config.eval.val_tokens) // seq_len
    try:
        stats = shards.read_stats(path)
        shards.check_tokenizer(stats, vocab_hash, path)
        files = shards.split_files(path, "validation", stats, vocab_size=config.model.vocab_size)
        source = pipeline.TokenWindows(files, seq_len)
    except (ValueError, FileNotFoundError, KeyError) as err:
        if d.val_path:  # asked for by name: a typo must not silently cost the run validation
            raise DataError(
                f"data.val_path={d.val_path!r}: {err}; fix the path, set data.val_path='' to "
                "validate on data.path's validation split, or eval.val_tokens=0 to turn "
                "validation off") from None
        log.warning("no validation data (%s); skipping validation loss", err)
        return None
    n = min(want, len(source))
    if n == 0:
        log.warning("%s: the validation split holds %d tokens, not one window of %d; skipping "
                    "validation loss", path, source.num_tokens, seq_len)
        return None
    if n < want:
        log.warning("%s: the validation split holds %d tokens, so validation scores %d windows "
                    "of %d, not eval.val_tokens=%d (%d windows)", path, source.num_tokens, n,
                    seq_len, config.eval.val_tokens, want)
    tokens = source.tokens(0, n * seq_len + 1).astype(np.int32)
    return tokens[np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]]


@functools.partial(jax.jit, static_argnums=(3, 4))
def window_sums(params, batch, tables, obj, spec, eps):
    """float32 [B, 3], replicated: per window, the sums over its targets of the objective at
    ``eps``, the gold-token NLL and the correct argmaxes. Same model and chunked loss as the
    train step, forward only, each device on its own windows inside one shard_map, as in the
    step: a Mosaic attention kernel (splash) cannot be partitioned by XLA, so the model must run
    per device too (outside the shard_map, a multi-chip TPU would refuse to compile it)."""

    def local(params, inputs_BxT, ids_BxT, t, eps):
        model = nnx.merge(spec.graphdef, params)
        h_BxTxD = model(inputs_BxT)
        b, T = ids_BxT.shape
        _, out = obj.chunked_loss(h_BxTxD.reshape(b * T, -1), model.unembedding(),
                                  ids_BxT.reshape(b * T), t, chunk_size=spec.chunk_size, eps=eps)
        per_token = jnp.stack([out.loss_N, out.nll_N, out.correct_N], axis=-1)
        return jax.lax.all_gather(per_token.reshape(b, T, 3).sum(axis=1), BATCH_AXES,
                                  tiled=True)

    return jax.shard_map(local, mesh=spec.mesh,
                         in_specs=(P(), P(BATCH_AXES), P(BATCH_AXES), P(), P()),
                         out_specs=P(), check_vma=False,
                         )(params, batch["inputs"], batch["targets"], tables, eps)


def lower_window_sums(trainer):
    """``window_sums`` lowered on abstract inputs as ``Validation`` calls it (one batch of the
    training microbatch, parameters in the trainer's layout), for ``--dry_run=aot``."""
    batch, tables = trainer.abstract_inputs(trainer.eval_batch_size)
    eps = jax.ShapeDtypeStruct((), jnp.float32)  # obj.eps_at(step, steps): a float32 scalar
    return window_sums.lower(trainer.abstract_state["params"], batch, tables, trainer.obj,
                             trainer.spec, eps)


def calls_per_evaluation(config) -> int:
    """``window_sums`` calls of one validation at ``eval.val_tokens`` (the split assumed large
    enough: a smaller one gives fewer windows, with a warning): the windows in batches of the
    training microbatch."""
    windows = int(config.eval.val_tokens) // int(config.data.seq_len)
    micro = int(config.train.batch_size) // int(config.grad_accum)
    return -(-windows // micro) if config.eval.every else 0


class Validation:
    """``fn(params, step, final)`` of the validation hook: mean objective, NLL and accuracy
    over the fixed windows."""

    def __init__(self, trainer, windows_NxL1: np.ndarray):
        self.trainer, self.windows = trainer, windows_NxL1
        self.batch_size = trainer.eval_batch_size  # the training microbatch

    def _global(self, rows_BxT: np.ndarray) -> jax.Array:
        # Every process holds all windows, so each device takes its rows from them directly.
        return jax.make_array_from_callback(rows_BxT.shape, self.trainer.batch_sharding,
                                            lambda index: rows_BxT[index])

    def __call__(self, params, step: int, final: bool) -> dict:
        del final
        t = self.trainer
        eps = t.obj.eps_at(step, t.config.train.steps)
        n, width = self.windows.shape
        sums = []
        for i in range(0, n, self.batch_size):
            rows = self.windows[i:i + self.batch_size]
            pad = np.zeros((self.batch_size - len(rows), width), np.int32)
            padded = np.concatenate([rows, pad])
            batch = {"inputs": self._global(padded[:, :-1]),
                     "targets": self._global(padded[:, 1:])}
            sums.append((window_sums(params, batch, t.tables, t.obj, t.spec, eps), len(rows)))
        per_window_Nx3 = np.concatenate([np.asarray(s, np.float64)[:k]
                                         for s, k in jax.device_get(sums)])
        loss, nll, acc = per_window_Nx3.sum(axis=0) / (n * (width - 1))
        return {"val/loss": loss, "val/nll": nll, "val/accuracy": acc, "val/eps": float(eps)}


def validation_evaluation(trainer) -> Evaluation | None:
    """The validation loss as an evaluation hook (at step 0, every eval.every steps and at the
    end), or None when ``eval.val_tokens`` or ``eval.every`` is 0 or there is no data."""
    e = trainer.config.eval
    if not e.val_tokens or not e.every:
        return None
    windows = read_windows(trainer.config, trainer.tokenizer.vocab_hash)
    if windows is None:
        return None
    return Evaluation("val", Validation(trainer, windows), every=e.every, at_start=True,
                host_model=False)
