#!/usr/bin/env bash
# Run the seven runs of launch/runs.txt (optionally for several seeds and with optional blocks)
# one after another on this machine (CPU, GPU or one TPU VM
# worker). Finished runs (WORKDIR_ROOT/RUN/DONE exists) are skipped; an unfinished one resumes from
# its last checkpoint because prefixlm.main resumes by default. Stops at the first failed run.
set -euo pipefail
# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
  cat <<EOF
Usage: launch/sweep.sh [options] [--] [--config.KEY=VALUE ...]

Runs, in order, every run of $RUNS_FILE (RUN_NAME CONFIG per line):
  PYTHON -m prefixlm.main --config=CONFIG --workdir=WORKDIR_ROOT/RUN_NAME [--config.data.path=DATA] [overrides]
and writes WORKDIR_ROOT/RUN_NAME/DONE when it exits 0. Runs with a DONE file are skipped, so
running the sweep again resumes it. Runs from the repository root ($REPO_ROOT).

Options:
  --dry-run            print the commands, run nothing (DONE files on local disk are still checked)
  --no-check           with --dry-run: do not look for DONE files (print all runs; tpu_vm.sh plans)
  --workdir-root DIR   parent of the run workdirs; local path or gs://...  [PREFIXLM_WORKDIR_ROOT, default runs]
  --data PATH          token shards, passed as --config.data.path  [PREFIXLM_SHARDS, default: the config's]
  --python PY          interpreter  [default .venv/bin/python if present, else python3]
  --launcher 'CMD ...' put CMD before every training command, e.g. 'srun --kill-on-bad-exit=1'
                       (launch/slurm.sbatch); split on spaces
  --seeds 0,1,2        run every run once per seed: NAME_seed0 -> NAME_seedN, CONFIG + seed=N
                       (':seed=N', or ',seed=N' after existing args)  [default: as listed]
  --data-seed D        with --seeds: one data order (data_seed=D) for every seed, so seeds vary
                       the init only; names get _dataD where D != N
  --preset NAME        add the hardware preset NAME of configs/hardware.py (h100, a100, tpu_v4,
                       tpu_v5e) to every config: CONFIG -> CONFIG:NAME, or CONFIG,NAME after
                       existing args (after seed=N with --seeds). Run names stay the same: it
                       changes how a step is computed, not what is trained. 'none': as listed
  --block B[,C]        add the optional block(s) '#[B] ...' of the run list ('all': every block)
  --with-gold          the same as --block with_gold: R(s) twins of the four softmax runs
  --only A,B           run only these run names (to split the sweep over machines)
  --log-dir DIR        write each run's output to DIR/RUN_NAME.log (DIR/latest.log links to the current one)
  --list               print the run names and configs, then exit
  -h, --help           this help
Any --config.KEY=VALUE or --distributed=... argument (or everything after --) is passed to every
run, e.g.
  launch/sweep.sh --workdir-root out/smoke -- --config.train.steps=20 --config.checkpoint.every=10
A DONE file on gs:// is read and written with 'gcloud storage'.
EOF
}

