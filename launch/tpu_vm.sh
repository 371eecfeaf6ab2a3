#!/usr/bin/env bash
# Create, set up and drive a Cloud TPU VM (single host or multi-host pod slice) for prefixlm.
# Every gcloud call is printed as `+ gcloud ...` before it runs; --dry-run prints and runs nothing.
# Remote scripts are built as text: their $(...) and $! must expand on the worker, not here, and
# every value put into them (names, paths, flags) is quoted with shell_quote (launch/common.sh), so
# it reaches the worker's shell as data; run names are restricted to [A-Za-z0-9._-] besides.
# shellcheck disable=SC2016
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh [options] SUBCOMMAND [args] [--] [extra]

Subcommands (in the order of a full experiment):
  create            create the TPU VM TPU_NAME (TPU_TYPE in TPU_ZONE). --spot for spot capacity,
                    --queued to go through `gcloud compute tpus queued-resources create` (waits in a
                    queue until capacity frees up; `status` shows its state). Args after -- are
                    passed to gcloud (e.g. -- --reserved, -- --network=NET).
  setup             install on every worker: the code (a copy of this working tree, or
                    `git clone PREFIXLM_REPO_URL`), a Python 3.11 venv (uv), requirements.txt,
                    requirements-nodeps.txt, the package (-e .), then jax[tpu]==0.10.2 with libtpu
                    (pip -f PREFIXLM_LIBTPU_URL); prints each worker's TPU devices at the end.
                    Run again after changing code to push the new tree.
  data              on worker 0, detached: download FineWeb-Edu (PREFIXLM_TOKENS tokens) into
                    DATA_DIR/raw and tokenize it into PREFIXLM_SHARDS (log: `logs data`). On a
                    multi-host slice it then uploads the shards to PREFIXLM_BUCKET/data/shards, and
                    `data-sync` copies them onto every worker's disk.
  data-sync         every worker: gcloud storage rsync PREFIXLM_BUCKET/data/shards -> PREFIXLM_SHARDS
  train CONFIG [--config.KEY=VALUE ...]
                    start `python -m prefixlm.main --config=CONFIG --workdir=WORKDIR_ROOT/RUN` on all
                    workers, detached (setsid nohup), output in LOG_DIR/RUN.log on each worker.
                    RUN is --run NAME, else CONFIG's name in launch/runs.txt, else derived from CONFIG.
                    Name the hardware preset in CONFIG (configs/prefix_norm.py:eps=1.0,tpu_v4);
                    it does not change RUN.
  sweep [--only A,B] [--seeds 0,1,2] [--block B] [--preset P] [--config.KEY=VALUE ...]
                    start launch/sweep.sh on all workers, detached: the seven runs of
                    launch/runs.txt one after another on this one TPU VM (finished runs skipped,
                    an interrupted one resumed). Prints the train commands it will run.
                    --seeds/--data-seed/--block/--with-gold/--preset as in launch/sweep.sh --help.
                    The hardware preset defaults to the one for TPU_TYPE: v4-* tpu_v4,
                    v5litepod-* tpu_v5e, other types none (--preset none: the configs as listed).
                    To run in parallel, create several TPU VMs (--name) and split with --only.
  logs [RUN|sweep|data]
                    tail LOG_DIR/RUN.log (default: latest.log, the current run) on --worker
                    (default 0; --worker=all for every worker). -f to follow, --lines N.
  status            describe the TPU VM (and queued resource), and on every worker what runs now
  stop              kill the detached run/sweep/data job on every worker (its process group)
  ssh [-- CMD ...]  interactive shell on --worker (default 0); with CMD, run it in the checkout
                    with the venv first on PATH, e.g. ssh -- python -m prefixlm.export --help
  delete            delete the TPU VM (with --queued: the queued resource, forcing its VM)
  help              this text

