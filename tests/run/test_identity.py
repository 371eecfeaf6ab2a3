"""Issue 21 items 5-7, in process: identity that means the data (data.path resolved, the data
named by its content), old runs that continue (a field added since at its default is no change,
an advised fix is accepted), --restart all or nothing across a kill, one row per step across a
SIGTERM at an evaluation step, and one-line refusals for an empty --workdir, a local path with
'://', a seed beyond what the data order takes and a missing data.val_path. Each failed on main
before the issue. Tiny model and data as in test_train.py."""

import json
import os
import shutil
import signal

import ml_collections
import numpy as np
import pytest
from test_faults import _steps
from test_train import read_metrics, run, tiny_config, tiny_tokenizer, write_token_dir

from prefixlm import config as config_lib
from prefixlm.core.errors import ConfigError, DataError
from prefixlm.data import shards
from prefixlm.run import preflight
from prefixlm.run import workdir as workdir_lib


def token_dir_with_checksums(root, seed=0, vocab_hash=None, **kw):
    """A token directory as tokenize writes one today: every shard's content checksum (and
    largest id) recorded."""
    root = write_token_dir(root, vocab_hash or tiny_tokenizer().vocab_hash, seed=seed, **kw)
    stats = json.loads((root / shards.STATS).read_text())
    for shard in stats["shards"]:
        for split in shards.SPLITS:
            f = root / shard[split]["file"]
            shard[split]["checksum"] = shards.file_checksum(f)
            shard[split]["max_id"] = int(np.fromfile(f, shards.DTYPE).max())
    (root / shards.STATS).write_text(json.dumps(stats))
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return token_dir_with_checksums(tmp_path_factory.mktemp("tokens"))


def _short(path, **kw):
    return tiny_config(path, **{"train__steps": 4, "log_every": 2, "checkpoint__every": 2,
                                "eval__every": 0, **kw})


# ---- identity that means the data ---------------------------------------------------------------
def _lose_the_last_checkpoint(workdir):
    """So the next run resumes from step 2 and trains steps 3-4 again under the same config
    (the same compiled programs: cheap)."""
    shutil.rmtree(workdir / "checkpoints" / "4")


def test_the_same_data_under_another_path_resumes(data, tmp_path):
    run(_short(data), tmp_path / "w")
    _lose_the_last_checkpoint(tmp_path / "w")
    copy = shutil.copytree(data, tmp_path / "moved")
    assert run(_short(copy), tmp_path / "w")["step"] == 4  # on main: data.path cannot change
    assert _steps(tmp_path / "w") == [2, 4]
    saved = json.loads((tmp_path / "w" / "config.json").read_text())["data"]
    assert saved["path"] == os.path.realpath(copy)
    assert saved["fingerprint"] == workdir_lib.data_fingerprint(data)


def test_other_data_under_the_same_path_is_refused(data, tmp_path):
    path = shutil.copytree(data, tmp_path / "tokens")
    run(_short(path), tmp_path / "w")
    shutil.rmtree(path)
    token_dir_with_checksums(path, seed=1)  # other shards, same place
    with pytest.raises(ConfigError, match=r"holds another run \(data.fingerprint: 'sha256:"):
        run(_short(path), tmp_path / "w", allow_changes=["data.fingerprint"])
    assert _steps(tmp_path / "w") == [2, 4]


def test_a_relative_data_path_means_one_directory_whatever_the_cwd(data, tmp_path, monkeypatch):
    for name, seed in (("a", 0), ("b", 1)):
        token_dir_with_checksums(tmp_path / name / "tokens", seed=seed)
    monkeypatch.chdir(tmp_path / "a")
    run(_short("tokens"), tmp_path / "w")
    assert json.loads((tmp_path / "w" / "config.json").read_text())["data"]["path"] == \
        os.path.realpath(tmp_path / "a" / "tokens")
    monkeypatch.chdir(tmp_path / "b")  # "tokens" here holds other shards
    with pytest.raises(ConfigError, match="data.fingerprint"):
        run(_short("tokens"), tmp_path / "w")


