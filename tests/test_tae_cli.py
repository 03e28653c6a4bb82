"""`--decoder tae` through the real commands on the demo model (its tiny random TAEHV decoder), on the CPU:
render's video and sidecar, bench's JSON line, weights download/verify, live's replay line, and the one-line
refusals of a missing, cut or foreign weights file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import LocalEntryNotFoundError

from memflow_cli.tae import TAEW2_1, random_released_state
from memflow_cli.tae import files as tae_files
from memflow_cli.weights import fetch

from .cli_helpers import DEMO, assert_video, memflow, video_frames, write_story
from .live import replay_options, same_frames

ONE_LINE_ERRORS = 1  # the error and its fix, on one line


@pytest.fixture(scope="module")
def taew2_1_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tae") / "taew2_1.pth"
    torch.save({key: t.half() for key, t in random_released_state(TAEW2_1, seed=3).items()}, path)
    return path


@pytest.fixture
def story(tmp_path) -> Path:
    return write_story(tmp_path / "fox.yaml", ["0s"], "2s")  # 3 chunks


def test_render_with_tae_writes_the_video_and_records_the_decoder(tmp_path, story):
    target = tmp_path / "fox.mp4"
    result = memflow("render", story, "-o", target, *DEMO, "--decoder", "tae", "-q")
    assert result.exit_code == 0, result.output
    assert_video(target, video_frames(3))
    assert json.loads(target.with_suffix(".json").read_text())["decoder"] == "tae"
    # a finished video is skipped only when asked with the decoder it was made with
    other = memflow("render", story, "-o", target, *DEMO, "--skip-existing", "-q")
    assert other.exit_code == 2 and "it was decoded with --decoder tae" in other.stderr
    same = memflow("render", story, "-o", target, *DEMO, "--skip-existing", "--decoder", "tae")
    assert same.exit_code == 0 and "skip:" in same.stderr


def test_tae_and_wan_make_different_frames_of_the_same_story(tmp_path, story):
    from .live import decoded_frames

    videos = {}
    for decoder in ("wan", "tae"):
        videos[decoder] = tmp_path / f"{decoder}.mp4"
        assert memflow("render", story, "-o", videos[decoder], *DEMO, "--decoder", decoder, "-q").exit_code == 0
    wan, tae = decoded_frames(videos["wan"]), decoded_frames(videos["tae"])
    assert len(wan) == len(tae) == video_frames(3)
    assert any((a != b).any() for a, b in zip(wan, tae, strict=True))


def test_bench_with_tae_names_the_decoder_and_times_it():
    result = memflow("bench", *DEMO, "--frames", "6", "--decoder", "tae")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.strip().splitlines()[-1])
    assert record["decoder"] == "tae" and record["video_frames"] == 21
    assert record["decode_ms_per_chunk"] > 0 and record["decode_to_cpu_ms_per_chunk"] > 0


@pytest.mark.parametrize("command", ["render", "bench", "live"])
def test_a_cut_or_foreign_weights_file_is_one_line_with_exit_2(tmp_path, story, taew2_1_file, command):
    cut = tmp_path / "cut.pth"
    cut.write_bytes(taew2_1_file.read_bytes()[:100_000])
    foreign = tmp_path / "foreign.pth"
    torch.save({"decoder.1.weight": torch.zeros(8, 16, 3, 3)}, foreign)
    arguments = {
        "render": ["render", story, "-o", tmp_path / "out.mp4"],
        "bench": ["bench", "--device", "cpu"],
        "live": ["live", "--prompt", "a fox", "-o", tmp_path / "live.mp4", "--device", "cpu"],
    }[command]
    for path, message in ((cut, "truncated or corrupt"), (foreign, "decoder.1.weight has shape [8, 16, 3, 3]"),
                          (tmp_path / "none.pth", "no such file")):  # fmt: skip
        result = memflow(*arguments, "--decoder", "tae", "--decoder-weights", path)
        assert result.exit_code == 2, result.output
        assert message in result.stderr and str(path) in result.stderr
        assert "memflow weights download --decoder tae" in result.stderr
        assert len(result.stderr.strip().splitlines()) <= ONE_LINE_ERRORS
    assert not (tmp_path / "out.mp4").exists() and not (tmp_path / "live.mp4").exists()


def test_tae_without_its_file_names_the_download_command(tmp_path, story, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    result = memflow("render", story, "-o", tmp_path / "out.mp4", "--decoder", "tae")
    assert result.exit_code == 2
    assert "taew2_1.pth are not in the Hugging Face cache" in result.stderr
    assert "run `memflow weights download --decoder tae`" in result.stderr


def test_bad_decoder_options_are_refused(tmp_path, story, taew2_1_file):
    result = memflow("render", story, "-o", tmp_path / "out.mp4", *DEMO, "--decoder", "vae")
    assert result.exit_code == 2 and "--decoder vae: not a decoder" in result.stderr
    result = memflow("render", story, "-o", tmp_path / "out.mp4", *DEMO, "--decoder-weights", taew2_1_file)
    assert result.exit_code == 2 and "the demo model decodes with random TAEHV weights" in result.stderr


@pytest.mark.parametrize("command", ["render", "bench", "live", "weights"])
def test_decoder_weights_alone_means_tae_and_beside_wan_is_refused_in_every_command(tmp_path, story, command):
    cut = tmp_path / "cut.pth"
    cut.write_bytes(b"not a checkpoint")
    arguments = {
        "render": ["render", story, "-o", tmp_path / "out.mp4"],
        "bench": ["bench", "--device", "cpu"],
        "live": ["live", "--prompt", "a fox", "-o", tmp_path / "live.mp4", "--device", "cpu"],
        "weights": ["weights", "verify"],
    }[command]
    alone = memflow(*arguments, "--decoder-weights", cut)  # read as the TAEHV file: found cut
    as_tae = memflow(*arguments, "--decoder", "tae", "--decoder-weights", cut)
    assert alone.exit_code == as_tae.exit_code == (1 if command == "weights" else 2)  # verify: a failed check
    assert (alone.stdout, alone.stderr) == (as_tae.stdout, as_tae.stderr) and str(cut) in alone.output
    beside_wan = memflow(*arguments, "--decoder", "wan", "--decoder-weights", cut)
    assert beside_wan.exit_code == 2, beside_wan.output
    assert "--decoder-weights is the TAEHV decoder's file, not used with --decoder wan" in beside_wan.stderr
    assert len(beside_wan.stderr.strip().splitlines()) <= ONE_LINE_ERRORS
    assert not (tmp_path / "out.mp4").exists() and not (tmp_path / "live.mp4").exists()


def test_weights_download_and_verify_with_a_local_stand_in_of_the_hub(tmp_path, taew2_1_file, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    fetched = []

    def stand_in(repo, name, *, cache_dir=None, local_dir=None, local_files_only=False, **kwargs):
        snapshot = Path(cache_dir) / f"models--{repo.replace('/', '--')}" / "snapshots" / "1"
        if local_files_only:
            if not (snapshot / name).is_file():
                raise LocalEntryNotFoundError(name)
            return str(snapshot / name)
        fetched.append(f"{repo}/{name}")
        snapshot.mkdir(parents=True, exist_ok=True)
        return shutil.copy(taew2_1_file, snapshot / name)

    monkeypatch.setattr(tae_files, "hf_hub_download", stand_in)
    monkeypatch.setattr(fetch, "check_reachable", lambda **_: None)  # the stand-in hub answers
    before = memflow("weights", "verify", "--decoder", "tae")
    assert before.exit_code == 1 and "memflow weights download --decoder tae" in before.stderr  # missing weights
    result = memflow("weights", "download", "--decoder", "tae")
    assert result.exit_code == 0, result.output
    assert fetched == ["madebyollin/taehv/taew2_1.pth"]
    cached = Path(result.stdout.strip().removeprefix("tae decoder: "))
    assert cached.is_file() and (tmp_path / "hf" / "hub") in cached.parents
    verified = memflow("weights", "verify", "--decoder", "tae")
    assert verified.exit_code == 0 and verified.stdout.startswith("ok   tae decoder:")
    cached.write_bytes(cached.read_bytes()[:-1000])  # cut: verify fails and says how to fix it
    broken = memflow("weights", "verify", "--decoder", "tae")
    assert broken.exit_code == 1 and "FAIL tae decoder" in broken.stdout and "truncated" in broken.stdout


def test_live_with_tae_records_it_and_its_replay_remakes_the_video(tmp_path):
    target = tmp_path / "live.mp4"
    session = memflow("live", "--prompt", "a fox in the snow", "-o", target, "--duration", "1.5s", *DEMO,
                      "--decoder", "tae")  # in-process: no stdin, as a session started without one  # fmt: skip
    assert session.exit_code == 0, session.stderr
    assert "live: decoding with tae" in session.stderr and "--decoder wan for the full-quality" in session.stderr
    assert json.loads(target.with_suffix(".json").read_text())["decoder"] == "tae"
    options = replay_options(target.with_suffix(".yaml"))
    assert options[-2:] == ["--decoder", "tae"]
    replayed = memflow("render", target.with_suffix(".yaml"), "-o", tmp_path / "replay.mp4", *options, "-q")
    assert replayed.exit_code == 0, replayed.stderr
    assert same_frames(target, tmp_path / "replay.mp4")
