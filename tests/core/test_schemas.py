"""Issue 21, class 2: inputs checked by schema (prefixlm.core.schemas). Every file format the project
reads has one declared schema, checked where the file is read, and a violation is one line naming
the file, the line (JSONL) and the field. Each case goes through the reader the commands use
(workdir, sinks, preflight, plots, study, shards, manifest, lock); each failed on main before the
issue (a traceback, or a value accepted and failing later), as its docstring says. Unit level: no
training run."""

import json

import numpy as np
import pytest

from prefixlm.core.errors import SchemaError
from prefixlm.data import shards
from prefixlm.run import lock, manifest, preflight, sinks
from prefixlm.run import workdir as workdir_lib
from prefixlm.study import figures
from prefixlm.study import runs as runs_lib


def _schemas():
    """Imported where used, so that each test fails on its own on a tree without it."""
    from prefixlm.core import schemas

    return schemas


def _names(error: SchemaError, path, line=None, field=None) -> str:
    text = str(error)
    assert "\n" not in text, text
    assert str(path) in text, text
    if line is not None:
        assert f" line {line}" in text, text
    if field is not None:
        assert f"field {field!r}" in text, text
    return text


# ---- config.json ------------------------------------------------------------------------------
@pytest.mark.parametrize("text, field", [
    ("{}", "seed"),
    ('{"seed": "0", "objective": {"name": "ce"}}', "seed"),
    ('{"seed": 0, "objective": ["ce"]}', "objective"),
    ('{"seed": 0, "objective": {"name": 7}}', "objective.name"),
    ('{"seed": 0, "objective": {"name": "ce"}, "train": {"steps": -1}}', "train.steps"),
])
def test_a_config_json_of_the_wrong_shape_names_the_field(tmp_path, text, field):
    """Before: `{}` or wrong types were accepted, then a KeyError/TypeError in the report (its
    arm label) or a resume comparing identities against nothing."""
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(SchemaError) as info:
        workdir_lib.read_config_json(tmp_path / "config.json")
    _names(info.value, tmp_path / "config.json", field=field)


