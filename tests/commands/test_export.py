"""Export: transformers reproduces the Flax logits, and the exported tokenizer equals prefixlm's."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from prefixlm.export import build_hf_tokenizer, export_model
from prefixlm.model.llama import Llama, ModelConfig

TEXTS = [
    "Hello world",
    "  leading spaces and trailing   ",
    "Question: What is 2+2?\nAnswer: 4\n\n",
    "naïve café — déjà vu; 東京タワー 🚀🚀",
    "1234567890 3.14159 1e-5 $100,000",
    "def f(x):\n\treturn x ** 2  # comment\r\n",
    "I'm you'll they'd WE'RE shouldn't",
    "tab\tnewline\n\n\nmany\n",
    "a" * 300,
    " " * 17 + "x",
    "Ünïcödé ẞ ﬁ ligature Ω≈ç√∫",
    "",
]


def random_model(tie: bool, seed: int = 0) -> Llama:
    """A tiny model with O(1) random weights, so the logits differ meaningfully across tokens."""
    cfg = ModelConfig(vocab_size=128256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                      d_ff=64, max_seq_len=64, tie_embeddings=tie, dtype="float32")
    model = Llama(cfg, rngs=nnx.Rngs(seed))
    params = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    noisy = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    nnx.update(model, jax.tree.unflatten(treedef, noisy))
    return model


@pytest.mark.parametrize("tie", [True, False])
def test_transformers_logits_match_flax(tie, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    model = random_model(tie)
    out = export_model(model, model.cfg, tmp_path, tokenizer=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 500000.0}
    assert cfg["tie_word_embeddings"] is tie
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert (hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()) is tie
    tokens = np.random.RandomState(0).randint(0, 128256, (3, 40))
    flax_logits = np.asarray(model.logits(jnp.asarray(tokens)))
    with torch.no_grad():
        hf_logits = hf(torch.tensor(tokens)).logits.float().numpy()
    assert flax_logits.std() > 1.0  # the check means something
    np.testing.assert_array_less(np.abs(flax_logits - hf_logits).max(), 1e-4)


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tok")
    build_hf_tokenizer(1024).save_pretrained(str(d))
    return AutoTokenizer.from_pretrained(str(d))


def test_exported_tokenizer_equals_prefixlm(hf_tokenizer, llama3):
    for text in TEXTS:
        ids = llama3.encode(text)
        # <|end_of_text|> is added in front, as every training document follows it
        assert hf_tokenizer.encode(text) == [llama3.eos_id] + ids, text
        assert hf_tokenizer(text)["input_ids"] == [llama3.eos_id] + ids, text
        assert hf_tokenizer.encode(text, add_special_tokens=False) == ids, text
        assert hf_tokenizer.decode(ids) == text
    assert hf_tokenizer.bos_token_id == hf_tokenizer.eos_token_id == llama3.eos_id == 128001
    assert len(hf_tokenizer) == llama3.vocab_size
    # the same ids for every special token name
    for name, i in list(llama3.special_ids.items())[:20]:
        assert hf_tokenizer.convert_tokens_to_ids(name) == i


def test_export_rejects_a_non_llama3_vocab(tmp_path):
    cfg = ModelConfig(vocab_size=512, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32,
                      max_seq_len=16, dtype="float32")
    with pytest.raises(ValueError, match="128256"):
        export_model(Llama(cfg, rngs=nnx.Rngs(0)), cfg, tmp_path)


def test_export_refuses_a_non_empty_directory_and_overwrite_cleans_only_an_export(tmp_path):
    """Before: stale weight files survived beside the new ones; any directory was written into."""
    from prefixlm.export import main, prepare_output

    model = random_model(tie=True)
    user_dir = tmp_path / "user"
    user_dir.mkdir()
    (user_dir / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty.*--overwrite"):
        export_model(model, model.cfg, user_dir, tokenizer=False)
    with pytest.raises(FileExistsError, match="does not look like a previous export"):
        export_model(model, model.cfg, user_dir, tokenizer=False, overwrite=True)
    assert sorted(p.name for p in user_dir.iterdir()) == ["notes.txt"]

    out = export_model(model, model.cfg, tmp_path / "hf", tokenizer=False)
    (out / "model-00002-of-00002.safetensors").write_bytes(b"stale shard")
    (out / "README.md").write_text("the user's model card")
    with pytest.raises(FileExistsError, match="not empty"):
        export_model(model, model.cfg, out, tokenizer=False)
    export_model(model, model.cfg, out, tokenizer=False, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md", "config.json", "generation_config.json", "model.safetensors",
        "prefixlm_export.json"]
    # The CLI refuses in one line with exit 2 before restoring anything.
    assert main(["--workdir", str(tmp_path / "no-run"), "--output", str(user_dir)]) == 2
    assert prepare_output(tmp_path / "new" / "dir") == tmp_path / "new" / "dir"


def test_exported_files_are_readable_by_others(tmp_path):
    """Before: model.safetensors was 0600 (safetensors' temp file) while the rest were 0644."""
    import os
    import stat

    old = os.umask(0o022)
    try:
        out = export_model(random_model(tie=True), random_model(tie=True).cfg, tmp_path / "hf",
                           tokenizer=False)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes == dict.fromkeys(modes, 0o644) and "model.safetensors" in modes
