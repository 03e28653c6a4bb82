"""The prompt-embedding cache: on disk (hit, miss, bound, damaged and foreign files, a folder that cannot be
written), in the engine (only new prompts are encoded; a fully cached render never loads the text encoder;
the sidecar says which prompt was encoded and which cached) and in memory (bounded over many stories)."""

from __future__ import annotations

import gc
import logging
import math
import os
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load, save

from memflow_cli import demo
from memflow_cli.cache_dir import CACHE_DIR_ENV, cache_root
from memflow_cli.decoders import DecoderChoice, DecoderRequest
from memflow_cli.embed_cache import DEFAULT_GIB, MAX_FILE_BYTES, SIZE_ENV, EmbedCacheSettings, EmbeddingCache
from memflow_cli.engine import load_engine
from memflow_cli.output import memflow_sidecar, sidecar_path
from memflow_cli.prompt_embeds import CACHED, ENCODED, RENDER_HEADROOM_GIB, PromptEmbeddings, fits_beside_render
from memflow_cli.render import render_story
from memflow_cli.script import Segment, Story
from memflow_cli.settings import GenerationSettings

LOGGER = "memflow_cli.embed_cache"
PROMPTS = ("a lighthouse on a cliff at dusk", "waves break against the rocks below")
KEY = '{"model":"test"}'
# The demo engines decode with the demo's TAEHV decoder: the prompts are the subject here, not the decoder
TAEHV = DecoderRequest(DecoderChoice.TAE)


def embeds(seed: int, text_len: int = 16, dim: int = 8, used: int = 5) -> torch.Tensor:
    """[text_len, dim] like a text encoder's output: `used` rows of values, zero rows after."""
    values = torch.zeros(text_len, dim)
    values[:used] = torch.randn(used, dim, generator=torch.Generator().manual_seed(seed))
    return values


def cache_at(folder: Path, max_bytes: int = 2**30, key: str = KEY, dtype=torch.float32) -> EmbeddingCache:
    return EmbeddingCache(EmbedCacheSettings(folder, max_bytes), key, dtype)


def warnings_of(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == LOGGER]


# -- on disk --------------------------------------------------------------------------------------------


def test_a_stored_prompt_comes_back_exactly_and_another_prompt_misses(tmp_path):
    cache = cache_at(tmp_path / "embeddings")
    stored = embeds(0)
    cache.put_many({PROMPTS[0]: stored})
    assert torch.equal(cache.get(PROMPTS[0]), stored)  # the zero rows past the prompt come back too
    assert cache.get(PROMPTS[1]) is None
    assert [p.suffix for p in (tmp_path / "embeddings").iterdir()] == [".safetensors"]  # no temporary left


def test_only_the_rows_up_to_the_last_non_zero_one_are_stored(tmp_path):
    short, long = cache_at(tmp_path / "short"), cache_at(tmp_path / "long")
    short.put_many({PROMPTS[0]: embeds(0, text_len=512, used=4)})
    long.put_many({PROMPTS[0]: embeds(0, text_len=512, used=400)})
    assert short.size_bytes() < 512 * 8 * 4 // 10 < long.size_bytes()


def test_bf16_storage_is_exact_for_an_encoder_that_runs_in_bf16(tmp_path):
    cache = cache_at(tmp_path, dtype=torch.bfloat16)
    stored = embeds(1).bfloat16().float()  # what a bf16 encoder hands back: float32 values exact in bf16
    cache.put_many({PROMPTS[0]: stored})
    assert cache.size_bytes() < 16 * 8 * 4  # two bytes a value
    assert torch.equal(cache.get(PROMPTS[0]), stored)


def test_another_text_encoder_does_not_see_the_prompt(tmp_path):
    cache_at(tmp_path).put_many({PROMPTS[0]: embeds(0)})
    assert cache_at(tmp_path, key='{"model":"other"}').get(PROMPTS[0]) is None


