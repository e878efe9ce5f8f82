#!/usr/bin/env bash
# A two-node Ray cluster on one machine, for trying multi-node placement without hardware.
#
#   cluster/local.sh up       head (127.0.0.1, dashboard + job server) and a second raylet joined to it
#   cluster/local.sh status   `ray status` of this cluster
#   cluster/local.sh down     stop both nodes; no process of this cluster is left
#
# The nodes differ by custom resources, so placement can tell them apart:
#   head:  {"hw_head": 1}   (put the coordinator there: coordinator_resources={"hw_head": 1})
#   node2: {"hw_node2": N}  (put the shards there:      shard_resources={"hw_node2": 1})
# Connect with ray.init(address="127.0.0.1:$HW_RAY_PORT"); submit jobs to http://127.0.0.1:$HW_DASHBOARD_PORT;
# both with RAY_AUTH_MODE=token in the client's environment (token authentication, below).
#
# Two raylets on one host need their own ports and temp dirs. Every port is set here (from
# HW_PORT_BASE) and the temp dirs live under HW_RAY_TMP, which also keeps this cluster's
# address out of /tmp/ray: a plain ray.init() elsewhere on the machine starts its own cluster
# instead of joining this one. `down` stops only this cluster's processes (those started with
# HW_RAY_TMP, and their children), never other Ray instances on the machine (as `ray stop` would).
#
# Settings (environment): HW_RAY_PORT (6379), HW_DASHBOARD_PORT (8265), HW_PORT_BASE (23000),
# HW_RAY_TMP (/tmp/hwray), HW_HEAD_CPUS (2), HW_NODE2_CPUS (2), HW_NODE2_SLOTS (2).
set -euo pipefail

PORT=${HW_RAY_PORT:-6379}
DASH=${HW_DASHBOARD_PORT:-8265}
BASE=${HW_PORT_BASE:-23000}
TMP=${HW_RAY_TMP:-/tmp/hwray}
HEAD_CPUS=${HW_HEAD_CPUS:-2}
NODE2_CPUS=${HW_NODE2_CPUS:-2}
NODE2_SLOTS=${HW_NODE2_SLOTS:-2}
ADDRESS=127.0.0.1:$PORT

# Token authentication, always on: anyone who can reach the head's ports (the GCS on $PORT, the
# job server on $DASH) could otherwise run any code as this user, and "loopback only" still means
# every local account and every process that can be tricked into a request to 127.0.0.1. Every
# process of this cluster (head, node2, the job server, job drivers, workers) inherits these.
# The token is Ray's own: RAY_AUTH_TOKEN if set, else the file RAY_AUTH_TOKEN_PATH, else
# ~/.ray/auth_token; `up` makes the file (mode 600) when there is none. Clients need the same:
#   export RAY_AUTH_MODE=token   (plus RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH if they were set here)
# Without it, `ray job submit` and ray.init() send no token and the cluster refuses them.
export RAY_AUTH_MODE=token

token_file() { echo "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"; }

# A token before the head starts: `ray start` with RAY_AUTH_MODE=token refuses to run without one.
# A Ray without token authentication (before 2.52) would ignore RAY_AUTH_MODE and start an open
# cluster; `ray get-auth-token` came with it, so its absence stops us first.
ensure_token() {
  if ! ray get-auth-token --help >/dev/null 2>&1; then
    echo "local.sh: this Ray has no token authentication (needs Ray >= 2.52); not starting an open cluster" >&2
    exit 1
  fi
  [ -n "${RAY_AUTH_TOKEN:-}" ] && return 0
  local f
  f=$(token_file)
  [ -s "$f" ] && return 0
  # 256 random bits as hex, as `ray get-auth-token --generate` makes, but also for a
  # RAY_AUTH_TOKEN_PATH file (that command only writes ~/.ray/auth_token) and unreadable to others
  (umask 077 && mkdir -p "$(dirname "$f")" && od -An -tx1 -N32 /dev/urandom | tr -d ' \n' >"$f")
  echo "local.sh: made an auth token in $f" >&2
}

