"""The `memflow` commands, run for real on the demo model: check, render, weights, and batch_render.sh.

Expected timelines are computed here from the rules (see `cli_helpers`), not read back from the code. A render
whose subject is not the decoder (options, names, sidecars, determinism) runs on the demo's TAEHV decoder (`TAE`);
the two-prompt story and the streaming decode run on the default Wan VAE.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from memflow_cli.decode import StreamingDecoder
from memflow_cli.engine import load_engine
from memflow_cli.generator import MemFlowGenerator, SeededNoise
from memflow_cli.output import partial_path, sidecar_path
from memflow_cli.script import parse_time
from memflow_cli.settings import GenerationSettings

from .cli_helpers import (
    CHUNK_S,
    DEMO,
    EXAMPLES,
    FPS,
    HEIGHT,
    JSONL_SEGMENT_S,
    STORIES,
    TAE,
    WIDTH,
    assert_video,
    chunks_until,
    decoded,
    memflow,
    video_frames,
    write_jsonl,
    write_story,
)

# ---------------------------------------------------------------------------------------------------------------------
# check: timelines of every shared story


def expected_timelines(path: Path) -> list[dict]:
    """The timelines of a script's stories, computed from the file with the grid rules above."""
    if path.suffix == ".jsonl":
        lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        stories = [
            ([i * JSONL_SEGMENT_S for i in range(len(line["prompts"]))], len(line["prompts"]) * JSONL_SEGMENT_S)
            for line in lines
        ]
    else:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        starts = [parse_time(segment["start"]) for segment in data["segments"]]
        stories = [(starts, parse_time(data["duration"]) if "duration" in data else starts[-1] + JSONL_SEGMENT_S)]
    timelines = []
    for starts, duration in stories:
        chunks = chunks_until(duration)
        first = [chunks_until(start) for start in starts]
        ends = [*first[1:], chunks]
        segments = [
            (i, starts[i], c * CHUNK_S, c, video_frames(end) - video_frames(c))
            for i, (c, end) in enumerate(zip(first, ends, strict=True))
        ]
        timelines.append({"chunks": chunks, "frames": video_frames(chunks), "segments": segments})
    return timelines


_ROW = re.compile(r"^[│|]\s*(\d+)\s*[│|]\s*([\d.]+)s\s*[│|]\s*([\d.]+)s\s*[│|]\s*(\d+)\s*[│|]\s*(\d+)\s*[│|]")
_CAPTION = re.compile(r"(\d+) chunks, (\d+) latent frames, (\d+) video frames, ([\d.]+) s")


def printed_timelines(stdout: str) -> list[dict]:
    """The timelines `memflow check` printed: its table rows, closed by each table's caption."""
    timelines, rows = [], []
    for line in stdout.splitlines():
        if row := _ROW.match(line.strip()):
            index, start, snapped, chunk, frames = row.groups()
            rows.append((int(index), float(start), float(snapped), int(chunk), int(frames)))
        elif caption := _CAPTION.search(line):
            chunks, latent, frames, seconds = caption.groups()
            assert int(latent) == 3 * int(chunks)
            assert float(seconds) == pytest.approx(int(frames) / FPS, abs=0.005)
            timelines.append({"chunks": int(chunks), "frames": int(frames), "segments": rows})
            rows = []
    return timelines


SHARED_SCRIPTS = sorted([*STORIES.glob("*.yaml"), *STORIES.glob("*.jsonl")]) if STORIES.is_dir() else []
needs_shared = pytest.mark.skipif(not SHARED_SCRIPTS, reason=f"no stories in {STORIES} (set MEMFLOW_SHARED_DIR)")


@needs_shared
@pytest.mark.parametrize("script", SHARED_SCRIPTS, ids=lambda path: path.name)
def test_check_prints_the_resolved_timeline_of_every_shared_story(script: Path):
    result = memflow("check", script)
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    expected = expected_timelines(script)
    printed = printed_timelines(result.stdout)
    assert len(printed) == len(expected)
    for got, want in zip(printed, expected, strict=True):
        assert got["chunks"] == want["chunks"] and got["frames"] == want["frames"]
        assert got["segments"] == [pytest.approx(segment) for segment in want["segments"]]
    assert result.stdout.rstrip().endswith("ok: 1 script(s) valid")


