"""launch/: the TPU VM script and the local sweep, without a cloud.

A fake `gcloud` first on PATH either fails when called (dry runs must call nothing), records its
arguments, or plays one TPU VM worker by running the `--command` script in a temporary home, so the
remote scripts themselves (detached start, status, stop, the remote sweep) run for real.
"""

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TPU_VM = ROOT / "launch" / "tpu_vm.sh"
SWEEP = ROOT / "launch" / "sweep.sh"
SLURM = ROOT / "launch" / "slurm.sbatch"

RUNS = [
    ("ce_seed0", "configs/ce.py"),
    ("label_smoothing_eps0p1_seed0", "configs/label_smoothing.py"),
    ("prefix_simple_eps0p1_seed0", "configs/prefix_simple.py"),
    ("prefix_unnorm_eps0p1_seed0", "configs/prefix_unnorm.py:eps=0.1"),
    ("prefix_unnorm_eps1p0_seed0", "configs/prefix_unnorm.py:eps=1.0"),
    ("prefix_norm_eps0p1_seed0", "configs/prefix_norm.py:eps=0.1"),
    ("prefix_norm_eps1p0_seed0", "configs/prefix_norm.py:eps=1.0"),
]

SUBCOMMANDS = ["create", "setup", "data", "data-sync", "train configs/ce.py", "sweep", "logs",
               "status", "stop", "ssh", "delete"]


def _write_exe(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip())
    path.chmod(0o755)
    return path


