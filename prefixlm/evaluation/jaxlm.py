"""``JaxLM``: an lm-eval model (``TemplateLM``) over the Flax decoder and a prefixlm tokenizer.

``JaxLM`` subclasses lm-eval's ``TemplateLM``, so requests are split into context and continuation
tokens by lm-eval's own ``_encode_pair`` (trailing context spaces move to the continuation; the
continuation is what ``encode(context + continuation)`` adds beyond ``encode(context)``).

Contexts start as training documents do. Every training document follows ``<|end_of_text|>``
(128001), so every evaluation context begins with it too: ``tok_encode`` prepends it (unless told
``add_special_tokens=False``, or the text already starts with it), exactly as lm-eval's ``HFLM``
does with a tokenizer that adds a BOS, and the exported tokenizer (``prefixlm.export``) adds
``<|end_of_text|>`` as its BOS. So ``lm_eval --model hf`` on the export scores the same tokens as
``JaxLM`` (``tests/evaluation/test_evaluate.py`` checks log-likelihoods, rolling log-likelihoods and greedy
generations against ``HFLM``). As in ``HFLM``, an empty context is ``[prefix_token_id]`` (the same
token), and ``loglikelihood_rolling`` encodes the text with the token too, so its first scored
token is ``<|end_of_text|>`` after ``<|end_of_text|>`` (lm-eval's behaviour for every BOS-adding
tokenizer, Llama 3's included; kept so the numbers agree).

Inputs longer than the model are cut from the left to ``max_length + 1`` tokens, as in ``HFLM``.
A continuation longer than ``max_length`` (where ``HFLM`` stops on an assertion) is scored in
consecutive pieces of at most ``max_length`` tokens, each conditioned on the tokens before it cut
from the left the same way, and the pieces' log-probabilities are summed: every continuation
token is scored, with as much left context as fits.

Why it is faster than ``HFLM`` on the export: requests are sorted by length and padded to a few
fixed lengths (two per octave) and a fixed batch size, so XLA compiles a handful of programs; and
the [tokens, 128k] output projection is applied only at the continuation positions (a few tokens
per request) instead of at every position of a 5-shot prompt.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from lm_eval.api.model import TemplateLM

from prefixlm.evaluation import restore
from prefixlm.model.llama import Llama, scoring_config
from prefixlm.vocab import tokenizer as tok_lib

MIN_BUCKET = 32
CONT_BUCKETS = (4, 16, 64, 256)  # continuation positions scored per row; longer: the full length
# Largest [rows, C, V] logits block formed at once (float32 elements: 1 GiB). A batch of 32 rows
# with 2048 scored positions over 128k ids would be 33 GB; larger blocks are scored in row slices.
MAX_LOGITS = 1 << 28
K_MAX = 16  # alternative targets per row (requests sharing one input, e.g. CharBench's 0..10)
EOT_TEXT = "<|end_of_text|>"  # the document separator every training document follows


def _bucket(n: int, cap: int) -> int:
    """Padded length for n tokens: two sizes per octave (32, 48, 64, 96, 128, 192, ...), capped
    at ``cap``. Padding wastes at most a third, and a 2048-token model compiles its body for at
    most ~12 lengths (each compile of a 10-layer body costs seconds on a CPU)."""
    if n <= MIN_BUCKET:
        return min(cap, MIN_BUCKET)
    step = max(8, (1 << (n - 1).bit_length()) // 4)
    return min(cap, -(-n // step) * step)


def _cont_bucket(n: int, length: int) -> int:
    return next((c for c in CONT_BUCKETS if n <= c and c < length), length)


def with_compute_dtype(model, dtype: str):
    """The same parameters under a model whose activations are computed in ``dtype`` (with an
    attention kernel that takes them: ``model.scoring_config``)."""
    cfg = scoring_config(model.cfg, dtype)
    if cfg == model.cfg:
        return model
    abstract = nnx.eval_shape(lambda: Llama(cfg, rngs=nnx.Rngs(0)))
    graphdef, _ = nnx.split(abstract)
    return nnx.merge(graphdef, nnx.state(model))


def scoring_devices(state) -> tuple:
    """The devices JaxLM scores on: every local device for a real (concrete) state, whatever
    layout the trainer holds it in; for an abstract state (``ShapeDtypeStruct`` leaves on a
    target's compile-only devices, ``--dry_run=aot``) the devices it is placed on, which are
    one host's (a real run's ``jax.local_devices()``); none for an abstract state placed nowhere."""
    leaves = jax.tree.leaves(state)
    if leaves and all(isinstance(x, jax.Array) for x in leaves):
        return tuple(jax.local_devices())
    devices = {d for x in leaves if getattr(x, "sharding", None) is not None
               for d in x.sharding.device_set}
    return tuple(sorted(devices, key=lambda d: d.id))


def on_one_device(state):
    """``state`` on one device if it spans several (the trainer's replicated or FSDP layout).

    With one local device scoring runs there, with no mesh: host inputs of any batch size, and an
    attention kernel that is not partitioned. An abstract state (``ShapeDtypeStruct`` leaves on a
    target's compile-only devices, for ``--dry_run=aot``) is placed the same way, on the
    lowest-numbered of its own devices, so it lowers to the program a real run compiles.
    """
    devices = {d for x in jax.tree.leaves(state) if isinstance(x, jax.Array | jax.ShapeDtypeStruct)
               and getattr(x, "sharding", None) is not None for d in x.sharding.device_set}
    if len(devices) <= 1:
        return state
    if all(isinstance(x, jax.Array) for x in jax.tree.leaves(state)):
        return jax.device_put(state, jax.local_devices()[0])
    one = jax.sharding.SingleDeviceSharding(min(devices, key=lambda d: d.id))
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), state)


class RowSharding:
    """Data-parallel scoring over several local devices: the rows of every batch split over a
    one-axis mesh ("rows"), the parameters replicated. Rows are independent (no op mixes them),
    so each device scores its rows exactly as one device would score them all, and evaluation
    takes 1/devices of the time instead of leaving all but one device idle.

    Calls are traced under the mesh (``jax.set_mesh``): splash, a Mosaic kernel XLA cannot
    partition, then runs per device in a ``shard_map`` over the rows (``attention``).
    """

    def __init__(self, devices):
        self.mesh = jax.sharding.Mesh(np.array(devices), ("rows",),
                                      axis_types=(jax.sharding.AxisType.Auto,))
        self.rows = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec("rows"))
        self.replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

    @property
    def shards(self) -> int:
        return self.mesh.size

    def replicate(self, state):
        if all(isinstance(x, jax.Array) for x in jax.tree.leaves(state)):
            return jax.device_put(state, self.replicated)
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=self.replicated), state)

    def place(self, x_BxN):
        """A batch (host array, or a device array in any layout) split by rows."""
        return jax.device_put(x_BxN, self.rows)

    def abstract(self, shape, dtype=jnp.int32):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=self.rows)


@functools.partial(jax.jit, static_argnums=0)
def _hidden(graphdef, state, tokens_BxL):
    """Final hidden states; compiled once per padded length, whatever is scored afterwards."""
    return nnx.merge(graphdef, state)(tokens_BxL)


@functools.partial(jax.jit, static_argnums=0)
def _score_hidden(graphdef, state, h_BxLxD, positions_BxC, targets_BxCxK):
    """Log-prob and greedy-match of K alternative targets at each of C positions per row.

    Logits are formed only at the C scored positions; K > 1 serves requests that share an input
    (multiple choice with one-token answers: CharBench's " 0".." 10" are scored in one row).
    Small to compile, so its (C, K) variants cost little next to the body's.
    """
    model = nnx.merge(graphdef, state)
    h_BxCxD = jnp.take_along_axis(h_BxLxD, positions_BxC[..., None], axis=1)
    logits_BxCxV = model.project(h_BxCxD)
    logp_BxCxV = jax.nn.log_softmax(logits_BxCxV, axis=-1)
    lp_BxCxK = jnp.take_along_axis(logp_BxCxV, targets_BxCxK, axis=-1)
    greedy_BxCxK = jnp.argmax(logits_BxCxV, axis=-1)[..., None] == targets_BxCxK
    return lp_BxCxK, greedy_BxCxK


def head_rows(rows: int, scored: int, vocab_size: int, shards: int = 1) -> int:
    """Rows per call of the scoring head: all ``rows``, or as many as keep its [rows, C, V]
    logits within ``MAX_LOGITS`` on each of ``shards`` devices (a multiple of ``shards``)."""
    per_device = max(1, min(-(-rows // shards), MAX_LOGITS // (scored * vocab_size)))
    return per_device * shards


def _score(graphdef, state, tokens_BxL, positions_BxC, targets_BxCxK, vocab_size: int,
           sharding: RowSharding | None = None):
    """The body once for the batch, then the scoring head in row slices of at most
    ``MAX_LOGITS`` logits per device (slices of one fixed size, so it compiles once per shape).
    With ``sharding`` every input is split by rows over its devices; else host arrays."""
    place = sharding.place if sharding is not None else (lambda x: x)
    shards = sharding.shards if sharding is not None else 1
    h_BxLxD = _hidden(graphdef, state, place(tokens_BxL))
    B, C = positions_BxC.shape
    rows = head_rows(B, C, vocab_size, shards)
    if rows == B:
        return _score_hidden(graphdef, state, place(h_BxLxD), place(positions_BxC),
                             place(targets_BxCxK))
    lps, greedys = [], []
    for start in range(0, B, rows):
        idx = np.minimum(np.arange(start, start + rows), B - 1)  # the last slice repeats a row
        lp, greedy = _score_hidden(graphdef, state, place(h_BxLxD[idx]), place(positions_BxC[idx]),
                                   place(targets_BxCxK[idx]))
        lps.append(np.asarray(lp)[:B - start])
        greedys.append(np.asarray(greedy)[:B - start])
    return np.concatenate(lps)[:B], np.concatenate(greedys)[:B]


def program_calls(shape: tuple[int, int, int, int], vocab_size: int, shards: int = 1) -> dict:
    """The jitted calls one scoring batch of shape (B, L, C, K) makes (what ``_score`` runs,
    its rows split over ``shards`` devices): ``{("hidden", B, L): 1, ("score", rows, L, C, K):
    calls}``."""
    B, L, C, K = shape
    rows = head_rows(B, C, vocab_size, shards)
    return {("hidden", B, L): 1, ("score", rows, L, C, K): -(-B // rows)}


@functools.partial(jax.jit, static_argnums=0)
def _next_token(graphdef, state, tokens_BxL, last_B):
    """Greedy next token after position ``last_B`` of each row."""
    model = nnx.merge(graphdef, state)
    h_BxLxD = model(tokens_BxL)
    h_BxD = jnp.take_along_axis(h_BxLxD, last_B[:, None, None], axis=1)[:, 0]
    logits_BxV = model.project(h_BxD)
    return jnp.argmax(logits_BxV, axis=-1)


class JaxLM(TemplateLM):
    """An ``lm_eval`` model over a ``prefixlm.model.Llama`` and a ``prefixlm`` tokenizer.

    Args:
      model: the Flax decoder (its parameters are used as they are; nothing is copied).
      tokenizer: ``prefixlm.vocab.tokenizer.Tokenizer`` the model was trained with.
      batch_size: rows per compiled call (fixed; short batches are padded with dummy rows, and
        with several local devices rounded up to a multiple of their number: the rows are
        split over them, ``RowSharding``).
      max_length: longest input; default the model's ``max_seq_len``.
      dtype: activation dtype for evaluation ("float32" matches the float32 HF export; None
        keeps the model's own).
      max_gen_toks: default generation budget for ``generate_until``.
      encode_cache: a dict shared across ``JaxLM`` instances (the in-loop evaluator keeps one
        per run): (context, continuation) -> token ids, so the requests of a repeated evaluation
        are not tokenized again. ``encode_seconds`` accumulates the time spent tokenizing.
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 16, max_length: int | None = None,
                 dtype: str | None = "float32", max_gen_toks: int = 256,
                 encode_cache: dict | None = None):
        super().__init__()
        self.encode_cache = encode_cache
        self.encode_seconds = 0.0
        self.input_tokens = 0  # real tokens through the body (shared inputs once), for FLOPs
        self.padded_tokens = 0  # the same with batch and length padding
        if dtype is not None:
            model = with_compute_dtype(model, dtype)
        self.model = model
        self.tok = tokenizer
        self._batch_size = int(batch_size)
        self._max_length = int(max_length or model.cfg.max_seq_len)
        self._max_gen_toks = max_gen_toks
        self.graphdef, state = nnx.split(model)
        devices = scoring_devices(state)
        self.sharding = RowSharding(devices) if len(devices) > 1 else None
        self.state = (self.sharding.replicate(state) if self.sharding is not None
                      else on_one_device(state))
        self.compiled_shapes: set[tuple[int, ...]] = set()

    @classmethod
    def from_workdir(cls, workdir, step: int | None = None, **kwargs) -> JaxLM:
        """The newest (or ``step``) checkpoint of a training directory, with its tokenizer."""
        config, model, step = restore.load_model(str(workdir), step=step)
        data = config_get(config, "data", None)
        name = config_get(data, "tokenizer", "llama3") if data is not None else "llama3"
        lm = cls(model, tok_lib.load(name), **kwargs)
        lm.step = step
        return lm

    # ---- what TemplateLM needs -------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        # The exported HF tokenizer's BOS is <|end_of_text|> too, so HFLM conditions on the same id.
        return self.tok.eos_id

    @property
    def tokenizer_name(self) -> str:
        return "prefixlm-llama3"

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def shards(self) -> int:
        """Devices the rows of a batch are split over (1: host inputs, one device)."""
        return self.sharding.shards if self.sharding is not None else 1

    @property
    def rows_per_batch(self) -> int:
        """``batch_size`` padded to a multiple of ``shards``: the rows of every compiled call."""
        return -(-self._batch_size // self.shards) * self.shards

    def _traced(self):
        """The context every jitted call is traced in: the rows' mesh, when there is one."""
        return jax.set_mesh(self.sharding.mesh) if self.sharding else contextlib.nullcontext()

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kw) -> list[int]:
        """Token ids of ``string`` after ``<|end_of_text|>``, as documents are in training.

        Mirrors ``HFLM.tok_encode`` over the exported tokenizer (whose BOS is that token):
        ``add_special_tokens=None`` adds it unless the text already starts with its text,
        ``True``/``False`` force it on or off (lm-eval encodes continuations with ``False``).
        """
        add = not string.startswith(EOT_TEXT) if add_special_tokens is None else add_special_tokens
        ids = ([self.prefix_token_id] if add else []) + self.tok.encode(string)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, **kw) -> str:
        return self.tok.decode(tokens)

    # ---- scoring ---------------------------------------------------------------------------
    def score_tokens(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), continuation is greedy) per token pair.

        Requests whose model input ``(context + continuation)[:-1]`` is identical share one row
        (as HFLM's one-token-continuation cache does), each keeping its own targets. A
        continuation longer than ``max_length`` is scored in pieces of at most ``max_length``
        tokens, each after the tokens before it (cut from the left); the pieces' log-probs add.
        """
        pieces = self._pieces(pairs)
        if pieces is not None:
            totals = [0.0] * len(pairs)
            greedy_all = [True] * len(pairs)
            for (i, _, _), (lp, greedy) in zip(
                    pieces, self.score_tokens([(c, t) for _, c, t in pieces]), strict=True):
                totals[i] += lp
                greedy_all[i] = greedy_all[i] and greedy
            return list(zip(totals, greedy_all, strict=True))
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        for batch, (B, L, C, K) in self._batches(pairs):
            tokens = np.full((B, L), self.tok.eos_id, np.int32)
            positions = np.zeros((B, C), np.int32)
            targets = np.zeros((B, C, K), np.int32)
            valid = np.zeros((B, C, K), bool)
            for b, (inp, members) in enumerate(batch):
                n = len(inp)
                tokens[b, :n] = inp
                c = min(C, n)  # the last c positions of the row are scored
                positions[b, C - c:] = np.arange(n - c, n)
                for k, (_, n_cont, tail) in enumerate(members):
                    targets[b, C - n_cont:, k] = tail
                    valid[b, C - n_cont:, k] = True
            self.compiled_shapes.add((B, L, C, K))
            self.input_tokens += sum(len(inp) for inp, _ in batch)
            self.padded_tokens += B * L
            with self._traced():
                lp, greedy = _score(self.graphdef, self.state, tokens, positions, targets,
                                    self.model.cfg.vocab_size, self.sharding)
            lp, greedy = np.asarray(lp, np.float64), np.asarray(greedy)
            for b, (_, members) in enumerate(batch):
                for k, (i, _, _) in enumerate(members):
                    v = valid[b, :, k]
                    out[i] = (float(lp[b, v, k].sum()), bool(greedy[b, v, k].all()))
        return out  # type: ignore[return-value]

    def _pieces(self, pairs) -> list[tuple[int, list[int], list[int]]] | None:
        """(request, context ids, continuation ids) with continuations of at most
        ``max_length`` tokens, when some request's is longer; else None."""
        max_len = self.max_length
        pieces = []
        for i, (ctx, cont) in enumerate(pairs):
            if not ctx or not cont:
                raise ValueError(f"request {i}: empty context or continuation ({len(ctx)}, "
                                 f"{len(cont)} tokens); lm-eval supplies prefix_token_id")
            for s in range(0, len(cont), max_len):
                before = ctx + cont[:s] if s else ctx
                pieces.append((i, before[-(max_len + 1):], cont[s:s + max_len]))
        return pieces if len(pieces) > len(pairs) else None

    def _batches(self, pairs):
        """The batches ``score_tokens`` runs, with their padded shapes: (rows, (B, L, C, K)),
        rows being (model input, members (request, continuation length, targets))."""
        max_len = self.max_length
        groups: dict[tuple[int, ...], list[tuple[int, int, list[int]]]] = {}
        for i, (ctx, cont) in enumerate(pairs):
            whole = (ctx + cont)[-(max_len + 1):]
            groups.setdefault(tuple(whole[:-1]), []).append((i, len(cont), whole[-len(cont):]))
        rows = []  # (input, members) with at most K_MAX members each
        for inp, members in groups.items():
            for k in range(0, len(members), K_MAX):
                rows.append((inp, members[k:k + K_MAX]))
        # Longest first (like HFLM), so each batch pads to a length its rows nearly fill.
        rows.sort(key=lambda r: -len(r[0]))
        B = self.rows_per_batch
        for start in range(0, len(rows), B):
            batch = rows[start:start + B]
            L = _bucket(max(len(inp) for inp, _ in batch), self.max_length)
            C = _cont_bucket(max(n for _, ms in batch for _, n, _ in ms), L)
            K = 1 if all(len(ms) == 1 for _, ms in batch) else K_MAX
            yield batch, (B, L, C, K)

    def call_counts(self, pairs) -> collections.Counter:
        """The jitted calls ``score_tokens(pairs)`` makes, by program and shape
        (``program_calls``), computed without the model: what one evaluation costs."""
        pieces = self._pieces(pairs)
        if pieces is not None:
            return self.call_counts([(c, t) for _, c, t in pieces])
        counts: collections.Counter = collections.Counter()
        for _, shape in self._batches(pairs):
            counts.update(program_calls(shape, self.model.cfg.vocab_size, self.shards))
        return counts

    # ---- the programs, for an AOT compile (``prefixlm.compile.aot``) --------------------------------
    def largest_calls(self) -> dict[str, tuple[int, ...]]:
        """The largest shape of each jitted program ``score_tokens`` may call: the body at the
        batch size and ``max_length``; the head at ``max_length`` with every position scored
        (a continuation longer than the largest bucket) and ``K_MAX`` targets, in the row
        slices that keep its logits within ``MAX_LOGITS``."""
        B, L = self.rows_per_batch, self.max_length
        return {"hidden": (B, L), "score": (head_rows(B, L, self.model.cfg.vocab_size,
                                                      self.shards), L, L, K_MAX)}

    def lower(self, program: str, shape: tuple[int, ...]):
        """``program`` ("hidden": ``_hidden``, "score": ``_score_hidden``, as named by
        ``program_calls``) lowered at ``shape`` on abstract inputs passed as ``score_tokens``
        passes them: this model's state as placed, and on one device host (numpy) tokens,
        positions and targets and the body's output for hidden states; on several, all of them
        split by rows (``RowSharding``), under the rows' mesh."""
        if self.sharding is not None:
            ids = self.sharding.abstract
            placed = self.sharding.rows
        else:
            ids = functools.partial(jax.ShapeDtypeStruct, dtype=jnp.int32)
            placed = jax.tree.leaves(self.state)[0].sharding
        with self._traced():
            if program == "hidden":
                return _hidden.lower(self.graphdef, self.state, ids(shape))
            rows, L, C, K = shape
            h = jax.eval_shape(functools.partial(_hidden, self.graphdef), self.state,
                               ids((rows, L)))
            h_BxLxD = jax.ShapeDtypeStruct(h.shape, h.dtype, sharding=placed)
            return _score_hidden.lower(self.graphdef, self.state, h_BxLxD, ids((rows, C)),
                                       ids((rows, C, K)))

    def encode_request(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) exactly as ``TemplateLM.loglikelihood`` splits them."""
        key = (context, continuation)  # the request's own strings: the key copies nothing
        if self.encode_cache is not None and key in self.encode_cache:
            ctx_ids, cont_ids = self.encode_cache[key]
            return ctx_ids.tolist(), cont_ids.tolist()
        if context == "":
            cont = self.tok_encode(continuation, add_special_tokens=False)
            ctx, cont = (([self.prefix_token_id], cont) if cont[0] != self.prefix_token_id
                         else (cont[:1], cont[1:]))
        else:
            ctx, cont = self._encode_pair(context, continuation)
        if self.encode_cache is not None:  # int32 arrays: a quarter of a list's memory
            self.encode_cache[key] = (np.asarray(ctx, np.int32), np.asarray(cont, np.int32))
        return ctx, cont

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """``TemplateLM.loglikelihood`` with the tokenization cached and timed."""
        t0 = time.perf_counter()
        encoded = [((ctx, cont), *self.encode_request(ctx, cont))
                   for ctx, cont in (req.args for req in requests)]
        self.encode_seconds += time.perf_counter() - t0
        return self._loglikelihood_tokens(encoded, disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        results = self.score_tokens([(ctx, cont) for _, ctx, cont in requests])
        for (key, _, _), r in zip(requests, results, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, r)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Sum of token log-probs over disjoint windows, conditioned on ``prefix_token_id``."""
        from lm_eval import utils

        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for ctx, cont in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, self.score_tokens(windows), strict=True):
            totals[i] += lp
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding until a stop string, EOS, or ``max_gen_toks`` (no KV cache: simple,
        and only used by generative tasks, which the five evaluation tasks are not)."""
        from lm_eval.models.utils import handle_stop_sequences, postprocess_generated_text

        eos = self.tok.decode([self.eot_token_id])
        results = [""] * len(requests)
        groups = collections.defaultdict(list)
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            groups[json.dumps(gen_kwargs, sort_keys=True, default=str)].append((i, context))
        for key, items in groups.items():
            kwargs = json.loads(key)
            until = handle_stop_sequences(kwargs.get("until"), eos=eos)
            max_gen = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            max_ctx = self.max_length - max_gen
            if max_ctx <= 0:
                raise ValueError(f"max_gen_toks {max_gen} must be below max_length "
                                 f"{self.max_length}")
            B = self.rows_per_batch
            place = self.sharding.place if self.sharding is not None else (lambda x: x)
            for start in range(0, len(items), B):
                batch = items[start:start + B]
                ctxs = [self.tok_encode(c, left_truncate_len=max_ctx) or [self.prefix_token_id]
                        for _, c in batch]
                L = _bucket(max(map(len, ctxs)) + max_gen, self.max_length)
                tokens = np.full((B, L), self.tok.eos_id, np.int32)
                lengths = np.ones(B, np.int32)
                for b, ids in enumerate(ctxs):
                    tokens[b, :len(ids)] = ids
                    lengths[b] = len(ids)
                start_len = lengths.copy()
                done = np.array([b >= len(batch) for b in range(B)])
                for _ in range(max_gen):
                    with self._traced():
                        nxt = np.asarray(_next_token(self.graphdef, self.state, place(tokens),
                                                     place(lengths - 1)))
                    for b in np.flatnonzero(~done):
                        if lengths[b] >= L:
                            done[b] = True
                            continue
                        tokens[b, lengths[b]] = nxt[b]
                        lengths[b] += 1
                        text = self.tok.decode(tokens[b, start_len[b]:lengths[b]].tolist())
                        if nxt[b] == self.eot_token_id or any(u in text for u in until):
                            done[b] = True
                    if done.all():
                        break
                for b, (i, context) in enumerate(batch):
                    gen = tokens[b, start_len[b]:lengths[b]].tolist()
                    if gen and gen[-1] == self.eot_token_id:
                        gen = gen[:-1]
                    text = postprocess_generated_text(generation=self.tok.decode(gen),
                                                      stop=until, think_end_token=None)
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", (context, kwargs), text)
        return results


def config_get(config, key: str, default):
    try:
        return config[key]
    except (KeyError, AttributeError, TypeError):
        return getattr(config, key, default)