# Ports of one node: node manager, object manager, dashboard agent (http, grpc), runtime-env
# agent, metrics, and a 100-port range for its workers; node $1 (0 or 1) gets block $1.
node_ports() {
  local b=$((BASE + $1 * 200))
  echo --node-manager-port=$b --object-manager-port=$((b + 1)) \
    --dashboard-agent-listen-port=$((b + 2)) --dashboard-agent-grpc-port=$((b + 3)) \
    --runtime-env-agent-port=$((b + 4)) --metrics-export-port=$((b + 5)) \
    --min-worker-port=$((b + 100)) --max-worker-port=$((b + 199))
}

# PIDs of this cluster: processes whose command line names $TMP, and all their descendants
# (-ww: whole command lines, however wide; a cut one could hide $TMP).
cluster_pids() {
  ps -wweo pid=,ppid=,args= | HW_MATCH="$TMP/" awk '
    { pid[NR] = $1; ppid[NR] = $2; if (index($0, ENVIRON["HW_MATCH"])) mine[$1] = 1 }
    END {
      do { grew = 0
        for (i = 1; i <= NR; i++) if (!(pid[i] in mine) && (ppid[i] in mine)) { mine[pid[i]] = 1; grew = 1 }
      } while (grew)
      for (p in mine) print p
    }'
}

up() {
  if [ -n "$(cluster_pids)" ]; then
    echo "local.sh: a cluster under $TMP is already running; run '$0 down' first" >&2
    exit 1
  fi
  mkdir -p "$TMP/head" "$TMP/node2"
  ensure_token
  ray start --head --node-ip-address=127.0.0.1 --port="$PORT" --temp-dir="$TMP/head" \
    --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASH" \
    --num-cpus="$HEAD_CPUS" --num-gpus=0 \
    --resources='{"hw_head": 1}' $(node_ports 0) --disable-usage-stats >"$TMP/head.log" 2>&1 \
    || { cat "$TMP/head.log" >&2; down; exit 1; }
  ray start --address="$ADDRESS" --node-ip-address=127.0.0.1 --temp-dir="$TMP/node2" \
    --num-cpus="$NODE2_CPUS" --num-gpus=0 --resources="{\"hw_node2\": $NODE2_SLOTS}" \
    $(node_ports 1) --disable-usage-stats >"$TMP/node2.log" 2>&1 \
    || { cat "$TMP/node2.log" >&2; down; exit 1; }
  for _ in $(seq 60); do  # the second raylet registers a moment after `ray start` returns
    [ "$(ray status --address="$ADDRESS" 2>/dev/null | grep -c ' node_')" -ge 2 ] && break
    sleep 0.5
  done
  echo "local Ray cluster up: 2 nodes, address $ADDRESS, dashboard and jobs at http://127.0.0.1:$DASH"
  local source=RAY_AUTH_TOKEN
  [ -n "${RAY_AUTH_TOKEN:-}" ] || source=$(token_file)
  echo "token authentication on: clients need RAY_AUTH_MODE=token and the token (from $source)"
}

down() {
  local pids
  pids=$(cluster_pids)
  [ -z "$pids" ] && { echo "local Ray cluster: nothing running under $TMP"; return 0; }
  kill -TERM $pids 2>/dev/null || true
  for _ in $(seq 50); do
    pids=$(cluster_pids)
    [ -z "$pids" ] && break
    sleep 0.2
  done
  # what TERM did not stop in 10 s, or what started meanwhile (the autoscaler's monitor, under
  # load): KILL, and wait until it is gone, so that nothing of the cluster outlives `down`
  for _ in $(seq 25); do
    [ -z "$pids" ] && break
    kill -KILL $pids 2>/dev/null || true
    sleep 0.2
    pids=$(cluster_pids)
  done
  if [ -n "$pids" ]; then
    echo "local.sh: processes of this cluster still running after SIGKILL: $pids" >&2
    return 1
  fi
  echo "local Ray cluster down"
}

status() {
  if [ -z "$(cluster_pids)" ]; then
    echo "local Ray cluster: nothing running under $TMP; start it with '$0 up'" >&2
    exit 1
  fi
  ray status --address="$ADDRESS"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
