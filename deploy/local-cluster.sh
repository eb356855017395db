#!/usr/bin/env bash
# A real two-node Ray cluster and an MLflow server on this machine, all bound to 127.0.0.1.
#
#   deploy/local-cluster.sh start     # Ray head + one worker node + mlflow server; writes $DIR/env
#   source .local-cluster/env         # RAY_AUTH_MODE/RAY_AUTH_TOKEN_PATH, RAY_API_SERVER_ADDRESS,
#                                     # TDA_STORE, MLFLOW_TRACKING_URI for `tda submit` and friends
#   deploy/local-cluster.sh status    # nodes and resources, MLflow health
#   deploy/local-cluster.sh stop      # stops exactly this cluster's processes, keeps the store
#
# Settings (environment): TDA_CLUSTER_DIR (default <repo>/.local-cluster), TDA_RAY_PORT (6390),
# TDA_DASHBOARD_PORT (8265), TDA_MLFLOW_PORT (5001),
# TDA_CLIENT_PORT (10001, the Ray client server), TDA_HEAD_CPUS (1), TDA_WORKER_CPUS (1),
# TDA_VENV (default <repo>/.venv; its bin/ goes first on PATH so jobs run the project's Python).
#
# Token authentication is on: a fresh random token is written to $DIR/auth_token (mode 600; clients
# read the copy $DIR/client_token) and both
# nodes start with RAY_AUTH_MODE=token, so the dashboard and the Jobs API refuse requests without it.
# Two nodes on one machine: each has its own raylet, object store and resources, and Ray schedules
# across them as across machines; the store is a folder both see, as a shared volume would be. Each
# node has its own TDA_CACHE ($DIR/cache/head, $DIR/cache/worker), the node-local cache of a URI store
# (`--store file://…` or s3://…), as separate disks would be.
#
# The dashboard / Jobs API and the MLflow server listen on 127.0.0.1 only. Ray's own gRPC servers
# (GCS, raylets, object managers, agents, the Ray client server) listen on every interface or on the
# machine's address, which Ray has no setting to change; token authentication guards them, and on a
# shared host a firewall should too.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="$(mkdir -p "${TDA_CLUSTER_DIR:-$REPO/.local-cluster}" && cd "${TDA_CLUSTER_DIR:-$REPO/.local-cluster}" && pwd)"
VENV="${TDA_VENV:-$REPO/.venv}"
RAY_PORT="${TDA_RAY_PORT:-6390}"
DASHBOARD_PORT="${TDA_DASHBOARD_PORT:-8265}"
MLFLOW_PORT="${TDA_MLFLOW_PORT:-5001}"
CLIENT_PORT="${TDA_CLIENT_PORT:-10001}"  # outside Ray's worker port range 10002-19999
HEAD_CPUS="${TDA_HEAD_CPUS:-1}"
WORKER_CPUS="${TDA_WORKER_CPUS:-1}"

export PATH="$VENV/bin:$PATH"
export RAY_USAGE_STATS_ENABLED=0 MLFLOW_DISABLE_TELEMETRY=true
export RAY_AUTH_MODE=token
# the cluster's processes read the token from $DIR/auth_token, clients from a copy ($DIR/client_token):
# Ray hands RAY_AUTH_TOKEN_PATH down to every process it starts, so it marks this cluster's processes
CLUSTER_ENV=(RAY_AUTH_TOKEN_PATH="$DIR/auth_token")

say() { echo "local-cluster: $*"; }
die() { echo "local-cluster: $*" >&2; exit 1; }

port_free() {
  python - "$1" <<'EOF'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do: TIME_WAIT leftovers are fine
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
EOF
}

wait_http() {  # URL, seconds
  local url="$1" deadline=$((SECONDS + $2))
  # any HTTP answer counts (the dashboard answers 401 without the token)
  until python - "$url" 2>/dev/null <<'EOF'
import sys, urllib.error, urllib.request
try:
    urllib.request.urlopen(sys.argv[1], timeout=2)
except urllib.error.HTTPError:
    pass
EOF
  do
    ((SECONDS < deadline)) || return 1
    sleep 1
  done
}

# every process of this cluster (Ray's, including agents and workers, and MLflow) carries
# RAY_AUTH_TOKEN_PATH=$DIR/auth_token in its environment: stop kills exactly those, never another Ray on
# the machine (`ray stop` kills them all) nor a shell that sourced the env file (it names client_token)
own_pids() {
  local env pid
  for env in /proc/[0-9]*/environ; do
    pid="${env#/proc/}"; pid="${pid%/environ}"
    grep -qzxF -- "RAY_AUTH_TOKEN_PATH=$DIR/auth_token" "$env" 2>/dev/null && echo "$pid"
  done
  return 0
}

