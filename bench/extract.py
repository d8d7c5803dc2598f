"""Benchmark of `selma lora extract` (issue 27) on a real-size SDXL UNet with random weights.

A base UNet (SDXL's config, 2.6 B parameters; `--quick`: a 0.2 B model of the same layout at half
the widths) gets random weights, and a known random LoRA is fused into its attention projections
(to_q / to_k / to_v / to_out.0, 560 layers): rank 128, or rank 640 as the SELMA authors' merge gives
it (five rank-128 experts summed with diffusers' set_adapters, weights 1/29 ... 1/40), scaled so
that |dW| / |W| is 1e-2 or 1e-3 in every layer. Both models are written in fp16, layer by layer
into sharded safetensors (the fine-tuned one fused in fp32 and rounded once, as a pipeline saved
in fp16 is), then `extract_lora(rank="auto")` + `save_extraction` runs in a fresh process.

Printed per case: CPU and wall time, peak RSS (of that process), the ranks found against the known
ones, and the recovery error per layer: ours |dW' - dW| against the raw difference's |D - dW| (goal:
never above it) and against the rounding floor, the error expected of a rank-r fit that knew the
rank, sqrt(r (m + n - r) / (m n)) |D - dW| (goal at 1e-2: within 2x). The bound, measured in the
same run on the same files: read both files (safetensors' safe_open) and one exact SVD
(torch.linalg.svd) of every changed layer, in a fresh process, before and after the first case (the
faster one counts). R = our CPU time / the bound's, the worst case's; goal R <= 1.2. CPU time (user
+ sys of the process) because on a shared machine wall time mostly measures the other processes.

    python bench/extract.py [--quick] [--cases r128:1e-2,r128:1e-3,r640:1e-2,r640:1e-3] [--threads 1] [--work DIR]

Disk: about 5 GB per model (full size), in a temporary folder (or --work) removed at the end.
The last line is `extract ratio=R goal=<=1.2`.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import resource
import shutil
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

from selma_toolkit.architectures import FAMILIES

GOAL = 1.2
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
EXPERT_RANK = 128
EXPERT_WEIGHTS = (1 / 29, 1 / 31, 1 / 34, 1 / 37, 1 / 40)  # set_adapters' 1 / len(model id) of five experts
SHARD_BYTES = 1 << 30
# diffusers' UNet2DConditionModel config of stabilityai/stable-diffusion-xl-base-1.0, as the sdxl family records it.
SDXL_UNET = dict(FAMILIES["sdxl"].published_denoiser)
QUICK_UNET = {
    **SDXL_UNET,
    "block_out_channels": (160, 320, 640),
    "transformer_layers_per_block": (1, 1, 2),
    "cross_attention_dim": 1024,
}


def unet_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of the UNet (state-dict order) and its shape, from the meta device."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config)
    return {name: tuple(tensor.shape) for name, tensor in unet.state_dict().items()}


def adapted(name: str) -> bool:
    return name.endswith(".weight") and name[: -len(".weight")].endswith(TARGETS)


def base_weight(name: str, shape: tuple[int, ...]):
    """The base's float32 value of a tensor, a function of its name: N(0, 1 / fan_in) weights, unit norms."""
    import torch

    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    if len(shape) == 1:
        return torch.ones(shape) if "norm" in name else torch.zeros(shape)
    fan_in = math.prod(shape[1:])
    return torch.randn(shape, generator=generator) / math.sqrt(fan_in)


def known_update(name: str, weight, rank: int, relative: float):
    """The fused LoRA's update of one layer, float64, |dW| = relative |W|: rank 128, or the sum of
    five rank-128 experts weighted as set_adapters weights them (rank 640)."""
    import torch

    generator = torch.Generator().manual_seed(zlib.crc32(("lora:" + name).encode()))
    out, inp = weight.shape
    experts = [(1.0,)] if rank == EXPERT_RANK else [(w,) for w in EXPERT_WEIGHTS]
    update = torch.zeros(out, inp, dtype=torch.float64)
    for (w,) in experts:
        up = torch.randn(out, EXPERT_RANK, generator=generator, dtype=torch.float64)
        down = torch.randn(EXPERT_RANK, inp, generator=generator, dtype=torch.float64)
        update += w * (up @ down)
    return update * (relative * float(weight.double().norm()) / float(update.norm()))


