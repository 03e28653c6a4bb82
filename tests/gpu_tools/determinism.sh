#!/usr/bin/env bash
# Does one story render to the same latents and frames in two processes, with cuDNN's autotuning on and off?
# Does a live session's replay? And what does autotuning buy the decoder? One JSON line per comparison.
# Full-size random weights, eager. Not part of the test suite.
#   OUT=/tmp/det bash tests/gpu_tools/determinism.sh
set -u
OUT=${OUT:-/tmp/determinism}
mkdir -p "$OUT"
story=$OUT/story.yaml
cat > "$story" <<'YAML'
title: determinism
seed: 7
duration: 9s
segments:
  - {start: 0s, prompt: "A white lighthouse on a rocky cliff at dusk, waves below"}
  - {start: 3s, prompt: "A storm rolls in over the sea, dark clouds above the lighthouse"}
  - {start: 6s, prompt: "Dawn breaks over calm water, gulls circling the white tower"}
YAML
tools=$(dirname "$0")
for mode in ${MODES:-on off}; do
  for i in 1 2; do
    python3 "$tools/recorded_run.py" --record "$OUT/$mode$i.pt" --cudnn-benchmark "$mode" -- \
      render "$story" -o "$OUT/$mode$i.mp4" --model random --no-compile -q --overwrite || echo "render $mode$i failed"
  done
  python3 "$tools/compare_runs.py" "$OUT/${mode}1.pt" "$OUT/${mode}2.pt"
done
if [ -z "${SKIP_LIVE:-}" ]; then
  python3 "$tools/live_session.py" --out "$OUT/live" --model random --duration "${LIVE_DURATION:-30s}" --every 6 \
    --replay --record --cudnn-benchmark "${LIVE_CUDNN:-default}" 2>"$OUT/live_stderr.txt" | tail -1
fi
if [ -z "${SKIP_BENCH:-}" ]; then
  for mode in on off; do
    python3 "$tools/recorded_run.py" --record "$OUT/bench_$mode.pt" --cudnn-benchmark "$mode" -- \
      bench --random-weights --no-compile --frames 120 2>/dev/null | tail -1
  done
fi
