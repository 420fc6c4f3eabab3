#!/usr/bin/env bash
# The PostgreSQL store of a fleet against the embedded SQLite store, in one run
# (issue 16; results in benches/README.md section 8):
#
#   sqlite   one tallyd on its SQLite store (the default)
#   pg       node 0 of a two-node fleet on a throwaway PostgreSQL cluster (default
#            settings: fsync and synchronous_commit on), node 1 idle but in the fleet
#
# For each: 64 B requests (throughput) and reconnects (connect + handshake + one request
# + close: handshakes per second), alternating sqlite and pg round by round, medians of
# ROUNDS; tallyd's CPU per operation, and for pg the database's CPU per operation (every
# postgres process of the cluster) and the statements per operation
# (tally_store_queries_total over tally_handshakes_total / requests). Then the enrollment
# rate of each store (N_ENROLL identities, 32 at a time), and revocations across nodes:
# `tallyd revoke` on node 0 of sessions held by node 1 (examples/fleet_revoke.rs).
#
# Usage: benches/fleet.sh          Environment: ROUNDS (5), DURATION (3 s), WORK
# (/tmp/tally-fleet), N_ENROLL (2000), N_REVOKE (50), LOADS ("throughput reconnect"),
# PG_STATS (set: where the database's time goes over the loads, pg_stat_statements;
# PG_STATS=enroll: over the pg enrollments instead). Installs PostgreSQL with apt-get if
# missing (root). Not part of `cargo test`.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${WORK:-/tmp/tally-fleet}
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-3}
N_ENROLL=${N_ENROLL:-2000}
N_REVOKE=${N_REVOKE:-50}
LOADS=${LOADS:-"throughput reconnect"}

