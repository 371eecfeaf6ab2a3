"""Is there enough data? Before training (:func:`check_enough`) and after downloading and
tokenizing (:func:`check_tokens`).

A run reads ``train.steps x train.batch_size`` windows of ``data.seq_len`` tokens. With fewer in
the train split the pipeline would silently repeat data (grain's ``repeat``); so a run checks
first and refuses short data in one line naming the shortfall, unless ``data.allow_repeat`` opts
in to epochs (the pipeline then logs each epoch boundary: ``pipeline.EpochLog``).

The downloader plans in FineWeb's GPT-2 ``token_count``; how many Llama 3 training tokens that
text gives is only known once it is tokenized, so :func:`check_tokens` measures it on the files
and says how many more the plan needs.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import sys

from prefixlm.core import errors
from prefixlm.data import shards

log = logging.getLogger("prefixlm.data")


class NotEnoughData(errors.DataError):
    """The train split is shorter than the run (a ValueError: a data error, exit 2)."""


def epoch_at_step(step: int, *, batch_size: int, windows_per_epoch: int) -> int:
    """The epoch (0-based) of the first window global step ``step`` reads: step s takes windows
    [s*B, (s+1)*B) of the repeated stream (B = global batch; processes interleave within it)."""
    return int(step) * int(batch_size) // max(1, int(windows_per_epoch))


def check_enough(config) -> dict:
    """Checks, before training, that the train split of ``config.data.path`` holds the run:
    ``train.steps x train.batch_size`` windows of ``data.seq_len`` (``train.steps x
    train.batch_tokens`` tokens, plus the first token, which is no target).

    Short data is a :class:`NotEnoughData` naming the shortfall (tokens, and about how many more
    shard files or documents), unless ``data.allow_repeat`` is True: then the run takes repeated,
    reshuffled epochs and each boundary is logged (``pipeline.EpochLog``, :func:`epoch_at_step`).
    Returns {"tokens_needed", "tokens_held", "windows_per_epoch", "epochs"} (epochs: how many
    the run touches, 1 when no window repeats).
    """
    d, t = config.data, config.train
    stats = shards.read_stats(d.path)
    split = stats["splits"]["train"]
    held = int(split["tokens"])
    windows = max(0, (held - 1) // int(d.seq_len))
    needed_windows = int(t.steps) * int(t.batch_size)
    needed = needed_windows * int(d.seq_len) + 1
    info = {"tokens_needed": needed, "tokens_held": held, "windows_per_epoch": windows,
            "epochs": math.ceil(needed_windows / windows) if windows else math.inf}
    if needed_windows <= windows:
        return info
    files = [s["train"] for s in stats["shards"] if int(s["train"]["tokens"]) > 0]
    short = needed - held
    per_file = held / max(1, len(files))
    per_doc = held / max(1, int(split["documents"]))
    what = (f"the train split of {d.path} holds {held:,} tokens, but train.steps="
            f"{t.steps} x train.batch_tokens={int(t.batch_size) * int(d.seq_len):,} needs "
            f"{needed:,}; short by {short:,} tokens (about "
            f"{math.ceil(short / per_file) if held else '?'} more shard files of "
            f"{per_file:,.0f} tokens, or {math.ceil(short / per_doc) if held else '?'} more "
            "documents)")
    if not bool(getattr(d, "allow_repeat", False)):
        raise NotEnoughData(what + ". Tokenize more data into data.path, lower train.tokens "
                            "(or train.steps), or set data.allow_repeat=True to train on "
                            "repeated epochs")
    log.warning("%s; data.allow_repeat=True: the run reads %s epochs of %s windows, each "
                "reshuffled, and logs every epoch boundary", what, info["epochs"], windows)
    return info



def check_tokens(output: str | os.PathLike, tokens_dir: str | os.PathLike, tokens: float) -> dict:
    """After tokenizing the downloaded files into ``tokens_dir``: whether their train split holds
    ``tokens`` Llama 3 tokens, measured, and if not how many more files the plan needs.

    The exchange rate is measured on the files themselves: Llama 3 train tokens per GPT-2
    ``token_count`` of the downloaded files that were tokenized. Returns {"train_tokens",
    "needed", "ratio", "more_files", "margin"} (``margin``: the ``--margin`` whose rerun fetches
    them, 0 when nothing more is needed). Raises ValueError when the two directories do not
    match (files downloaded but not yet tokenized).
    """
    out = pathlib.Path(output)
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"{out / 'manifest.json'}: no download record ({e}); run this "
                                "command without --check first") from e
    stats = shards.read_stats(tokens_dir)
    tokenized = {pathlib.Path(f).name for f in stats["inputs"]}
    files = manifest["files"]
    missing = [f["path"] for f in files if pathlib.Path(f["path"]).name not in tokenized]
    if missing or not files:
        raise ValueError(f"{tokens_dir} was not made from all {len(files)} files of {out} "
                         f"({len(missing)} not tokenized, e.g. {missing[:1]}); tokenize them "
                         f"first: python -m prefixlm.data.tokenize --input "
                         f"'{out}/{manifest.get('folder', '**')}/*.parquet' --output {tokens_dir}")
    gpt2 = sum(int(f["token_count"]) for f in files)
    train = int(stats["splits"]["train"]["tokens"])
    ratio = train / max(1, gpt2)
    short = max(0.0, tokens - train)
    more_files = math.ceil(short / ratio / (gpt2 / len(files))) if short else 0
    margin = math.ceil((gpt2 + short / ratio) / tokens * 1.01 * 100) / 100 if short else 0.0
    return {"train_tokens": train, "needed": tokens, "ratio": ratio, "more_files": more_files,
            "margin": margin, "gpt2_tokens": gpt2, "files": len(files)}


def check_download_main(output, tokens_dir, tokens: float) -> int:
    """``python -m prefixlm.data.fineweb --output OUT --tokens N --check TOKENS_DIR``: prints
    the measurement; exit 0 when enough, 2 (one line naming the files needed) when short."""
    c = check_tokens(output, tokens_dir, tokens)
    head = (f"{tokens_dir}: {c['train_tokens']:,} Llama 3 train tokens from {c['files']} files "
            f"({c['gpt2_tokens']:,} GPT-2 tokens; measured {c['ratio']:.3f} Llama 3 train tokens "
            f"per GPT-2 token) for {c['needed']:,.0f} needed")
    if not c["more_files"]:
        print(f"{head}: enough ({c['train_tokens'] / c['needed'] - 1:+.1%} spare)")
        return 0
    print(f"error: {head}: short by {c['needed'] - c['train_tokens']:,.0f}, about "
          f"{c['more_files']} more files; fetch them with python -m prefixlm.data.fineweb "
          f"--output {output} --tokens {tokens:g} --margin {c['margin']:.2f}, then "
          "rerun the same tokenize command (finished shards are kept)", file=sys.stderr)
    return 2