Options (each has an environment variable; the flag wins; defaults live in launch/common.sh):
  --name NAME           TPU_NAME              [prefixlm]
  --type TYPE           TPU_TYPE              [v4-8]  e.g. v5litepod-8, v4-16, v5p-8, v6e-8
  --zone ZONE           TPU_ZONE              [from the type: v4 us-central2-b, v5litepod us-west4-a,
                                               v5p us-east5-a, v6e us-east5-b]
  --version VERSION     TPU_VERSION           [from the type: v4 tpu-ubuntu2204-base, v5litepod
                                               v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e]
  --project PROJECT     TPU_PROJECT           [gcloud's configured project]
  --spot                TPU_SPOT=1            spot capacity: ~60-70% cheaper, preemptible at any time
  --queued              TPU_QUEUED=1          create/delete through queued resources
  --worker W            (ssh, logs)           0, 1, ... or all
  --bucket gs://B[/P]   PREFIXLM_BUCKET       runs go to gs://B/P/runs, shards to gs://B/P/data/shards
  --workdir-root DIR    PREFIXLM_WORKDIR_ROOT [$PREFIXLM_BUCKET/runs, else runs (worker disk)]
  --run NAME            (train)               run name, i.e. the workdir under WORKDIR_ROOT
  --only A,B            (sweep)               run only these runs of launch/runs.txt
  --seeds 0,1,2         (sweep)               every run once per seed (NAME_seedN, seed=N)
  --data-seed D         (sweep)               with --seeds: one data order for every seed
  --block B, --with-gold (sweep)              add optional block(s) of launch/runs.txt
  --preset P            (sweep)               hardware preset added to every config (run names
                                              unchanged) [from the type: v4 tpu_v4, v5litepod
                                              tpu_v5e, else none]; 'none' for no preset
  -f, --follow          (logs)                follow the log
  --lines N             (logs)                lines to show [100]
  --dry-run             DRY_RUN=1             print the commands, run nothing
  -h, --help            this text
Environment only (see launch/common.sh):
  PREFIXLM_REMOTE_DIR   checkout on each worker, relative to its home            [prefixlm]
  PREFIXLM_DATA_DIR     raw/ and shards/ on each worker's local disk            [data/fineweb-edu]
  PREFIXLM_SHARDS       token shards used by train/sweep (local path or gs://)  [DATA_DIR/shards]
  PREFIXLM_LOG_DIR      per-worker logs and pid files                           [out/logs]
  PREFIXLM_TOKENS       tokens for `data`                                        [2e9]
  PREFIXLM_REPO_URL, PREFIXLM_REPO_REF   clone this instead of copying the working tree
  PREFIXLM_PYTHON_VERSION [3.11], PREFIXLM_JAX_TPU [jax[tpu]==0.10.2], PREFIXLM_LIBTPU_URL,
  PREFIXLM_PIP_FLAGS [--extra-index-url https://download.pytorch.org/whl/cpu: CPU torch]
  TPU_SSH_FLAGS         extra flags for gcloud ssh/scp, e.g. --tunnel-through-iap
Paths other than PREFIXLM_REMOTE_DIR are relative to the checkout on the worker (data/, runs/
and out/ are git-ignored: `setup` neither copies nor clobbers them).

Where things live: code, venv, shards and logs on each worker's own disk; run workdirs
(checkpoints, metrics.jsonl) on GCS when a bucket is given. A multi-host slice needs a gs://
workdir root (orbax writes one checkpoint from all hosts) and the shards on every worker; a spot
VM loses its disk when preempted, so give spot runs a bucket too: after a preemption, `delete`,
`create`, `setup`, `data` (or `data-sync`) and `sweep` again; finished runs are skipped and the
interrupted one resumes from its last checkpoint.

Example (v4-8, on demand):
  export TPU_PROJECT=my-project PREFIXLM_BUCKET=gs://my-bucket/prefixlm
  launch/tpu_vm.sh create && launch/tpu_vm.sh setup && launch/tpu_vm.sh data
  launch/tpu_vm.sh logs data -f          # until stats.json is written
  launch/tpu_vm.sh sweep && launch/tpu_vm.sh logs -f
  launch/tpu_vm.sh delete
EOF
}

# ---- argument parsing: options may come before or after the subcommand ----
SUBCOMMAND=""
POSITIONAL=()
OVERRIDES=()
EXTRA=()
WORKER=""
RUN_NAME=""
ONLY=""
SEEDS=""
DATA_SEED=""
PRESET=""
BLOCKS=()
FOLLOW=0
LINES=100

parse_args() {
  while (($#)); do
    case $1 in
      --name) need_value "$1" "${2-}"; TPU_NAME=$2; shift ;;
      --name=*) TPU_NAME=${1#*=} ;;
      --type) need_value "$1" "${2-}"; TPU_TYPE=$2; shift ;;
      --type=*) TPU_TYPE=${1#*=} ;;
      --zone) need_value "$1" "${2-}"; TPU_ZONE=$2; shift ;;
      --zone=*) TPU_ZONE=${1#*=} ;;
      --version) need_value "$1" "${2-}"; TPU_VERSION=$2; shift ;;
      --version=*) TPU_VERSION=${1#*=} ;;
      --project) need_value "$1" "${2-}"; TPU_PROJECT=$2; shift ;;
      --project=*) TPU_PROJECT=${1#*=} ;;
      --spot) TPU_SPOT=1 ;;
      --queued) TPU_QUEUED=1 ;;
      --worker) need_value "$1" "${2-}"; WORKER=$2; shift ;;
      --worker=*) WORKER=${1#*=} ;;
      --bucket) need_value "$1" "${2-}"; PREFIXLM_BUCKET=$2; shift ;;
      --bucket=*) PREFIXLM_BUCKET=${1#*=} ;;
      --workdir-root) need_value "$1" "${2-}"; PREFIXLM_WORKDIR_ROOT=$2; shift ;;
      --workdir-root=*) PREFIXLM_WORKDIR_ROOT=${1#*=} ;;
      --run) need_value "$1" "${2-}"; RUN_NAME=$2; shift ;;
      --run=*) RUN_NAME=${1#*=} ;;
      --only) need_value "$1" "${2-}"; ONLY=$2; shift ;;
      --only=*) ONLY=${1#*=} ;;
      --seeds) need_value "$1" "${2-}"; SEEDS=$2; shift ;;
      --seeds=*) SEEDS=${1#*=} ;;
      --data-seed) need_value "$1" "${2-}"; DATA_SEED=$2; shift ;;
      --data-seed=*) DATA_SEED=${1#*=} ;;
      --preset) (($# >= 2)) || die "--preset needs a value, e.g. --preset tpu_v4"; check_preset "$2"; PRESET=$2; shift ;;
      --preset=*) check_preset "${1#*=}"; PRESET=${1#*=} ;;
      --block) need_value "$1" "${2-}"; BLOCKS+=(--block "$2"); shift ;;
      --block=*) BLOCKS+=(--block "${1#*=}") ;;
      --with-gold) BLOCKS+=(--with-gold) ;;
      -f | --follow) FOLLOW=1 ;;
      --lines) need_value "$1" "${2-}"; LINES=$2; shift ;;
      --lines=*) LINES=${1#*=} ;;
      --dry-run) DRY_RUN=1 ;;
      -h | --help) SUBCOMMAND=help ;;
      --) shift; EXTRA+=("$@"); break ;;
      --config.*) OVERRIDES+=("$1") ;;
      -*) die "unknown option '$1' (training overrides look like --config.train.steps=100; see --help)" ;;
      *) if [[ -z $SUBCOMMAND ]]; then SUBCOMMAND=$1; else POSITIONAL+=("$1"); fi ;;
    esac
    shift
  done
  [[ $LINES =~ ^[0-9]+$ ]] || die "--lines wants a number, got '$LINES'"
}

