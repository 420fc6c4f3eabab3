#!/usr/bin/env bash
# Tally beside the limit and its peers, in one interleaved run of one load tool:
#
#   plain    examples/bench_plain.rs: a minimal TCP echo (the limit)
#   tally    tallyd with the echo backend, encrypted sessions (the default mode)
#   tally-auth  the same daemon, authenticated-only sessions (its policy allows both)
#   tls-psk  examples/bench_tls_psk.rs: a TLS 1.3 PSK echo of the same build (tokio, OpenSSL)
#   spiped   spiped's server end in front of the plain echo; the load tool speaks plain TCP
#            to spiped's client end (CPU counted: spiped server + echo)
#   stunnel  stunnel (TLS 1.3 PSK) in front of the plain echo; the load tool speaks TLS-PSK
#            to it directly (CPU counted: stunnel + echo)
#
# Usage: benches/peers.sh [LOAD...]     LOAD: 64 | 1k | 16k | depth8 | reconnect | idle
#                                      (default: all)
# Environment: ROUNDS (5), DURATION (3 s), WORK (/tmp/tally-peers), PEERS=0 to skip
# spiped and stunnel, IDLE_COUNTS ("1000 19000"), SESSION (both | encrypted |
# authenticated: which tally targets), BEFORE=path/to/an/older/tallyd to measure it too
# (as `before`, authenticated sessions, on a copy of the state directory; BEFORE_SCHEMA
# sets the copy's schema version back for a build that knows fewer). SPEC_LOAD=1 runs
# the same loads (64, 1k, depth8, reconnect) from a second, independent client too:
# benches/spec-load (written from spec/ alone), against tallyd and the plain echo, in
# rounds of its own, each a JSON line with the server's CPU per operation. BIN= a
# directory of prebuilt binaries (e.g. target/profiling) skips the build.
# Installs spiped and stunnel4 with apt-get when missing (root). Not part of `cargo test`.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${WORK:-/tmp/tally-peers}
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-3}
PEERS=${PEERS:-1}
IDLE_COUNTS=${IDLE_COUNTS:-"1000 19000"}
SESSION=${SESSION:-both}
BEFORE=${BEFORE:-}
LOADS=("$@")
[ ${#LOADS[@]} -gt 0 ] || LOADS=(64 1k 16k depth8 reconnect idle)

if [ "$PEERS" = 1 ] && ! { command -v spiped && command -v stunnel4; } >/dev/null; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq spiped stunnel4
fi
if [ -z "${BIN:-}" ]; then
  (cd "$ROOT" && cargo build --quiet --release --features bench-tls --bins --examples)
  BIN="$ROOT/target/release"
fi
SL=
if [ "${SPEC_LOAD:-0}" = 1 ]; then
  (cd "$ROOT/benches/spec-load" && cargo build --quiet --release)
  SL="$ROOT/benches/spec-load/target/release/spec-load"
fi

mkdir -p "$WORK"
cd "$WORK"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
ulimit -n "$(ulimit -Hn)"

# tallyd at its defaults (log level info, logging to a file), the per-source limits
# lifted: every load comes from one address.
cat > tallyd.toml <<'EOF'
encryption = "allowed"
[limits]
max_connections = 30000
max_unauthenticated = 1024
max_unauthenticated_per_source = 100000
new_connections_per_source = 100000
enrollments_per_second = 100000
max_enrollments_in_progress = 1000
EOF
"$BIN/tallyd" --config tallyd.toml --state-dir state --listen 127.0.0.1:7420 >tallyd.log 2>&1 &
pids+=($!); TALLYD=$!
"$BIN/examples/bench_plain" 127.0.0.1:7421 2>/dev/null & pids+=($!); PLAIN=$!
"$BIN/examples/bench_tls_psk" 127.0.0.1:7422 2>/dev/null & pids+=($!)
peer_args=()
if [ "$PEERS" = 1 ]; then
  [ -f spiped.key ] || head -c 32 /dev/urandom > spiped.key
  spiped -d -F -n 20000 -s '[127.0.0.1]:7431' -t '[127.0.0.1]:7421' -k spiped.key & pids+=($!); SPIPED_D=$!
  spiped -e -F -n 20000 -s '[127.0.0.1]:7432' -t '[127.0.0.1]:7431' -k spiped.key & pids+=($!)
  printf '%s:%s\n' bench tally-bench-psk-not-a-secret-0123 > psk.txt
  chmod 600 psk.txt
  cat > stunnel.conf <<EOF
foreground = yes
pid =
[echo]
accept = 127.0.0.1:7433
connect = 127.0.0.1:7421
PSKsecrets = $WORK/psk.txt
sslVersionMin = TLSv1.3
ciphersuites = TLS_AES_128_GCM_SHA256
EOF
  stunnel4 stunnel.conf 2>stunnel.log & pids+=($!); STUNNEL=$!
  peer_args=(--peer "spiped=plain:127.0.0.1:7432@$SPIPED_D,$PLAIN"
             --peer "stunnel=tls-psk:127.0.0.1:7433@$STUNNEL,$PLAIN")
fi
sleep 1
TOKEN=$("$BIN/tallyd" token --state-dir state)
if [ -n "$BEFORE" ]; then
  # The bench identities enrolled first, then the state copied for the older daemon.
  "$BIN/tally" bench --server 127.0.0.1:7420 --token "$TOKEN" --cred-dir creds \
    --mode idle -c 64 --rounds 1 --duration 1 >/dev/null
  sleep 1
  rm -rf state-before; cp -a state state-before; rm -f state-before/tallyd.lock state-before/tallyd.sock
  # An older build may know fewer schema versions (BEFORE_SCHEMA: 1 for one before the
  # durable queue): its copy says the one it knows; the newer tables and columns stay,
  # unused by it.
  [ -z "${BEFORE_SCHEMA:-}" ] || sqlite3 state-before/identities.db "PRAGMA user_version = $BEFORE_SCHEMA"
  "$BEFORE" --config tallyd.toml --state-dir state-before --listen 127.0.0.1:7425 >before.log 2>&1 &
  OLD=$!
  sleep 1
  if ! kill -0 "$OLD" 2>/dev/null; then
    # A build from before `encryption` refuses the key: without it.
    grep -v '^encryption' tallyd.toml > tallyd-before.toml
    "$BEFORE" --config tallyd-before.toml --state-dir state-before --listen 127.0.0.1:7425 >before.log 2>&1 &
    OLD=$!
    sleep 1
  fi
  pids+=("$OLD")
  peer_args+=(--peer "before=tally-auth:127.0.0.1:7425@$OLD")
fi
T=("$BIN/tally" bench --server 127.0.0.1:7420 --token "$TOKEN" --cred-dir creds
   --daemon-pid "$TALLYD" --session "$SESSION")
R=(--rounds "$ROUNDS" --duration "$DURATION")
ALL=(--plain 127.0.0.1:7421 --tls-psk 127.0.0.1:7422 "${peer_args[@]}")

run() { echo; echo "\$ tally bench $*"; "${T[@]}" "$@"; }
# The second client, ROUNDS rounds, each: plain, then tallyd in each SESSION mode.
spec_load() {
  [ -n "$SL" ] || return 0
  local kind=$1; shift
  local modes=(encrypted authenticated)
  [ "$SESSION" = both ] || modes=("$SESSION")
  for _ in $(seq "$ROUNDS"); do
    if [ "$kind" = run ]; then
      echo "\$ spec-load plain $* --server-pid $PLAIN"
      "$SL" plain --server 127.0.0.1:7421 --server-pid "$PLAIN" "$@"
    fi
    for mode in "${modes[@]}"; do
      echo "\$ spec-load $kind --mode $mode $* --server-pid $TALLYD"
      "$SL" "$kind" --server 127.0.0.1:7420 --credential creds --mode "$mode" --server-pid "$TALLYD" "$@"
    done
  done
}
for load in "${LOADS[@]}"; do
  case $load in
    64) run "${ALL[@]}" "${R[@]}" -c 64 --payload 64 --depth 1
        spec_load run --conns 64 --depth 1 --size 64 --seconds "$DURATION" ;;
    1k) run "${ALL[@]}" "${R[@]}" -c 64 --payload 1024 --depth 1
        spec_load run --conns 64 --depth 1 --size 1024 --seconds "$DURATION" ;;
    16k) run "${ALL[@]}" "${R[@]}" -c 64 --payload 16384 --depth 1 ;;
    depth8) run "${ALL[@]}" "${R[@]}" -c 64 --payload 64 --depth 8
        spec_load run --conns 64 --depth 8 --size 64 --seconds "$DURATION" ;;
    # Each reconnect leaves a TIME_WAIT socket: 2-second rounds stay within the
    # ephemeral ports of one address.
    reconnect) sleep 5; run "${ALL[@]}" --rounds "$ROUNDS" --duration 2 --mode reconnect -c 16 --payload 64
        spec_load reconnect --workers 16 --seconds 2 ;;
    idle) for n in $IDLE_COUNTS; do
            run --mode idle -c "$n" --rounds 1 --duration 3
          done ;;
    *) echo "unknown load $load" >&2; exit 2 ;;
  esac
done
