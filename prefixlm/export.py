"""Export a Flax ``Llama`` to a Hugging Face ``LlamaForCausalLM`` directory, tokenizer included.

    python -m prefixlm.export --workdir DIR --output HF_DIR [--step N]

writes ``model.safetensors`` (float32), ``config.json``, ``generation_config.json``,
``tokenizer.json`` and ``tokenizer_config.json``. The result loads with
``AutoModelForCausalLM.from_pretrained(HF_DIR)`` and with
``lm_eval --model hf --model_args pretrained=HF_DIR``.

Weights: the model's parameter names already mirror HF's, so export is transposes only (an
``nnx.Linear`` kernel is [in, out], a torch ``weight`` is [out, in]); RoPE is in HF's rotate-half
layout on both sides, so q/k need no permutation. ``tests/commands/test_export.py`` checks the logits of
``transformers`` against the Flax ones (tied and untied).

Tokenizer: built offline from the same tiktoken ranks file as ``prefixlm.vocab.tokenizer.load("llama3")``
with transformers' ``TikTokenConverter``, so ``AutoTokenizer`` gives the same ids. Two choices:
  * ``bos_token`` = ``eos_token`` = ``<|end_of_text|>`` (128001), as GPT-2 does with its one
    separator: training never shows ``<|begin_of_text|>``; every document there follows
    ``<|end_of_text|>``.
  * That BOS is added in front of every encoded text (a post-processor template, like Llama 3's
    own tokenizer adds its BOS): ``tok.encode(text)`` is ``[128001] + prefixlm encode(text)``, and
    ``add_special_tokens=False`` gives ``prefixlm`` ``encode(text)`` exactly. lm-eval's HF model
    then starts every context with the token the model knows as "a document starts here", as
    ``prefixlm.evaluation.jaxlm.JaxLM`` does, and both score the same tokens (tested there).
One difference remains and is inherent to HF tokenizers: special-token *text* in the input
("<|end_of_text|>") becomes the special id there, while prefixlm encodes it as plain text.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

import numpy as np

from prefixlm.core import cli, errors
from prefixlm.evaluation import restore
from prefixlm.vocab import tokenizer as tok_lib

BOS_EOS = "<|end_of_text|>"
PAD = "<|finetune_right_pad_id|>"

# The files an export writes (the tokenizer's two come from ``save_pretrained``). ``--overwrite``
# removes these names and every ``*.safetensors`` / ``*.safetensors.index.json`` (a stale weight
# file beside the new one is what makes a reused directory load the wrong model); any other file in
# the directory is the user's and is left alone.
EXPORT_FILES = ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "prefixlm_export.json")
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json")


def _export_owned(out: pathlib.Path) -> list[pathlib.Path]:
    """Files in ``out`` that an export writes or that would be read as weights beside ours."""
    owned = {out / n for n in EXPORT_FILES if (out / n).is_file()}
    for pattern in WEIGHT_PATTERNS:
        owned.update(f for f in out.glob(pattern) if f.is_file())
    return sorted(owned)


def prepare_output(output_dir, *, overwrite: bool = False) -> pathlib.Path:
    """Makes ``output_dir`` ready for an export: new or empty, or a previous export to replace.

    A non-empty directory is refused unless ``overwrite``; with it, only a directory that looks
    like a previous export (``config.json`` and a ``*.safetensors`` file) is cleaned, and only of
    the export's own files (:data:`EXPORT_FILES` and weight files), so pointing ``--output`` at
    the wrong directory never deletes someone's data.
    """
    out = pathlib.Path(output_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--output {out} is a file; pass a directory path")
    if not out.is_dir() or not any(out.iterdir()):
        out.mkdir(parents=True, exist_ok=True)
        return out
    if not overwrite:
        raise FileExistsError(
            f"--output {out} is not empty; export into a new or empty directory, or pass "
            "--overwrite to replace a previous export there"
        )
    if not ((out / "config.json").is_file() and any(out.glob("*.safetensors"))):
        raise FileExistsError(
            f"--output {out} is not empty and does not look like a previous export (no "
            "config.json + *.safetensors), so --overwrite will not clean it; choose a new "
            "directory"
        )
    for f in _export_owned(out):
        f.unlink()
    return out


def _public_mode(path: pathlib.Path) -> None:
    """Gives a written file the mode ``open()`` would (0644 under umask 022).

    safetensors writes through a private temp file (0600); an export is meant to be read by
    others (an eval job, a shared model directory), like every other file written beside it.
    """
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def hf_state_dict(model) -> dict[str, np.ndarray]:
    """HF ``LlamaForCausalLM`` tensor names -> float32 numpy arrays (lm_head only when untied)."""
    f32 = lambda x: np.ascontiguousarray(np.asarray(x[...], dtype=np.float32))  # noqa: E731
    sd = {"model.embed_tokens.weight": f32(model.embed_tokens.embedding)}
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{name}.weight"] = f32(getattr(layer.self_attn, name).kernel).T
        for name in ("gate_proj", "up_proj", "down_proj"):
            sd[p + f"mlp.{name}.weight"] = f32(getattr(layer.mlp, name).kernel).T
        sd[p + "input_layernorm.weight"] = f32(layer.input_layernorm.weight)
        sd[p + "post_attention_layernorm.weight"] = f32(layer.post_attention_layernorm.weight)
    sd["model.norm.weight"] = f32(model.norm.weight)
    if not model.cfg.tie_embeddings:
        sd["lm_head.weight"] = f32(model.lm_head.kernel).T
    return {k: np.ascontiguousarray(v) for k, v in sd.items()}


def hf_config(model_cfg, bos_id: int, eos_id: int, pad_id: int) -> dict:
    """config.json contents for transformers 5 (RoPE as ``rope_parameters``)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": model_cfg.vocab_size,
        "hidden_size": model_cfg.d_model,
        "intermediate_size": model_cfg.d_ff,
        "num_hidden_layers": model_cfg.n_layers,
        "num_attention_heads": model_cfg.n_heads,
        "num_key_value_heads": model_cfg.n_kv_heads,
        "head_dim": model_cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": model_cfg.max_seq_len,
        "rms_norm_eps": model_cfg.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": float(model_cfg.rope_theta)},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": bool(model_cfg.tie_embeddings),
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "dtype": "float32",
        "use_cache": True,
    }


