"""The record's run end to end (configs/prefix_longest.py:record on the tiny model): its name,
eps held for the first third of the steps and decayed to 0 over the second, and an objective
that is CE + eps CE(prefix) (above the plain NLL while eps > 0, equal to it from then on)."""

import pytest
from test_train import read_metrics, run, tiny_config, tiny_tokenizer, write_token_dir

from prefixlm import config as config_lib


@pytest.fixture(scope="module")
def token_dir(tmp_path_factory):
    return write_token_dir(tmp_path_factory.mktemp("tokens"), tiny_tokenizer().vocab_hash)


def test_record_run_holds_then_decays_eps_and_adds_the_prefix_ce(token_dir, tmp_path):
    c = tiny_config(token_dir, family="prefix_longest", arg="record,tiny", train__steps=9,
                    log_every=1, eval__every=3)
    assert config_lib.run_name(c) == "prefix_longest_aux_eps0p25_hold0p3333_lin0p3333_seed0_tiny"
    run(c, tmp_path)
    rows = {r["step"]: r for r in read_metrics(tmp_path) if "eps" in r}
    # step s logs the update made at s - 1: held for updates 0-2, decayed over 3-5, then 0
    expected = [0.25, 0.25, 0.25, 0.25, 0.25 * 2 / 3, 0.25 / 3, 0.0, 0.0, 0.0]
    assert [rows[s]["eps"] for s in range(1, 10)] == pytest.approx(expected, abs=1e-7)
    for s in range(1, 10):
        if rows[s]["eps"] > 0:
            assert rows[s]["loss"] > rows[s]["nll"]  # CE + eps CE(longest prefix) > CE
        else:
            assert rows[s]["loss"] == pytest.approx(rows[s]["nll"], rel=1e-6)
    # One eps per loss: an evaluation row holds the eps its val/loss used, eps_at(s), beside
    # the training step's eps_at(s - 1) that its loss used (at step 6: 0.25 / 3 and 0).
    val = {r["step"]: r for r in read_metrics(tmp_path) if "val/loss" in r}
    assert sorted(val) == [0, 3, 6, 9]
    schedule = expected[1:] + [0.0]  # eps_at(s) for s = 1..9
    assert [val[s]["val/eps"] for s in (3, 6, 9)] == pytest.approx(
        [schedule[s - 1] for s in (3, 6, 9)], abs=1e-7)
    assert val[0]["val/eps"] == 0.25
    assert val[6]["eps"] == pytest.approx(0.25 / 3) and val[6]["val/eps"] == 0.0
    assert val[6]["val/loss"] == pytest.approx(val[6]["val/nll"], rel=1e-6)  # at val/eps 0
    assert val[3]["val/loss"] > val[3]["val/nll"]  # at val/eps 0.25
