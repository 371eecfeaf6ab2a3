# shellcheck shell=bash
# Shared by launch/tpu_vm.sh and launch/sweep.sh (sourced, never run). Holds the ONE place where
# launch defaults live, the run list reader and the command printer. Bash 4+.

# shellcheck disable=SC2034  # REPO_ROOT, TRAIN_ARGV, RUN_* are used by the sourcing scripts
LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_ROOT=$(cd "$LAUNCH_DIR/.." && pwd)
RUNS_FILE=${PREFIXLM_RUNS_FILE:-$LAUNCH_DIR/runs.txt}

# ---------------------------------------------------------------------------------------------
# Defaults. Every value comes from the environment variable of the same name when it is set, and a
# flag of tpu_vm.sh / sweep.sh overrides both. Empty TPU_ZONE / TPU_VERSION are derived from
# TPU_TYPE by tpu_resolve below; empty TPU_PROJECT means gcloud's configured project.
# Remote paths other than PREFIXLM_REMOTE_DIR are relative to the checkout on the worker
# (commands run there; data/, runs/ and out/ are git-ignored, so `setup` never copies or clobbers
# them), PREFIXLM_REMOTE_DIR is relative to the worker's home directory.
# ---------------------------------------------------------------------------------------------
: "${TPU_NAME:=prefixlm}"                       # TPU VM name (and queued-resource id)
: "${TPU_TYPE:=v4-8}"                           # accelerator type: v4-8, v5litepod-8, v4-16, ...
: "${TPU_ZONE:=}"                               # derived from TPU_TYPE when empty
: "${TPU_VERSION:=}"                            # TPU runtime (software) version; derived when empty
: "${TPU_PROJECT:=}"                            # GCP project; empty: `gcloud config get project`
: "${TPU_SPOT:=0}"                              # 1: spot capacity (cheaper, can be preempted)
: "${TPU_QUEUED:=0}"                            # 1: create/delete through queued resources
: "${TPU_SSH_FLAGS:=}"                          # extra ssh/scp flags, e.g. --tunnel-through-iap
: "${PREFIXLM_BUCKET:=}"                        # gs://BUCKET[/PREFIX]: runs and shared shards live here
: "${PREFIXLM_WORKDIR_ROOT:=}"                  # empty: $PREFIXLM_BUCKET/runs, else runs
: "${PREFIXLM_REPO_URL:=}"                      # empty: copy this working tree; else git clone URL
: "${PREFIXLM_REPO_REF:=}"                      # branch/tag/commit to check out with PREFIXLM_REPO_URL
: "${PREFIXLM_REMOTE_DIR:=prefixlm}"            # checkout on each worker, relative to its home
: "${PREFIXLM_DATA_DIR:=data/fineweb-edu}"      # raw/ parquet and shards/ on each worker's disk
: "${PREFIXLM_SHARDS:=}"                        # empty: $PREFIXLM_DATA_DIR/shards (the configs' data.path)
: "${PREFIXLM_LOG_DIR:=out/logs}"               # per-worker logs and pid files
: "${PREFIXLM_TOKENS:=2e9}"                     # tokens to download for the full experiment
: "${PREFIXLM_PYTHON_VERSION:=3.11}"            # the worker venv's Python (uv fetches it)
# The TPU build of the pinned jax; the find-links page carries libtpu wheels for older pins.
: "${PREFIXLM_JAX_TPU:=jax[tpu]==0.10.2}"
: "${PREFIXLM_LIBTPU_URL:=https://storage.googleapis.com/jax-releases/libtpu_releases.html}"
# The pinned torch (used by export/lm-eval only) from PyPI is a CUDA build on Linux; take the CPU one.
: "${PREFIXLM_PIP_FLAGS:=--extra-index-url https://download.pytorch.org/whl/cpu}"
: "${DRY_RUN:=0}"                               # 1: print commands, run nothing

die() { echo "error: $*" >&2; exit 2; }

# `need_value "$1" "${2-}"` in an option loop: FLAG's value is missing or empty -> one line, exit 2
# (bash's own ${2:?} printed 'line N: 2: ...' and exited 1).
need_value() { [[ -n ${2-} ]] || die "$1 needs a value (see --help)"; }

