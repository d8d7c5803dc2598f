"""Benchmark of expert merging (issue 8), measured against baselines taken in the same run.

(a) File-to-file merge of 5 random rank-128 experts with the shapes of SD 1.5's UNet attention
    layers (attn1/attn2 to_q, to_k, to_v, to_out.0: built from the SD 1.5 UNet config on the meta
    device, no download), methods selma and delta, against the time to only read every input
    file into memory and write one output of the same size (atomically, as save_lora writes).
    Each job runs in a fresh process, so its peak RSS is its own. Goal: wall-time ratio <= 1.5.
(b) One UNet denoising step (CFG batch of 2) on CPU at a small latent size with the 5 experts as
    runtime diffusers adapters (set_adapters, 1/T each) vs the 1 merged (selma) adapter, median
    of interleaved repeats on the full-size SD 1.5 UNet (random weights). Goal: merged >= 2x faster.

Times are medians of interleaved repeats, with one torch thread. (a)'s goal is on wall time: a merge
also takes the sha256 of every input (the provenance its record keeps), CPU work the I/O baseline
does not do, which merge_files runs on other threads while it merges, so what a user waits for is
the wall time; CPU seconds of the process (user + sys, all its threads) are printed beside, and on
a shared machine they are the steadier number. (b) compares CPU seconds. Usage: python
bench/merge.py [--repeats 3] [--unet-repeats 5] [--latent 8] [--skip-unet]. The last line is
`merge ratio=R goal=<=1.5` (R: the worse wall-time ratio of selma and delta).
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from selma_toolkit.architectures import FAMILIES

EXPERTS = 5
RANK = 128
# diffusers' UNet2DConditionModel config of runwayml/stable-diffusion-v1-5, as the sd1 family records it.
SD15_UNET = dict(FAMILIES["sd1"].published_denoiser)
ATTENTION_LAYERS = (
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
)


def attention_shapes() -> dict[str, tuple[int, int]]:
    """Canonical module name -> (out, in) of every attention projection of the SD 1.5 UNet."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        unet = UNet2DConditionModel(**SD15_UNET)
    return {
        f"unet.{name}": tuple(module.weight.shape)
        for name, module in unet.named_modules()
        if name.endswith(ATTENTION_LAYERS)
    }