# ---- gcloud wrappers ----
where_flags() {
  WHERE=("--zone=$TPU_ZONE")
  [[ -n $TPU_PROJECT ]] && WHERE+=("--project=$TPU_PROJECT")
  return 0
}

ssh_flags() {
  SSH_EXTRA=()
  # shellcheck disable=SC2206  # word splitting of the flag list is intended
  [[ -n $TPU_SSH_FLAGS ]] && SSH_EXTRA=($TPU_SSH_FLAGS)
  return 0
}

# remote WORKER SCRIPT: run a bash script on one worker or all of them.
remote() {
  local worker=$1 script=$2
  where_flags
  ssh_flags
  run_cmd gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${WHERE[@]}" "--worker=$worker" \
    "${SSH_EXTRA[@]}" "--command=$script"
}

q() { shell_quote "$1"; }

# The start of every remote script: stop on errors, go to the checkout, define `alive` (is the
# job in LOG_DIR/running.pid still running? a zombie is not).
remote_prelude() {
  local log
  log=$(q "$PREFIXLM_LOG_DIR")
  printf 'set -e; cd %s || { printf "%%s: no checkout at ~/%%s; run: launch/tpu_vm.sh setup\\n" "$(hostname)" %s >&2; exit 1; }; ' \
    "$(q "$PREFIXLM_REMOTE_DIR")" "$(q "$PREFIXLM_REMOTE_DIR")"
  printf 'alive() { [ -f %s/running.pid ] && kill -0 "$(cat %s/running.pid)" 2>/dev/null && [ "$(ps -o stat= -p "$(cat %s/running.pid)" | cut -c1)" != Z ]; }; ' \
    "$log" "$log" "$log"
}

