#!/usr/bin/env bash
# Render every narrative script of a folder into one output folder, one `memflow render` per script.
#
#   scripts_examples/batch_render.sh SCRIPTS_DIR OUT_DIR [memflow render options...]
#   scripts_examples/batch_render.sh scripts_examples out --model demo --duration 3s
#
# Scripts are the *.yaml, *.yml and *.jsonl files of SCRIPTS_DIR (not its subfolders), in name order; a folder,
# pipe or broken link with such a name fails (memflow check says what it is).
# memflow names the outputs (`memflow check --json`) and decides what is finished (`render --skip-existing`:
# a video whose metadata records the same story, seed, settings and length); a preview is not a finished
# full render. Run again after any stop (Ctrl-C, kill -9, a crash), the batch resumes: finished videos are
# skipped, a story whose render died continues from its last snapshot (with --snapshots), else from the start,
# and a story another memflow process
# is rendering now is left to it ("in progress"). With --overwrite, videos that are not a finished render of
# the same request (a preview, other settings) are replaced; finished ones are still skipped. Two scripts
# whose stories would write the same file: the later one fails. A failed script is logged to
# OUT_DIR/failures.log and the batch goes on; Ctrl-C stops the batch (the current render keeps its playable
# partial file and names it).
#
# Exit code: 0 if every script was rendered, skipped or is in progress elsewhere, 1 if any failed,
# 130 if interrupted. MEMFLOW (default: memflow) names the command to run.

set -uo pipefail
shopt -s nullglob nocasematch

if [[ $# -lt 2 || $1 == -h || $1 == --help ]]; then
    sed -n '2,21p' "$0" | sed 's/^# \{0,1\}//'
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

rendered=0
skipped=0
failed=0
in_progress=0
errors=$(mktemp)
trap 'rm -f "$errors"' EXIT
declare -A writer_of  # output file (as memflow's JSON writes it, lower-cased: X.mp4 and x.MP4 are one) -> its script

log_failure() {  # script, one-line reason; memflow's messages are in $errors
    local script=$1 reason=$2
    failed=$((failed + 1))
    {
        echo "$(date -u +%Y-%m-%dT%H:%M:%SZ) $script: $reason"
        sed 's/^/    /' "$errors"
    } >>"$failures_log"
    echo "failed: $script ($reason, see $failures_log)" >&2
}

# The outputs of a script's stories, one a line, exactly as `memflow check --json` spells them (JSON string
# contents: compared, never decoded).
outputs_of() {
    sed -n -E 's/.*"output": "((\\.|[^"\\])*)".*/\1/p'
}

for script in "$scripts_dir"/*; do
    case $script in
        *.yaml | *.yml | *.jsonl) ;;  # a folder, a pipe or a broken link: memflow check says what it is
        *) continue ;;
    esac
    if ! stories=$("$memflow" check "$script" --out-dir "$out_dir" --json 2>"$errors"); then
        cat "$errors" >&2
        log_failure "$script" "memflow check failed"
        continue
    fi
    clash=
    while IFS= read -r output; do
        key=${output,,}
        if [[ -n ${writer_of[$key]+set} && ${writer_of[$key]} != "$script" ]]; then
            clash="a story would write $output, which ${writer_of[$key]} writes in this batch"
        fi
    done < <(printf '%s\n' "$stories" | outputs_of)
    if [[ -n $clash ]]; then
        echo "error: $clash; give it another title" >"$errors"
        cat "$errors" >&2
        log_failure "$script" "$clash"
        continue
    fi
    while IFS= read -r output; do
        writer_of[${output,,}]=$script
    done < <(printf '%s\n' "$stories" | outputs_of)

    echo "render: $script" >&2
    # memflow's stdout goes to ours; its stderr to the terminal and to a file for the log.
    # tee -i survives Ctrl-C, so memflow can still say where its partial file is.
    {
        "$memflow" render "$script" --out-dir "$out_dir" --skip-existing "$@" 2>&1 >&3 3>&- |
            tee -i "$errors" >&2 3>&-
        status=${PIPESTATUS[0]}
    } 3>&1
    if [[ $status == 0 ]]; then
        story_count=$(printf '%s\n' "$stories" | grep -c .)
        skips=$(grep -c '^skip: ' "$errors")
        busy=$(grep -c '^in progress: ' "$errors")
        if [[ $skips == "$story_count" ]]; then
            skipped=$((skipped + 1))
        elif [[ $((skips + busy)) == "$story_count" ]]; then
            in_progress=$((in_progress + 1))
        else
            rendered=$((rendered + 1))
        fi
    elif [[ $status == 129 || $status == 130 || $status == 143 ]]; then
        echo "interrupted: stopped at $script" >&2
        exit 130
    else
        log_failure "$script" "memflow render exited with $status"
    fi
done

summary="batch: $rendered rendered, $skipped skipped, $failed failed"
[[ $in_progress -gt 0 ]] && summary+=", $in_progress in progress elsewhere"
echo "$summary"
if [[ $failed -gt 0 ]]; then
    echo "failures are logged in $failures_log" >&2
    exit 1
fi