def _env(bin_dir: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TPU_", "PREFIXLM_")) and k != "DRY_RUN"}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    env.update(extra)
    return env


def _run(args, env, check=True, cwd=ROOT):
    proc = subprocess.run([str(a) for a in args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def forbidden_gcloud(tmp_path):
    """A gcloud that must not be called: it leaves a marker and fails."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "gcloud_was_called"
    _write_exe(bin_dir / "gcloud", f"""
        #!/usr/bin/env bash
        echo "$*" >> {shlex.quote(str(marker))}
        echo "fake gcloud: a dry run must not call gcloud" >&2
        exit 97
        """)
    return bin_dir, marker


def _train_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if "-m prefixlm.main" in line]


def _with_preset(config: str, preset: str) -> str:
    """CONFIG with a hardware preset appended, written independently of launch/common.sh."""
    return f"{config},{preset}" if ":" in config else f"{config}:{preset}"


def _copy_checkout(dest: Path) -> None:
    """launch/ and configs/hardware.py (the hardware presets sweep.sh --preset accepts)."""
    shutil.copytree(ROOT / "launch", dest / "launch")
    (dest / "configs").mkdir(parents=True)
    shutil.copy(ROOT / "configs" / "hardware.py", dest / "configs" / "hardware.py")


def test_run_list_is_the_seven_runs():
    rows = [line.split() for line in (ROOT / "launch" / "runs.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    assert [tuple(r) for r in rows] == RUNS


def test_help(forbidden_gcloud):
    bin_dir, marker = forbidden_gcloud
    env = _env(bin_dir)
    out = _run([TPU_VM, "--help"], env).stdout
    for sub in ["create", "setup", "data", "data-sync", "train", "sweep", "logs", "status",
                "stop", "ssh", "delete"]:
        assert f"\n  {sub}" in out, sub
    for var in ["TPU_NAME", "TPU_TYPE", "TPU_ZONE", "TPU_VERSION", "TPU_PROJECT", "TPU_SPOT",
                "TPU_QUEUED", "PREFIXLM_BUCKET", "PREFIXLM_WORKDIR_ROOT", "jax[tpu]==0.10.2"]:
        assert var in out, var
    assert _run([TPU_VM], env).stdout == out  # no subcommand: help
    assert "--workdir-root" in _run([SWEEP, "--help"], env).stdout
    assert _run([TPU_VM, "frobnicate"], env, check=False).returncode != 0
    assert not marker.exists()


def test_tpu_vm_sweep_dry_run_prints_the_seven_train_commands(forbidden_gcloud):
    bin_dir, marker = forbidden_gcloud
    out = _run([TPU_VM, "sweep", "--dry-run", "--bucket", "gs://bkt/exp",
                "--config.train.steps=7"], _env(bin_dir)).stdout
    lines = _train_lines(out)
    assert len(lines) == 7, out
    for line, (name, config) in zip(lines, RUNS, strict=True):
        assert f"--config={_with_preset(config, 'tpu_v4')} " in line  # TPU_TYPE v4-8's preset
        assert f"--workdir=gs://bkt/exp/runs/{name} " in line
        assert line.endswith("--config.train.steps=7")
    gcloud = [line for line in out.splitlines() if line.startswith("+ gcloud ")]
    assert len(gcloud) == 1 and "tpu-vm ssh prefixlm" in gcloud[0]
    assert "--worker=all" in gcloud[0] and "launch/sweep.sh" in gcloud[0]
    assert not marker.exists()


def test_sweep_sh_dry_run_prints_the_seven_train_commands(forbidden_gcloud, tmp_path):
    bin_dir, marker = forbidden_gcloud
    out = _run([SWEEP, "--dry-run", "--workdir-root", tmp_path / "runs", "--data", "/d/shards",
                "--", "--config.train.steps=3"], _env(bin_dir)).stdout
    lines = _train_lines(out)
    assert len(lines) == 7, out
    for line, (name, config) in zip(lines, RUNS, strict=True):
        argv = shlex.split(line.removeprefix("+ "))
        assert argv[1:] == ["-m", "prefixlm.main", f"--config={config}",
                            f"--workdir={tmp_path / 'runs' / name}",
                            "--config.data.path=/d/shards", "--config.train.steps=3"]
    assert not (tmp_path / "runs").exists()
    # gs:// roots: DONE files are not looked up in a dry run (that would call gcloud).
    out = _run([SWEEP, "--dry-run", "--workdir-root", "gs://b/runs"], _env(bin_dir)).stdout
    assert len(_train_lines(out)) == 7
    assert not marker.exists()


@pytest.mark.parametrize("sub", SUBCOMMANDS)
def test_every_subcommand_dry_run_prints_gcloud_and_runs_nothing(forbidden_gcloud, sub):
    bin_dir, marker = forbidden_gcloud
    args = [TPU_VM, "--dry-run", "--bucket", "gs://bkt/exp", *sub.split()]
    out = _run(args, _env(bin_dir)).stdout
    assert "+ gcloud compute tpus " in out, out
    assert not marker.exists(), marker.read_text()
    # DRY_RUN=1 in the environment works like the flag.
    out = _run([TPU_VM, "--bucket", "gs://bkt/exp", *sub.split()], _env(bin_dir, DRY_RUN="1")).stdout
    assert "+ gcloud compute tpus " in out
    assert not marker.exists()


def _recording_gcloud(tmp_path) -> tuple[Path, Path]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls"
    calls.mkdir()
    # One file per call: its arguments, NUL-separated.
    _write_exe(bin_dir / "gcloud", f"""
        #!/usr/bin/env bash
        n=$(ls {shlex.quote(str(calls))} | wc -l)
        printf '%s\\0' "$@" > {shlex.quote(str(calls))}/$(printf %03d "$n")
        """)
    return bin_dir, calls


def _calls(calls: Path) -> list[list[str]]:
    return [p.read_text().split("\0")[:-1] for p in sorted(calls.iterdir())]


def test_gcloud_calls_and_remote_scripts_parse(tmp_path):
    """Each subcommand's real gcloud calls: flags as documented, remote scripts valid bash."""
    bin_dir, calls = _recording_gcloud(tmp_path)
    env = _env(bin_dir, TPU_PROJECT="proj", TPU_TYPE="v5litepod-8", TPU_NAME="exp1")
    for sub in SUBCOMMANDS:
        before = len(_calls(calls))
        _run([TPU_VM, "--bucket", "gs://bkt/exp", *sub.split()], env)
        new = _calls(calls)[before:]
        assert new, sub
        for argv in new:
            assert argv[:3] == ["compute", "tpus", "tpu-vm"], argv
            assert "exp1" in argv[3:5] or "exp1:prefixlm-src.tgz" in argv
            assert "--zone=us-west4-a" in argv and "--project=proj" in argv
            scripts = [a.removeprefix("--command=") for a in argv if a.startswith("--command=")]
            for script in scripts:
                syntax = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True)
                assert syntax.returncode == 0, (sub, script, syntax.stderr)
    # setup from a git remote instead of a copy of the working tree
    before = len(_calls(calls))
    _run([TPU_VM, "setup"], {**env, "PREFIXLM_REPO_URL": "https://example.com/p.git",
                              "PREFIXLM_REPO_REF": "v1"})
    (argv,) = _calls(calls)[before:]
    script = next(a.removeprefix("--command=") for a in argv if a.startswith("--command="))
    assert "git clone --quiet https://example.com/p.git prefixlm" in script
    assert "checkout --quiet v1" in script
    assert subprocess.run(["bash", "-n", "-c", script]).returncode == 0
    create = _calls(calls)[0]
    assert create[3:5] == ["create", "exp1"]
    assert "--accelerator-type=v5litepod-8" in create and "--version=v2-alpha-tpuv5-lite" in create
    setup_script = next(a for c in _calls(calls) for a in c
                        if a.startswith("--command=") and "requirements.txt" in a)
    assert "'jax[tpu]==0.10.2' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html" \
        in setup_script


def test_create_and_delete_spot_and_queued(forbidden_gcloud):
    bin_dir, marker = forbidden_gcloud
    env = _env(bin_dir)
    out = _run([TPU_VM, "create", "--dry-run", "--spot", "--type", "v4-32"], env).stdout
    assert "+ gcloud compute tpus tpu-vm create prefixlm --zone=us-central2-b " \
        "--accelerator-type=v4-32 --version=tpu-ubuntu2204-base --spot" in out
    out = _run([TPU_VM, "create", "--dry-run", "--queued", "--spot", "--", "--reserved"], env).stdout
    assert "+ gcloud compute tpus queued-resources create prefixlm --zone=us-central2-b " \
        "--node-id=prefixlm --accelerator-type=v4-8 --runtime-version=tpu-ubuntu2204-base " \
        "--spot --reserved" in out
    out = _run([TPU_VM, "delete", "--dry-run", "--queued"], env).stdout
    assert "+ gcloud compute tpus queued-resources delete prefixlm --zone=us-central2-b --force" in out
    assert not marker.exists()


def test_multi_host_slices_need_a_bucket(forbidden_gcloud):
    bin_dir, marker = forbidden_gcloud
    env = _env(bin_dir)
    for sub in (["train", "configs/ce.py"], ["sweep"], ["data"]):
        proc = _run([TPU_VM, "--dry-run", "--type", "v4-16", *sub], env, check=False)
        assert proc.returncode != 0 and "gs://" in proc.stderr, (sub, proc.stderr)
        _run([TPU_VM, "--dry-run", "--type", "v4-16", "--bucket", "gs://b", *sub], env)
    out = _run([TPU_VM, "--dry-run", "--type", "v4-16", "--bucket", "gs://b", "data"], env).stdout
    assert "gcloud storage rsync --recursive data/fineweb-edu/shards gs://b/data/shards" in out
    assert not marker.exists()


def test_train_run_names(forbidden_gcloud):
    bin_dir, _ = forbidden_gcloud
    env = _env(bin_dir)

    def workdir(*args):
        line = _train_lines(_run([TPU_VM, "--dry-run", "train", *args], env).stdout)[0]
        return line.split("--workdir=")[1].split()[0]

    assert workdir("configs/prefix_norm.py:eps=1.0") == "runs/prefix_norm_eps1p0_seed0"
    assert workdir("configs/prefix_norm.py:demo,eps=0.5") == "runs/prefix_norm_demoeps0p5"
    assert workdir("configs/ce.py", "--run", "mine") == "runs/mine"
    # A hardware preset in the config does not change the run (prefixlm.config.run_name).
    assert workdir("configs/prefix_norm.py:eps=1.0,tpu_v4") == "runs/prefix_norm_eps1p0_seed0"
    assert workdir("configs/ce.py:tpu_v5e") == "runs/ce_seed0"
    assert workdir("configs/prefix_norm.py:h100,eps=0.3") == "runs/prefix_norm_eps0p3"


def _fake_python(path: Path, record: Path) -> Path:
    """Records its --config and fails when it names $FAIL_CONFIG."""
    return _write_exe(path, f"""
        #!/usr/bin/env bash
        echo "$*" >> {shlex.quote(str(record))}
        for a in "$@"; do
          if [[ -n "${{FAIL_CONFIG:-}}" && "$a" == "--config=$FAIL_CONFIG" ]]; then exit 3; fi
        done
        echo "step 1 loss 1.0"
        """)


def test_sweep_sh_skips_finished_runs_and_resumes(forbidden_gcloud, tmp_path):
    bin_dir, marker = forbidden_gcloud
    record = tmp_path / "record"
    python = _fake_python(tmp_path / "python", record)
    root = tmp_path / "runs"
    args = [SWEEP, "--python", python, "--workdir-root", root, "--config.train.steps=2"]

    proc = _run(args, _env(bin_dir, FAIL_CONFIG=RUNS[2][1]), check=False)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert sorted(p.parent.name for p in root.glob("*/DONE")) == sorted(n for n, _ in RUNS[:2])
    assert len(record.read_text().splitlines()) == 3

    record.unlink()
    out = _run(args, _env(bin_dir)).stdout
    ran = record.read_text().splitlines()
    assert [line.split()[2] for line in ran] == [f"--config={c}" for _, c in RUNS[2:]]
    assert all(line.endswith("--config.train.steps=2") for line in ran)
    assert out.count("done (") == 2
    assert sorted(p.parent.name for p in root.glob("*/DONE")) == sorted(n for n, _ in RUNS)

    record.unlink()
    out = _run([*args, "--dry-run"], _env(bin_dir)).stdout
    assert _train_lines(out) == [] and out.count("skipped") == 7
    _run(args, _env(bin_dir))
    assert not record.exists()

    out = _run([SWEEP, "--python", python, "--workdir-root", tmp_path / "only",
                "--only", "ce_seed0,prefix_norm_eps1p0_seed0", "--log-dir", tmp_path / "logs"],
               _env(bin_dir)).stdout
    assert len(_train_lines(out)) == 2
    assert (tmp_path / "logs" / "ce_seed0.log").read_text() == "step 1 loss 1.0\n"
    assert os.readlink(tmp_path / "logs" / "latest.log") == "prefix_norm_eps1p0_seed0.log"
    assert _run([SWEEP, "--only", "nope", "--dry-run"], _env(bin_dir), check=False).returncode != 0
    assert not marker.exists()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _simulated_worker(tmp_path, *, shards="data/fineweb-edu/shards"):
    """One TPU VM worker in a temporary home: the fake gcloud runs each --command script there."""
    home = tmp_path / "home"
    checkout = home / "prefixlm"
    (checkout / ".venv" / "bin").mkdir(parents=True)
    _copy_checkout(checkout)
    (checkout / shards).mkdir(parents=True)
    (checkout / shards / "stats.json").write_text("{}")
    _write_exe(checkout / ".venv" / "bin" / "python", """
        #!/usr/bin/env bash
        echo "fakepython $*"
        sleep "${FAKE_SLEEP:-0}"
        """)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _write_exe(bin_dir / "gcloud", f"""
        #!/usr/bin/env bash
        [[ "$1 $2 $3 $4" == "compute tpus tpu-vm ssh" ]] || exit 0
        for a in "$@"; do [[ $a == --command=* ]] && cmd=${{a#--command=}}; done
        cd {shlex.quote(str(home))} && HOME={shlex.quote(str(home))} exec bash -c "$cmd"
        """)
    return bin_dir, home, checkout


def test_simulated_worker_train_status_stop_and_remote_sweep(tmp_path):
    """The remote scripts run for real on one simulated worker (the fake gcloud's home)."""
    bin_dir, home, checkout = _simulated_worker(tmp_path)
    logs = checkout / "out" / "logs"
    job_group = None
    try:
        env = _env(bin_dir, FAKE_SLEEP="30")
        out = _run([TPU_VM, "train", "configs/prefix_norm.py:eps=0.1", "--config.train.steps=5"],
                   env).stdout
        assert "started prefix_norm_eps0p1_seed0" in out
        pid = int((logs / "running.pid").read_text())
        # Its own process group, for `stop`; recorded, so the cleanup below kills that group and
        # never the test's own (under pytest-xdist the worker and its tests share one group).
        job_group = os.getpgid(pid)
        assert _alive(pid) and job_group == pid != os.getpgrp()
        assert (logs / "running.job").read_text().strip() == "prefix_norm_eps0p1_seed0"
        second = _run([TPU_VM, "sweep"], env, check=False)
        assert second.returncode != 0 and "still running" in second.stderr
        assert "running prefix_norm_eps0p1_seed0" in _run([TPU_VM, "status"], env).stdout
        for _ in range(50):
            if "--config.train.steps=5" in (logs / "latest.log").read_text():
                break
            time.sleep(0.1)
        assert "--workdir=runs/prefix_norm_eps0p1_seed0" in \
            _run([TPU_VM, "logs"], env).stdout
        assert "stopped prefix_norm_eps0p1_seed0" in _run([TPU_VM, "stop"], env).stdout
        assert not _alive(pid)
        assert "idle" in _run([TPU_VM, "status"], env).stdout

        env = _env(bin_dir, FAKE_SLEEP="0")
        _run([TPU_VM, "sweep", "--config.train.steps=9"], env)
        pid = int((logs / "running.pid").read_text())
        with contextlib.suppress(ProcessLookupError):  # the fast fake sweep may be done already
            job_group = os.getpgid(pid)
        for _ in range(100):
            if not _alive(pid):
                break
            time.sleep(0.1)
        sweep_log = (logs / "sweep.log").read_text()
        assert "sweep finished: 7 run(s) trained" in sweep_log, sweep_log
        done = sorted(p.parent.name for p in (checkout / "runs").glob("*/DONE"))
        assert done == sorted(n for n, _ in RUNS)
        assert "--config.train.steps=9" in (logs / "ce_seed0.log").read_text()
        assert "--config=configs/ce.py:tpu_v4 --workdir=runs/ce_seed0 " in \
            (logs / "ce_seed0.log").read_text()
        assert "sweep finished" in _run([TPU_VM, "logs", "sweep"], env).stdout
    finally:
        if job_group is not None and job_group != os.getpgrp() and _alive(job_group):
            os.killpg(job_group, signal.SIGKILL)


@pytest.mark.skipif(shutil.which("shellcheck") is None and not os.environ.get("CI"),
                    reason="shellcheck not installed (apt-get install shellcheck); CI installs it")
def test_shellcheck_clean():
    scripts = sorted(str(p) for p in (ROOT / "launch").glob("*.sh"))
    scripts.append(str(ROOT / "launch" / "slurm.sbatch"))
    proc = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---- shell injection: values reach generated scripts as data ------------------------------------

PAYLOAD = "x$(touch pwned)`touch pwned`\";touch pwned;\"'"


def _no_pwned(*roots):
    hits = [p for root in roots for p in Path(root).rglob("pwned")]
    assert hits == [], hits




def test_run_names_that_are_not_plain_words_are_refused(tmp_path):
    """Before: --run 'x$(touch /tmp/pwn)' ran the touch inside the generated remote script."""
    bin_dir, calls = _recording_gcloud(tmp_path)
    for args in (["train", "configs/ce.py", "--run", PAYLOAD], ["logs", PAYLOAD],
                 ["train", "configs/ce.py", "--run", ".."]):
        proc = _run([TPU_VM, *args], _env(bin_dir), check=False, cwd=tmp_path)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "may use only letters, digits" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    assert _calls(calls) == []
    proc = _run([SWEEP, "--dry-run", "--only", PAYLOAD], _env(bin_dir), check=False, cwd=tmp_path)
    assert proc.returncode == 2 and "may use only" in proc.stderr
    bad_list = tmp_path / "runs.txt"
    bad_list.write_text("a;b configs/ce.py\n")
    proc = _run([SWEEP, "--dry-run"], _env(bin_dir, PREFIXLM_RUNS_FILE=str(bad_list)),
                check=False, cwd=tmp_path)
    assert proc.returncode == 2 and "'a;b'" in proc.stderr
    _no_pwned(tmp_path)


@pytest.mark.parametrize("var", ["PREFIXLM_REMOTE_DIR", "PREFIXLM_LOG_DIR", "PREFIXLM_SHARDS"])
def test_paths_with_shell_syntax_stay_data_on_the_worker(tmp_path, var):
    """Before: these were pasted unquoted into echo "..." of the remote scripts and ran there."""
    value = f"d/{PAYLOAD}" if var != "PREFIXLM_REMOTE_DIR" else PAYLOAD
    shards = value if var == "PREFIXLM_SHARDS" else "data/fineweb-edu/shards"
    bin_dir, home, checkout = _simulated_worker(tmp_path, shards=shards)
    env = _env(bin_dir, **{var: value})
    try:
        proc = _run([TPU_VM, "train", "configs/ce.py", "--config.train.steps=1"], env,
                    check=False, cwd=tmp_path)
        if var == "PREFIXLM_REMOTE_DIR":  # no checkout there: the error names the literal path
            assert proc.returncode != 0 and f"no checkout at ~/{PAYLOAD}" in proc.stderr
        else:
            assert proc.returncode == 0, proc.stdout + proc.stderr
            assert "started ce_seed0" in proc.stdout
            if var == "PREFIXLM_LOG_DIR":
                assert f"log ~/prefixlm/{value}/ce_seed0.log" in proc.stdout
                log = checkout / value / "ce_seed0.log"
            else:
                log = checkout / "out" / "logs" / "ce_seed0.log"
            for _ in range(50):
                if log.is_file() and "fakepython" in log.read_text():
                    break
                time.sleep(0.1)
            assert "--workdir=runs/ce_seed0" in log.read_text()
            if var == "PREFIXLM_SHARDS":
                assert f"--config.data.path={value}" in log.read_text()
                (checkout / shards / "stats.json").unlink()
                proc = _run([TPU_VM, "sweep"], env, check=False, cwd=tmp_path)
                assert proc.returncode != 0 and f"no token shards at {value}" in proc.stderr
        for sub in (["status"], ["logs"], ["stop"]):
            _run([TPU_VM, *sub], env, check=False, cwd=tmp_path)
    finally:
        time.sleep(0.2)
    _no_pwned(tmp_path, ROOT / "launch")


# ---- seeds and optional blocks of the run list ---------------------------------------------------

WITH_GOLD = [(f"{family}_eps{tag}_withgold_seed0",
              f"configs/{family}.py:eps={eps},prefix_set=with_gold")
             for family in ("prefix_unnorm", "prefix_norm") for eps, tag in (("0.1", "0p1"),
                                                                          ("1.0", "1p0"))]


def _listed(*args, env=None):
    out = _run([SWEEP, "--list", *args], env or _env(Path("/nonexistent"))).stdout
    return [tuple(line.split()) for line in out.splitlines()]


def test_sweep_seeds_and_blocks_expand_the_run_list():
    """Before: no seed list and no optional block; only the seven seed-0 runs could be swept."""
    assert _listed() == RUNS
    assert _listed("--with-gold") == RUNS + WITH_GOLD == _listed("--block", "with_gold")
    every_block = _listed("--block", "all")  # other blocks (prefix_longest, ...) come after
    assert every_block[:len(RUNS) + len(WITH_GOLD)] == RUNS + WITH_GOLD
    runs = _listed("--seeds", "0,1,2")
    assert len(runs) == 21
    assert runs[0] == ("ce_seed0", "configs/ce.py:seed=0")
    assert runs[7 + 3] == ("prefix_unnorm_eps0p1_seed1", "configs/prefix_unnorm.py:eps=0.1,seed=1")
    assert runs[14 + 6] == ("prefix_norm_eps1p0_seed2", "configs/prefix_norm.py:eps=1.0,seed=2")
    runs = _listed("--seeds", "1", "--data-seed", "0", "--with-gold")
    assert runs[0] == ("ce_seed1_data0", "configs/ce.py:seed=1,data_seed=0")
    assert runs[-1] == ("prefix_norm_eps1p0_withgold_seed1_data0",
                        "configs/prefix_norm.py:eps=1.0,prefix_set=with_gold,seed=1,data_seed=0")
    assert _listed("--seeds", "3", "--data-seed", "3")[0] == ("ce_seed3",
                                                              "configs/ce.py:seed=3,data_seed=3")
    env = _env(Path("/nonexistent"))
    for bad in (["--seeds", "0,x"], ["--seeds", "-1"], ["--data-seed", "0"], ["--block", "nope"],
                ["--seeds", "1", "--data-seed", "a"]):
        proc = _run([SWEEP, "--list", *bad], env, check=False)
        assert proc.returncode == 2 and proc.stderr.startswith("error: "), (bad, proc.stderr)


def test_listed_names_are_the_names_the_trainer_derives():
    """Every name of the run list (seeds, data seeds, blocks) equals prefixlm.config.run_name of
    its config string, so a workdir always says which run it holds."""
    import importlib

    from prefixlm.config import run_name

    runs = _listed("--seeds", "0,2", "--block", "all") + _listed("--seeds", "1", "--data-seed", "0")
    runs += _listed("--block", "all")  # the lines as written, too
    runs += _listed("--seeds", "1", "--preset", "h100", "--block", "all")  # presets: same names
    runs += _listed("--preset", "tpu_v5e")
    for name, config in runs:
        path, _, arg = config.partition(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert run_name(module.get_config(arg)) == name, config


def test_tpu_vm_sweep_passes_seeds_and_blocks(forbidden_gcloud):
    bin_dir, marker = forbidden_gcloud
    out = _run([TPU_VM, "sweep", "--dry-run", "--seeds", "0,1", "--with-gold", "--data-seed", "0"],
               _env(bin_dir)).stdout
    lines = _train_lines(out)
    assert len(lines) == 22, out
    assert "--workdir=runs/prefix_norm_eps1p0_withgold_seed1_data0 " in lines[-1]
    (gcloud,) = [line for line in out.splitlines() if line.startswith("+ gcloud ")]
    assert "--seeds 0,1 --data-seed 0 --with-gold --preset tpu_v4" in gcloud
    assert not marker.exists()


# ---- hardware presets (--preset) ------------------------------------------------------------------

def test_sweep_preset_is_appended_to_every_config_and_keeps_the_names():
    """Before: no --preset; a GPU/TPU sweep ran the configs without their hardware settings."""
    for preset in ("h100", "tpu_v4"):
        assert _listed("--preset", preset) == [(n, _with_preset(c, preset)) for n, c in RUNS]
    assert _listed("--preset=a100")[0] == ("ce_seed0", "configs/ce.py:a100")
    assert _listed("--preset", "h100")[6] == ("prefix_norm_eps1p0_seed0",
                                             "configs/prefix_norm.py:eps=1.0,h100")
    assert _listed("--preset", "none") == RUNS
    # With --seeds the preset comes after seed=N (and data_seed=D); the names are --seeds' own.
    seeded = _listed("--seeds", "0,1", "--data-seed", "0", "--with-gold")
    with_preset = _listed("--preset", "h100", "--seeds", "0,1", "--data-seed", "0", "--with-gold")
    assert [n for n, _ in with_preset] == [n for n, _ in seeded]
    assert [c for _, c in with_preset] == [f"{c},h100" for _, c in seeded]
    assert with_preset[0] == ("ce_seed0", "configs/ce.py:seed=0,data_seed=0,h100")
    assert with_preset[-1] == ("prefix_norm_eps1p0_withgold_seed1_data0",
                               "configs/prefix_norm.py:eps=1.0,prefix_set=with_gold,seed=1,"
                               "data_seed=0,h100")


def test_sweep_preset_names_are_the_hardware_presets_of_the_configs():
    """sweep.sh reads the presets from configs/hardware.py; they must be configs/base.py's."""
    from configs.base import HARDWARE_PRESETS

    env = _env(Path("/nonexistent"))
    for preset in HARDWARE_PRESETS:
        assert _listed("--preset", preset)[0] == ("ce_seed0", f"configs/ce.py:{preset}")
    proc = _run([SWEEP, "--list", "--preset", "demo"], env, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith(f"use one of: {' '.join(HARDWARE_PRESETS)} (or none)")


@pytest.mark.parametrize("bad", ["demo", "tiny", "H100x", "", "x y", "a;b", "a-b", "a\nb", PAYLOAD])
def test_sweep_preset_rejects_other_names_in_one_line(tmp_path, bad):
    """Only [A-Za-z0-9_]+ naming a hardware preset: demo/tiny change the run, so a workdir named
    after the listed run would hold another one."""
    env = _env(Path("/nonexistent"))
    for args in (["--list", "--preset", bad], [f"--preset={bad}", "--dry-run"]):
        proc = _run([SWEEP, *args], env, check=False, cwd=tmp_path)
        assert proc.returncode == 2, (bad, proc.stdout, proc.stderr)
        assert proc.stderr.startswith("error: --preset") and proc.stdout == ""
        assert len(proc.stderr.splitlines()) == 1, proc.stderr
    proc = _run([SWEEP, "--list", "--preset"], env, check=False)  # no value
    assert proc.returncode == 2 and proc.stderr == "error: --preset needs a value, e.g. --preset h100\n"
    _no_pwned(tmp_path, ROOT / "launch")


def test_sweep_sh_dry_run_with_preset_keeps_the_workdirs(forbidden_gcloud, tmp_path):
    bin_dir, marker = forbidden_gcloud
    out = _run([SWEEP, "--dry-run", "--preset", "h100", "--seeds", "2", "--workdir-root",
                tmp_path / "runs", "--", "--config.train.steps=3"], _env(bin_dir)).stdout
    lines = _train_lines(out)
    assert len(lines) == 7, out
    for line, (name, config) in zip(lines, RUNS, strict=True):
        argv = shlex.split(line.removeprefix("+ "))
        seeded = f"{config},seed=2" if ":" in config else f"{config}:seed=2"
        assert argv[3:] == [f"--config={seeded},h100",
                            f"--workdir={tmp_path / 'runs' / name.replace('_seed0', '_seed2')}",
                            "--config.train.steps=3"]
    assert not marker.exists()


@pytest.mark.parametrize(("tpu_type", "args", "preset"), [
    ("v4-8", [], "tpu_v4"),
    ("v4-16", ["--bucket", "gs://b"], "tpu_v4"),
    ("v5litepod-8", [], "tpu_v5e"),
    ("v6e-8", [], None),  # no preset for this generation: the configs as listed
    ("v5p-8", [], None),
    ("v5litepod-8", ["--preset", "none"], None),
    ("v4-8", ["--preset", "a100"], "a100"),
    ("v6e-8", ["--preset=tpu_v4"], "tpu_v4"),
])
def test_tpu_vm_sweep_preset_defaults_to_the_tpu_type(forbidden_gcloud, tpu_type, args, preset):
    bin_dir, marker = forbidden_gcloud
    out = _run([TPU_VM, "sweep", "--dry-run", "--type", tpu_type, *args], _env(bin_dir)).stdout
    assert f"# hardware preset: {preset or 'none'} " in out
    lines = _train_lines(out)
    assert len(lines) == 7, out
    for line, (name, config) in zip(lines, RUNS, strict=True):
        expected = _with_preset(config, preset) if preset else config
        assert f"--config={expected} " in line and f"runs/{name} " in line
    (gcloud,) = [line for line in out.splitlines() if line.startswith("+ gcloud ")]
    assert (f"--preset {preset} " in gcloud) == (preset is not None)
    assert ("--preset" in gcloud) == (preset is not None)
    assert not marker.exists()


def test_tpu_vm_sweep_rejects_a_bad_preset_before_calling_gcloud(tmp_path):
    bin_dir, calls = _recording_gcloud(tmp_path)
    for bad in ("tiny", "x$(touch pwned)", ""):
        proc = _run([TPU_VM, "sweep", "--preset", bad], _env(bin_dir), check=False, cwd=tmp_path)
        assert proc.returncode == 2 and proc.stderr.startswith("error: --preset"), proc.stderr
        assert len(proc.stderr.splitlines()) == 1
    # Only sweep takes --preset; train names it in the config (silently dropping it would not do).
    proc = _run([TPU_VM, "train", "configs/ce.py", "--preset", "tpu_v4"], _env(bin_dir),
                check=False, cwd=tmp_path)
    assert proc.returncode == 2 and "train configs/ce.py:tpu_v4" in proc.stderr, proc.stderr
    assert _calls(calls) == []
    _no_pwned(tmp_path)


# ---- Slurm (GPU) ---------------------------------------------------------------------------------

def _slurm_job(tmp_path, **env_extra):
    """A fake `srun` that records its arguments and runs the command once as task 0 (enough to
    check what every task would run), a checkout copy as the submit directory."""
    checkout = tmp_path / "repo"
    _copy_checkout(checkout)
    record = tmp_path / "record"
    (checkout / ".venv" / "bin").mkdir(parents=True)
    _fake_python(checkout / ".venv" / "bin" / "python", record)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun_log = tmp_path / "srun"
    _write_exe(bin_dir / "srun", f"""
        #!/usr/bin/env bash
        echo "$*" >> {shlex.quote(str(srun_log))}
        while [[ $1 == --* ]]; do shift; done
        SLURM_PROCID=0 SLURM_LOCALID=0 SLURM_STEP_NODELIST=gpu[001-002] exec "$@"
        """)
    env = _env(bin_dir, SLURM_JOB_ID="4242", SLURM_SUBMIT_DIR=str(checkout),
               SLURM_JOB_NUM_NODES="2", SLURM_NTASKS="16", **env_extra)
    return checkout, env, record, srun_log


def test_slurm_train_runs_one_srun_step_with_distributed_on(tmp_path):
    checkout, env, record, srun_log = _slurm_job(tmp_path, PREFIXLM_SHARDS="/scratch/shards")
    proc = _run(["bash", SLURM, "train", "configs/prefix_norm.py:eps=1.0",
                 "--config.train.steps=2"], env, cwd=tmp_path)
    assert "2 node(s), 16 task(s)" in proc.stdout
    assert srun_log.read_text().startswith("--kill-on-bad-exit=1 .venv/bin/python -m prefixlm.main")
    (argv,) = record.read_text().splitlines()
    assert argv.split() == ["-m", "prefixlm.main", "--config=configs/prefix_norm.py:eps=1.0",
                            "--workdir=runs/prefix_norm_eps1p0_seed0", "--distributed=on",
                            "--config.data.path=/scratch/shards", "--config.train.steps=2"]
    bad = _run(["bash", SLURM, "train", "configs/ce.py", "--run", PAYLOAD], env, check=False,
               cwd=tmp_path)
    assert bad.returncode == 2 and "may use only" in bad.stderr
    outside = {k: v for k, v in env.items() if k != "SLURM_JOB_ID"}
    proc = _run(["bash", SLURM, "train", "configs/ce.py"], outside, check=False, cwd=tmp_path)
    assert proc.returncode == 2 and "sbatch" in proc.stderr
    _no_pwned(tmp_path)


def test_slurm_sweep_runs_each_run_as_an_srun_step_and_resumes(tmp_path):
    checkout, env, record, srun_log = _slurm_job(tmp_path)
    args = ["bash", SLURM, "sweep", "--seeds", "0,1", "--only", "ce_seed0,ce_seed1",
            "--config.train.steps=3"]
    out = _run(args, env, cwd=tmp_path).stdout
    assert "sweep finished: 2 run(s) trained" in out
    steps = srun_log.read_text().splitlines()
    assert len(steps) == 2 and all(s.startswith("--kill-on-bad-exit=1 ") for s in steps)
    ran = [line.split() for line in record.read_text().splitlines()]
    assert [a[2:4] for a in ran] == [["--config=configs/ce.py:seed=0", "--workdir=runs/ce_seed0"],
                                     ["--config=configs/ce.py:seed=1", "--workdir=runs/ce_seed1"]]
    assert all("--distributed=on" in a and a[-1] == "--config.train.steps=3" for a in ran)
    assert sorted(p.parent.name for p in (checkout / "runs").glob("*/DONE")) == [
        "ce_seed0", "ce_seed1"]
    assert "2 already done" in _run(args, env, cwd=tmp_path).stdout


def test_slurm_sweep_and_train_take_a_hardware_preset(tmp_path):
    checkout, env, record, _ = _slurm_job(tmp_path)
    out = _run(["bash", SLURM, "sweep", "--preset", "h100", "--seeds", "1", "--only", "ce_seed1",
                "--config.train.steps=3"], env, cwd=tmp_path).stdout
    assert "sweep finished: 1 run(s) trained" in out
    _run(["bash", SLURM, "train", "configs/prefix_norm.py:eps=1.0,h100"], env, cwd=tmp_path)
    ran = [line.split()[2:4] for line in record.read_text().splitlines()]
    assert ran == [["--config=configs/ce.py:seed=1,h100", "--workdir=runs/ce_seed1"],
                   ["--config=configs/prefix_norm.py:eps=1.0,h100",
                    "--workdir=runs/prefix_norm_eps1p0_seed0"]]
    bad = _run(["bash", SLURM, "sweep", "--preset", "demo"], env, check=False, cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --preset")


# ---- GPU setup ----------------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("make") is None, reason="make not installed")
def test_make_setup_accel_cuda_adds_jax_cuda12_and_keeps_torch_cpu(tmp_path):
    """Before: no documented GPU install (PyPI's Linux torch would also pull CUDA wheels)."""
    pins = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    cuda = [line for line in (ROOT / "requirements-cuda.txt").read_text().splitlines()
            if line and not line.startswith("#")]
    assert cuda == [f"jax[cuda12]=={pins['jax']}"]  # the same jax as the CPU stack
    venv = tmp_path / "venv"

    # Under `make test` this runs inside make: drop the parent's make variables, or the nested
    # make prints "Entering/Leaving directory" lines around the plan.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}

    def plan(*args):
        return _run(["make", "--no-print-directory", "-n", "setup", f"VENV={venv}", *args],
                    env).stdout

    lines = plan("ACCEL=cuda").splitlines()
    (install,) = [line for line in lines if "-r requirements.txt" in line]
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in install
    assert "-r requirements-cuda.txt" in install
    assert any("jax.devices()" in line for line in lines)
    assert lines[-1] == f"touch {venv}/.installed-cuda"
    cpu = plan()
    assert "requirements-cuda.txt" not in cpu and f"touch {venv}/.installed\n" in cpu
    bad = _run(["make", "--no-print-directory", "-n", "setup", "ACCEL=rocm"], env, check=False)
    assert bad.returncode != 0 and "expected cpu or cuda" in bad.stderr


# ---- issue 21: runs files and options that cannot work are one line and exit 2 -----------------

def _runs_file(tmp_path, text: str, name="runs.txt") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode())
    return path


def _one_line_exit_2(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert all(n in lines[0] for n in needles), (needles, lines[0])


def test_a_runs_file_naming_a_run_twice_is_refused(forbidden_gcloud, tmp_path):
    """Before: `dupA ce` then `dupA prefix_norm` trained the first and skipped the second as
    done, since both are WORKDIR_ROOT/dupA."""
    bin_dir, marker = forbidden_gcloud
    record = tmp_path / "record"
    python = _fake_python(tmp_path / "python", record)
    twice = _runs_file(tmp_path, "dupA configs/ce.py\ndupA configs/prefix_norm.py\n")
    proc = _run([SWEEP, "--python", python, "--workdir-root", tmp_path / "runs"],
                _env(bin_dir, PREFIXLM_RUNS_FILE=str(twice)), check=False)
    _one_line_exit_2(proc, "dupA", "twice")
    assert not record.exists() and not (tmp_path / "runs").exists()
    # in an optional block too (its workdir is the same), and names that --seeds makes equal
    in_block = _runs_file(tmp_path, "a configs/ce.py\n#[extra] a configs/ce.py:eps=0.1\n", "b.txt")
    _one_line_exit_2(_run([SWEEP, "--list"], _env(bin_dir, PREFIXLM_RUNS_FILE=str(in_block)),
                          check=False), "'a'")
    seeds = _runs_file(tmp_path, "a_seed0 configs/ce.py\na_seed1 configs/ce.py\n", "s.txt")
    _one_line_exit_2(_run([SWEEP, "--list", "--seeds", "0"],
                          _env(bin_dir, PREFIXLM_RUNS_FILE=str(seeds)), check=False), "a_seed0")
    assert not marker.exists()


def test_a_crlf_runs_file_reads_as_the_same_runs(forbidden_gcloud, tmp_path):
    """Before: the CR stayed on each config (`--config='configs/ce.py\r'`)."""
    bin_dir, _ = forbidden_gcloud
    lines = "".join(f"{name} {config}\n" for name, config in RUNS[:3])
    out = {}
    for ending in ("\n", "\r\n"):
        runs = _runs_file(tmp_path, lines.replace("\n", ending), f"runs{len(ending)}.txt")
        out[ending] = _run([SWEEP, "--dry-run", "--workdir-root", tmp_path / "r"],
                           _env(bin_dir, PREFIXLM_RUNS_FILE=str(runs))).stdout
    assert out["\r\n"] == out["\n"] and "\r" not in out["\r\n"]
    assert len(_train_lines(out["\n"])) == 3


def test_a_run_named_like_an_option_is_refused(forbidden_gcloud, tmp_path):
    """Before: a run named -rf with --log-dir trained, then `ln -sfn -rf.log ...` failed (bash's
    own error, exit 1) after the run had started."""
    bin_dir, _ = forbidden_gcloud
    record = tmp_path / "record"
    python = _fake_python(tmp_path / "python", record)
    runs = _runs_file(tmp_path, "-rf configs/ce.py\n")
    proc = _run([SWEEP, "--python", python, "--workdir-root", tmp_path / "runs", "--log-dir",
                 tmp_path / "logs"], _env(bin_dir, PREFIXLM_RUNS_FILE=str(runs)), check=False)
    _one_line_exit_2(proc, "'-rf'", "option")
    assert not record.exists()
    _one_line_exit_2(_run([SWEEP, "--dry-run", "--only", "-x"], _env(bin_dir), check=False), "-x")


@pytest.mark.parametrize("args, needle", [
    (["--workdir-root="], "--workdir-root is empty"),
    (["--workdir-root"], "--workdir-root needs a value"),
    (["--workdir-root", ""], "--workdir-root needs a value"),
    (["--log-dir="], "--log-dir needs a value"),
    (["--seeds"], "--seeds needs a value"),
])
def test_an_empty_or_missing_option_value_is_refused(forbidden_gcloud, tmp_path, args, needle):
    """Before: an empty --workdir-root= put the workdirs at /RUN_NAME; a missing value was bash's
    own `line N: 2: ...` and exit 1."""
    bin_dir, marker = forbidden_gcloud
    proc = _run([SWEEP, "--dry-run", "--no-check", *args], _env(bin_dir), check=False)
    _one_line_exit_2(proc, needle)
    assert _train_lines(proc.stdout) == [] and not marker.exists()