@pytest.mark.parametrize("text", ["{}", "[]", "\xff{"])
def test_the_report_reads_config_json_by_its_schema(tmp_path, text):
    """Before: the report took `{}` or `[]` as a config (a KeyError later, a traceback)."""
    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "step_00000010.jsonl").write_text("")
    (run / "config.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(SchemaError) as info:
        runs_lib.load_run(run)
    _names(info.value, run / "config.json")


# ---- metrics.jsonl ----------------------------------------------------------------------------
GOOD = '{"step": 2, "loss": 3.5, "nll": 3.4, "val/nll": "nan"}\n'


@pytest.mark.parametrize("bad, field", [
    (b'{"step": Infinity, "loss": 1.0}', "step"),
    (b'{"step": "7", "loss": 1.0}', "step"),
    (b'{"step": -3}', "step"),
    (b'{"step": 4, "loss": [1, 2]}', "loss"),
    (b"[1, 2]", ""),
    (b"\xff\xfe not utf-8", None),
])
@pytest.mark.parametrize("reader", ["workdir.read_rows", "figures.load_metrics", "JsonlSink"])
def test_a_bad_metrics_row_names_the_file_line_and_field(tmp_path, bad, field, reader):
    """Before: `"step": Infinity` (OverflowError in history_steps), `"7"` (TypeError in the
    sink's resume filter), non-object and non-UTF-8 lines were tracebacks or silently dropped,
    in training and in the report."""
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(GOOD.encode() + bad + b"\n" + GOOD.replace("2", "4").encode())
    call = {"workdir.read_rows": lambda: workdir_lib.read_rows(path),
            "figures.load_metrics": lambda: figures.load_metrics(tmp_path),
            "JsonlSink": lambda: sinks.JsonlSink(tmp_path, resume_step=10)}[reader]
    with pytest.raises(SchemaError) as info:
        call()
    _names(info.value, path, line=2, field=field or None)


def test_history_with_an_infinite_step_is_one_line(tmp_path):
    """Before: preflight's history check did int(inf): OverflowError, a traceback."""
    (tmp_path / "metrics.jsonl").write_text('{"step": Infinity}\n' + GOOD)
    with pytest.raises(SchemaError, match="field 'step'"):
        preflight.history_steps(tmp_path)


def test_only_a_torn_last_line_is_dropped(tmp_path, caplog):
    """The one JSONL reader keeps round three's rule for a write cut short, and only for it."""
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(GOOD.encode() + b'{"step": 4, "lo')
    assert [r["step"] for r in workdir_lib.read_rows(path)] == [2]
    assert "line 2 is torn" in caplog.text
    path.write_bytes(b'{"step": 4, "lo\n' + GOOD.encode())
    with pytest.raises(SchemaError, match="line 1: not JSON"):
        workdir_lib.read_rows(path)


# ---- eval/step_*.jsonl ------------------------------------------------------------------------
ITEM = {"task": "piqa", "doc_id": 0, "correct": 1, "correct_norm": None, "gold_logprob": -3.0,
        "gold_bytes": 12, "n_choices": 2}


@pytest.mark.parametrize("bad, field", [
    ("[1, 2]", ""),
    (json.dumps({**ITEM, "task": ["piqa"]}), "task"),
    (json.dumps({**ITEM, "doc_id": "3"}), "doc_id"),
    (json.dumps({**ITEM, "correct": 2}), "correct"),
    (json.dumps({k: v for k, v in ITEM.items() if k != "gold_bytes"}), "gold_bytes"),
])
def test_a_bad_eval_row_names_the_file_line_and_field(tmp_path, bad, field):
    """Before: an eval line `[1,2]` (AttributeError) or a task given as a list (unhashable)
    was a traceback from the report."""
    path = tmp_path / "step_00000010.jsonl"
    path.write_text(json.dumps(ITEM) + "\n" + bad + "\n" + json.dumps({**ITEM, "doc_id": 1}))
    with pytest.raises(SchemaError) as info:
        runs_lib.load_items(path)
    _names(info.value, path, line=2, field=field or None)


# ---- token directories: stats.json and shard records ------------------------------------------
def _stats(tmp_path, **change):
    stats = {"format": shards.FORMAT, "tokenizer_hash": "abc", "documents": 1, "tokens": 4,
             "splits": {"train": {"tokens": 4}, "validation": {"tokens": 0}},
             "shards": [{"name": "s0", "train": {"file": "train/s0.bin", "tokens": 4},
                         "validation": {"file": "validation/s0.bin", "tokens": 0}}]}
    stats.update(change)
    (tmp_path / shards.STATS).write_text(json.dumps(stats))


@pytest.mark.parametrize("change, field", [
    ({"shards": None}, "shards"),
    ({"shards": [1, 2]}, "shards[0]"),
    ({"shards": [{"train": {"file": "../../etc/passwd", "tokens": 4},
                  "validation": {"file": "validation/s0.bin", "tokens": 0}}]},
     "shards[0].train.file"),
    ({"shards": [{"train": {"file": "train/s0.bin", "tokens": "4"},
                  "validation": {"file": "validation/s0.bin", "tokens": 0}}]},
     "shards[0].train.tokens"),
    ({"tokenizer_hash": 5}, "tokenizer_hash"),
    ({"splits": None}, "splits"),
    ({"splits": {"train": {"tokens": 4}}}, "splits.validation"),
])
def test_a_bad_stats_json_names_the_field(tmp_path, change, field):
    """Before: `shards` null or a list of numbers was a TypeError in split_files (a traceback
    from training); a shard file outside the directory was opened."""
    _stats(tmp_path, **change)
    with pytest.raises(SchemaError) as info:
        shards.read_stats(tmp_path)
    assert isinstance(info.value, ValueError)  # train wraps ValueErrors of the data as DataError
    _names(info.value, tmp_path / shards.STATS, field=field)


def test_a_garbage_shard_cache_is_recomputed_not_fatal(tmp_path):
    """Before: a part file's `id_check` with a non-integer max_id was int('x'): a ValueError
    that refused the run, though the cache is only a cache."""
    _stats(tmp_path)
    (tmp_path / "train").mkdir()
    (tmp_path / "validation").mkdir()
    np.arange(4, dtype=shards.DTYPE).tofile(tmp_path / "train" / "s0.bin")
    (tmp_path / "validation" / "s0.bin").write_bytes(b"")
    (tmp_path / "parts").mkdir()
    st = (tmp_path / "train" / "s0.bin").stat()
    (tmp_path / "parts" / "s0.json").write_text(json.dumps({"id_check": {"train": {
        "max_id": "x", "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino,
        "ctime_ns": st.st_ctime_ns}}}))
    assert shards.split_files(tmp_path, "train", vocab_size=10)[0][1] == 4


# ---- checkpoint manifests ---------------------------------------------------------------------
@pytest.mark.parametrize("text", ["null", "[]", '{"files": {"params/x": [12]}}',
                                  '{"files": {"params/x": ["12", null]}}'])
def test_a_manifest_of_the_wrong_shape_is_a_corrupt_step(tmp_path, text):
    """Before: a manifest holding `null` raised TypeError, which the restore blamed on the
    storage ("cannot check checkpoint ... fix the storage") instead of moving the step aside."""
    step = tmp_path / "checkpoints" / "4"
    (step / "params").mkdir(parents=True)
    (step / "params" / "x").write_bytes(b"0" * 12)
    (step / manifest.MANIFEST).write_text(text)
    why = manifest.verify(workdir_lib.run_path(step))
    assert why is not None and manifest.MANIFEST in why, why


def test_a_null_manifest_moves_the_step_aside(tmp_path):
    """The restore's judge: the step is moved to checkpoints_bad/, the previous one chosen."""
    from prefixlm.run import checkpoint as ckpt_lib

    for s in (2, 4):
        step = tmp_path / "checkpoints" / str(s)
        for item in ckpt_lib.ITEMS:
            (step / item).mkdir(parents=True)
        (step / "_CHECKPOINT_METADATA").write_text("{}")
        (step / manifest.MANIFEST).write_text('{"files": {}}' if s == 2 else "null")
    ckpt = ckpt_lib.Checkpointer(tmp_path, max_to_keep=3, async_save=False)
    try:
        chosen, faults = ckpt._judge()
        ckpt._set_aside(faults)
    finally:
        ckpt.manager.close()
    assert chosen == 2 and [s for s, _ in faults] == [4]
    assert (tmp_path / "checkpoints_bad" / "4").is_dir()


# ---- run.lock / run.lease ---------------------------------------------------------------------
def test_a_lease_of_the_wrong_shape_is_taken_over(tmp_path):
    """Before: a lease whose `expires` was not a number raised TypeError in acquire."""
    (tmp_path / lock.LEASE).write_text('{"pid": 1, "host": "h", "time": "t", "token": "x", '
                                       '"expires": "tomorrow"}')
    lease = lock.Lease(tmp_path, confirm=0.0)
    lease.acquire()
    assert json.loads((tmp_path / lock.LEASE).read_text())["token"] == lease.token  # taken over
    lease.release()
    assert not (tmp_path / lock.LEASE).exists()


# ---- runs files and plan.json -----------------------------------------------------------------
@pytest.mark.parametrize("text, line, needle", [
    ("a configs/ce.py\na configs/prefix_norm.py\n", 2, "also on line 1"),
    ("dupA ce\n#[x] dupA prefix_norm\n", 2, "also on line 1"),
    ("a configs/ce.py\r\nb configs/ce.py\r\n", 1, "carriage return"),
    ("-rf configs/ce.py\n", 1, "may not start with '-'"),
    ("a/b configs/ce.py\n", 1, "may use only"),
    ("a configs/ce.py extra\n", 1, "must be 'RUN_NAME CONFIG'"),
])
def test_a_bad_runs_file_names_the_line(tmp_path, text, line, needle):
    """Before: a runs file naming one run twice skipped the second as done; a CRLF file or a
    run named `-rf` broke the launch scripts. (The bash side is the launch scripts'; this is
    the Python validator they and the tests can call.)"""
    path = tmp_path / "runs.txt"
    path.write_bytes(text.encode())
    with pytest.raises(SchemaError) as info:
        _schemas().parse_runs(path)
    assert needle in _names(info.value, path, line=line)
    assert _schemas().main(["runs", str(path)]) == 2


def test_the_shipped_runs_file_passes():
    import pathlib

    runs = _schemas().parse_runs(pathlib.Path(__file__).parents[2] / "launch" / "runs.txt")
    assert len(runs) >= 7 and len({r.name for r in runs}) == len(runs)


def test_plan_json_is_read_by_its_schema(tmp_path):
    schemas = _schemas()
    plan = {"compiled_peak_bytes": None, "estimated_total_bytes": 1e9, "usable_bytes": 2e9,
            "device_kind": "h100", "devices": 1, "preset": "h100"}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    assert schemas.read_json(tmp_path / "plan.json", schemas.PLAN) == plan
    (tmp_path / "plan.json").write_text(json.dumps({**plan, "devices": 0}))
    with pytest.raises(SchemaError) as info:
        schemas.read_json(tmp_path / "plan.json", schemas.PLAN)
    _names(info.value, tmp_path / "plan.json", field="devices")


def test_what_the_metrics_writer_writes_its_reader_accepts(tmp_path):
    """The writer and the schema agree: non-finite numbers, numpy scalars, None and strings."""
    writer = sinks.MetricsWriter(tmp_path, 0, True, {"tensorboard": False})
    writer.write(1, {"loss": float("nan"), "nll": np.float32(2.5), "eval/error": None,
                     "inf": float("inf"), "note": "x", "flag": True})
    writer.close()
    (row,) = workdir_lib.read_rows(tmp_path / "metrics.jsonl")
    assert row["loss"] == "nan" and row["nll"] == 2.5 and row["inf"] == "inf"
