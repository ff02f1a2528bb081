#!/usr/bin/env bash
# Builds every fuzz target and runs each for SECONDS (default 60), one after another, then
# prints per target the executions run and the crashes found. Exits 1 when any target
# crashed (its input is in fuzz/artifacts/<target>/), 2 when a build or run failed.
#
#   fuzz/run.sh [SECONDS] [TARGET...]
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`) and a C++ compiler for libFuzzer.
set -uo pipefail
cd "$(dirname "$0")"

seconds="${1:-60}"
shift $(( $# > 0 ? 1 : 0 ))
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || [ "$seconds" -eq 0 ]; then
  echo "usage: fuzz/run.sh [SECONDS] [TARGET...]" >&2
  exit 2
fi
targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
  mapfile -t targets < <(cargo fuzz list)
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "cargo-fuzz is missing: cargo install cargo-fuzz" >&2
  exit 2
fi

# No sanitizer: AddressSanitizer needs the nightly-only -Zsanitizer, and the code under test
# is safe Rust, where ASan finds little. With `-s none` cargo fuzz passes only stable -C
# flags, so the stable toolchain builds it as is (no RUSTC_BOOTSTRAP).
fuzz_flags=(-s none --release --debug-assertions)

echo ">> building ${targets[*]}"
for t in "${targets[@]}"; do
  cargo fuzz build "${fuzz_flags[@]}" "$t" || exit 2
done

# libFuzzer writes new inputs to the first directory (ignored by git) and reads the
# committed seeds from the second.
mkdir -p logs
declare -A runs crashes
status=0
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "seeds/$t" "artifacts/$t"
  log="logs/$t.log"
  before=$(find "artifacts/$t" -type f | wc -l)
  echo ">> $t for ${seconds}s (log: fuzz/$log)"
  # -max_len: SIP messages reach 16 KiB; everything else stays far below it.
  cargo fuzz run "${fuzz_flags[@]}" "$t" "corpus/$t" "seeds/$t" -- \
    -max_total_time="$seconds" -max_len=16384 -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 >"$log" 2>&1
  rc=$?
  after=$(find "artifacts/$t" -type f | wc -l)
  # The final stats line; a run stopped by a crash prints it too.
  n=$(sed -n 's/^stat::number_of_executed_units: *\([0-9]*\).*/\1/p' "$log" | tail -1)
  if [ -z "$n" ]; then
    n=$(sed -n 's/^#\([0-9]*\)[[:space:]].*/\1/p' "$log" | tail -1)
  fi
  runs[$t]="${n:-0}"
  crashes[$t]=$((after - before))
  if [ "$rc" -ne 0 ] && [ "${crashes[$t]}" -eq 0 ]; then
    # libFuzzer failed without leaving an input (e.g. out of memory while loading).
    crashes[$t]="failed (exit $rc)"
    status=2
  elif [ "${crashes[$t]}" != 0 ]; then
    [ "$status" -eq 0 ] && status=1
    grep -m1 -A3 "panicked at" "$log" || true
  fi
done

echo
printf '%-18s %8s %16s %10s\n' target seconds executions crashes
for t in "${targets[@]}"; do
  printf '%-18s %8s %16s %10s\n' "$t" "$seconds" "${runs[$t]}" "${crashes[$t]}"
done
if [ "$status" -ne 0 ]; then
  echo "crash inputs: fuzz/artifacts/<target>/ (reproduce: cargo fuzz run -s none <target> <file>)"
fi
exit "$status"
