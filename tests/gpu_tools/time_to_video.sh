#!/usr/bin/env bash
# Time to video on one GPU, as a user lives it: whole `memflow render` processes of the 30-second example on
# full-size random weights in the official layout, read through the real loaders. Not part of the test suite.
#
#   bash tests/gpu_tools/time_to_video.sh            # from the repository root; results in $OUT (default /tmp/ttv-out)
#   COMPILED=1 bash tests/gpu_tools/time_to_video.sh  # also `--compile` renders, cold and warm (about 3 more minutes)
#   SKIP_BENCH=1 ... / SKIP_RENDERS=1 ...             # one half each, where one call may last 10 minutes at most
#   WEIGHTS=demo RENDER_ARGS="--duration 1.5s --device cpu" BENCH_ARGS="--model demo --device cpu --frames 6" \
#     bash tests/gpu_tools/time_to_video.sh          # a dry run of the script on a CPU
#
# 1. writes the files once to $WEIGHTS (default /tmp/official; kept if already there);
# 2. renders scripts_examples/lighthouse.yaml with --model $WEIGHTS, one process each: cold (empty compile caches),
#    warm (the caches the cold one left), --no-compile; [COMPILED=1: --compile cold, --compile warm];
# 3. memflow bench --random-weights --time-to-video (steady state, and two render processes of its own).
# Each step has a time limit and a failure does not stop the next. Prints timestamps; writes up to 8 JSON files.
set -x
export PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python}
OUT=${OUT:-/tmp/ttv-out}
WEIGHTS=${WEIGHTS:-/tmp/official}
STORY=${STORY:-scripts_examples/lighthouse.yaml}
RENDER_ARGS=${RENDER_ARGS:-}  # e.g. "--duration 0.75s" for a dry run
BENCH_ARGS=${BENCH_ARGS:---random-weights}  # e.g. "--model demo --device cpu --frames 6" for a dry run on a CPU
CACHE=$(mktemp -d /tmp/memflow-ttv-cache.XXXXXX)  # empty compile caches: MEMFLOW_CACHE_DIR for every render here
mkdir -p "$OUT"
unset TORCHINDUCTOR_CACHE_DIR TRITON_CACHE_DIR
export MEMFLOW_CACHE_DIR=$CACHE
stamp() { echo "=== $(date -u +%H:%M:%S) $*"; }

stamp "start"; nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true
$PYTHON -c "import torch, memflow_cli; print('torch', torch.__version__, 'cuda', torch.version.cuda, memflow_cli.__file__)"

case $WEIGHTS in
  demo|random) ;;  # a built-in model (a dry run): no files
  *)
    if [ ! -f "$WEIGHTS/Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth" ]; then
      stamp "writing the official layout to $WEIGHTS"
      timeout 240 $PYTHON -m memflow_cli.random_model "$WEIGHTS" || stamp "FAILED: writing the files"
    fi
    du -sh "$WEIGHTS"
    cat "$WEIGHTS"/*.pt "$WEIGHTS"/Wan2.1-T2V-1.3B/*.pth > /dev/null  # in the page cache, as the targets assume
    ;;
esac

render() {  # render NAME [options...]: one whole process, its wall time, its sidecar copied to $OUT/NAME.json
  local name=$1; shift
  stamp "render $name $*"
  local start end
  start=$(date +%s.%N)
  # shellcheck disable=SC2086  # RENDER_ARGS is a list of options
  timeout 300 $PYTHON -m memflow_cli render "$STORY" --model "$WEIGHTS" -o "/tmp/out-$name.mp4" --overwrite -q \
    $RENDER_ARGS "$@" \
    || stamp "FAILED: render $name"
  end=$(date +%s.%N)
  stamp "render $name: process $(awk "BEGIN { print $end - $start }") s"
  [ -f "/tmp/out-$name.json" ] && $PYTHON - "$name" "$start" "$end" "/tmp/out-$name.json" "$OUT/$name.json" <<'PY'
import json, sys
name, start, end, source, target = sys.argv[1:]
meta = json.load(open(source))
meta["process_s"] = round(float(end) - float(start), 3)
json.dump(meta, open(target, "w"), indent=1)
t = meta["timings"]
print(f"{name}: process {meta['process_s']:.1f} s, compile {meta['compile']!r} ({meta.get('compile_reason')}), "
      + ", ".join(f"{k} {v}" for k, v in t.items()))
PY
}

if [ -z "$SKIP_RENDERS" ]; then
  render cold
  render warm
  render no-compile --no-compile
  if [ -n "$COMPILED" ]; then
    rm -rf "$CACHE"; mkdir -p "$CACHE"
    render compiled-cold --compile
    render compiled-warm --compile
  fi
fi

if [ -z "$SKIP_BENCH" ]; then
  stamp "bench $BENCH_ARGS --time-to-video"
  # shellcheck disable=SC2086
  timeout 420 $PYTHON -m memflow_cli bench $BENCH_ARGS --time-to-video > /tmp/ttv-bench.txt 2>&1 \
    || stamp "FAILED: bench"
  tail -n 40 /tmp/ttv-bench.txt
  tail -n 1 /tmp/ttv-bench.txt > "$OUT/bench.json"
fi

stamp "summary"
$PYTHON - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rows = {}
for path in sorted(out.glob("*.json")):
    if path.name in ("bench.json", "summary.json"):
        continue
    meta = json.loads(path.read_text())
    rows[path.stem] = {"process_s": meta["process_s"], "compile": meta["compile"], **meta["timings"]}
try:
    bench = json.loads((out / "bench.json").read_text())
    rows["bench"] = {k: bench.get(k) for k in ("fps_generate", "fps_decode", "fps_end_to_end", "attention", "warmup_s")}
    rows["bench_time_to_video"] = bench.get("time_to_video_s")
except (OSError, ValueError) as error:
    rows["bench"] = f"no JSON line: {error}"
(out / "summary.json").write_text(json.dumps(rows, indent=1))
print(json.dumps(rows, indent=1))
PY
rm -rf "$CACHE"
stamp "done"
