#!/usr/bin/env bash
# Time `render --update` after the last prompt of a 2-minute, 12-segment story is edited, against a fresh
# render of the edited story (neither keeps snapshots; the first render does, and its time is shown too), and
# check that both files are the same.
#   tests/gpu_tools/update_time.sh WORKDIR [render options, e.g. --model random --device cuda]
#   MEMFLOW='python3 -m memflow_cli' tests/gpu_tools/update_time.sh ...   # where no `memflow` script is installed
set -euo pipefail
read -r -a memflow <<< "${MEMFLOW:-memflow}"
work=${1:?usage: update_time.sh WORKDIR [render options...]}; shift
mkdir -p "$work" && cd "$work"
python3 - <<'PY'
prompts = ["a red fox trots across a snowy field", "the fox stops at the edge of a pine forest",
           "snow begins to fall between the trees", "the fox curls up under a fallen log",
           "night comes and the forest is quiet", "an owl watches from a branch", "the moon rises over the pines",
           "the fox wakes and stretches", "dawn light spreads across the snow", "the fox walks toward a frozen river",
           "ice cracks under its paws", "the fox reaches the far bank"]
def story(last):
    lines = ["title: fox", "seed: 0", "duration: 120s", "segments:"]
    for i, p in enumerate(prompts[:-1] + [last]):
        lines += [f"  - start: {10 * i}s", f"    prompt: {p}"]
    return "\n".join(lines) + "\n"
open("story.yaml", "w").write(story(prompts[-1]))
open("edited.yaml", "w").write(story("the fox disappears into the forest on the far bank"))
PY
s0=$(date +%s.%N); "${memflow[@]}" render story.yaml -o a.mp4 -q --overwrite --snapshots "$@"
cp a.json first.json  # its snapshots' sizes and its render time (with snapshots)
t0=$(date +%s.%N); "${memflow[@]}" render edited.yaml -o a.mp4 -q --update "$@"
t1=$(date +%s.%N); "${memflow[@]}" render edited.yaml -o b.mp4 -q --overwrite "$@"
t2=$(date +%s.%N)
python3 -c "
import json, sys
a, b, first = (json.load(open(name)) for name in ('a.json', 'b.json', 'first.json'))
s0, t0, t1, t2 = map(float, sys.argv[1:])
print(json.dumps({'update_process_s': round(t1 - t0, 2), 'fresh_process_s': round(t2 - t1, 2),
                  'update_render_s': a['timings']['render_s'], 'fresh_render_s': b['timings']['render_s'],
                  'first_with_snapshots_process_s': round(t0 - s0, 2),
                  'first_with_snapshots_render_s': first['timings']['render_s'],
                  'reused_frames': a['reused_frames'], 'video_frames': a['timeline']['video_frames'],
                  'snapshot_bytes': sum(f['bytes'] for f in first['snapshots']['files'])}))" "$s0" "$t0" "$t1" "$t2"
cmp a.mp4 b.mp4 && echo "same file: yes"