def write_experts(folder: Path) -> list[Path]:
    """5 random rank-128 float16 experts (unequal alphas) in the default (kohya) layout."""
    import torch

    from selma_toolkit.lora import LoraModule, LoraWeights, save_lora

    shapes = attention_shapes()
    paths = []
    for index in range(EXPERTS):
        generator = torch.Generator().manual_seed(index)
        modules = {
            name: LoraModule(
                down=(torch.randn(RANK, inp, generator=generator) * 0.01).half(),
                up=(torch.randn(out, RANK, generator=generator) * 0.01).half(),
                alpha=float(RANK // (index + 1)),
            )
            for name, (out, inp) in shapes.items()
        }
        paths.append(
            save_lora(
                LoraWeights(modules),
                folder / f"expert{index}.safetensors",
                metadata={"skill": f"skill{index}", "base_model": "runwayml/stable-diffusion-v1-5"},
            )
        )
    return paths


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _measure(work) -> tuple[float, float, float]:
    """(CPU seconds, wall seconds, peak RSS MiB of this process) of ``work()``."""
    import torch

    torch.set_num_threads(1)
    cpu, wall = time.process_time(), time.perf_counter()
    work()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return cpu, wall, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def merge_job(paths: list[Path], out: Path, method: str) -> tuple[float, float, float]:
    from selma_toolkit.lora import merge_files

    return _measure(lambda: merge_files(paths, out, method))


def io_job(paths: list[Path], out: Path, size: int) -> tuple[float, float, float]:
    """Only read every input into memory and write one output of ``size`` bytes, as outputs are written."""
    import torch
    from safetensors.torch import save

    from selma_toolkit.io import atomic_write_bytes

    def work() -> None:
        inputs = [path.read_bytes() for path in paths]  # load_file would only map them, reading nothing yet
        atomic_write_bytes(out, save({"blob": torch.zeros(size, dtype=torch.uint8)}))
        del inputs

    return _measure(work)


def breakdown_job(paths: list[Path], out: Path, method: str) -> dict[str, float]:
    """CPU seconds of each stage of a file-to-file merge, run one after the other."""
    from selma_toolkit.io import sha256_file
    from selma_toolkit.lora import load_lora, merge_experts, save_lora

    stages: dict[str, float] = {}
    experts: list = []
    merged: list = []
    stages["load_lora"] = _measure(lambda: experts.extend(load_lora(p) for p in paths))[0]
    stages["sha256"] = _measure(lambda: [sha256_file(p) for p in paths])[0]
    stages["merge_experts"] = _measure(lambda: merged.append(merge_experts(experts, method)))[0]
    stages["save_lora"] = _measure(lambda: save_lora(merged[0], out))[0]
    return stages


def in_fresh_process(job, *args):
    """Run ``job`` in a new interpreter (spawn), so timings and peak RSS are its own."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(job, args)


def bench_merge(paths: list[Path], folder: Path, repeats: int) -> float:
    input_mib = sum(p.stat().st_size for p in paths) / 2**20
    print(
        f"(a) {EXPERTS} experts, rank {RANK}, {len(attention_shapes())} SD 1.5 attention modules each, float16, {input_mib:.0f} MiB in all"
    )
    ratios = []
    for method in ("selma", "delta"):
        out = folder / f"merged-{method}.safetensors"
        in_fresh_process(merge_job, paths, out, method)  # warm-up: page cache, imports on disk
        size = out.stat().st_size
        runs: dict[str, list[tuple[float, float, float]]] = {"merge": [], "io": []}
        for _ in range(repeats):  # interleaved, so drifting machine load hits both alike
            runs["merge"].append(in_fresh_process(merge_job, paths, out, method))
            runs["io"].append(in_fresh_process(io_job, paths, folder / "io-only.safetensors", size))
        cpu = {job: statistics.median(r[0] for r in results) for job, results in runs.items()}
        wall = {job: statistics.median(r[1] for r in results) for job, results in runs.items()}
        rss = {job: max(r[2] for r in results) for job, results in runs.items()}
        ratios.append(wall["merge"] / wall["io"])
        print(
            f"    {method:5s}: merge file-to-file wall {wall['merge']:.2f} s (CPU {cpu['merge']:.2f}) vs read inputs "
            f"+ write {size / 2**20:.0f} MiB wall {wall['io']:.2f} s (CPU {cpu['io']:.2f}) -> ratio {ratios[-1]:.2f} "
            f"(CPU {cpu['merge'] / cpu['io']:.2f}); "
            f"peak RSS {rss['merge']:.0f} MiB (read + write only: {rss['io']:.0f} MiB)"
        )
        stages = in_fresh_process(breakdown_job, paths, out, method)
        print(
            "           stage by stage (CPU s): "
            + ", ".join(f"{stage} {seconds:.2f}" for stage, seconds in stages.items())
        )
    return max(ratios)


def unet_step_job(paths: list[Path], latent: int, repeats: int) -> dict[str, tuple[float, float]]:
    """Median (CPU, wall) seconds of one UNet step with 5 runtime adapters, 1 merged adapter, none."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging

    from selma_toolkit.adapters.diffusers import load_experts
    from selma_toolkit.tiny import build_tiny_pipeline

    diffusers_logging.set_verbosity_error()  # its notes on the absent text-encoder keys are expected here
    torch.set_num_threads(1)
    torch.manual_seed(0)
    with init_empty_weights():
        unet = UNet2DConditionModel(**SD15_UNET)
    unet = unet.to_empty(device="cpu")
    with torch.no_grad():  # random weights: the cost of a step does not depend on their values
        for parameter in unet.parameters():
            parameter.normal_(0.0, 0.02)
    # The tiny pipeline's tokenizer, text encoder and VAE: only the UNet runs here.
    pipe = StableDiffusionPipeline(**{**build_tiny_pipeline("sd1").components, "unet": unet})
    # Adapter names must not contain one another: diffusers filters its missing-key report by substring.
    settings = {
        "runtime": (
            load_experts(pipe, paths, method="runtime", adapter_name="expert"),
            [1.0 / len(paths)] * len(paths),
        ),
        "merged": (load_experts(pipe, paths, method="selma", adapter_name="selma"), None),
        "base": ([], None),  # no adapter: what the LoRA layers cost on top
    }
    latents = torch.randn(2, 4, latent, latent)
    text = torch.randn(2, 77, SD15_UNET["cross_attention_dim"])
    timings: dict[str, list[tuple[float, float]]] = {label: [] for label in settings}
    with torch.no_grad():
        for step in range(repeats + 1):
            for label, (names, weights) in settings.items():
                if names:
                    pipe.enable_lora()
                    pipe.set_adapters(names, adapter_weights=weights)
                else:
                    pipe.disable_lora()
                cpu, wall = time.process_time(), time.perf_counter()
                unet(latents, 500, encoder_hidden_states=text)
                if step:  # the first round warms up
                    timings[label].append((time.process_time() - cpu, time.perf_counter() - wall))
    return {
        label: (statistics.median(t[0] for t in runs), statistics.median(t[1] for t in runs))
        for label, runs in timings.items()
    }


def bench_unet(paths: list[Path], latent: int, repeats: int) -> None:
    result = in_fresh_process(unet_step_job, paths, latent, repeats)
    (runtime, runtime_wall), (merged, merged_wall), (base, _) = result["runtime"], result["merged"], result["base"]
    print(
        f"(b) SD 1.5 UNet (full size, random weights), latent {latent}x{latent}, batch 2, CPU, 1 thread, median of {repeats}: "
        f"5 runtime adapters {runtime:.2f} s (wall {runtime_wall:.2f}) vs 1 merged adapter {merged:.2f} s "
        f"(wall {merged_wall:.2f}) -> merged {runtime / merged:.2f}x faster (goal >= 2x)"
    )
    print(
        f"    no adapter {base:.2f} s: the LoRA layers add {runtime - base:.2f} s (runtime) vs {merged - base:.2f} s (merged); "
        "the rest of a step (convolutions, attention, feed-forward) is the same for both"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="merge and read/write repeats (median)")
    parser.add_argument("--unet-repeats", type=int, default=5, help="UNet steps per setting (median)")
    parser.add_argument("--latent", type=int, default=8, help="latent side (8 = 64 px images)")
    parser.add_argument("--skip-unet", action="store_true", help="only part (a)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="selma-bench-merge-") as tmp:
        folder = Path(tmp)
        paths = write_experts(folder)
        ratio = bench_merge(paths, folder, args.repeats)
        if not args.skip_unet:
            bench_unet(paths, args.latent, args.unet_repeats)
    print(f"merge ratio={ratio:.2f} goal=<=1.5")
    return 0


if __name__ == "__main__":
    sys.exit(main())