def test_the_least_recently_used_files_are_evicted_beyond_the_bound(tmp_path):
    cache = cache_at(tmp_path)
    cache.put_many({PROMPTS[0]: embeds(0)})
    one_file = cache.size_bytes()
    bounded = cache_at(tmp_path, max_bytes=2 * one_file)
    bounded.put_many({PROMPTS[1]: embeds(1)})
    old = os.stat(bounded.path(PROMPTS[1])).st_mtime_ns - 10**9
    os.utime(bounded.path(PROMPTS[0]), ns=(old, old))
    os.utime(bounded.path(PROMPTS[1]), ns=(old - 10**9, old - 10**9))  # prompt 1 used longest ago...
    assert bounded.get(PROMPTS[1]) is not None  # ...until now: a hit makes it the most recently used
    bounded.put_many({"a third prompt": embeds(2)})
    assert bounded.get(PROMPTS[0]) is None  # the least recently used went
    assert bounded.get(PROMPTS[1]) is not None and bounded.get("a third prompt") is not None
    assert bounded.size_bytes() <= 2 * one_file


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda data: data[:-10], "unreadable"),  # cut off in the tensor data
        (lambda data: data[:6], "truncated"),  # cut off in the header
        (lambda data: b"\x00" * len(data), "not a safetensors file"),
        (lambda data: os.urandom(len(data)), ""),
    ],
    ids=["truncated-data", "truncated-header", "zeros", "random-bytes"],
)
def test_a_damaged_file_is_ignored_with_one_warning_and_replaced(tmp_path, caplog, damage, reason):
    cache = cache_at(tmp_path)
    cache.put_many({PROMPTS[0]: embeds(0)})
    path = cache.path(PROMPTS[0])
    path.write_bytes(damage(path.read_bytes()))
    with caplog.at_level(logging.WARNING, LOGGER):
        assert cache.get(PROMPTS[0]) is None
    [warning] = warnings_of(caplog)
    assert str(path) in warning and reason in warning and "encoded again" in warning
    cache.put_many({PROMPTS[0]: embeds(0)})  # the prompt encoded again is written over it
    assert torch.equal(cache.get(PROMPTS[0]), embeds(0))


def with_values(path: Path, change) -> None:
    """Rewrite a cache file with its header (format, key) as it is and its tensor changed by `change`."""
    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata()
    rows = load(path.read_bytes())["embeds"]
    path.write_bytes(save({"embeds": change(rows).contiguous()}, metadata=metadata))


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda rows: torch.full_like(rows, math.nan), "holds values that are not finite (NaN or infinity)"),
        (lambda rows: torch.where(rows == 0, rows, math.inf), "holds values that are not finite (NaN or infinity)"),
        (lambda rows: rows.half(), "holds torch.float16 values where the text encoder's are torch.float32"),
    ],
    ids=["nan", "inf", "float16"],
)
def test_a_file_with_its_header_intact_but_values_unusable_is_ignored_with_one_warning(tmp_path, caplog, change,
                                                                                       reason):  # fmt: skip
    cache = cache_at(tmp_path)
    cache.put_many({PROMPTS[0]: embeds(0)})
    path = cache.path(PROMPTS[0])
    with_values(path, change)
    with caplog.at_level(logging.WARNING, LOGGER):
        assert cache.get(PROMPTS[0]) is None
    [warning] = warnings_of(caplog)
    assert warning == f"ignored the cached prompt embedding {path} ({reason}): the prompt is encoded again"


@pytest.mark.parametrize("kind", ["fifo", "device", "huge"])
def test_a_fifo_device_or_huge_file_at_a_cache_files_place_is_ignored_at_once(tmp_path, caplog, kind):
    cache = cache_at(tmp_path)
    path = cache.path(PROMPTS[0])
    if kind == "fifo":
        os.mkfifo(path)  # reading it would wait for a writer forever
    elif kind == "device":
        path.symlink_to("/dev/zero")  # reading it would never end
    else:
        with path.open("wb") as file:
            file.truncate(MAX_FILE_BYTES + 1)  # sparse: no disk space taken
    with caplog.at_level(logging.WARNING, LOGGER):
        assert cache.get(PROMPTS[0]) is None
    [warning] = warnings_of(caplog)
    assert warning.startswith(f"ignored the cached prompt embedding {path} (")
    said = {"fifo": "a named pipe (FIFO), not a file", "device": "a device, not a file", "huge": "larger than"}
    assert said[kind] in warning


def test_a_file_of_another_prompt_or_version_is_ignored_with_a_warning(tmp_path, caplog):
    cache = cache_at(tmp_path)
    cache.put_many({PROMPTS[0]: embeds(0), PROMPTS[1]: embeds(1)})
    cache.path(PROMPTS[0]).write_bytes(cache.path(PROMPTS[1]).read_bytes())  # a foreign file under its name
    with caplog.at_level(logging.WARNING, LOGGER):
        assert cache.get(PROMPTS[0]) is None
    assert warnings_of(caplog) == [
        f"ignored the cached prompt embedding {cache.path(PROMPTS[0])} (made for another prompt or text encoder): "
        "the prompt is encoded again"
    ]
    caplog.clear()
    path = cache.path(PROMPTS[1])
    path.write_bytes(path.read_bytes().replace(b'"version":"1"', b'"version":"9"'))
    with caplog.at_level(logging.WARNING, LOGGER):
        assert cache.get(PROMPTS[1]) is None
    [warning] = warnings_of(caplog)
    assert "format version 9, this memflow reads 1" in warning