# Quote one word for bash only when it needs it, so printed commands stay readable and pasteable.
# Everything that goes into a generated (remote) script passes through here: single quotes are
# POSIX, so the word reaches the worker's shell as data whatever it holds ($(...), `...`, ;, ").
shell_quote() {
  local s=$1
  if [[ -n $s && $s =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$s"
  else
    printf "'%s'" "${s//\'/\'\\\'\'}"
  fi
}

quote_cmd() {
  local out=() w
  for w in "$@"; do out+=("$(shell_quote "$w")"); done
  printf '%s\n' "${out[*]}"
}

# Print a command as `+ cmd ...`, then run it unless DRY_RUN=1.
run_cmd() {
  echo "+ $(quote_cmd "$@")"
  if [[ $DRY_RUN == 1 ]]; then return 0; fi
  "$@"
}

# Run names become directory and log file names, locally and inside generated remote scripts:
# only [A-Za-z0-9._-] (and not . or ..) is accepted, so a name can never be shell syntax or a path,
# and no leading '-', so it can never be read as an option (a run named -rf reached `ln -sfn`).
check_run_name() {
  local name=$1 where=$2
  [[ $name =~ ^[A-Za-z0-9._-]+$ && $name != . && $name != .. ]] \
    || die "$where: run name '${name//[^[:print:]]/?}' may use only letters, digits, '.', '_' and '-'"
  [[ $name != -* ]] || die "$where: run name '$name' starts with '-' and would read as an option; rename it"
}

# Each run has its own workdir WORKDIR_ROOT/RUN_NAME, so a name listed twice would be two runs in
# one workdir (the second was skipped as done). WHERE says which list or option made them.
check_unique_names() {
  local where=$1 i
  local -A seen=()
  for i in "${!RUN_NAMES[@]}"; do
    [[ -z ${seen[${RUN_NAMES[$i]}]:-} ]] \
      || die "$where: run name '${RUN_NAMES[$i]}' is given twice (${seen[${RUN_NAMES[$i]}]} and ${RUN_CONFIGS[$i]}); each run needs its own name, its workdir is WORKDIR_ROOT/RUN_NAME"
    seen[${RUN_NAMES[$i]}]=${RUN_CONFIGS[$i]}
  done
}

# RUN_NAMES[i] and RUN_CONFIGS[i] from launch/runs.txt (comments and blank lines skipped).
# A line '#[BLOCK] RUN_NAME CONFIG' belongs to the optional block BLOCK: it is read only when
# RUN_BLOCKS (comma-separated block names, or 'all') names it. RUN_ALL_BLOCKS lists the blocks
# the file has, in order, for --list and for the error on an unknown block. Windows line ends
# (CRLF) read as plain ones; a name listed twice, in any block, is refused.
load_runs() {
  RUN_NAMES=()
  RUN_CONFIGS=()
  RUN_ALL_BLOCKS=()
  local line name config extra block want=",${RUN_BLOCKS:-}," list_file=$RUNS_FILE
  local all_names=() all_configs=()
  [[ -f $list_file ]] || die "run list $list_file not found"
  while IFS= read -r line || [[ -n $line ]]; do
    line=${line%$'\r'}
    read -r name config extra <<< "$line"
    block=""
    if [[ ${name:-} =~ ^#\[([A-Za-z0-9_-]+)\]$ ]]; then
      block=${BASH_REMATCH[1]}
      name=$config
      read -r config extra <<< "$extra"
      [[ " ${RUN_ALL_BLOCKS[*]} " == *" $block "* ]] || RUN_ALL_BLOCKS+=("$block")
    fi
    [[ -z ${name:-} || $name == \#* ]] && continue
    [[ -n ${config:-} && -z ${extra:-} ]] \
      || die "$RUNS_FILE: line for '$name' must be 'RUN_NAME CONFIG' (or '#[BLOCK] RUN_NAME CONFIG')"
    check_run_name "$name" "$RUNS_FILE"
    all_names+=("$name")
    all_configs+=("$config")
    if [[ -n $block && $want != *",$block,"* && $want != ",all," ]]; then continue; fi
    RUN_NAMES+=("$name")
    RUN_CONFIGS+=("$config")
  done < "$list_file"
  local names=("${RUN_NAMES[@]}") configs=("${RUN_CONFIGS[@]}")
  RUN_NAMES=("${all_names[@]}") RUN_CONFIGS=("${all_configs[@]}")
  check_unique_names "$RUNS_FILE"
  RUN_NAMES=("${names[@]}") RUN_CONFIGS=("${configs[@]}")
  local b
  IFS=, read -r -a want <<< "${RUN_BLOCKS:-}"
  for b in "${want[@]}"; do
    [[ -z $b || $b == all || " ${RUN_ALL_BLOCKS[*]} " == *" $b "* ]] \
      || die "--block: $RUNS_FILE has no block '$b' (it has: ${RUN_ALL_BLOCKS[*]:-none})"
  done
  [[ ${#RUN_NAMES[@]} -gt 0 ]] || die "$RUNS_FILE lists no runs"
}

# Replaces RUN_NAMES/RUN_CONFIGS by one copy per seed of SEEDS (comma-separated, e.g. 0,1,2):
# NAME_seedK becomes NAME_seedN and CONFIG gets seed=N appended as ':seed=N' (or ',seed=N' when
# it already has args). DATA_SEED (optional, >= 0) fixes the data order for every seed: it adds
# data_seed=D and, where D != N, '_dataD' to the name, as prefixlm.config.run_name does.
expand_seeds() {
  local seeds=$1 data_seed=${2:-} names=() configs=() seed_list seed i base config name
  [[ $seeds =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--seeds wants a comma-separated list of integers >= 0, e.g. 0,1,2; got '$seeds'"
  [[ -z $data_seed || $data_seed =~ ^[0-9]+$ ]] || die "--data-seed wants an integer >= 0, got '$data_seed'"
  IFS=, read -r -a seed_list <<< "$seeds"
  for seed in "${seed_list[@]}"; do
    seed=$((10#$seed))
    for i in "${!RUN_NAMES[@]}"; do
      base=${RUN_NAMES[$i]}
      [[ $base =~ ^(.*)_seed[0-9]+$ ]] && base=${BASH_REMATCH[1]}
      name="${base}_seed$seed"
      config=${RUN_CONFIGS[$i]}
      if [[ $config == *:* ]]; then config+=",seed=$seed"; else config+=":seed=$seed"; fi
      if [[ -n $data_seed ]]; then
        config+=",data_seed=$((10#$data_seed))"
        ((10#$data_seed == seed)) || name+="_data$((10#$data_seed))"
      fi
      names+=("$name")
      configs+=("$config")
    done
  done
  RUN_NAMES=("${names[@]}")
  RUN_CONFIGS=("${configs[@]}")
  check_unique_names "--seeds $seeds"
}

# HARDWARE_PRESETS: the public functions of configs/hardware.py (the same list as configs/base.py
# HARDWARE_PRESETS; tests/project/test_launch.py checks that they agree). Read from the file, so a new
# preset there needs no change here.
load_hardware_presets() {
  local file=$REPO_ROOT/configs/hardware.py
  [[ -f $file ]] || die "$file not found: it defines the hardware presets (is $REPO_ROOT a prefixlm checkout?)"
  mapfile -t HARDWARE_PRESETS < <(sed -nE 's/^def ([A-Za-z0-9][A-Za-z0-9_]*)\(.*/\1/p' "$file")
  ((${#HARDWARE_PRESETS[@]})) || die "$file defines no hardware presets"
}

# Is NAME one of HARDWARE_PRESETS (load_hardware_presets first)?
is_hardware_preset() {
  local preset
  for preset in "${HARDWARE_PRESETS[@]}"; do [[ $preset == "$1" ]] && return 0; done
  return 1
}

# --preset NAME: a hardware preset of configs/hardware.py, or 'none' (the configs as listed).
# Only hardware presets: demo and tiny change what is trained and the run name, so a workdir
# named after the listed run would hold another run (and its DONE file would skip the real one).
check_preset() {
  local preset=$1
  [[ $preset =~ ^[A-Za-z0-9_]+$ ]] \
    || die "--preset wants a hardware preset name ([A-Za-z0-9_]+, e.g. h100 or tpu_v4), got '${preset//[^[:print:]]/?}'"
  [[ $preset == none ]] && return 0
  load_hardware_presets
  is_hardware_preset "$preset" \
    || die "--preset: '$preset' is not a hardware preset of configs/hardware.py; use one of: ${HARDWARE_PRESETS[*]} (or none)"
}

# Adds the hardware preset PRESET (see check_preset; 'none' adds nothing) to every RUN_CONFIGS
# entry the way expand_seeds adds seed=N: ':PRESET', or ',PRESET' after existing args (so after
# seed=N when it runs after expand_seeds). A hardware preset changes how a step is computed, not
# what is trained: RUN_NAMES stay as they are, as prefixlm.config.run_name leaves it out too.
add_preset() {
  local preset=$1 i
  check_preset "$preset"
  [[ $preset == none ]] && return 0
  for i in "${!RUN_CONFIGS[@]}"; do
    if [[ ${RUN_CONFIGS[$i]} == *:* ]]; then RUN_CONFIGS[i]+=",$preset"; else RUN_CONFIGS[i]+=":$preset"; fi
  done
}

# The hardware preset for TPU_TYPE, empty when configs/hardware.py has none for its generation:
# tpu_vm.sh sweep's default --preset (v4-* -> tpu_v4, v5litepod-* -> tpu_v5e).
tpu_preset() {
  case ${TPU_TYPE%%-*} in
    v4) echo tpu_v4 ;;
    v5litepod) echo tpu_v5e ;;
    *) echo "" ;;
  esac
}

# The run name for a config string: its name in runs.txt, else derived from it
# (configs/prefix_norm.py:eps=0.1 -> prefix_norm_eps0p1). Hardware presets in its args are left
# out first (configs/prefix_norm.py:eps=1.0,h100 is the run prefix_norm_eps1p0_seed0).
run_name_for_config() {
  local config=$1 i item items kept=()
  if [[ $config == *:* ]]; then
    load_hardware_presets
    IFS=, read -r -a items <<< "${config#*:}"
    for item in "${items[@]}"; do is_hardware_preset "$item" || kept+=("$item"); done
    config=${config%%:*}
    if ((${#kept[@]})); then config+=":$(IFS=,; printf '%s' "${kept[*]}")"; fi
  fi
  RUN_BLOCKS=all load_runs
  for i in "${!RUN_CONFIGS[@]}"; do
    if [[ ${RUN_CONFIGS[$i]} == "$config" ]]; then printf '%s\n' "${RUN_NAMES[$i]}"; return; fi
  done
  local base=${config##*/} args=""
  [[ $base == *:* ]] && args=${base#*:}
  base=${base%%:*}
  base=${base%.py}
  args=${args//./p}
  args=${args//[^A-Za-z0-9]/}
  printf '%s\n' "${base}${args:+_$args}"
}

# TRAIN_ARGV: the one training command line, shared by `tpu_vm.sh train`, sweep.sh and the plans.
train_argv() {
  local python=$1 config=$2 workdir=$3
  shift 3
  # shellcheck disable=SC2034
  TRAIN_ARGV=("$python" -m prefixlm.main "--config=$config" "--workdir=$workdir" "$@")
}

# Zone and runtime version for an accelerator type, when not given. Availability changes: check
# `gcloud compute tpus accelerator-types list --zone=Z` and `gcloud compute tpus tpu-vm versions list`.
tpu_resolve() {
  local gen=${TPU_TYPE%%-*}
  case $gen in
    v4) : "${TPU_ZONE:=us-central2-b}"; : "${TPU_VERSION:=tpu-ubuntu2204-base}" ;;
    v5litepod) : "${TPU_ZONE:=us-west4-a}"; : "${TPU_VERSION:=v2-alpha-tpuv5-lite}" ;;
    v5p) : "${TPU_ZONE:=us-east5-a}"; : "${TPU_VERSION:=v2-alpha-tpuv5}" ;;
    v6e) : "${TPU_ZONE:=us-east5-b}"; : "${TPU_VERSION:=v2-alpha-tpuv6e}" ;;
    v2 | v3) : "${TPU_VERSION:=tpu-ubuntu2204-base}" ;;
    *) die "unknown accelerator type '$TPU_TYPE' (TPU_TYPE / --type); expected e.g. v4-8 or v5litepod-8" ;;
  esac
  [[ -n $TPU_ZONE ]] || die "no default zone for $TPU_TYPE: pass --zone or set TPU_ZONE"
  if [[ -z $PREFIXLM_WORKDIR_ROOT ]]; then
    if [[ -n $PREFIXLM_BUCKET ]]; then PREFIXLM_WORKDIR_ROOT=${PREFIXLM_BUCKET%/}/runs
    else PREFIXLM_WORKDIR_ROOT=runs; fi
  fi
  : "${PREFIXLM_SHARDS:=${PREFIXLM_DATA_DIR%/}/shards}"
}

# Hosts (TPU VM workers) in a slice of TPU_TYPE. v2-v4/v5p count TensorCores (2 per chip, 4 chips
# per host); v5e/v6e count chips, 8 on a single host and 4 per host in multi-host slices.
tpu_hosts() {
  local gen=${TPU_TYPE%%-*} n=${TPU_TYPE##*-}
  [[ $n =~ ^[0-9]+$ ]] || die "cannot read the size of accelerator type '$TPU_TYPE'"
  case $gen in
    v5litepod | v6e) if ((n <= 8)); then echo 1; else echo $((n / 4)); fi ;;
    *) if ((n <= 8)); then echo 1; else echo $((n / 8)); fi ;;
  esac
}