@needs_shared
def test_check_example_000_numbers():
    result = memflow("check", STORIES / "example-000.yaml")
    (timeline,) = printed_timelines(result.stdout)
    assert (timeline["chunks"], timeline["frames"]) == (80, 957)
    # 10s -> chunk 14 (10.5 s), 20s -> 27 (20.25 s), 30s -> 40 exactly, 40s -> 54, 50s -> 67
    assert [(snapped, chunk) for _, _, snapped, chunk, _ in timeline["segments"]] == [
        (0, 0), (10.5, 14), (20.25, 27), (30, 40), (40.5, 54), (50.25, 67),
    ]  # fmt: skip
    assert [frames for *_, frames in timeline["segments"]] == [165, 156, 156, 168, 156, 156]
    assert "59.81 s" in result.stdout


@needs_shared
def test_check_takes_many_scripts_at_once():
    result = memflow("check", *SHARED_SCRIPTS)
    assert result.exit_code == 0, result.stderr
    assert len(printed_timelines(result.stdout)) == sum(len(expected_timelines(s)) for s in SHARED_SCRIPTS)
    assert f"ok: {len(SHARED_SCRIPTS)} script(s) valid" in result.stdout


def test_check_the_example_scripts():
    scripts = sorted(path for path in EXAMPLES.iterdir() if path.suffix in (".yaml", ".yml", ".jsonl"))
    assert len(scripts) >= 2
    result = memflow("check", *scripts)
    assert result.exit_code == 0, result.stderr
    for script in scripts:
        assert printed_timelines(memflow("check", script).stdout) == expected_timelines(script)