start() {
  command -v ray >/dev/null || die "no ray in $VENV/bin; run 'make test' or 'make run' once to create the venv"
  [[ -z "$(own_pids)" ]] || die "already running (see '$0 status'); stop it with '$0 stop'"
  for port in "$RAY_PORT" "$DASHBOARD_PORT" "$MLFLOW_PORT" "$CLIENT_PORT"; do
    port_free "$port" || die "port $port on 127.0.0.1 is taken; set TDA_RAY_PORT/TDA_DASHBOARD_PORT/TDA_MLFLOW_PORT"
  done
  mkdir -p "$DIR/store" "$DIR/mlflow/artifacts" "$DIR/logs"
  ( umask 077 && python -c "import secrets; print(secrets.token_hex(32))" > "$DIR/auth_token" \
      && cp "$DIR/auth_token" "$DIR/client_token" )
  # a short temp dir: Ray's socket paths must stay under 108 characters
  local tmp; tmp="$(mktemp -d /tmp/tda-cluster-XXXXXX)"
  ln -sfn "$tmp" "$DIR/ray"

  say "starting the Ray head on 127.0.0.1:$RAY_PORT (dashboard and Jobs API on 127.0.0.1:$DASHBOARD_PORT)"
  env "${CLUSTER_ENV[@]}" TDA_CACHE="$DIR/cache/head" ray start --head --node-ip-address 127.0.0.1 --port "$RAY_PORT" \
    --dashboard-host 127.0.0.1 --dashboard-port "$DASHBOARD_PORT" --include-dashboard true \
    --ray-client-server-port "$CLIENT_PORT" --dashboard-agent-listen-port 0 --num-cpus "$HEAD_CPUS" --temp-dir "$tmp" \
    --resources "{\"tda_head\": 1}" --disable-usage-stats >"$DIR/logs/head.log" 2>&1 \
    || { cat "$DIR/logs/head.log" >&2; die "the Ray head did not start (log: $DIR/logs/head.log)"; }

  say "starting a Ray worker node ($WORKER_CPUS CPU)"
  env "${CLUSTER_ENV[@]}" TDA_CACHE="$DIR/cache/worker" ray start --address "127.0.0.1:$RAY_PORT" --node-ip-address 127.0.0.1 --num-cpus "$WORKER_CPUS" --dashboard-agent-listen-port 0 \
    --temp-dir "$tmp" --resources "{\"tda_worker\": 1}" --disable-usage-stats >"$DIR/logs/worker.log" 2>&1 \
    || { cat "$DIR/logs/worker.log" >&2; stop; die "the Ray worker did not start (log: $DIR/logs/worker.log)"; }

  say "starting the MLflow server on 127.0.0.1:$MLFLOW_PORT"
  env "${CLUSTER_ENV[@]}" nohup mlflow server --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
    --backend-store-uri "sqlite:///$DIR/mlflow/mlflow.db" \
    --artifacts-destination "$DIR/mlflow/artifacts" --serve-artifacts \
    >"$DIR/logs/mlflow.log" 2>&1 &
  echo $! >"$DIR/mlflow.pid"
  wait_http "http://127.0.0.1:$MLFLOW_PORT/health" 120 \
    || { tail -20 "$DIR/logs/mlflow.log" >&2; stop; die "the MLflow server did not answer (log: $DIR/logs/mlflow.log)"; }
  wait_http "http://127.0.0.1:$DASHBOARD_PORT/api/version" 60 \
    || { stop; die "the Ray dashboard (Jobs API) did not answer on 127.0.0.1:$DASHBOARD_PORT"; }

  cat >"$DIR/env" <<EOF
# written by deploy/local-cluster.sh start; source it to talk to this cluster
export RAY_AUTH_MODE=token
export RAY_AUTH_TOKEN_PATH='$DIR/client_token'
export RAY_API_SERVER_ADDRESS='http://127.0.0.1:$DASHBOARD_PORT'
export TDA_STORE='$DIR/store'
export MLFLOW_TRACKING_URI='http://127.0.0.1:$MLFLOW_PORT'
export PATH='$VENV/bin':"\$PATH"
EOF
  say "up: 2 Ray nodes, MLflow at http://127.0.0.1:$MLFLOW_PORT, store $DIR/store"
  say "next: source $DIR/env && tda submit specs/cluster.yaml --wait"
}

stop() {
  local pids; pids="$(own_pids)"
  if [[ -z "$pids" ]]; then say "nothing running"; return 0; fi
  say "stopping $(wc -w <<<"$pids") processes"
  kill $pids 2>/dev/null || true
  for _ in $(seq 20); do
    pids="$(own_pids)"; [[ -z "$pids" ]] && break; sleep 0.5
  done
  [[ -z "$pids" ]] || kill -9 $pids 2>/dev/null || true
  if [[ -L "$DIR/ray" ]]; then rm -rf "$(readlink "$DIR/ray")" "$DIR/ray"; fi
  rm -f "$DIR/mlflow.pid"
  say "stopped (store and MLflow data kept in $DIR)"
}

status() {
  [[ -n "$(own_pids)" ]] || { say "not running"; return 1; }
  RAY_AUTH_TOKEN_PATH="$DIR/client_token" ray status --address "127.0.0.1:$RAY_PORT" || true
  python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$MLFLOW_PORT/health', timeout=5)" \
    && say "MLflow http://127.0.0.1:$MLFLOW_PORT: healthy" || say "MLflow http://127.0.0.1:$MLFLOW_PORT: not answering"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) cat "$DIR/env" ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