# A remote script that starts COMMAND (already quoted) detached as job JOB: its own session
# (setsid, so `stop` can kill the whole group), immune to the ssh hangup (nohup), output in
# LOG_DIR/JOB.log on each worker, pid in LOG_DIR/running.pid. Refuses when a job still runs.
# PRECHECK (optional) is script text run in the checkout before anything starts.
detached_script() {
  local job=$1 command=$2 precheck=${3:-} log
  log=$(q "$PREFIXLM_LOG_DIR")
  remote_prelude
  printf '%s' "$precheck"
  printf 'mkdir -p %s; ' "$log"
  printf 'if alive; then '
  printf 'echo "$(hostname): $(cat %s/running.job) is still running (pid $(cat %s/running.pid)); wait, or: launch/tpu_vm.sh stop" >&2; exit 1; fi; ' "$log" "$log"
  printf 'export PYTHONUNBUFFERED=1; '
  printf 'setsid nohup %s > %s/%s.log 2>&1 < /dev/null & ' "$command" "$log" "$(q "$job")"
  printf 'echo $! > %s/running.pid; echo %s > %s/running.job; ln -sfn %s.log %s/latest.log; ' \
    "$log" "$(q "$job")" "$log" "$(q "$job")" "$log"
  printf 'printf "%%s: started %%s (pid %%s), log ~/%%s/%%s/%%s.log\\n" "$(hostname)" %s "$!" %s %s %s\n' \
    "$(q "$job")" "$(q "$PREFIXLM_REMOTE_DIR")" "$log" "$(q "$job")"
}

