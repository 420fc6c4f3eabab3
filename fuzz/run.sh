#!/usr/bin/env bash
# Runs every fuzz target for a bounded time on the stable toolchain.
#   fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]     (default: 120 seconds, all targets)
# Seeds: spec/vectors/ (fuzz/seeds.py) for the protocol targets, hand-written for the others
# (fuzz/seeds/TARGET/). Crashes land in fuzz/artifacts/TARGET/.
set -euo pipefail
cd "$(dirname "$0")"
secs=${1:-120}
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(frame_decoder enroll handshake session credential c_credential c_api config control)
command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked
python3 seeds.py seeds >/dev/null
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t"
  echo "== $t ($secs s)"
  # -s none: no sanitizer, so the stable toolchain suffices (the crate forbids unsafe code).
  cargo +stable fuzz run -s none "$t" "corpus/$t" "seeds/$t" -- \
    -max_total_time="$secs" -max_len=4096 -print_final_stats=1 2>&1 \
    | grep -E "^(#[0-9]+ *DONE|stat::number_of_executed_units|stat::peak_rss_mb|SUMMARY|==[0-9]+== ERROR|Done [0-9]+ runs)" || true
done