def build_hf_tokenizer(max_length: int):
    """A transformers fast tokenizer equal to prefixlm's Llama 3 one, with ``<|end_of_text|>``
    added in front of every text (see module docstring): documents follow it in training."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter


    converted = TikTokenConverter(
        vocab_file=str(tok_lib.llama3_ranks_path()),
        pattern=tok_lib.LLAMA3_PATTERN,
        extra_special_tokens=tok_lib.llama3_special_tokens(),
    ).converted()
    bos_id = 128000 + tok_lib.llama3_special_tokens().index(BOS_EOS)
    # Keep the converter's ByteLevel step (it fixes character offsets) and add the BOS after it.
    converted.post_processor = processors.Sequence([
        converted.post_processor,
        processors.TemplateProcessing(single=f"{BOS_EOS} $A", pair=f"{BOS_EOS} $A {BOS_EOS} $B:1",
                                      special_tokens=[(BOS_EOS, bos_id)]),
    ])
    return PreTrainedTokenizerFast(
        tokenizer_object=converted,
        bos_token=BOS_EOS,
        eos_token=BOS_EOS,
        pad_token=PAD,
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,
    )


def export_model(model, model_cfg, output_dir, *, tokenizer: bool = True, meta: dict | None = None,
                 overwrite: bool = False) -> pathlib.Path:
    """Writes an HF LlamaForCausalLM directory for ``model`` (a ``prefixlm.model.Llama``).

    ``tokenizer=False`` skips the tokenizer files (~6 s to build); ``meta`` is stored as
    ``prefixlm_export.json`` (source workdir, step, ...) so an export says where it came from.
    ``output_dir`` must be new or empty, or a previous export with ``overwrite=True`` (see
    :func:`prepare_output`).
    """
    from safetensors.numpy import save_file


    out = pathlib.Path(output_dir)
    shape = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff",
             "tie_embeddings")
    diff = [f for f in shape if getattr(model.cfg, f) != getattr(model_cfg, f)]
    if diff:
        raise ValueError(f"model_cfg differs from the model's own config in {diff}")
    specials = {s: 128000 + i for i, s in enumerate(tok_lib.llama3_special_tokens())}
    if model_cfg.vocab_size != 128000 + len(specials):
        raise errors.ConfigError(
            f"model vocab_size {model_cfg.vocab_size} is not Llama 3's 128256; the exported "
            "tokenizer would not match the embedding (export supports the llama3 tokenizer only)"
        )
    bos = eos = specials[BOS_EOS]
    pad = specials[PAD]
    out = prepare_output(out, overwrite=overwrite)
    save_file(hf_state_dict(model), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(model_cfg, bos, eos, pad), indent=2))
    gen = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    if tokenizer:
        build_hf_tokenizer(model_cfg.max_seq_len).save_pretrained(str(out))
    (out / "prefixlm_export.json").write_text(json.dumps(
        {"model_config": {k: getattr(model_cfg, k) for k in model_cfg.__dataclass_fields__}}
        | (meta or {}), indent=2, default=str))
    for f in _export_owned(out):
        _public_mode(f)
    return out


def export_workdir(workdir, output_dir, step: int | None = None, *, overwrite: bool = False
                   ) -> pathlib.Path:
    """Exports the checkpoint at ``step`` (newest when None) of a training workdir."""
    prepare_output(output_dir, overwrite=overwrite)  # refuse before the (slow) restore
    _, model, step = restore.load_model(str(workdir), step=step)
    return export_model(model, model.cfg, output_dir, overwrite=overwrite,
                        meta={"workdir": str(pathlib.Path(workdir).resolve()), "step": step})


@cli.command
def main(argv=None) -> int:
    p = cli.ArgumentParser(
        prog="python -m prefixlm.export",
        description=(
            "Export a prefixlm checkpoint (DIR/checkpoints/<step>/) as a Hugging Face "
            "LlamaForCausalLM directory: model.safetensors (float32), config.json, "
            "generation_config.json and the Llama 3 tokenizer (built offline). Load it with "
            "AutoModelForCausalLM.from_pretrained(HF_DIR) or "
            "`lm_eval --model hf --model_args pretrained=HF_DIR`."
        ),
    )
    p.add_argument("--workdir", required=True, help="training directory holding checkpoints/")
    p.add_argument("--output", required=True,
                   help="directory to write: new or empty (created if missing)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous export in --output (removes only the files an export "
                   "writes and *.safetensors; refuses a directory without config.json + "
                   "*.safetensors)")
    args = p.parse_args(argv)
    out = export_workdir(args.workdir, args.output, args.step, overwrite=args.overwrite)
    step = json.loads((out / "prefixlm_export.json").read_text()).get("step")
    print(f"exported step {step} of {args.workdir} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