# Fail on the worker, before starting anything, when the shards are not on its disk.
shards_check() {
  [[ $PREFIXLM_SHARDS == gs://* ]] && return 0
  local hint="launch/tpu_vm.sh data"
  (($(tpu_hosts) > 1)) && hint="launch/tpu_vm.sh data, then data-sync"
  printf 'if [ ! -f %s/stats.json ]; then printf "%%s: no token shards at %%s (no stats.json); run: %%s\\n" "$(hostname)" %s %s >&2; exit 1; fi; ' \
    "$(q "$PREFIXLM_SHARDS")" "$(q "$PREFIXLM_SHARDS")" "$(q "$hint")"
}

need_shared_workdir() {
  if (($(tpu_hosts) > 1)) && [[ $PREFIXLM_WORKDIR_ROOT != gs://* ]]; then
    die "$TPU_TYPE has $(tpu_hosts) hosts: orbax checkpoints need one shared workdir; pass --bucket gs://... or --workdir-root gs://... (now '$PREFIXLM_WORKDIR_ROOT')"
  fi
  if [[ $TPU_SPOT == 1 && $PREFIXLM_WORKDIR_ROOT != gs://* ]]; then
    echo "warning: spot VM with workdirs on its own disk: a preemption loses the checkpoints; consider --bucket gs://..." >&2
  fi
  return 0
}

no_positional() {
  [[ ${#POSITIONAL[@]} -eq 0 ]] || die "$SUBCOMMAND takes no argument '${POSITIONAL[0]}'"
}

# ---- subcommands ----
cmd_create() {
  no_positional
  where_flags
  local spot=()
  [[ $TPU_SPOT == 1 ]] && spot=(--spot)
  if [[ $TPU_QUEUED == 1 ]]; then
    run_cmd gcloud compute tpus queued-resources create "$TPU_NAME" "${WHERE[@]}" \
      "--node-id=$TPU_NAME" "--accelerator-type=$TPU_TYPE" "--runtime-version=$TPU_VERSION" \
      "${spot[@]}" "${EXTRA[@]}"
    echo "# queued; the VM exists once 'launch/tpu_vm.sh --queued status' says ACTIVE"
  else
    run_cmd gcloud compute tpus tpu-vm create "$TPU_NAME" "${WHERE[@]}" \
      "--accelerator-type=$TPU_TYPE" "--version=$TPU_VERSION" "${spot[@]}" "${EXTRA[@]}"
  fi
}

cmd_setup() {
  no_positional
  local code tarball=prefixlm-src.tgz
  if [[ -z $PREFIXLM_REPO_URL ]]; then
    # A copy of this working tree: tracked and untracked-but-not-ignored files (no .venv, runs, data).
    local tmp
    tmp=$(mktemp -d)
    echo "+ (cd $(q "$REPO_ROOT") && git ls-files -z --cached --others --exclude-standard | tar -czf $tmp/$tarball --null -T -)"
    if [[ $DRY_RUN != 1 ]]; then
      (cd "$REPO_ROOT" && git ls-files -z --cached --others --exclude-standard \
        | while IFS= read -r -d '' f; do [[ -e $f ]] && printf '%s\0' "$f"; done \
        | tar -czf "$tmp/$tarball" --null -T -)
    fi
    where_flags
    ssh_flags
    run_cmd gcloud compute tpus tpu-vm scp "$tmp/$tarball" "$TPU_NAME:$tarball" "${WHERE[@]}" \
      --worker=all "${SSH_EXTRA[@]}"
    rm -rf "$tmp"
    code="mkdir -p $(q "$PREFIXLM_REMOTE_DIR"); tar -xzf ~/$tarball -C $(q "$PREFIXLM_REMOTE_DIR"); rm -f ~/$tarball; "
  else
    local dir url ref
    dir=$(q "$PREFIXLM_REMOTE_DIR")
    url=$(q "$PREFIXLM_REPO_URL")
    ref=$(q "${PREFIXLM_REPO_REF:-HEAD}")
    code="if [ -d $dir/.git ]; then git -C $dir fetch --quiet origin; else git clone --quiet $url $dir; fi; "
    if [[ -n $PREFIXLM_REPO_REF ]]; then
      code+="git -C $dir checkout --quiet $ref; git -C $dir pull --quiet --ff-only || true; "
    else
      code+="git -C $dir pull --quiet --ff-only; "
    fi
  fi
  local py=.venv/bin/python pip=".venv/bin/python -m pip install --quiet $PREFIXLM_PIP_FLAGS"
  local script="set -e; $code"
  script+="cd $(q "$PREFIXLM_REMOTE_DIR"); export PATH=\"\$HOME/.local/bin:\$PATH\"; "
  script+="command -v uv > /dev/null || python3 -m pip install --user --quiet uv || curl -LsSf https://astral.sh/uv/install.sh | sh; "
  script+="[ -x $py ] || uv venv --seed --python $(q "$PREFIXLM_PYTHON_VERSION") .venv; "
  script+="$py -m pip install --quiet --upgrade pip; "
  script+="$pip -r requirements.txt; "
  script+="$pip --no-deps -r requirements-nodeps.txt; "
  script+="$pip --no-deps -e .; "
  script+="$pip $(q "$PREFIXLM_JAX_TPU") -f $(q "$PREFIXLM_LIBTPU_URL"); "
  script+="$py -c 'import socket, jax; print(socket.gethostname(), \"jax\", jax.__version__, jax.local_devices())'"
  remote all "$script"
}

cmd_data() {
  no_positional
  local hosts raw shards chain up=""
  hosts=$(tpu_hosts)
  raw=$(q "${PREFIXLM_DATA_DIR%/}/raw")
  shards=$(q "$PREFIXLM_SHARDS")
  [[ $PREFIXLM_SHARDS == gs://* ]] && die "PREFIXLM_SHARDS=$PREFIXLM_SHARDS: 'data' writes shards to the worker's disk; give a local path"
  if ((hosts > 1)); then
    [[ -n $PREFIXLM_BUCKET ]] || die "$TPU_TYPE has $hosts hosts: every host reads the shards, so 'data' uploads them to --bucket gs://... for data-sync"
    up=" && gcloud storage rsync --recursive $shards $(q "${PREFIXLM_BUCKET%/}/data/shards")"
  fi
  chain="mkdir -p $raw $shards"
  chain+=" && .venv/bin/python -m prefixlm.data.fineweb --output $raw --tokens $(q "$PREFIXLM_TOKENS")"
  chain+=" && .venv/bin/python -m prefixlm.data.tokenize --input $(q "${PREFIXLM_DATA_DIR%/}/raw/**/*.parquet") --output $shards --workers \$(nproc)"
  chain+="$up && cat $shards/stats.json"
  remote 0 "$(detached_script data "bash -c $(q "$chain")")"
}

cmd_data_sync() {
  no_positional
  [[ -n $PREFIXLM_BUCKET ]] || die "data-sync copies from PREFIXLM_BUCKET/data/shards: pass --bucket gs://..."
  local script
  script="$(remote_prelude)mkdir -p $(q "$PREFIXLM_SHARDS"); "
  script+="gcloud storage rsync --recursive $(q "${PREFIXLM_BUCKET%/}/data/shards") $(q "$PREFIXLM_SHARDS"); "
  script+="echo \"\$(hostname): \$(du -sh $(q "$PREFIXLM_SHARDS"))\""
  remote all "$script"
}

cmd_train() {
  [[ ${#POSITIONAL[@]} -eq 1 ]] || die "usage: launch/tpu_vm.sh train CONFIG [--config.KEY=VALUE ...] (e.g. configs/prefix_norm.py:eps=0.1)"
  local config=${POSITIONAL[0]} name=$RUN_NAME
  [[ -n $name ]] || name=$(run_name_for_config "$config")
  check_run_name "$name" "train --run"
  need_shared_workdir
  train_argv .venv/bin/python "$config" "${PREFIXLM_WORKDIR_ROOT%/}/$name" \
    "--config.data.path=$PREFIXLM_SHARDS" "${OVERRIDES[@]}" "${EXTRA[@]}"
  echo "# run $name on every worker of $TPU_NAME ($TPU_TYPE): $(quote_cmd "${TRAIN_ARGV[@]}")"
  local script
  remote all "$(detached_script "$name" "$(quote_cmd "${TRAIN_ARGV[@]}")" "$(shards_check)")"
}

cmd_sweep() {
  no_positional
  need_shared_workdir
  local args=(--python .venv/bin/python --workdir-root "$PREFIXLM_WORKDIR_ROOT" --data "$PREFIXLM_SHARDS")
  [[ -n $ONLY ]] && args+=(--only "$ONLY")
  [[ -n $SEEDS ]] && args+=(--seeds "$SEEDS")
  [[ -n $DATA_SEED ]] && args+=(--data-seed "$DATA_SEED")
  args+=("${BLOCKS[@]}")
  # The hardware preset: --preset, else the one for TPU_TYPE (none for types without one).
  local preset=${PRESET:-$(tpu_preset)}
  [[ -n $preset && $preset != none ]] && args+=(--preset "$preset")
  if [[ -n $PRESET ]]; then
    echo "# hardware preset: $preset (--preset)"
  else
    echo "# hardware preset: ${preset:-none} (the default for $TPU_TYPE; --preset NAME or none to change it)"
  fi
  echo "# launch/sweep.sh on every worker of $TPU_NAME ($TPU_TYPE) runs, one after another:"
  "$LAUNCH_DIR/sweep.sh" --dry-run --no-check "${args[@]}" -- "${OVERRIDES[@]}" "${EXTRA[@]}" \
    | grep -v '^# dry run' | sed 's/^/#   /'
  local command
  command=$(quote_cmd launch/sweep.sh "${args[@]}" --log-dir "$PREFIXLM_LOG_DIR" -- "${OVERRIDES[@]}" "${EXTRA[@]}")
  remote all "$(detached_script sweep "$command" "$(shards_check)")"
}

cmd_logs() {
  ((${#POSITIONAL[@]} <= 1)) || die "usage: launch/tpu_vm.sh logs [RUN|sweep|data] [-f] [--lines N] [--worker W]"
  local job=${POSITIONAL[0]:-latest} log tail_cmd
  check_run_name "$job" logs
  log="$(q "$PREFIXLM_LOG_DIR")/$(q "$job").log"
  if ((FOLLOW)); then tail_cmd="tail -n $LINES -F $log"; else tail_cmd="tail -n $LINES $log"; fi
  local worker=${WORKER:-0}
  if [[ $worker == all ]]; then
    # Lines from several workers interleave; prefix each with its host.
    tail_cmd="$tail_cmd | sed -u \"s/^/[\$(hostname)] /\""
  fi
  remote "$worker" "$(remote_prelude)$tail_cmd"
}

cmd_status() {
  no_positional
  where_flags
  if [[ $TPU_QUEUED == 1 ]]; then
    run_cmd gcloud compute tpus queued-resources describe "$TPU_NAME" "${WHERE[@]}" \
      "--format=value(name.basename(),state.state)"
  fi
  run_cmd gcloud compute tpus tpu-vm describe "$TPU_NAME" "${WHERE[@]}" \
    "--format=table(name.basename(),acceleratorType,state,health,runtimeVersion,networkEndpoints.len():label=HOSTS)"
  local log script
  log=$(q "$PREFIXLM_LOG_DIR")
  script="$(remote_prelude)h=\$(hostname); "
  script+="if alive; then "
  script+="echo \"\$h: running \$(cat $log/running.job) (pid \$(cat $log/running.pid))\"; "
  script+="else echo \"\$h: idle\"; fi; "
  script+="[ -e $log/latest.log ] && tail -n 2 $log/latest.log | sed \"s/^/\$h:   /\"; true"
  remote all "$script"
}

cmd_stop() {
  no_positional
  local log script
  log=$(q "$PREFIXLM_LOG_DIR")
  # The job leads its own session (setsid), so its pid is its process group: TERM the group (the
  # trainer may save a checkpoint), KILL it if it is still there after 60 s.
  script="$(remote_prelude)h=\$(hostname); "
  script+="if alive; then p=\$(cat $log/running.pid); kill -TERM -- \"-\$p\" || true; "
  script+="for i in \$(seq 60); do alive || break; sleep 1; done; "
  script+="if alive; then kill -KILL -- \"-\$p\" || true; fi; "
  script+="echo \"\$h: stopped \$(cat $log/running.job) (process group \$p)\"; "
  script+="else echo \"\$h: nothing running\"; fi"
  remote all "$script"
}

cmd_ssh() {
  no_positional
  local worker=${WORKER:-0}
  where_flags
  ssh_flags
  if ((${#EXTRA[@]} == 0)); then
    run_cmd gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${WHERE[@]}" "--worker=$worker" "${SSH_EXTRA[@]}"
  else
    remote "$worker" "$(remote_prelude)export PATH=\"\$PWD/.venv/bin:\$PATH\"; $(quote_cmd "${EXTRA[@]}")"
  fi
}

cmd_delete() {
  no_positional
  where_flags
  if [[ $TPU_QUEUED == 1 ]]; then
    run_cmd gcloud compute tpus queued-resources delete "$TPU_NAME" "${WHERE[@]}" --force --quiet
  else
    run_cmd gcloud compute tpus tpu-vm delete "$TPU_NAME" "${WHERE[@]}" --quiet
  fi
}

main() {
  parse_args "$@"
  case $SUBCOMMAND in
    "" | help) usage; return 0 ;;
  esac
  tpu_resolve
  # Only train/sweep/ssh/create take trailing args; catch stray overrides elsewhere.
  case $SUBCOMMAND in
    train | sweep) ;;
    *) [[ ${#OVERRIDES[@]} -eq 0 ]] || die "$SUBCOMMAND takes no --config.* overrides" ;;
  esac
  if [[ -n $PRESET && $SUBCOMMAND != sweep ]]; then
    die "--preset is for sweep only; train takes the preset in its config, e.g. train configs/ce.py:$PRESET"
  fi
  case $SUBCOMMAND in
    create | ssh | train | sweep) ;;
    *) [[ ${#EXTRA[@]} -eq 0 ]] || die "$SUBCOMMAND takes nothing after --" ;;
  esac
  case $SUBCOMMAND in
    create) cmd_create ;;
    setup) cmd_setup ;;
    data) cmd_data ;;
    data-sync) cmd_data_sync ;;
    train) cmd_train ;;
    sweep) cmd_sweep ;;
    logs) cmd_logs ;;
    status) cmd_status ;;
    stop) cmd_stop ;;
    ssh) cmd_ssh ;;
    delete) cmd_delete ;;
    *) die "unknown subcommand '$SUBCOMMAND' (see launch/tpu_vm.sh --help)" ;;
  esac
}

main "$@"
