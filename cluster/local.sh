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
# Connect with ray.init(address="127.0.0.1:$HW_RAY_PORT"); submit jobs to http://127.0.0.1:$HW_DASHBOARD_PORT.
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

# Token authentication: off by default for this loopback-only cluster, because Ray turns it on
# for a head whenever ~/.ray/auth_token exists, while joining nodes, drivers and `ray job submit`
# only send the token when RAY_AUTH_MODE=token is set in their environment too. To use it:
# export RAY_AUTH_MODE=token before `up` and in every client.
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}

# Ports of one node: node manager, object manager, dashboard agent (http, grpc), runtime-env
# agent, metrics, and a 100-port range for its workers; node $1 (0 or 1) gets block $1.
node_ports() {
  local b=$((BASE + $1 * 200))
  echo --node-manager-port=$b --object-manager-port=$((b + 1)) \
    --dashboard-agent-listen-port=$((b + 2)) --dashboard-agent-grpc-port=$((b + 3)) \
    --runtime-env-agent-port=$((b + 4)) --metrics-export-port=$((b + 5)) \
    --min-worker-port=$((b + 100)) --max-worker-port=$((b + 199))
}

# PIDs of this cluster: processes whose command line names $TMP, and all their descendants.
cluster_pids() {
  ps -eo pid=,ppid=,args= | HW_MATCH="$TMP/" awk '
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
  [ -n "$pids" ] && kill -KILL $pids 2>/dev/null || true
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