main() {
  local dry_run=$DRY_RUN no_check=0 root=${PREFIXLM_WORKDIR_ROOT:-runs} data=${PREFIXLM_SHARDS:-}
  local python="" launcher="" only="" log_dir="" list=0 seeds="" data_seed="" blocks="" preset=none
  local overrides=()
  while (($#)); do
    case $1 in
      --dry-run) dry_run=1 ;;
      --no-check) no_check=1 ;;
      --workdir-root) need_value "$1" "${2-}"; root=$2; shift ;;
      --workdir-root=*) root=${1#*=} ;;
      --data) need_value "$1" "${2-}"; data=$2; shift ;;
      --data=*) data=${1#*=} ;;
      --python) need_value "$1" "${2-}"; python=$2; shift ;;
      --python=*) python=${1#*=} ;;
      --launcher) need_value "$1" "${2-}"; launcher=$2; shift ;;
      --launcher=*) launcher=${1#*=} ;;
      --only) need_value "$1" "${2-}"; only=$2; shift ;;
      --only=*) only=${1#*=} ;;
      --log-dir) need_value "$1" "${2-}"; log_dir=$2; shift ;;
      --log-dir=*) log_dir=${1#*=}; need_value --log-dir "$log_dir" ;;
      --seeds) need_value "$1" "${2-}"; seeds=$2; shift ;;
      --seeds=*) seeds=${1#*=} ;;
      --data-seed) need_value "$1" "${2-}"; data_seed=$2; shift ;;
      --data-seed=*) data_seed=${1#*=} ;;
      --preset) (($# >= 2)) || die "--preset needs a value, e.g. --preset h100"; preset=$2; shift ;;
      --preset=*) preset=${1#*=} ;;
      --block) need_value "$1" "${2-}"; blocks+=",$2"; shift ;;
      --block=*) blocks+=",${1#*=}" ;;
      --with-gold) blocks+=",with_gold" ;;
      --list) list=1 ;;
      -h | --help) usage; return 0 ;;
      --) shift; overrides+=("$@"); break ;;
      --config.* | --distributed=*) overrides+=("$1") ;;
      *) die "sweep.sh: unknown argument '$1' (overrides look like --config.train.steps=100; see --help)" ;;
    esac
    shift
  done
  DRY_RUN=$dry_run
  # Empty, the workdirs would be /RUN_NAME (and an empty --log-dir a mkdir of '').
  [[ -n $root ]] || die "--workdir-root is empty; give the parent of the run workdirs (default runs)"
  cd "$REPO_ROOT"
  if [[ -z $python ]]; then
    if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi
  fi
  [[ -z $data_seed || -n $seeds ]] || die "--data-seed needs --seeds (e.g. --seeds 0,1,2 --data-seed 0)"
  RUN_BLOCKS=${blocks#,} load_runs
  [[ -n $seeds ]] && expand_seeds "$seeds" "$data_seed"
  add_preset "$preset"
  local n=${#RUN_NAMES[@]} i name
  if ((list)); then
    for i in "${!RUN_NAMES[@]}"; do printf '%s %s\n' "${RUN_NAMES[$i]}" "${RUN_CONFIGS[$i]}"; done
    return 0
  fi
  if [[ -n $only ]]; then
    local want found
    IFS=, read -r -a want <<< "$only"
    for name in "${want[@]}"; do
      check_run_name "$name" --only
      found=0
      for i in "${!RUN_NAMES[@]}"; do [[ ${RUN_NAMES[$i]} == "$name" ]] && found=1; done
      ((found)) || die "--only: no run named '$name' in $RUNS_FILE (sweep.sh --list shows them)"
    done
  fi
  [[ -n $data ]] && overrides=("--config.data.path=$data" "${overrides[@]}")
  [[ -n $log_dir && $dry_run != 1 ]] && mkdir -p "$log_dir"

  local ran=0 skipped=0 wd
  for i in "${!RUN_NAMES[@]}"; do
    name=${RUN_NAMES[$i]}
    if [[ -n $only && ",$only," != *",$name,"* ]]; then continue; fi
    wd=${root%/}/$name
    if ((!no_check)) && is_done "$wd" "$dry_run"; then
      echo "= [$((i + 1))/$n] $name: done ($wd/DONE exists), skipped"
      skipped=$((skipped + 1))
      continue
    fi
    train_argv "$python" "${RUN_CONFIGS[$i]}" "$wd" "${overrides[@]}"
    if [[ -n $launcher ]]; then
      local launch_words
      read -r -a launch_words <<< "$launcher"
      TRAIN_ARGV=("${launch_words[@]}" "${TRAIN_ARGV[@]}")
    fi
    echo "# [$((i + 1))/$n] $name"
    if [[ -n $log_dir ]]; then
      echo "+ $(quote_cmd "${TRAIN_ARGV[@]}") >> $(shell_quote "$log_dir/$name.log") 2>&1"
    else
      echo "+ $(quote_cmd "${TRAIN_ARGV[@]}")"
    fi
    ran=$((ran + 1))
    [[ $dry_run == 1 ]] && continue
    local rc=0 start=$SECONDS
    if [[ -n $log_dir ]]; then
      ln -sfn -- "$name.log" "$log_dir/latest.log"
      "${TRAIN_ARGV[@]}" >> "$log_dir/$name.log" 2>&1 || rc=$?
    else
      "${TRAIN_ARGV[@]}" || rc=$?
    fi
    if ((rc != 0)); then
      echo "! $name failed (exit $rc) after $((SECONDS - start)) s; run the sweep again to resume it" >&2
      return "$rc"
    fi
    mark_done "$wd"
    echo "= $name finished in $((SECONDS - start)) s"
  done
  if [[ $dry_run == 1 ]]; then
    echo "# dry run: $ran run(s) would start, $skipped already done"
  else
    echo "# sweep finished: $ran run(s) trained, $skipped already done"
  fi
}

# Does WORKDIR/DONE exist? gs:// is not looked up in a dry run (nothing may be called).
is_done() {
  local wd=$1 dry=$2
  if [[ $wd == gs://* ]]; then
    [[ $dry == 1 ]] && return 1
    gcloud storage ls "$wd/DONE" > /dev/null 2>&1
  else
    [[ -f $wd/DONE ]]
  fi
}

mark_done() {
  local wd=$1 stamp
  stamp="finished $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(hostname)"
  if [[ $wd == gs://* ]]; then
    local tmp
    tmp=$(mktemp)
    echo "$stamp" > "$tmp"
    run_cmd gcloud storage cp --quiet "$tmp" "$wd/DONE"
    rm -f "$tmp"
  else
    mkdir -p "$wd"
    echo "$stamp" > "$wd/DONE"
  fi
}

main "$@"