def test_a_folder_that_cannot_be_written_costs_one_warning(tmp_path, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would be")
    cache = cache_at(blocker / "embeddings")
    with caplog.at_level(logging.WARNING, LOGGER):
        cache.put_many({PROMPTS[0]: embeds(0)})
        cache.put_many({PROMPTS[1]: embeds(1)})
        assert cache.get(PROMPTS[0]) is None
    [warning] = warnings_of(caplog)
    assert warning.startswith(f"cannot write the prompt-embedding cache in {blocker / 'embeddings'}")
    assert warning.endswith("prompts are encoded without it")


def test_the_cache_folder_comes_from_the_environment(tmp_path):
    home = Path.home()
    assert cache_root({}) == home / ".cache" / "memflow"
    assert cache_root({"XDG_CACHE_HOME": str(tmp_path / "xdg")}) == tmp_path / "xdg" / "memflow"
    both = {"XDG_CACHE_HOME": str(tmp_path / "xdg"), CACHE_DIR_ENV: str(tmp_path / "mine")}
    assert cache_root(both) == tmp_path / "mine"
    settings = EmbedCacheSettings.from_environment(both)
    assert settings.folder == tmp_path / "mine" / "embeddings"
    assert settings.max_bytes == DEFAULT_GIB * 2**30 and settings.enabled


def test_the_bound_comes_from_the_environment_and_zero_turns_the_cache_off(tmp_path, caplog):
    env = {CACHE_DIR_ENV: str(tmp_path)}
    assert EmbedCacheSettings.from_environment({**env, SIZE_ENV: "0.5"}).max_bytes == 2**29
    assert not EmbedCacheSettings.from_environment({**env, SIZE_ENV: "0"}).enabled
    with caplog.at_level(logging.WARNING, LOGGER):
        settings = EmbedCacheSettings.from_environment({**env, SIZE_ENV: "lots"})
    assert settings.max_bytes == DEFAULT_GIB * 2**30
    assert warnings_of(caplog) == [
        f"{SIZE_ENV}='lots' is not a size in GiB (like 2 or 0.5, at most 2**20; 0 turns the cache off): the "
        "prompt-embedding cache keeps its default of 2 GiB"
    ]


@pytest.mark.parametrize("value", ["1e308", "inf", "nan", "-1", "-0.5", "²", "١", "1_0", "2 GiB", "9" * 5000])
def test_a_bound_that_is_no_size_keeps_the_default_with_the_warning(tmp_path, caplog, value):
    with caplog.at_level(logging.WARNING, LOGGER):
        settings = EmbedCacheSettings.from_environment({CACHE_DIR_ENV: str(tmp_path), SIZE_ENV: value})
    assert settings.max_bytes == DEFAULT_GIB * 2**30
    [warning] = warnings_of(caplog)
    assert warning.startswith(f"{SIZE_ENV}=") and warning.endswith("cache keeps its default of 2 GiB")


# -- in the engine (demo model, CPU) --------------------------------------------------------------------


def story(tmp_path: Path, prompts: tuple[str, str] = PROMPTS, title: str = "lighthouse") -> Story:
    segments = (Segment(0.0, prompts[0]), Segment(0.75, prompts[1]))
    return Story(path=tmp_path / f"{title}.yaml", title=title, seed=0, duration_s=1.5, segments=segments)


def render(engine, tmp_path: Path, name: str, prompts: tuple[str, str] = PROMPTS) -> dict:
    target = tmp_path / f"{name}.mp4"
    render_story(engine, story(tmp_path, prompts), target, GenerationSettings(geometry=engine.geometry), seed=0)
    return memflow_sidecar(sidecar_path(target))


class CountingEncoders:
    """Builds demo text encoders that record every prompt they encode."""

    def __init__(self, monkeypatch):
        self.built = 0
        self.encoded: list[str] = []
        build = demo.build_demo_text_encoder

        def counting_build():
            self.built += 1
            encoder = build()
            encode = encoder.encode

            def recording_encode(prompts, *args, **kwargs):
                self.encoded.extend(prompts)
                return encode(prompts, *args, **kwargs)

            encoder.encode = recording_encode
            return encoder

        monkeypatch.setattr(demo, "build_demo_text_encoder", counting_build)


def test_a_second_render_reads_every_prompt_from_the_cache_and_never_loads_the_text_encoder(tmp_path, monkeypatch):
    encoders = CountingEncoders(monkeypatch)
    with load_engine("demo", "cpu", decoder=TAEHV) as engine:
        first = render(engine, tmp_path, "first")
        first_embeds = engine.embeddings(PROMPTS)
    assert first["prompts"] == [{"prompt": p, "embedding": ENCODED} for p in PROMPTS]
    assert "prompts" not in first["timeline"]  # the request record (`--skip-existing`) is as it was
    assert encoders.built == 1 and sorted(encoders.encoded) == sorted(PROMPTS)

    with load_engine("demo", "cpu", decoder=TAEHV) as engine:  # a new run: nothing in memory
        second = render(engine, tmp_path, "second")
        assert not engine.prompts.encoder_loaded
        assert torch.equal(engine.embeddings(PROMPTS), first_embeds)
    assert second["prompts"] == [{"prompt": p, "embedding": CACHED} for p in PROMPTS]
    assert encoders.built == 1  # the demo's text encoder was never built again


def test_a_story_with_one_prompt_edited_encodes_only_that_prompt(tmp_path, monkeypatch):
    encoders = CountingEncoders(monkeypatch)
    with load_engine("demo", "cpu", decoder=TAEHV) as engine:
        render(engine, tmp_path, "first")
    edited = (PROMPTS[0], "waves break against the rocks below, gulls circle")
    encoders.encoded.clear()
    with load_engine("demo", "cpu", decoder=TAEHV) as engine:
        sidecar = render(engine, tmp_path, "edited", edited)
        assert engine.prompts.encoded_prompts == 1
    assert encoders.encoded == [edited[1]]
    assert [p["embedding"] for p in sidecar["prompts"]] == [CACHED, ENCODED]


def test_the_first_prompts_are_ready_when_the_engine_is(tmp_path, monkeypatch):
    encoders = CountingEncoders(monkeypatch)
    with load_engine("demo", "cpu", decoder=TAEHV, prompts=PROMPTS) as engine:
        assert engine.prompts.encoder_loaded and sorted(encoders.encoded) == sorted(PROMPTS)
        sidecar = render(engine, tmp_path, "prefetched")
    assert [p["embedding"] for p in sidecar["prompts"]] == [ENCODED, ENCODED]  # encoded for this video
    assert sorted(encoders.encoded) == sorted(PROMPTS)  # once


@pytest.mark.parametrize("damage", ["cut", "nan"])
def test_a_damaged_cache_file_is_encoded_again_with_one_warning(tmp_path, monkeypatch, caplog, damage):
    encoders = CountingEncoders(monkeypatch)
    settings = EmbedCacheSettings(tmp_path / "cache")
    with load_engine("demo", "cpu", decoder=TAEHV, prompts=PROMPTS, embed_cache=settings) as engine:
        expected = engine.embeddings(PROMPTS)
        damaged = engine.prompts.cache.path(PROMPTS[1])
    if damage == "cut":
        damaged.write_bytes(damaged.read_bytes()[:100])
    else:  # its header as it was: read as it is, these values would render a black video
        with_values(damaged, lambda rows: torch.full_like(rows, math.nan))
    encoders.encoded.clear()
    with (
        caplog.at_level(logging.WARNING, LOGGER),
        load_engine("demo", "cpu", decoder=TAEHV, embed_cache=settings) as engine,
    ):
        assert torch.equal(engine.embeddings(PROMPTS), expected)
    assert encoders.encoded == [PROMPTS[1]]
    [warning] = warnings_of(caplog)
    assert str(damaged) in warning


def test_a_render_goes_on_when_the_cache_folder_cannot_be_written(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "cache"
    blocker.write_text("a file, not a folder")
    monkeypatch.setenv(CACHE_DIR_ENV, str(blocker))
    with caplog.at_level(logging.WARNING, LOGGER), load_engine("demo", "cpu", decoder=TAEHV) as engine:
        sidecar = render(engine, tmp_path, "uncached")
        render(engine, tmp_path, "again", (PROMPTS[1], "a third prompt, never cached"))
    assert [p["embedding"] for p in sidecar["prompts"]] == [ENCODED, ENCODED]
    assert len(warnings_of(caplog)) == 1 and "cannot write the prompt-embedding cache" in warnings_of(caplog)[0]
    assert (tmp_path / "uncached.mp4").is_file() and (tmp_path / "again.mp4").is_file()


def test_with_the_cache_off_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv(SIZE_ENV, "0")
    with load_engine("demo", "cpu", decoder=TAEHV, prompts=PROMPTS) as engine:
        assert engine.prompts.cache is None
    assert not (tmp_path / "cache").exists()


def live_tensor_bytes() -> int:
    """Bytes of every CPU tensor alive in the process (each storage once)."""
    gc.collect()
    storages = {}
    with warnings.catch_warnings():  # isinstance on torch.distributed's deprecated aliases warns
        warnings.simplefilter("ignore", FutureWarning)
        tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in tensors:
        if obj.device.type == "cpu" and not obj.is_meta:
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def test_the_engine_holds_no_more_embeddings_after_twenty_stories_than_after_a_few(tmp_path):
    with load_engine("demo", "cpu", decoder=TAEHV) as engine:
        held, live = [], {}
        for index in range(20):
            prompts = (f"story {index}: a lighthouse at dusk", f"story {index}: waves on the rocks")
            engine.video(story(tmp_path, prompts).timeline(engine.geometry))
            held.append(engine.prompts.held_bytes())
            if index in (9, 19):  # a walk over every object: after ten stories and after twenty
                live[index] = live_tensor_bytes()
        one_prompt = engine.embeddings(prompts[:1]).nbytes
    assert engine.prompts.held_prompts() <= engine.prompts.memory_prompts
    assert max(held) <= engine.prompts.memory_prompts * one_prompt
    assert held[-1] == held[9]  # full since story 5, then flat
    assert live[19] <= live[9]  # the whole process holds no more tensor memory than after ten stories


# -- where the text encoder stays between encodes -----------------------------------------------------------

GIB = 2**30
UMT5_XXL_BYTES = 11_400_000_000  # models_t5_umt5-xxl-enc-bf16.pth


@pytest.mark.parametrize(
    ("card_gib", "stays"),
    [(22.0, False), (30.0, True), (44.0, True), (139.0, True)],
    ids=["24GB", "32GB", "48GB", "H200"],
)
def test_the_full_size_text_encoder_stays_on_the_gpu_only_where_a_render_still_fits_beside_it(card_gib, stays):
    assert fits_beside_render(int(card_gib * GIB), UMT5_XXL_BYTES, int(RENDER_HEADROOM_GIB * GIB)) is stays


def test_an_encoder_without_weights_always_stays():
    assert fits_beside_render(0, 0, int(RENDER_HEADROOM_GIB * GIB))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(("headroom_gib", "stays"), [(0.0, True), (1e6, False)])
def test_on_the_gpu_the_encoder_stays_where_there_is_room_and_leaves_where_there_is_not(headroom_gib, stays):
    device = torch.device("cuda", torch.cuda.current_device())
    prompts = PromptEmbeddings(demo.build_demo_text_encoder, device, None, headroom_gib=headroom_gib)
    cpu = demo.build_demo_text_encoder().encode(list(PROMPTS))
    torch.testing.assert_close(prompts.embeddings(PROMPTS), cpu, rtol=1e-4, atol=1e-5)
    assert prompts.text_encoder.device.type == ("cuda" if stays else "cpu")


def test_a_temporary_file_left_by_a_dead_writer_is_evicted_and_one_being_written_is_not(tmp_path):
    cache = cache_at(tmp_path, max_bytes=0)  # everything goes, but what another process is writing now
    writing, dead = tmp_path / ".tmp-writing.safetensors", tmp_path / ".tmp-dead.safetensors"
    writing.write_bytes(b"half a file")
    dead.write_bytes(b"half a file")
    old = time.time() - 2 * 3600
    os.utime(dead, (old, old))
    cache.put_many({PROMPTS[0]: embeds(0)})
    assert writing.exists() and not dead.exists() and not cache.path(PROMPTS[0]).exists()


# -- through the command ----------------------------------------------------------------------------------


def test_memflow_render_encodes_a_story_once_and_reads_it_back_on_the_next_run(tmp_path, monkeypatch):
    from .cli_helpers import DEMO, TAE, memflow, write_story

    encoders = CountingEncoders(monkeypatch)
    script = write_story(tmp_path / "fox.yaml", ["0s", "0.75s"], "1.5s")
    first = memflow("render", script, *DEMO, *TAE, "-o", tmp_path / "first.mp4", "--quiet")
    assert first.exit_code == 0, first.output
    assert encoders.built == 1 and len(encoders.encoded) == 2  # the story's two prompts, once
    again = memflow("render", script, *DEMO, *TAE, "-o", tmp_path / "again.mp4", "--quiet")
    assert again.exit_code == 0, again.output
    assert encoders.built == 1  # the second run never built the text encoder
    sources = [[p["embedding"] for p in memflow_sidecar(tmp_path / f"{name}.json")["prompts"]]
               for name in ("first", "again")]  # fmt: skip
    assert sources == [[ENCODED, ENCODED], [CACHED, CACHED]]
