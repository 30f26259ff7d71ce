#!/usr/bin/env bash
# Submit a training run to a running Ray cluster and follow its logs:
#   launch/submit.sh [hydra overrides ...]
#   RAY_ADDRESS=http://head-node:8265 launch/submit.sh +experiment=gmai_vl_r1_7b data.root=/data/GMAI-Reasoning10K
# Every node needs the project's Python environment (make install, or the same image); the job
# ships this checkout as its working directory, so the code and conf/ come from here.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${RAY_ADDRESS:=http://127.0.0.1:8265}"
runtime_env='{
  "excludes": [".git", ".venv", ".venv-vllm", "artifacts", "outputs", "multirun"],
  "env_vars": {"PYTHONPATH": "src", "TOKENIZERS_PARALLELISM": "false"}
}'
exec ray job submit --address "$RAY_ADDRESS" --working-dir . --runtime-env-json "$runtime_env" \
  -- python -m gmai_rl.train "$@"
