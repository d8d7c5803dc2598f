"""Benchmark of the exact `svd` merge (issue 31): the SVD taken from the experts' stacked factors,
never of a dense update, against the `selma` merge of the same experts, measured in the same run.

Two random rank-16 experts on the attention projections (``--every-layer``: every Linear and Conv2d
layer) of the full-size SD 1.5 UNet and of its CLIP-L text encoder (shapes from the diffusers / transformers configs on the meta device, no
download), float16 as trained experts are stored, merged in memory with ``merge_experts``: `svd` to
rank 8 and `selma` (the paper's rule, the fast baseline), interleaved, median of ``--repeats``.
``--dense`` also times the dense exact SVD the `svd` method took before (each module's full
update D [out, in] formed and factored; minutes), as a method copy without the low-rank formula.

Times are CPU seconds of this process with one torch thread (on a shared machine wall time mostly
measures the other processes); wall times are printed beside them. Usage:
python bench/merge_svd.py [--repeats 3] [--dense]. The last line is `merge_svd ratio=R goal=<=2`
(R: svd time / selma time).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path

from selma_toolkit.architectures import FAMILIES

RANK, MERGED_RANK, EXPERTS = 16, 8, 2
# diffusers' UNet2DConditionModel config of runwayml/stable-diffusion-v1-5, as the sd1 family records it.
SD15_UNET = dict(FAMILIES["sd1"].published_denoiser)
# Its CLIP-L text encoder.
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}


ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "q_proj", "k_proj", "v_proj", "out_proj")  # SELMA's default targets


def layer_shapes(every_layer: bool = False) -> dict[str, tuple[int, ...]]:
    """Canonical module name -> weight shape of the attention projections of the SD 1.5 UNet and CLIP-L
    (what SELMA trains), or of every Linear / Conv2d of them."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from selma_toolkit.lora import canonical_module_name

    with torch.device("meta"):
        models = {"unet": UNet2DConditionModel(**SD15_UNET), "text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L))}
    return {
        canonical_module_name(component, path): tuple(layer.weight.shape)
        for component, model in models.items()
        for path, layer in model.named_modules()
        if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) and (every_layer or path.endswith(ATTENTION))
    }


def random_experts(shapes: dict[str, tuple[int, ...]]) -> list:
    """EXPERTS random rank-RANK float16 experts (kohya conv LoRAs: A [r, in, kh, kw], B [out, r, 1, 1])."""
    import torch

    from selma_toolkit.lora import LoraModule, LoraWeights

    experts = []
    for index in range(EXPERTS):
        generator = torch.Generator().manual_seed(index)
        modules = {}
        for name, (out, inp, *kernel) in shapes.items():
            down = torch.randn(RANK, inp, *kernel, generator=generator) * 0.01
            up = torch.randn(out, RANK, *([1, 1] if kernel else []), generator=generator) * 0.01
            modules[name] = LoraModule(down=down.half(), up=up.half(), alpha=float(RANK))
        experts.append(LoraWeights(modules))
    return experts


def timed(work) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of ``work()``."""
    cpu, wall = time.process_time(), time.perf_counter()
    work()
    return time.process_time() - cpu, time.perf_counter() - wall


def medians(jobs: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """Median (CPU, wall) seconds of each job, after a warm-up run, the jobs interleaved so that drifting
    machine load hits all alike."""
    for job in jobs.values():
        job()
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in jobs}
    for _ in range(repeats):
        for name, job in jobs.items():
            runs[name].append(timed(job))
    return {
        name: (statistics.median(r[0] for r in results), statistics.median(r[1] for r in results))
        for name, results in runs.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed merges per method (median)")
    parser.add_argument(
        "--every-layer", action="store_true", help="experts on every Linear / Conv2d, not only attention"
    )
    parser.add_argument("--dense", action="store_true", help="also time the dense exact SVD (minutes)")
    args = parser.parse_args()

    import torch

    from selma_toolkit.config.merge_methods import METHODS
    from selma_toolkit.lora import merge_experts, merge_files, save_lora

    torch.set_num_threads(1)
    shapes = layer_shapes(args.every_layer)
    experts = random_experts(shapes)
    with tempfile.TemporaryDirectory(prefix="selma-bench-merge-svd-") as tmp:
        folder = Path(tmp)
        paths = [save_lora(expert, folder / f"expert{i}.safetensors") for i, expert in enumerate(experts)]
        size = sum(path.stat().st_size for path in paths) / 2**20
        print(
            f"{EXPERTS} random rank-{RANK} float16 experts ({size:.0f} MiB) on {len(shapes)} "
            f"{'layers' if args.every_layer else 'attention projections'} of the SD 1.5 UNet and CLIP-L; "
            f"CPU, 1 thread, median of {args.repeats}"
        )
        files = medians(
            {
                "svd": lambda: merge_files(paths, folder / "svd.safetensors", "svd", rank=MERGED_RANK),
                "selma": lambda: merge_files(paths, folder / "selma.safetensors", "selma"),
            },
            args.repeats,
        )
    memory = medians(
        {
            "svd": lambda: merge_experts(experts, "svd", rank=MERGED_RANK),
            "selma": lambda: merge_experts(experts, "selma"),
        },
        args.repeats,
    )
    labels = {
        "svd": f"svd to rank {MERGED_RANK} (exact, from the stacked factors)",
        "selma": "selma (the paper's rule)",
    }
    for name, label in labels.items():
        print(
            f"    {label}: file to file {files[name][0]:.2f} s (wall {files[name][1]:.2f}); the merge in memory "
            f"{memory[name][0]:.3f} s (wall {memory[name][1]:.3f})"
        )
    if args.dense:
        # The same method without its low-rank formula: the dense update of each module, then its SVD.
        METHODS["svd_dense"] = dataclasses.replace(METHODS["svd"], name="svd_dense", low_rank="")
        dense, dense_wall = timed(lambda: merge_experts(experts, "svd_dense", rank=MERGED_RANK))  # type: ignore[arg-type]
        print(
            f"    svd to rank {MERGED_RANK} through each dense update (before), in memory: {dense:.1f} s "
            f"(wall {dense_wall:.1f}), {dense / memory['svd'][0]:.0f}x the svd from the factors"
        )
    print(f"merge_svd ratio={files['svd'][0] / files['selma'][0]:.2f} goal=<=2")
    return 0


if __name__ == "__main__":
    sys.exit(main())