def write_long_prompt_story(path: Path, words: int) -> Path:
    """Two segments, at 0s and 1.5s, the second a prompt of `words` words (6 words repeated)."""
    prompt = " ".join(["a lighthouse keeper climbs the stairs"] * (words // 6))
    segments = f"segments:\n  - start: 0s\n    prompt: a fox\n  - start: 1.5s\n    prompt: {prompt}\n"
    path.write_text(f"title: long\nduration: 3s\n{segments}", encoding="utf-8")
    return path


def test_check_warns_about_a_prompt_the_text_encoder_cuts(tmp_path: Path):
    script = write_long_prompt_story(tmp_path / "long.yaml", 10_002)
    result = memflow("check", script)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.rstrip().endswith("ok: 1 script(s) valid")
    (line,) = result.stderr.strip().splitlines()
    # the rough count: a word of n letters is ceil(n/4) tokens, so the 6 words are 1+3+2+2+1+2 = 11 tokens;
    # 1667 repeats and the end token are 18338; 46 repeats (276 words) and "a lighthouse" fit 512 with the end token
    assert line == (
        f"warning: 'long' ({script}): segment 1 (at 1.5s): 10002 words, about 18338 tokens by a rough count; "
        "the text encoder reads 512, so everything after about word 278 ('...keeper climbs the stairs a "
        "lighthouse') is likely dropped"
    )


def test_render_counts_a_cut_prompt_with_the_models_tokenizer(tmp_path: Path, tokenizer):
    script = write_long_prompt_story(tmp_path / "long.yaml", 600)
    result = memflow("render", script, *DEMO, *TAE, "-o", tmp_path / "long.mp4", "-q", "--duration", "2.25s")
    assert result.exit_code == 0, result.stderr
    words = (" ".join(["a lighthouse keeper climbs the stairs"] * 100)).split()
    tokens = len(tokenizer(" ".join(words))["input_ids"])
    kept = max(n for n in range(len(words) + 1) if len(tokenizer(" ".join(words[:n]))["input_ids"]) <= 256)
    warning = f"warning: 'long' ({script}): segment 1 (at 1.5s): 600 words, {tokens} tokens; the text encoder reads "
    warning += f"256, so everything after word {kept} ('...{' '.join(words[kept - 6 : kept])}') is dropped"
    assert warning in result.stderr.splitlines()


def test_check_does_not_read_prompts_as_markup(tmp_path: Path):
    script = tmp_path / "brackets.yaml"
    script.write_text('title: "[draft] fox"\nsegments:\n  - start: 0s\n    prompt: "[pan left] a fox [/pan]"\n')
    result = memflow("check", script)
    assert result.exit_code == 0, result.stderr
    assert "[draft] fox" in result.stdout and "[pan left] a fox [/pan]" in result.stdout


# ---------------------------------------------------------------------------------------------------------------------
# check and render: a bad script is one line naming file:line, field and fix; exit 2


BAD_SCRIPTS = {
    "two starts in one chunk": (
        "snap.yaml", "segments:\n- start: 0s\n  prompt: a\n- start: 5s\n  prompt: b\n- start: 5.2s\n  prompt: c\n",
        "6: segments[2].start:", "0.75 s apart",
    ),
    "misspelt key": (
        "key.yaml", "segments:\n- start: 0s\n  promt: a\n", "3: segments[0].promt:", "did you mean 'prompt'",
    ),
    "not a time": ("time.yaml", "segments:\n- start: ten\n  prompt: a\n", "2: segments[0].start:", "write it like 10s"),
    "first start not 0": ("first.yaml", "segments:\n- start: 2s\n  prompt: a\n", "2: segments[0].start:", "at 0s"),
    "start after the end": (
        "late.yaml", "duration: 10s\nsegments:\n- start: 0s\n  prompt: a\n- start: 12s\n  prompt: b\n",
        "5: segments[1].start:", "duration longer",
    ),
    "bad setting": (
        "settings.yaml", "segments:\n- start: 0s\n  prompt: a\nsettings:\n  memory: bank\n",
        "5: settings.memory:", "remove `memory`",
    ),
    "blank prompt": ("blank.yaml", "segments:\n- start: 0s\n  prompt: '  '\n", "3: segments[0].prompt:", "describe"),
    "bad yaml": ("syntax.yaml", "segments:\n  - start: 0s\n   prompt: a\n", "3: not valid YAML", "indentation"),
    "empty jsonl prompts": ("bad.jsonl", '{"prompts": ["a", "b"]}\n{"prompts": []}\n', "2: prompts:", "each line"),
    "jsonl not json": ("broken.jsonl", '{"prompts": ["a"]\n', "1: not valid JSON", "each line"),
    "unknown extension": ("story.txt", "segments: []\n", ": cannot read '.txt' files", ".yaml, .yml, .jsonl"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_SCRIPTS.values(), ids=BAD_SCRIPTS.keys())
def test_check_reports_a_bad_script_in_one_line(tmp_path: Path, case: tuple[str, str, str, str]):
    name, text, where, fix = case
    script = tmp_path / name
    script.write_text(text, encoding="utf-8")
    result = memflow("check", script)
    assert result.exit_code == 2
    assert result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {script}{'' if where.startswith(':') else ':'}{where}"), line
    assert fix in line


def test_check_a_missing_file(tmp_path: Path):
    result = memflow("check", tmp_path / "nothere.yaml")
    assert result.exit_code == 2
    message = f"error: {tmp_path / 'nothere.yaml'}: no such file — check the path and the file name"
    assert result.stderr.strip() == message


def test_render_refuses_a_bad_script_before_loading_anything(tmp_path: Path):
    name, text, where, _ = BAD_SCRIPTS["two starts in one chunk"]
    script = tmp_path / name
    script.write_text(text, encoding="utf-8")
    result = memflow("render", script, *DEMO, "-o", tmp_path / "out.mp4")
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {script}:{where}")
    assert list(tmp_path.iterdir()) == [script]


@pytest.mark.parametrize(
    "options, message",
    [
        (("--duration", "0s"), "--duration: must be longer than 0s"),
        (("--duration", "soon"), "--duration: 'soon' is not a time"),
        (("--memory", "bank"), "memory: unknown mode 'bank'"),
        (("--window", "2"), "--window: the sink (3 frames) must be smaller than the window (2 frames)"),
        (("--sink", "12"), "--sink: the sink (12 frames) must be smaller than the window (12 frames)"),
        (("--steps", "250,500"), "steps: must be strictly decreasing"),
        (("--steps", "1000,abc"), "--steps: 'abc' is not a whole number; write the steps like 1000,750,500,250"),
    ],
)
def test_render_rejects_bad_options(tmp_path: Path, options: tuple[str, ...], message: str):
    script = write_story(tmp_path / "fox.yaml", ["0s"], "3s")
    result = memflow("render", script, *DEMO, "-o", tmp_path / "fox.mp4", *options)
    assert result.exit_code == 2
    assert message in result.stderr.splitlines()[0]
    assert not (tmp_path / "fox.mp4").exists() and not partial_path(tmp_path / "fox.mp4").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["fox.yaml"]  # no partial, no lock file left


# ---------------------------------------------------------------------------------------------------------------------
# render on the demo model


def test_render_a_two_prompt_story(tmp_path: Path):
    # the switch at 1s snaps to chunk 2 (1.5 s), inside the 3 s preview; the third prompt (5s) is cut off
    script = write_story(tmp_path / "fox.yaml", ["0s", "1s", "5s"], "10s", seed=11)
    target = tmp_path / "fox.mp4"
    result = memflow("render", script, *DEMO, "-o", target, "--duration", "3s")
    assert result.exit_code == 0, result.stderr

    chunks = chunks_until(3.0)
    assert chunks == 4
    assert result.stdout == f"{target}\n"
    assert "demo model" in result.stderr  # the warning
    assert f"{video_frames(chunks)} frames in" in result.stderr  # the report, on stderr
    assert_video(target, video_frames(chunks))
    assert not partial_path(target).exists()

    meta = json.loads(sidecar_path(target).read_text(encoding="utf-8"))
    assert {"script", "title", "seed", "timeline", "settings", "weights", "timings"} <= meta.keys()
    assert meta["script"] == str(script) and meta["title"] == "fox" and meta["seed"] == 11
    timeline = meta["timeline"]
    assert (timeline["chunks"], timeline["latent_frames"], timeline["video_frames"]) == (4, 12, 45)
    segments = [(s["start_s"], s["snapped_start_s"], s["start_chunk"], s["video_frames"]) for s in timeline["segments"]]
    assert segments == [(0.0, 0.0, 0, video_frames(2)), (1.0, 1.5, 2, video_frames(4) - video_frames(2))]
    assert meta["settings"]["memory"]["mode"] == "nam"
    assert meta["weights"]["model"] == "demo" and meta["fp8"] is False and meta["decoder"] == "wan"
    assert meta["timings"]["render_s"] > 0


def test_render_options_reach_the_settings_and_the_sidecar(tmp_path: Path):
    script = write_story(tmp_path / "fox.yaml", ["0s"], "10s", seed=3)
    target = tmp_path / "fox.mp4"
    options = ("--seed", "9", "--steps", "1000,500", "--memory", "sink", "--window", "9", "--sink", "3", "-q")
    result = memflow("render", script, *DEMO, *TAE, "-o", target, "--duration", "1.5s", *options)
    assert result.exit_code == 0, result.stderr
    assert_video(target, video_frames(2))
    meta = json.loads(sidecar_path(target).read_text(encoding="utf-8"))
    assert meta["seed"] == 9
    assert meta["settings"]["sampler"]["steps"] == [1000, 500]
    assert meta["settings"]["memory"] | {"mode": "sink", "window": 9, "sink": 3} == meta["settings"]["memory"]


def test_render_several_scripts_into_a_folder(tmp_path: Path):
    first = write_story(tmp_path / "a.yaml", ["0s", "0.75s"], "2s", title='"[draft] first"')
    second = write_story(tmp_path / "b.yaml", ["0s"], "1.5s")  # no title: the file name
    out = tmp_path / f"renders-{'x' * 80}"  # stdout is one path a line, however long
    result = memflow("render", first, second, *DEMO, *TAE, "--out-dir", out)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == [str(out / "[draft] first.mp4"), str(out / "b.mp4")]
    assert result.stderr.count("demo model") == 1  # the model is loaded once
    assert_video(out / "[draft] first.mp4", video_frames(chunks_until(2.0)))
    assert_video(out / "b.mp4", video_frames(chunks_until(1.5)))
    assert sidecar_path(out / "b.mp4").is_file()


def test_render_a_jsonl_file_of_several_stories(tmp_path: Path):
    script = write_jsonl(tmp_path / "batch.jsonl", [["a fox", "a forest"], ["a boat", "a storm"]])
    out = tmp_path / "out"
    result = memflow("render", script, *DEMO, *TAE, "--out-dir", out, "--duration", "1.5s", "-q")
    assert result.exit_code == 0, result.stderr
    targets = [out / "batch-001.mp4", out / "batch-002.mp4"]
    assert result.stdout.splitlines() == [str(path) for path in targets]
    for line, target in enumerate(targets, start=1):
        assert_video(target, video_frames(2))
        meta = json.loads(sidecar_path(target).read_text(encoding="utf-8"))
        assert meta["script_line"] == line and meta["timeline"]["chunks"] == 2


def test_render_a_jsonl_file_of_several_stories_to_one_file_is_an_error(tmp_path: Path):
    script = write_jsonl(tmp_path / "batch.jsonl", [["a fox"], ["a boat"]])
    result = memflow("render", script, *DEMO, "-o", tmp_path / "out.mp4")
    assert result.exit_code == 2
    assert "2 stories" in result.stderr and "--out-dir" in result.stderr
    assert not (tmp_path / "out.mp4").exists()


def test_render_needs_exactly_one_of_output_and_out_dir(tmp_path: Path):
    script = write_story(tmp_path / "fox.yaml", ["0s"], "3s")
    assert memflow("render", script, *DEMO).exit_code == 2
    both = memflow("render", script, *DEMO, "-o", tmp_path / "a.mp4", "--out-dir", tmp_path / "out")
    assert both.exit_code == 2 and "exactly one" in both.stderr


def test_render_never_clobbers_without_overwrite(tmp_path: Path):
    script = write_story(tmp_path / "fox.yaml", ["0s"], "10s")
    target = tmp_path / "fox.mp4"
    target.write_bytes(b"precious")
    result = memflow("render", script, *DEMO, "-o", target, "--duration", "1.5s")
    assert result.exit_code == 2
    assert "exists" in result.stderr and "--overwrite" in result.stderr
    assert result.stdout == ""
    assert target.read_bytes() == b"precious"
    assert not partial_path(target).exists() and not sidecar_path(target).exists()

    result = memflow("render", script, *DEMO, *TAE, "-o", target, "--duration", "1.5s", "--overwrite", "-q")
    assert result.exit_code == 0, result.stderr
    assert_video(target, video_frames(2))


def test_render_with_out_dir_checks_every_target_first(tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "b.mp4").write_bytes(b"precious")
    first, second = (write_story(tmp_path / f"{name}.yaml", ["0s"], "1.5s") for name in "ab")
    result = memflow("render", first, second, *DEMO, "--out-dir", out)
    assert result.exit_code == 2 and "b.mp4" in result.stderr
    assert sorted(path.name for path in out.iterdir()) == ["b.mp4"]  # a.mp4 was not rendered either


def test_render_is_deterministic_for_a_seed(tmp_path: Path):
    script = write_story(tmp_path / "fox.yaml", ["0s"], "10s")
    videos = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        target = tmp_path / f"{name}.mp4"
        result = memflow("render", script, *DEMO, *TAE, "-o", target, "--duration", "1.5s", "--seed", str(seed), "-q")
        assert result.exit_code == 0, result.stderr
        videos[name] = decoded(target)
    assert len(videos["a"]) == video_frames(2) * WIDTH * HEIGHT * 3
    assert videos["a"] == videos["b"]
    assert videos["a"] != videos["c"]


# ---------------------------------------------------------------------------------------------------------------------
# The engine's streaming decode


@pytest.fixture(scope="module")
def engine():
    with load_engine("demo", "cpu") as engine:
        yield engine


def _diffusers_vae_of(vae):
    """diffusers' Wan VAE (the one-shot reference decode) holding the decode-side weights of memflow's VAE."""
    from diffusers import AutoencoderKLWan

    from memflow_cli.demo import DEMO_VAE_NARROWING
    from memflow_cli.weights import WAN21_VAE_CONFIG

    reference = AutoencoderKLWan(**copy.deepcopy({**WAN21_VAE_CONFIG, **DEMO_VAE_NARROWING})).eval()
    missing, unexpected = reference.load_state_dict(vae.state_dict(), strict=False)
    assert not unexpected and all(name.startswith(("encoder.", "quant_conv.")) for name in missing)
    return reference


def test_streaming_decode_of_generated_chunks_equals_one_shot_decode(engine):
    settings = GenerationSettings(geometry=engine.geometry)
    prompts = ("a red fox in the snow",)
    engine.encode(prompts)
    generator = MemFlowGenerator(engine.transformer, settings)
    noise = SeededNoise(0, generator.noise_shape(), engine.device, engine.dtype)
    chunks = list(generator.generate(engine.embeddings(prompts), 3, noise))

    decoder = StreamingDecoder(engine.vae)
    streamed = torch.cat([decoder.decode_float(latents) for latents in chunks])  # [N, 3, H, W]

    vae = engine.vae
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(shape)
    std = torch.tensor(vae.config.latents_std).view(shape)
    z = torch.cat(chunks, dim=1).permute(0, 2, 1, 3, 4) * std + mean  # [1, F, C, h, w] -> [1, C, F, h, w]
    with torch.no_grad():
        whole = _diffusers_vae_of(vae).decode(z).sample[0].permute(1, 0, 2, 3).clamp(-1, 1)  # [N, 3, H, W]

    assert streamed.shape == whole.shape == (video_frames(3), 3, HEIGHT, WIDTH)
    torch.testing.assert_close(streamed, whole, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# Without weights


@pytest.fixture
def no_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "hf-home"
    home.mkdir()
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def test_render_without_weights_names_the_download_command(tmp_path: Path, no_weights: Path):
    script = write_story(tmp_path / "fox.yaml", ["0s"], "3s")
    result = memflow("render", script, "--device", "cpu", "-o", tmp_path / "fox.mp4")
    assert result.exit_code == 1
    assert "memflow weights download" in result.stderr
    assert str(no_weights) in result.stderr  # where it looked
    assert not (tmp_path / "fox.mp4").exists() and not partial_path(tmp_path / "fox.mp4").exists()


def test_weights_verify_without_weights_names_the_download_command(no_weights: Path):
    result = memflow("weights", "verify")
    assert result.exit_code == 1
    assert "memflow weights download" in result.stderr


# ---------------------------------------------------------------------------------------------------------------------
# Options, titles, permissions (the batch script: test_cli_robustness.py)


def test_a_bad_option_is_blamed_on_the_option_not_the_script(tmp_path: Path):
    script = write_story(tmp_path / "fox.yaml", ["0s"], "3s")
    result = memflow("render", script, *DEMO, "-o", tmp_path / "fox.mp4", "--bank-size", "0")
    assert result.exit_code == 2
    assert "--bank-size: must be at least 1, got 0" in result.stderr
    assert "fox.yaml" not in result.stderr


def test_a_title_with_a_slash_still_names_one_file_in_the_folder(tmp_path: Path):
    script = write_story(tmp_path / "a.yaml", ["0s"], "1.5s", title='"fox/night: take 2"')
    out = tmp_path / "renders"
    result = memflow("render", script, *DEMO, *TAE, "--out-dir", out)
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == [str(out / "fox_night_ take 2.mp4")]
    assert_video(out / "fox_night_ take 2.mp4", video_frames(chunks_until(1.5)))


def test_the_sidecar_is_as_readable_as_the_video(tmp_path: Path):
    script = write_story(tmp_path / "fox.yaml", ["0s"], "1.5s")
    target = tmp_path / "fox.mp4"
    assert memflow("render", script, *DEMO, *TAE, "-o", target).exit_code == 0
    assert sidecar_path(target).stat().st_mode & 0o777 == target.stat().st_mode & 0o777


def test_render_without_compile(tmp_path: Path):
    script = write_story(tmp_path / "fox.yaml", ["0s"], "1.5s")
    result = memflow("render", script, *DEMO, *TAE, "-o", tmp_path / "fox.mp4", "--no-compile", "-q")
    assert result.exit_code == 0, result.stderr
    assert_video(tmp_path / "fox.mp4", video_frames(chunks_until(1.5)))
