#!/usr/bin/env bash
# Render every narrative script of a folder into one output folder, one `memflow render` per script.
#
#   scripts_examples/batch_render.sh SCRIPTS_DIR OUT_DIR [memflow render options...]
#   scripts_examples/batch_render.sh scripts_examples out --model demo --duration 3s
#
# Scripts are the *.yaml, *.yml and *.jsonl files of SCRIPTS_DIR (not its subfolders), in name order.
# A script is skipped when its MP4s exist already: OUT_DIR/<title>.mp4 for a YAML story (the `title:`
# line, else the file name), OUT_DIR/<stem>-<line>.mp4 for every story of a JSONL file. A failed script
# is logged to OUT_DIR/failures.log and the batch goes on; Ctrl-C stops the whole batch (the current
# render keeps its playable .partial.mp4). Output paths go to stdout, a summary at the end.
#
# Exit code: 0 if every script was rendered or skipped, 1 if any failed, 130 if interrupted.
# MEMFLOW (default: memflow) names the command to run.

set -uo pipefail
shopt -s nullglob nocasematch

if [[ $# -lt 2 || $1 == -h || $1 == --help ]]; then
    sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
scripts_dir=$1
out_dir=$2
shift 2
memflow=${MEMFLOW:-memflow}

if [[ ! -d $scripts_dir ]]; then
    echo "error: $scripts_dir is not a folder" >&2
    exit 2
fi
mkdir -p "$out_dir" || exit 1
failures_log=$out_dir/failures.log

# The title of a YAML story: its top-level `title:` (quotes and a trailing comment removed), else the file stem.
yaml_title() {
    local script=$1 raw title
    raw=$(sed -n -E 's/^title:[[:space:]]*(.*)$/\1/p' "$script" | head -n 1)
    raw=$(printf '%s' "$raw" | sed -E 's/[[:space:]]+#.*$//; s/^"(.*)"$/\1/; s/^'\''(.*)'\''$/\1/; s/[[:space:]]+$//')
    # as memflow names the file: characters that cannot be in a file name become '_'
    title=$(printf '%s' "$raw" | sed -E 's#[/\\:*?"<>|[:cntrl:]]#_#g; s/^[ .]+//; s/[ .]+$//')
    if [[ -z $raw ]]; then
        title=$(basename "${script%.*}")  # no title: memflow uses the file name
    elif [[ -z $title ]]; then
        title=untitled  # a title of dots and spaces only: memflow's fallback name
    fi
    printf '%s\n' "$title"
}

# The MP4s a script renders to, one a line.
expected_outputs() {
    local script=$1 stem
    case $script in
        *.jsonl)
            stem=$(basename "${script%.*}")
            awk -v dir="$out_dir" -v stem="$stem" 'NF { printf "%s/%s-%03d.mp4\n", dir, stem, NR }' "$script"
            ;;
        *)
            printf '%s/%s.mp4\n' "$out_dir" "$(yaml_title "$script")"
            ;;
    esac
}

all_exist() {
    local path any=0
    while IFS= read -r path; do
        [[ -e $path ]] || return 1
        any=1
    done
    [[ $any == 1 ]]
}

rendered=0
skipped=0
failed=0
errors=$(mktemp)
trap 'rm -f "$errors"' EXIT

for script in "$scripts_dir"/*; do
    case $script in
        *.yaml | *.yml | *.jsonl) [[ -f $script ]] || continue ;;
        *) continue ;;
    esac
    if expected_outputs "$script" | all_exist; then
        echo "skip: $script (output exists)" >&2
        skipped=$((skipped + 1))
        continue
    fi
    echo "render: $script" >&2
    # memflow's stdout goes to ours; its stderr to the terminal and to a file for the log.
    # tee -i survives Ctrl-C, so memflow can still say where its partial file is.
    {
        "$memflow" render "$script" --out-dir "$out_dir" "$@" 2>&1 >&3 3>&- | tee -i "$errors" >&2 3>&-
        status=${PIPESTATUS[0]}
    } 3>&1
    if [[ $status == 0 ]]; then
        rendered=$((rendered + 1))
    elif [[ $status == 130 ]]; then
        echo "interrupted: stopped at $script" >&2
        exit 130
    else
        failed=$((failed + 1))
        {
            echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) $script: memflow render exited with $status"
            sed 's/^/    /' "$errors"
        } >>"$failures_log"
        echo "failed: $script (exit $status, see $failures_log)" >&2
    fi
done

echo "batch: $rendered rendered, $skipped skipped, $failed failed"
if [[ $failed -gt 0 ]]; then
    echo "failures are logged in $failures_log" >&2
    exit 1
fi
