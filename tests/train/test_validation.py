"""Validation on fixed windows (issue 16): the first eval.val_tokens tokens of the validation
split, in order, the same for every seed, data seed, grad_accum and batch size, with an exact
mean over a padded last batch, and val/loss at the step's scheduled eps. Tiny model, 34-id
vocabulary, seq 16 (see test_train.py)."""

import jax
import numpy as np
import pytest
from test_train import read_metrics, run, tiny_config, tiny_tokenizer, write_token_dir

from prefixlm import config as config_lib
from prefixlm.data import shards
from prefixlm.train import trainer as step_lib
from prefixlm.train import validation_loss


@pytest.fixture(scope="module")
def token_dir(tmp_path_factory):
    return write_token_dir(tmp_path_factory.mktemp("tokens"), tiny_tokenizer().vocab_hash)


def _trainer(token_dir, **kw):
    c = config_lib.resolve(tiny_config(token_dir, train__batch_size=4, **kw), 1, 1)
    return step_lib.Trainer.create(c, tiny_tokenizer())


def _reference(trainer, params, windows_NxL1, eps):
    """float64 mean objective, NLL and accuracy over all windows, from the model's hidden
    states with the logits, log-softmax and target computed apart from the loss code."""
    model = trainer.model(params)
    inputs, targets = windows_NxL1[:, :-1], windows_NxL1[:, 1:]
    h_NxD = np.asarray(model(inputs), np.float64).reshape(-1, trainer.mcfg.d_model)
    e_VxD = np.asarray(model.unembedding(), np.float64)
    z_NxV = h_NxD @ e_VxD.T
    logp_NxV = z_NxV - z_NxV.max(1, keepdims=True)
    logp_NxV -= np.log(np.exp(logp_NxV).sum(1, keepdims=True))
    ids_N = targets.reshape(-1)
    q_NxV = np.asarray(trainer.obj.target(ids_N, eps=eps), np.float64)
    return (-(q_NxV * logp_NxV).sum(1).mean(), -logp_NxV[np.arange(len(ids_N)), ids_N].mean(),
            (z_NxV.argmax(1) == ids_N).mean())


def test_windows_are_the_splits_first_tokens_and_the_mean_is_exact(token_dir):
    trainer = _trainer(token_dir, eval__val_tokens=30 * 16 + 5)  # 30 windows: 7 batches + 2
    windows = validation_loss.read_windows(trainer.config, tiny_tokenizer().vocab_hash)
    stream = np.fromfile(token_dir / "validation" / "00000.bin", dtype=shards.DTYPE)
    assert windows.shape == (30, 17) and windows.dtype == np.int32
    for i in (0, 1, 29):
        np.testing.assert_array_equal(windows[i], stream[16 * i:16 * i + 17])
    params = trainer.init_fn()["params"]
    got = validation_loss.Validation(trainer, windows)(params, 0, False)
    want = _reference(trainer, params, windows, eps=0.1)
    for key, w in zip(("val/loss", "val/nll", "val/accuracy"), want, strict=True):
        np.testing.assert_allclose(got[key], w, rtol=2e-6, err_msg=key)
    # Another batch size (2, as with grad_accum=2) scores the same windows: the accuracy to the
    # bit, the NLL and the objective to float32 rounding of their per-token terms (XLA's CPU
    # code for another batch shape may round a token's hidden state or logit differently in the
    # last bit: the objective differed at 4 of 480 tokens before issue 20, the NLL at 1 after).
    halves = validation_loss.Validation(trainer, windows)
    halves.batch_size = 2
    other = halves(params, 0, False)
    assert other["val/accuracy"] == got["val/accuracy"]
    assert other["val/nll"] == pytest.approx(got["val/nll"], rel=1e-7)
    assert other["val/loss"] == pytest.approx(got["val/loss"], rel=1e-7)


def test_val_loss_uses_the_scheduled_eps(token_dir):
    trainer = _trainer(token_dir, objective__eps_schedule="linear",
                       objective__eps_decay_fraction=0.5, train__steps=20)
    windows = validation_loss.read_windows(trainer.config, tiny_tokenizer().vocab_hash)
    params = trainer.init_fn()["params"]
    val = validation_loss.Validation(trainer, windows)
    for step, eps in ((0, 0.1), (5, 0.05), (10, 0.0), (20, 0.0)):
        got = val(params, step, False)
        want = _reference(trainer, params, windows, eps=eps)
        np.testing.assert_allclose(got["val/loss"], want[0], rtol=2e-6, err_msg=str(step))
    assert got["val/loss"] == pytest.approx(got["val/nll"], rel=1e-6)  # eps 0: plain NLL


def test_a_short_split_gives_fewer_windows_with_a_warning(tmp_path, caplog):
    data = write_token_dir(tmp_path, tiny_tokenizer().vocab_hash, n_val=100)
    c = config_lib.resolve(tiny_config(data, eval__val_tokens=2**21), 1, 1)
    with caplog.at_level("WARNING", logger="prefixlm"):
        windows = validation_loss.read_windows(c, tiny_tokenizer().vocab_hash)
    assert windows.shape == (6, 17)  # (100 - 1) // 16
    assert "not eval.val_tokens=2097152" in caplog.text


@pytest.mark.slow
def test_runs_with_other_data_seeds_and_grad_accum_log_the_same_step_0_val_nll(token_dir,
                                                                                tmp_path):
    rows = {}
    for name, kw in {"a": dict(data_seed=1), "b": dict(data_seed=2, grad_accum=2)}.items():
        c = tiny_config(token_dir, train__steps=1, train__batch_size=4, eval__every=10,
                        checkpoint__every=0, **kw)
        run(c, tmp_path / name)
        rows[name] = {r["step"]: r for r in read_metrics(tmp_path / name)}
    assert rows["a"][0]["val/nll"] == pytest.approx(rows["b"][0]["val/nll"], rel=1e-7)
    assert rows["a"][0]["val/loss"] == pytest.approx(rows["b"][0]["val/loss"], rel=1e-7)
    assert rows["a"][1]["loss"] != rows["b"][1]["loss"]  # they did train on other batches
    assert jax.device_count() == 1


@pytest.mark.parametrize("change, message", [
    (dict(eval__val_tokens=-1), r"eval.val_tokens=-1 must be an integer >= 0"),
    (dict(checkpoint__preemption_check_every=0),
     r"checkpoint.preemption_check_every=0 must be an integer >= 1"),
])
def test_the_loops_fields_are_range_checked(token_dir, change, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.resolve(tiny_config(token_dir, **change), num_devices=1, process_count=1)
