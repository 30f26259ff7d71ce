#!/usr/bin/env bash
# Start (or stop) a one-machine Ray cluster to try `launch/submit.sh` locally:
#   launch/local_cluster.sh start [num_cpus]   then   launch/submit.sh trainer.steps=20
#   launch/local_cluster.sh stop               (`ray stop`: every Ray process on this machine)
# The cluster runs this checkout's .venv (make install) when there is one, so a job's `python`
# is the project's. Ray 2.60 turns on token authentication when a token exists; this cluster
# runs with RAY_AUTH_MODE=disabled unless you export another mode, and submit.sh uses the same
# default for the local address (export the same RAY_AUTH_MODE for both otherwise).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
[[ -x $repo/.venv/bin/ray ]] && export PATH="$repo/.venv/bin:$PATH"
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
case "${1:-start}" in
  start) ray start --head --num-cpus "${2:-6}" --dashboard-host 127.0.0.1 --disable-usage-stats ;;
  stop) ray stop ;;
  *) echo "usage: $0 start [num_cpus] | stop" >&2; exit 2 ;;
esac
