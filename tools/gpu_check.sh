#!/usr/bin/env bash
# One call on a machine with a real GPU: build, then `taming info`, `taming check`
# (every kernel against its CPU reference, every variant), `taming verify` on the
# PyTorch fixtures, `taming tune` (the autotuner's timings and winners), and
# `taming bench kernels|vqgan|gpt-sample|vqgan-train --json` with the tuned choices, and
# GPU-timestamp profiles (TAMING_PROFILE=gpu) of inference, sampling and a GPT training
# step, all output into the folder given as the argument (tar it where only a few files
# come back). Each step has a time limit so the whole run stays under 8 minutes (80 s on
# an H200); a step that fails or times out is recorded in summary.txt and the next one
# still runs.
#
#   tools/gpu_check.sh OUT_DIR            (TAMING_FIXTURES=DIR if the fixtures are elsewhere)
#
# TAMING_BIN=PATH uses a binary built elsewhere (a machine without Rust or without
# network for the crates) and skips the build. Without the shared fixtures, verify
# runs on the repository's own PyTorch-made fixtures in tests/data.
set -uo pipefail
out="${1:?usage: tools/gpu_check.sh OUT_DIR}"
cd "$(dirname "$0")/.."
mkdir -p "$out"
out="$(cd "$out" && pwd)"
summary="$out/summary.txt"
: > "$summary"
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}"
# A fresh verdict cache: this run's check is the one that counts.
export TAMING_CACHE_DIR="$out/cache"
started=$(date +%s)

step() {  # step NAME SECONDS FILE COMMAND...
  local name="$1" limit="$2" file="$3"; shift 3
  local t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" > "$out/$file" 2> "$out/$name.stderr"
  local rc=$?
  local secs=$(( $(date +%s) - t0 ))
  local verdict="ok"
  [ $rc -eq 124 ] && verdict="TIMED OUT after ${limit} s"
  [ $rc -ne 0 ] && [ $rc -ne 124 ] && verdict="exit $rc"
  printf '%-14s %-22s %4d s  -> %s\n' "$name" "$verdict" "$secs" "$file" | tee -a "$summary"
}

if [ -n "${TAMING_BIN:-}" ]; then
  bin="$TAMING_BIN"
  echo "build          SKIPPED: using $bin" | tee -a "$summary"
else
  if ! command -v cargo >/dev/null 2>&1; then
    echo "gpu_check: cargo not found; install Rust from https://rustup.rs or set TAMING_BIN" | tee -a "$summary"
    exit 1
  fi
  step build 200 build.txt cargo build --release
  bin=target/release/taming
fi
[ -x "$bin" ] || { echo "gpu_check: the build failed (see $out/build.stderr)" | tee -a "$summary"; exit 1; }

fixtures="${TAMING_FIXTURES:-}"
for d in "$fixtures" ../shared/fixtures shared/fixtures; do
  if [ -n "$d" ] && [ -d "$d/vqgan" ]; then fixtures="$d"; break; fi
done

step info 30 info.txt "$bin" info
step check 150 check.jsonl "$bin" check --json
if [ -d "$fixtures/vqgan" ]; then
  step verify 60 verify.txt "$bin" verify "$fixtures/vqgan" "$fixtures/transformer"
else
  own=$(ls -d tests/data/*/ | while read -r d; do [ -f "$d/model.safetensors" ] && echo "$d"; done)
  echo "verify         no shared fixtures (set TAMING_FIXTURES): the repository's own in tests/data" | tee -a "$summary"
  step verify 60 verify.txt "$bin" verify $own
fi
# Time every kernel choice here and cache the winners (the benches below then run with them).
step tune 90 tune.txt "$bin" tune
step bench-kernels 45 bench_kernels.jsonl "$bin" bench kernels --json --runs 5
step bench-vqgan 45 bench_vqgan.jsonl "$bin" bench vqgan --json --runs 3
step bench-gpt 45 bench_gpt_sample.jsonl "$bin" bench gpt-sample --json --runs 3
step bench-train 45 bench_vqgan_train.jsonl "$bin" bench vqgan-train --json --runs 2
# Where the GPU time goes: each dispatch timed by the device's timestamps (no per-dispatch waits).
# (The table goes to stderr: both streams into the file.)
profiled() { TAMING_PROFILE=gpu "$@" 2>&1; }
export -f profiled
step profile-vqgan 45 profile_vqgan.txt bash -c 'profiled "$0" bench vqgan --size 512 --runs 1' "$bin"
step profile-sample 45 profile_sample.txt bash -c 'profiled "$0" bench gpt-sample --runs 1' "$bin"
step profile-train 45 profile_train.txt bash -c 'profiled "$0" bench gpt-train --runs 2' "$bin"

{
  echo "device: $(grep -m1 '^using:' "$out/info.txt" 2>/dev/null | cut -d' ' -f2-)"
  echo "check: $(grep -c '"passed":true' "$out/check.jsonl" 2>/dev/null) passed, $(grep -c '"passed":false' "$out/check.jsonl" 2>/dev/null) failed"
  [ -f "$out/verify.txt" ] && echo "verify: $(tail -1 "$out/verify.txt")"
  echo "total: $(( $(date +%s) - started )) s"
} | tee -a "$summary"