if ! ls -d /usr/lib/postgresql/*/bin >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql
fi
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
(cd "$ROOT" && cargo build --quiet --release --features cli --bins --examples)
BIN="$ROOT/target/release"

rm -rf "$WORK"; mkdir -p "$WORK/pg"; cd "$WORK"
pids=()
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true
  as_pg "$PGBIN/pg_ctl" -D "$WORK/pg/data" -m immediate stop >/dev/null 2>&1 || true
}
trap cleanup EXIT
ulimit -n "$(ulimit -Hn)"
[ "$(id -u)" = 0 ] && chown postgres "$WORK/pg"
as_pg "$PGBIN/initdb" -D "$WORK/pg/data" -U postgres --auth=trust >/dev/null
PGPORT=55439
as_pg "$PGBIN/pg_ctl" -D "$WORK/pg/data" -l "$WORK/pg/log" -w \
  -o "-p $PGPORT -k $WORK/pg -c listen_addresses=127.0.0.1 -c max_connections=200 ${PG_STATS:+-c shared_preload_libraries=pg_stat_statements -c track_functions=all}" start >/dev/null
PGPID=$(head -1 "$WORK/pg/data/postmaster.pid")
URL="postgres://postgres@127.0.0.1:$PGPORT/postgres"

# As benches/peers.sh: defaults (log level info), the per-source limits lifted.
limits='[limits]
max_connections = 30000
max_unauthenticated = 1024
max_unauthenticated_per_source = 100000
new_connections_per_source = 100000
enrollments_per_second = 100000
max_enrollments_in_progress = 1000'
printf 'listen = "127.0.0.1:7450"\nstate_dir = "%s/sqlite"\n%s\n' "$WORK" "$limits" > sqlite.toml
for n in 0 1; do
  printf 'listen = "127.0.0.1:745%d"\nstate_dir = "%s/node%d"\nstore = "%s"\nmetrics_listen = "127.0.0.1:946%d"\n%s\n' \
    $((n + 1)) "$WORK" $n "$URL" $n "$limits" > node$n.toml
done
"$BIN/tallyd" --config node0.toml init >/dev/null
mkdir -m 700 node1 && cp node0/server.key node0/store.key node1/
"$BIN/tallyd" --config sqlite.toml >sqlite.log 2>&1 & pids+=($!); SQLITE=$!
"$BIN/tallyd" --config node0.toml >node0.log 2>&1 & pids+=($!); NODE0=$!
"$BIN/tallyd" --config node1.toml >node1.log 2>&1 & pids+=($!)
sleep 2
TOKEN_SQLITE=$("$BIN/tallyd" --config sqlite.toml token)
# Open enrollment is the fleet's, off until turned on (README, "Running several daemons").
"$BIN/tallyd" --config node0.toml open-enrollment on >/dev/null
TOKEN_PG=$("$BIN/tallyd" --config node0.toml token)

# CPU ticks (utime + stime) of the cluster's processes, and one metric of node 0.
pg_ticks() {
  local t=0 p
  for p in $PGPID $(pgrep -P "$PGPID"); do
    [ -r /proc/$p/stat ] && t=$((t + $(awk '{print $14 + $15}' /proc/$p/stat 2>/dev/null || echo 0)))
  done
  echo $t
}
metric() {
  exec 3<>/dev/tcp/127.0.0.1/9460
  printf 'GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n' >&3
  awk -v m="$1" '$1 == m { print $2 }' <&3
  exec 3<&-
}
HZ=$(getconf CLK_TCK)

bench() { # NAME TARGET_ADDR TOKEN PID OUT ARGS...
  local name=$1 addr=$2 token=$3 pid=$4 out=$5; shift 5
  "$BIN/tally" bench --server "$addr" --token "$token" --cred-dir "creds-$name" \
    --daemon-pid "$pid" --rounds 1 --json "$@" > "$out" 2>>bench.err
}

# PG_STATS=1: where the database's time goes, by statement and function, and its CPU by
# process kind, over the pg rounds (pg_stat_statements; counters reset before the loads).
psql_() { "$PGBIN/psql" -X -q -h 127.0.0.1 -p "$PGPORT" -U postgres postgres "$@"; }
kinds() { # CPU ticks of the cluster's live processes by kind (backend, walwriter...)
  for p in $(pgrep -P "$PGPID"); do
    [ -r /proc/$p/stat ] || continue
    k=$(tr '\0' ' ' < /proc/$p/cmdline | awk '{print ($2 == "postgres") ? "backend" : $2 "-" $3}')
    echo "$k $(awk '{print $14 + $15}' /proc/$p/stat)"
  done | awk '{t[$1] += $2} END {for (k in t) print k, t[k]}' | sort
}
pg_stats_reset() {
  psql_ -c "CREATE EXTENSION IF NOT EXISTS pg_stat_statements" -c "SELECT pg_stat_statements_reset()" -c "SELECT pg_stat_reset()" >/dev/null
  kinds > kinds-before.txt
}
pg_stats_print() {
  echo; echo "database CPU ticks by process kind over $1 (before, after):"
  kinds > kinds-after.txt; join -a2 kinds-before.txt kinds-after.txt | sed 's/^/  /'
  echo; echo "statements by total time (pg_stat_statements):"
  psql_ -c "SELECT calls, round(total_exec_time::numeric, 1) AS ms, round((total_exec_time / greatest(calls, 1) * 1000)::numeric, 1) AS us_per_call, rows, left(regexp_replace(query, '\s+', ' ', 'g'), 90) AS query FROM pg_stat_statements ORDER BY total_exec_time DESC LIMIT 12"
  psql_ -c "SELECT funcname, calls, round(total_time::numeric, 1) AS ms, round(self_time::numeric, 1) AS self_ms FROM pg_stat_user_functions ORDER BY total_time DESC"
}

echo "enrollment: $N_ENROLL identities, 32 at a time, each store"
for s in sqlite pg; do
  case $s in sqlite) a=127.0.0.1:7450 t=$TOKEN_SQLITE p=$SQLITE ;; pg) a=127.0.0.1:7451 t=$TOKEN_PG p=$NODE0 ;; esac
  [ "$s" = pg ] && [ "${PG_STATS:-}" = enroll ] && pg_stats_reset
  "$BIN/tally" bench --server "$a" --token "$t" --cred-dir "creds-$s" --daemon-pid "$p" \
    --mode idle -c "$N_ENROLL" --duration 1 --rounds 1 --json 2>&1 >/dev/null | grep enrolled | sed "s/^/  $s: /"
done
if [ "${PG_STATS:-}" = enroll ]; then pg_stats_print "the pg enrollments"; fi

if [ -n "${PG_STATS:-}" ] && [ "${PG_STATS}" != enroll ]; then pg_stats_reset; fi

for mode in $LOADS; do
  case $mode in
    throughput) args=(-c 64 --payload 64 --depth 1 --duration "$DURATION") ;;
    # Each reconnect leaves a TIME_WAIT socket: 2-second rounds.
    reconnect) args=(--mode reconnect -c 16 --payload 64 --duration 2); sleep 5 ;;
  esac
  for r in $(seq "$ROUNDS"); do
    bench sqlite 127.0.0.1:7450 "$TOKEN_SQLITE" "$SQLITE" "sqlite-$mode-$r.json" "${args[@]}"
    t0=$(pg_ticks); q0=$(metric tally_store_queries_total)
    bench pg 127.0.0.1:7451 "$TOKEN_PG" "$NODE0" "pg-$mode-$r.json" "${args[@]}"
    t1=$(pg_ticks); q1=$(metric tally_store_queries_total)
    echo "$((t1 - t0)) $((q1 - q0))" > "pg-$mode-$r.db"
    [ "$mode" = reconnect ] && sleep 5
  done
done

if [ -n "${PG_STATS:-}" ] && [ "${PG_STATS}" != enroll ]; then pg_stats_print "the loads"; fi

python3 - "$ROUNDS" "$HZ" <<'PY'
import json, sys, statistics as st
rounds, hz = int(sys.argv[1]), int(sys.argv[2])
def med(xs): return st.median(xs)
import os
for mode, what in [("throughput", "64 B requests, 64 connections, 1 in flight"),
                   ("reconnect", "reconnects (handshake + 1 request), 16 workers")]:
    if not os.path.exists(f"sqlite-{mode}-1.json"):
        continue
    print(f"\n{what}: medians of {rounds} alternating rounds")
    rows = {}
    for s in ("sqlite", "pg"):
        rate, cpu, dbcpu, q = [], [], [], []
        for r in range(1, rounds + 1):
            t = json.load(open(f"{s}-{mode}-{r}.json"))["targets"][0]
            n = t["rounds"][0]["count"]
            rate.append(t["per_sec"]); cpu.append(t["server_cpu_us"])
            if s == "pg":
                ticks, queries = map(int, open(f"pg-{mode}-{r}.db").read().split())
                dbcpu.append(ticks / hz * 1e6 / n); q.append(queries / n)
        rows[s] = (med(rate), med(cpu), med(dbcpu) if dbcpu else None, med(q) if q else None,
                   min(rate), max(rate))
    for s, (rate, cpu, dbcpu, q, lo, hi) in rows.items():
        extra = "" if dbcpu is None else f", database CPU {dbcpu:.1f} us/op, {q:.3f} statements/op"
        print(f"  {s:6}: {rate:,.0f}/s ({lo:,.0f}-{hi:,.0f}), tallyd CPU {cpu:.2f} us/op{extra}")
    print(f"  pg/sqlite: rate {rows['pg'][0] / rows['sqlite'][0]:.3f}x, tallyd CPU {rows['pg'][1] / rows['sqlite'][1]:.3f}x")
PY

echo
echo "revocation across nodes: tallyd revoke on node 0, sessions on node 1"
"$BIN/examples/fleet_revoke" "$BIN/tallyd" node0.toml creds-pg 127.0.0.1:7452 "$N_REVOKE" | sed 's/^/  /'