def write_unet(folder: Path, config: dict, case: tuple[int, float] | None) -> None:
    """A diffusers folder with the UNet in fp16 shards, written tensor by tensor: the base, or
    (``case`` = (rank, |dW|/|W|)) the base with the known update fused in float32."""
    from safetensors.torch import save_file

    shapes = unet_shapes(config)
    sizes = {name: math.prod(shape) * 2 for name, shape in shapes.items()}
    shards: list[list[str]] = [[]]
    used = 0
    for name in shapes:
        if used + sizes[name] > SHARD_BYTES and shards[-1]:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += sizes[name]
    (folder / "unet").mkdir(parents=True)
    weight_map = {}
    for index, names in enumerate(shards):
        file = f"diffusion_pytorch_model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name in names:
            weight = base_weight(name, shapes[name])
            if case is not None and adapted(name):
                weight = (weight.double() + known_update(name, weight, *case)).float()
            tensors[name] = weight.half()
            weight_map[name] = file
        save_file(tensors, folder / "unet" / file)
    index_file = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    (folder / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index_file))
    unet_config = {
        "_class_name": "UNet2DConditionModel",
        **{k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
    }
    (folder / "unet" / "config.json").write_text(json.dumps(unet_config))
    (folder / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"]})
    )


# ------------------------------------------------------------------------ jobs, each in a fresh process


def _peak_rss_mib() -> float:
    """This process's peak RSS: VmHWM of its address space. Not getrusage's ru_maxrss: Linux carries
    it over exec, so a spawned child reports at least what its parent held when it forked."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # no /proc: an upper bound


def _usage(threads: int, work) -> dict:
    import torch

    torch.set_num_threads(threads)
    cpu, wall = time.process_time(), time.perf_counter()
    result = work()
    return {
        "cpu": time.process_time() - cpu,
        "wall": time.perf_counter() - wall,
        "rss_mib": _peak_rss_mib(),
        **(result or {}),
    }


def extract_job(model: str, base: str, out: str, threads: int) -> dict:
    """`selma lora extract --model MODEL --base BASE --out OUT`, without the CLI's start-up."""
    from selma_toolkit.lora.extract import extract_lora, save_extraction

    def work() -> dict:
        extraction = extract_lora(model, base)
        save_extraction(extraction, out)
        return {"summary": extraction.summary()}

    return _usage(threads, work)


def bound_job(model: str, base: str, threads: int) -> dict:
    """Read both files whole, tensor by tensor, and run one exact SVD of every changed layer."""
    import torch
    from safetensors import safe_open

    def work() -> dict:
        svds = 0
        files = sorted((Path(model) / "unet").glob("*.safetensors"))
        for file in files:
            with (
                safe_open(file, framework="pt") as fine,
                safe_open(Path(base) / "unet" / file.name, framework="pt") as start,
            ):
                for name in fine.keys():  # noqa: SIM118 - safe_open has no __iter__
                    difference = fine.get_tensor(name).float() - start.get_tensor(name).float()
                    if adapted(name):
                        torch.linalg.svd(difference.reshape(difference.shape[0], -1), full_matrices=False)
                        svds += 1
        return {"svds": svds}

    return _usage(threads, work)


def in_fresh_process(job, *args):
    """Run ``job`` in a new interpreter (spawn): its timings and peak RSS are its own."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(job, args)


# --------------------------------------------------------------------------------------- the checks


def recovery(lora_file: Path, model: Path, base: Path, config: dict, case: tuple[int, float]) -> dict:
    """Per adapted layer: ours against the raw difference and the rounding floor; ranks found."""
    import torch

    from selma_toolkit.lora import load_lora
    from selma_toolkit.lora.model_weights import open_model_weights

    lora = load_lora(lora_file)
    rank, relative = case
    worst_raw, over_floor, exact_rank, layers = 0.0, [], 0, 0
    found = json.loads(lora.metadata["selma.extract"])
    columns = found["columns"]
    with open_model_weights(model, "model") as fine, open_model_weights(base, "base") as start:
        for name, shape in unet_shapes(config).items():
            if not adapted(name):
                continue
            module = "unet." + name[: -len(".weight")]
            truth = known_update(name, base_weight(name, shape), rank, relative)
            raw = fine.read(module).double() - start.read(module).double()
            ours = lora.modules[module].delta(torch.float64) if module in lora.modules else torch.zeros_like(raw)
            noise = float((raw - truth).norm())
            m, n = raw.shape
            r = min(rank, m, n)
            floor = noise * math.sqrt(r * (m + n - r) / (m * n))
            error = float((ours - truth).norm())
            worst_raw = max(worst_raw, error / noise)
            over_floor.append(error / floor)
            row = dict(zip(columns, found["layers"].get(module, []), strict=False))
            exact_rank += row.get("found") == r or (r == min(m, n) and row.get("status") == "full-rank")
            layers += 1
    return {
        "worst_vs_raw": worst_raw,
        "median_vs_floor": statistics.median(over_floor),
        "max_vs_floor": max(over_floor),
        "exact_rank": exact_rank,
        "layers": layers,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 0.2 B UNet of SDXL's layout at half the widths")
    parser.add_argument("--cases", default="r128:1e-2,r128:1e-3,r640:1e-2,r640:1e-3", help="rank:relative size, ...")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the measured processes")
    parser.add_argument("--work", type=Path, help="folder for the models (default: a temporary folder)")
    args = parser.parse_args()
    config = QUICK_UNET if args.quick else SDXL_UNET
    cases = [
        (int(rank.lstrip("r")), float(relative)) for rank, relative in (c.split(":") for c in args.cases.split(","))
    ]
    root = Path(tempfile.mkdtemp(prefix="selma-bench-extract-", dir=args.work))
    try:
        started = time.perf_counter()
        write_unet(root / "base", config, None)
        size = sum(p.stat().st_size for p in (root / "base" / "unet").glob("*.safetensors")) / 2**30
        count = sum(adapted(name) for name in unet_shapes(config))
        print(
            f"UNet {'quick' if args.quick else 'SDXL'}: {size:.2f} GiB in fp16, {count} attention projections adapted "
            f"(written in {time.perf_counter() - started:.0f} s); torch threads {args.threads}",
            flush=True,
        )
        bounds, ratios = [], []
        for index, case in enumerate(cases):
            model = root / f"model-{index}"
            write_unet(model, config, case)
            if index == 0:
                bounds.append(in_fresh_process(bound_job, str(model), str(root / "base"), args.threads))
            ours = in_fresh_process(
                extract_job, str(model), str(root / "base"), str(root / "lora.safetensors"), args.threads
            )
            if index == 0:
                bounds.append(in_fresh_process(bound_job, str(model), str(root / "base"), args.threads))
                bound = min(bounds, key=lambda b: b["cpu"])
                print(
                    f"bound (read both files + {bound['svds']} exact SVDs): CPU {bound['cpu']:.1f} s, wall "
                    f"{bound['wall']:.1f} s (runs: {', '.join(format(b['cpu'], '.1f') for b in bounds)} s CPU), "
                    f"peak RSS {bound['rss_mib']:.0f} MiB",
                    flush=True,
                )
            checks = recovery(root / "lora.safetensors", model, root / "base", config, case)
            summary = ours["summary"]
            ratios.append(ours["cpu"] / bound["cpu"])
            print(
                f"rank {case[0]} at |dW|/|W| = {case[1]:g}: CPU {ours['cpu']:.1f} s, wall {ours['wall']:.1f} s, "
                f"peak RSS {ours['rss_mib']:.0f} MiB, ratio {ratios[-1]:.2f}; found ranks {summary['found_ranks']}, "
                f"stored {summary['ranks']}, {summary['unchanged']} layers unchanged; rank exact in "
                f"{checks['exact_rank']}/{checks['layers']} layers; error / raw difference: worst "
                f"{checks['worst_vs_raw']:.3f}; error / rounding floor: median {checks['median_vs_floor']:.2f}, "
                f"max {checks['max_vs_floor']:.2f}",
                flush=True,
            )
            shutil.rmtree(model)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"extract ratio={max(ratios):.2f} goal=<={GOAL}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
