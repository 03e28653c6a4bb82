"""Measures a `memflow live` session as a viewer sees it: prompts typed at set times, the page watched.

Starts `memflow live --serve 127.0.0.1:0` with the given model and device, waits for its first frame,
then types a prompt every `--every` seconds on its stdin. A client of the page's event stream notes
when each prompt shows on the page (the frame on screen is the first of its segment). At the end
(`--duration`) it prints one JSON line: per prompt, typed-to-page latency measured here, typed-to-accepted
(the session loop took it; sidecar `accepted_s`) and the session's own figures (sidecar), the stalls, and
with `--replay` whether `memflow render OUT.yaml` gives the same frames. Not part of the test suite.

    PYTHONPATH=. python tests/gpu_tools/live_session.py --out $OUT --model random --duration 90s --replay
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from tests.live import MEMFLOW, replay_options, same_frames

PROMPTS = [
    "A storm rolls in over the sea, dark clouds gathering above the lighthouse",
    "The old keeper climbs the spiral staircase with a lantern in his hand",
    "At the top the great lamp turns, its beam sweeping across the waves",
    "Dawn breaks over calm water, gulls circling the white tower",
    "A small fishing boat returns to the harbour below the cliff",
    "Children run along the beach beneath the lighthouse in the morning sun",
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="random")
    parser.add_argument("--device", default=None)
    parser.add_argument("--duration", default="90s")
    parser.add_argument("--every", type=float, default=10.0, help="seconds between typed prompts")
    parser.add_argument("--ahead", default="2")
    parser.add_argument("--replay", action="store_true", help="render OUT.yaml and compare the frames")
    parser.add_argument("--record", action="store_true",
                        help="record both runs' latents and frame hashes (recorded_run.py) and say where they part")
    parser.add_argument("--compile", action="store_true", help="the session compiled (--compile)")
    parser.add_argument("--decoder", choices=("wan", "tae"), default=None, help="live's --decoder (default: its own)")
    parser.add_argument("--cudnn-benchmark", default="default", help="with --record: on, off or default")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    target = args.out / "live.mp4"
    device = ["--device", args.device] if args.device else []
    tools = Path(__file__).parent

    def memflow(record: str) -> list[str]:
        if not args.record:
            return list(MEMFLOW)
        return [sys.executable, str(tools / "recorded_run.py"), "--record", str(args.out / record),
                "--cudnn-benchmark", args.cudnn_benchmark, "--"]  # fmt: skip

    session_options = ["--compile"] if args.compile else []
    session_options += [] if args.decoder is None else ["--decoder", args.decoder]
    command = [*memflow("live.pt"), "live", "--prompt", "A white lighthouse on a rocky cliff at dusk",
               "-o", str(target), "--model", args.model, *device, "--duration", args.duration, "--ahead", args.ahead,
               "--serve", "127.0.0.1:0", "--overwrite", *session_options]  # fmt: skip
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True)  # fmt: skip
    lines: list[tuple[float, str]] = []
    url: list[str] = []

    def read_stderr() -> None:
        assert process.stderr is not None
        for line in process.stderr:
            lines.append((time.monotonic(), line))
            sys.stderr.write(line)
            if line.startswith("watch and steer: "):
                url.append(line.split(": ", 1)[1].strip())

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    shown: dict[str, float] = {}  # prompt -> when the page first showed it

    def watch_page() -> None:
        with urllib.request.urlopen(url[0] + "events", timeout=600) as stream:
            for raw in stream:
                line = raw.decode().strip()
                if line.startswith("data: "):
                    status = json.loads(line[6:])
                    shown.setdefault(status["prompt"], time.monotonic())
                    if status.get("ended"):
                        return

    while not any("(chunk 0)" in line for _, line in lines):
        if process.poll() is not None:
            sys.exit(f"memflow live exited with code {process.returncode}")
        time.sleep(0.02)
    threading.Thread(target=watch_page, daemon=True).start()
    typed: dict[str, float] = {}
    assert process.stdin is not None
    for prompt in PROMPTS:
        time.sleep(args.every)
        if process.poll() is not None:
            break
        typed[prompt] = time.monotonic()
        try:
            process.stdin.write(prompt + "\n")
            process.stdin.flush()
        except BrokenPipeError:
            break
    process.wait()
    reader.join(timeout=10)
    sidecar = json.loads(target.with_suffix(".json").read_text())
    page = {p: round(shown[p] - t, 3) for p, t in typed.items() if p in shown}
    accepted = [round(1000 * (s["accepted_s"] - s["received_s"]), 3) for s in sidecar["live"]["segments"]
                if s.get("accepted_s") is not None]  # the session loop took the prompt and started its encoding
    result = {"returncode": process.returncode, "model": args.model, "ahead": int(args.ahead),
              "typed_to_page_s": list(page.values()), "typed_to_accepted_ms": accepted, "session": sidecar["live"],
              "chunks": sidecar["timeline"]["chunks"], "render_s": sidecar["timings"]["render_s"]}  # fmt: skip
    if args.replay:
        replay = args.out / "replay.mp4"
        script = target.with_suffix(".yaml")
        options = replay_options(script)  # the options the session's OUT.yaml names
        rendered = subprocess.run([*memflow("replay.pt"), "render", str(script), "-o", str(replay),
                                   *options, "-q", "--overwrite"], capture_output=True, text=True)  # fmt: skip

        result["replay_same_frames"] = rendered.returncode == 0 and same_frames(target, replay)
        result["replay_stderr_tail"] = rendered.stderr[-500:]
        if args.record:
            compared = subprocess.run([sys.executable, str(tools / "compare_runs.py"), str(args.out / "live.pt"),
                                       str(args.out / "replay.pt")], capture_output=True, text=True)  # fmt: skip
            result["compared"] = json.loads(compared.stdout) if compared.returncode == 0 else compared.stderr[-500:]
    line = json.dumps(result)
    (args.out / "live_summary.json").write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