def test_the_advised_fix_for_a_changed_shard_is_accepted(data, tmp_path):
    """A shard edited under a run is refused with 're-tokenize into a fresh directory'; the
    fresh directory (the same corpus and tokenizer: the same shards) then resumes the run."""
    path = shutil.copytree(data, tmp_path / "tokens")
    run(_short(path), tmp_path / "w")
    _lose_the_last_checkpoint(tmp_path / "w")
    shard = path / "train" / "00000.bin"
    raw = bytearray(shard.read_bytes())
    raw[8] ^= 1
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="Re-tokenize into a fresh directory"):
        run(_short(path), tmp_path / "w")
    fresh = token_dir_with_checksums(tmp_path / "fresh")  # what tokenize would write again
    assert run(_short(fresh), tmp_path / "w")["step"] == 4  # resumed from step 2


# ---- old runs continue --------------------------------------------------------------------------
def test_a_run_recorded_before_a_field_existed_continues(data, tmp_path, monkeypatch):
    """A workdir written before objective.eps_schedule (and data fingerprints) existed: its
    checkpoints' identity and config.json lack the field and name data.path instead."""
    today = workdir_lib.identity

    def old_identity(config):
        out = {k: v for k, v in today(config).items()
               if k not in ("objective.eps_schedule", "data.fingerprint")}
        return {**out, "data.path": config.data.path}

    monkeypatch.setattr(workdir_lib, "identity", old_identity)
    run(_short(data), tmp_path)
    monkeypatch.setattr(workdir_lib, "identity", today)
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["objective"]["eps_schedule"], saved["data"]["fingerprint"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    _lose_the_last_checkpoint(tmp_path)

    with pytest.raises(ConfigError, match="objective.eps_schedule: None -> 'linear'"):
        run(_short(data, objective__eps_schedule="linear"), tmp_path)  # not the default
    assert run(_short(data), tmp_path)["step"] == 4  # on main: "None -> 'constant'"


def test_a_model_that_cannot_fit_the_host_is_refused_before_anything_is_written(data, tmp_path):
    with pytest.raises(ConfigError, match="does not fit"):
        run(_short(data, model__d_model=4_000_000), tmp_path / "w")
    assert not (tmp_path / "w").exists()
    assert run(_short(data), tmp_path / "w")["step"] == 4  # the corrected command


def test_a_missing_val_path_is_an_error_unless_validation_is_off(data, tmp_path):
    c = _short(data, eval__every=2, eval__val_tokens=64, data__val_path=str(tmp_path / "typo"))
    with pytest.raises(DataError, match=r"data.val_path=.*typo.*eval.val_tokens=0"):
        run(c, tmp_path / "w")
    assert not (tmp_path / "w").exists()
    c = _short(data, eval__every=2, eval__val_tokens=0, data__val_path=str(tmp_path / "typo"))
    assert run(c, tmp_path / "w")["step"] == 4


# ---- atomic multi-step operations ---------------------------------------------------------------
class Killed(BaseException):
    """Stands in for SIGKILL: nothing after it runs (no except/finally of ours catches it)."""


def test_restart_is_all_or_nothing_across_a_kill(data, tmp_path, monkeypatch):
    run(_short(data), tmp_path)
    before = (tmp_path / "metrics.jsonl").read_text()
    real, moved = os.replace, []

    def dies_after_one_move(src, dst):
        if os.path.dirname(os.fspath(src)) == os.fspath(tmp_path) and \
                os.path.basename(os.path.dirname(os.fspath(dst))).startswith("restarted-"):
            if moved:
                raise Killed
            moved.append(src)
        return real(src, dst)

    monkeypatch.setattr(os, "replace", dies_after_one_move)
    with pytest.raises(Killed):
        run(_short(data), tmp_path, restart=True)
    monkeypatch.setattr(os, "replace", real)
    run(_short(data), tmp_path)  # the plain rerun: the restart is finished, not half-undone
    (folder,) = [p for p in tmp_path.iterdir() if p.name.startswith(preflight.RESTARTED)]
    assert (folder / "metrics.jsonl").read_text() == before
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["2", "4"]
    assert not (folder / preflight.JOURNAL).exists()
    assert [r["step"] for r in read_metrics(tmp_path)] == [2, 4]  # trained again from 0


def test_restart_when_its_folder_name_is_taken(data, tmp_path, monkeypatch):
    run(_short(data), tmp_path)
    monkeypatch.setattr(preflight.time, "strftime", lambda fmt, *a: "20261206-120000")
    (tmp_path / "restarted-20261206-120000").mkdir()
    run(_short(data), tmp_path, restart=True)
    assert (tmp_path / "restarted-20261206-120000-1" / "metrics.jsonl").exists()


def test_sigterm_at_an_evaluation_step_gives_it_one_row(data, tmp_path):
    c = _short(data, train__steps=6, eval__every=2, eval__val_tokens=64)
    full = run(c, tmp_path / "full")
    assert full["step"] == 6

    def preempt(step):
        if step == 4:  # an evaluation step: saved and logged, its evaluation skipped
            os.kill(os.getpid(), signal.SIGTERM)

    assert run(c, tmp_path / "w", step_hook=preempt)["preempted_at"] == 4
    run(c, tmp_path / "w")
    rows, ref = read_metrics(tmp_path / "w"), read_metrics(tmp_path / "full")
    assert [r["step"] for r in rows] == [0, 2, 4, 6]
    shown = ("step", "loss", "nll", "val/nll", "val/loss")
    assert [{k: r.get(k) for k in shown} for r in rows] == \
        [{k: r.get(k) for k in shown} for r in ref]


# ---- one line for a bad input -------------------------------------------------------------------
@pytest.mark.parametrize("workdir, message", [
    ("", "--workdir is empty"),
    ("{tmp}/runs://a", "a local path cannot contain '://'"),
])
def test_a_workdir_that_names_no_local_directory_is_refused(data, tmp_path, workdir, message):
    with pytest.raises(ConfigError, match=message):
        run(_short(data), workdir.format(tmp=tmp_path))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("field", ["seed", "data_seed"])
def test_a_seed_beyond_the_data_order_is_one_line(data, field):
    with pytest.raises(ConfigError, match=f"{field}=99999999999999999999 must be an integer in"):
        config_lib.resolve(_short(data, **{field: 99999999999999999999}))


def test_an_object_store_data_path_is_pinned_as_given(monkeypatch):
    """realpath would turn gs://bucket/tokens into a local ./gs:/bucket/tokens: remote data
    paths stay as typed (their content still enters the identity through the fingerprint)."""
    monkeypatch.setattr(workdir_lib, "data_fingerprint", lambda path: f"sha256:of {path}")
    c = ml_collections.ConfigDict({"data": {"path": "gs://bucket/tokens",
                                            "val_path": "gs://bucket/val"}})
    pinned = workdir_lib.pin_data(c)
    assert (pinned.data.path, pinned.data.val_path) == ("gs://bucket/tokens", "gs://bucket/val")
    assert pinned.data.fingerprint == "sha256:of gs://bucket/tokens"


def test_a_val_path_recorded_as_typed_is_no_identity_change(tmp_path, monkeypatch):
    """A run recorded before paths were pinned holds data.val_path as typed ("val", relative):
    resumed from the same directory, today's pinned real path names the same directory, so it is
    no change; another directory's "val" still is."""
    (tmp_path / "a" / "val").mkdir(parents=True)
    (tmp_path / "b" / "val").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "a")
    new = {"data.val_path": os.path.realpath("val")}
    assert workdir_lib.identity_diff({"data.val_path": "val"}, new) == {}
    monkeypatch.chdir(tmp_path / "b")
    assert "data.val_path" in workdir_lib.identity_diff({"data.val_path": "val"}, new)
