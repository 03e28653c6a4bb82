"""A warm load of official-layout files, phase by phase (issue #25 target 4). Not part of the test suite.

    python -m memflow_cli.random_model /tmp/official           # the files, once (15.9 GB)
    python tests/gpu_tools/load_phases.py /tmp/official         # on CUDA where there is one; --device cpu
    python tests/gpu_tools/load_phases.py /tmp/official --device cpu --prompts-from scripts_examples/lighthouse.yaml

Whole loads first, each a process of its own as a render's: one that fills the caches (merged transformer,
converted VAE, prompt embeddings), then two warm ones with the Wan VAE and two with `--decoder tae` (a random
taew2_1 file); each reports its process's import and load seconds and CPU. Then each phase alone on one
thread in this process (imports first: each is paid once). One JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from memflow_cli import weights
from memflow_cli.checkpoint import read_transformer
from memflow_cli.decoders import DecoderChoice, DecoderRequest
from memflow_cli.engine import load_engine, model_dtype
from memflow_cli.loading import read_transformer_config
from memflow_cli.merged_cache import CONVERTED_VAE, MERGED_TRANSFORMER, MergedCache, MergedCacheSettings
from memflow_cli.script import load_scripts
from memflow_cli.tae import TAEW2_1, random_released_state

PHASES: dict[str, dict[str, float]] = {}


def timed(name: str, step, device: torch.device):
    wall, cpu = time.perf_counter(), time.process_time()
    result = step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    PHASES[name] = {"wall_s": round(time.perf_counter() - wall, 3), "cpu_s": round(time.process_time() - cpu, 3)}
    print(f"{name:56s} {PHASES[name]['wall_s']:7.3f} s wall {PHASES[name]['cpu_s']:7.3f} s CPU", flush=True)
    return result


def import_vae_library() -> None:
    from diffusers import AutoencoderKLWan  # noqa: F401


def import_text_encoder_library() -> None:
    from transformers import AutoTokenizer, UMT5EncoderModel  # noqa: F401


def whole_load(folder: str, device: torch.device, prompts: list[str], decoder: DecoderRequest) -> None:
    """One load_engine in this process, as a render's; prints its import and load seconds and the CPU so far."""
    with load_engine(folder, device, prompts=prompts, decoder=decoder) as engine:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        print(json.dumps({"import_s": round(engine.startup.import_s, 3), "load_s": round(engine.startup.load_s, 3),
                          "cpu_s": round(usage.ru_utime + usage.ru_stime, 2), "merge": engine.identity["lora_merge"],
                          "encoded": engine.prompts.encoded_prompts}))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("folder")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--prompts-from", default="scripts_examples/lighthouse.yaml")
    parser.add_argument("--whole", default=None, help="(internal) one whole load with this taew2_1 file or 'wan'")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = model_dtype(device)
    prompts = [segment.prompt for segment in load_scripts(args.prompts_from)[0].segments]
    if args.whole is not None:
        decoder = DecoderRequest() if args.whole == "wan" else DecoderRequest(DecoderChoice.TAE, Path(args.whole))
        whole_load(args.folder, device, prompts, decoder)
        return
    with tempfile.TemporaryDirectory() as folder:
        tae = Path(folder) / "taew2_1.pth"
        torch.save({key: t.half() for key, t in random_released_state(TAEW2_1).items()}, tae)
        for name, whole in (("first (fills the caches)", "wan"), ("warm wan 1", "wan"), ("warm wan 2", "wan"),
                            ("warm tae 1", str(tae)), ("warm tae 2", str(tae))):  # fmt: skip
            command = [sys.executable, __file__, args.folder, "--device", args.device, "--whole", whole,
                       "--prompts-from", args.prompts_from]  # fmt: skip
            line = subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1]
            PHASES[f"whole process: {name}"] = json.loads(line)
            print(f"whole process: {name:28s} {line}", flush=True)
    files = timed("resolve_model", lambda: weights.resolve_model(args.folder), device)
    timed("weights_identity (fingerprints)", lambda: weights.weights_identity(files), device)
    timed("import diffusers' AutoencoderKLWan", import_vae_library, device)
    timed("import transformers' AutoTokenizer, UMT5EncoderModel", import_text_encoder_library, device)
    vae_cache = MergedCache(MergedCacheSettings.from_environment(kind=CONVERTED_VAE))
    timed("VAE: converted from Wan2.1_VAE.pth", lambda: weights.load_vae(files.vae, device, dtype), device)
    timed("VAE: read from the converted-VAE cache", lambda: weights.load_vae(files.vae, device, dtype, cache=vae_cache),
          device)  # fmt: skip
    config = read_transformer_config(files.transformer_config)
    merged = MergedCache(MergedCacheSettings.from_environment(kind=MERGED_TRANSFORMER))
    timed("transformer: read from the merged cache, built (plain)", lambda: read_transformer(
        files.base, files.lora, config, device=device, dtype=dtype, cache=merged), device)  # fmt: skip
    print(json.dumps({"device": str(device), "dtype": str(dtype), "phases": PHASES}))


if __name__ == "__main__":
    main()
