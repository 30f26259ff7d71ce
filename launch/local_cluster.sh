#!/usr/bin/env bash
# Start (or stop) a one-machine Ray cluster to try `launch/submit.sh` locally:
#   launch/local_cluster.sh start [num_cpus]   then   launch/submit.sh trainer.steps=20
#   launch/local_cluster.sh stop
# Ray 2.60 turns on token authentication; this local cluster disables it, and the same
# RAY_AUTH_MODE must be exported for `ray job submit` (submit.sh inherits it from your shell).
set -euo pipefail
export RAY_AUTH_MODE=disabled
case "${1:-start}" in
  start) ray start --head --num-cpus "${2:-6}" --dashboard-host 127.0.0.1 --disable-usage-stats ;;
  stop) ray stop ;;
  *) echo "usage: $0 start [num_cpus] | stop" >&2; exit 2 ;;
esac
