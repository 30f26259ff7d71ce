#!/usr/bin/env bash
# Submit a training run to a running Ray cluster and follow its logs:
#   launch/submit.sh [hydra overrides ...]
#   launch/submit.sh [ray job submit options ... --] [hydra overrides ...]
#   RAY_ADDRESS=http://head-node:8265 launch/submit.sh trainer.output_dir=/shared/runs/7b \
#       +experiment=gmai_vl_r1_7b data.root=/data/GMAI-Reasoning10K
# Every node needs the project's Python environment (make install, or the same image); the job
# ships this checkout as its working directory, so the code and conf/ come from here.
#
# Ray runs the job in a temporary copy of this checkout, deleted with the Ray session, so outputs
# go to an absolute folder: trainer.output_dir if given (relative: to where you run this), else
# this checkout's outputs/<date>/<time> (multirun/<date>/<time>/<n> with -m); hydra's run folder
# is the same. On a multi-node cluster use shared storage, or a checkout the head node shares.
# GMAI_RL_CACHE (where the demo builds its tiny model and data) travels with the job when set.
# Without RAY_ADDRESS this submits to the cluster of launch/local_cluster.sh (127.0.0.1:8265,
# RAY_AUTH_MODE=disabled unless exported).
set -euo pipefail
here=$PWD
cd "$(dirname "$0")/.."
repo=$PWD
[[ -x $repo/.venv/bin/ray ]] && export PATH="$repo/.venv/bin:$PATH"
if [[ -z ${RAY_ADDRESS:-} ]]; then
  # The cluster of launch/local_cluster.sh, with its authentication mode.
  export RAY_ADDRESS=http://127.0.0.1:8265 RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
fi

ray_args=()
if [[ " $* " == *" -- "* ]]; then
  while [[ $1 != -- ]]; do ray_args+=("$1"); shift; done
  shift
fi

absolute() { [[ $1 == /* ]] && echo "$1" || echo "$here/$1"; }

out="" sweep="" run_dir="" multirun=""
overrides=()
for arg in "$@"; do
  case $arg in
    trainer.output_dir=*) out=$(absolute "${arg#*=}"); arg="trainer.output_dir=$out" ;;
    hydra.run.dir=*) run_dir=$(absolute "${arg#*=}"); arg="hydra.run.dir=$run_dir" ;;
    hydra.sweep.dir=*) sweep=$(absolute "${arg#*=}"); arg="hydra.sweep.dir=$sweep" ;;
    -m | --multirun) multirun=1 ;;
  esac
  overrides+=("$arg")
done
stamp=$(date +%Y-%m-%d/%H-%M-%S)
if [[ -n $multirun ]]; then
  if [[ -n $out ]]; then
    echo "with -m every job would write to trainer.output_dir=$out: set hydra.sweep.dir instead" \
      "(each job gets its own numbered folder in it)" >&2
    exit 2
  fi
  [[ -n $sweep ]] || { sweep=$repo/multirun/$stamp; overrides+=("hydra.sweep.dir=$sweep"); }
  echo "outputs: $sweep/<job number>" >&2
else
  [[ -n $run_dir ]] || { run_dir=${out:-$repo/outputs/$stamp}; overrides+=("hydra.run.dir=$run_dir"); }
  echo "outputs: ${out:-$run_dir}" >&2
fi

env_vars="\"PYTHONPATH\": \"src\", \"TOKENIZERS_PARALLELISM\": \"false\""
if [[ -n ${GMAI_RL_CACHE:-} ]]; then
  env_vars+=", \"GMAI_RL_CACHE\": \"$(absolute "$GMAI_RL_CACHE")\""
fi
runtime_env="{
  \"excludes\": [\".git\", \".venv\", \".venv-vllm\", \"artifacts\", \"outputs\", \"multirun\"],
  \"env_vars\": {$env_vars}
}"
exec ray job submit --address "$RAY_ADDRESS" --working-dir . --runtime-env-json "$runtime_env" \
  "${ray_args[@]}" -- python -m gmai_rl.train "${overrides[@]}"
