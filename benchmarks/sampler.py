"""Sampler speed: seconds and peak memory per volume, by model size, volume size, sampler and steps.

    .venv/bin/python benchmarks/sampler.py [--device auto|cpu|cuda] [--models demo paper]
        [--sizes 128x128x128 256x256x128] [--steps 10 25 50] [--no-rflow] [--timeout 600]

Each measurement runs in its own process (so that peak memory is that run's alone) and predicts
one MR volume whose grid is already at the model's spacing (so the model grid has the size
given), decode and post-processing included. "demo" is the shipped demo checkpoint
(sct_model/checkpoints/demo.pt) when present, else the tiny preset with random weights; "paper"
is the paper-scale preset with random weights (speed does not depend on the weights). Rectified
flow ("RFlow") is measured with the same networks and an RFlow scheduler. A run that exceeds
``--timeout`` seconds is reported as such. Peak memory: the process's maximum resident set size on
the CPU, ``torch.cuda.max_memory_allocated`` on a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DEMO_CHECKPOINT = REPO / "sct_model" / "checkpoints" / "demo.pt"


def _phantom(size_xyz: tuple[int, int, int], spacing_mm: tuple[float, float, float]):  # type: ignore[no-untyped-def]
    import numpy as np

    from sct_model.volume import Grid, Volume

    grid = Grid(size=size_xyz, spacing_mm=spacing_mm, origin_mm=(0.0, 0.0, 0.0))
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n) for n in grid.shape_zyx), indexing="ij")
    radius = (x / 0.8) ** 2 + (y / 0.9) ** 2 + (z / 0.85) ** 2
    rng = np.random.default_rng(0)
    mr = np.where(radius < 1, 400 + 200 * np.cos(6 * x) * np.sin(5 * y), 5).astype(np.float32)
    mr = np.where((radius > 0.8) & (radius < 0.9), 80, mr) + rng.normal(0, 5, mr.shape).astype(np.float32)
    return Volume(np.clip(mr, 0, None).astype(np.float32), grid)


def _checkpoint(model: str, scheduler_kind: str, workdir: Path) -> Path:
    from sct_model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
    from sct_model.networks import SchedulerConfig, preset
    from sct_model.preprocessing import PreprocessingConfig

    rflow = SchedulerConfig(kind="rflow", prediction_type="v_prediction") if scheduler_kind == "rflow" else None
    if model == "demo" and DEMO_CHECKPOINT.exists():
        if rflow is None or load_checkpoint(DEMO_CHECKPOINT).model.scheduler.kind == "rflow":
            return DEMO_CHECKPOINT
        base = load_checkpoint(DEMO_CHECKPOINT)
        networks = dataclasses.replace(base.model, scheduler=rflow).build()
        spacing, patch = base.preprocessing.spacing_mm, base.latent_patch_shape
    else:
        networks = preset("tiny" if model == "demo" else "paper", scheduler=rflow).build()
        spacing, patch = (2.0, 2.0, 2.0), (32, 32, 32)
    path = workdir / f"{model}-{scheduler_kind}.pt"
    if not path.exists():
        save_checkpoint(
            Checkpoint.from_networks(
                networks,
                scale_factor=1.0,
                preprocessing=PreprocessingConfig(spacing_mm=spacing),
                latent_patch_shape=patch,
                model_name=f"bench-{model}",
                model_version="random",
                intended_use="benchmark only",
                training_data={"source": "none: random weights"},
            ),
            path,
        )
    return path


def run_one(args: argparse.Namespace) -> None:
    """One measurement in this process; prints one JSON line."""
    import torch

    from sct_model.checkpoint import load_checkpoint
    from sct_model.sampler import SCTSampler

    torch.set_num_threads(os.cpu_count() or 1)
    checkpoint = Path(args.checkpoint)
    sampler = SCTSampler.from_checkpoint(checkpoint, args.device)
    spacing = load_checkpoint(checkpoint).preprocessing.spacing_mm
    size = tuple(int(v) for v in args.size.split("x"))
    mr = _phantom(size, spacing)  # type: ignore[arg-type]
    device = sampler.info.device
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        sampler.predict(mr, steps=2, samples=1, seed=0, output_grid=mr.grid)  # warm-up (kernels, cuDNN plans)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    result = sampler.predict(mr, steps=args.steps, samples=1, seed=0, output_grid=mr.grid)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak_mb = (
        torch.cuda.max_memory_allocated() / 2**20
        if device.startswith("cuda")
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    print(json.dumps({"seconds": seconds, "peak_mb": peak_mb, "device": device, "timings": result.timings_s}))


def machine(device: str) -> str:
    text = (
        f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), Python {platform.python_version()}"
    )
    try:
        import torch

        text += f", torch {torch.__version__}"
        if device != "cpu" and torch.cuda.is_available():
            text += f", {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--models", nargs="+", default=["demo", "paper"], choices=["demo", "paper"])
    parser.add_argument("--sizes", nargs="+", default=["128x128x128", "256x256x128"])
    parser.add_argument("--steps", nargs="+", type=int, default=[10, 25, 50])
    parser.add_argument("--rflow-steps", nargs="+", type=int, default=[30])
    parser.add_argument("--no-rflow", action="store_true")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per measurement")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--size", help=argparse.SUPPRESS)
    parser.add_argument("--step-count", dest="steps_one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        args.steps = args.steps_one
        run_one(args)
        return 0

    plan = [(model, "ddpm", steps) for model in args.models for steps in args.steps]
    if not args.no_rflow:
        plan += [(model, "rflow", steps) for model in args.models for steps in args.rflow_steps]
    rows = []
    with tempfile.TemporaryDirectory(prefix="sct-sampler-bench-") as tmp:
        for size in args.sizes:
            skip_slower: set[tuple[str, str]] = set()
            for model, kind, steps in plan:
                label = f"{model:<6} {size:<12} {'DDIM' if kind == 'ddpm' else 'RFlow':<6} {steps:>3}"
                if (model, kind) in skip_slower:
                    rows.append((label, "skipped (fewer steps timed out)", "", ""))
                    continue
                checkpoint = _checkpoint(model, kind, Path(tmp))
                command = [
                    sys.executable,
                    __file__,
                    "--one",
                    "--checkpoint",
                    str(checkpoint),
                    "--size",
                    size,
                    "--step-count",
                    str(steps),
                    "--device",
                    args.device,
                ]
                try:
                    done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, check=True)
                except subprocess.TimeoutExpired:
                    rows.append((label, f"timeout (> {args.timeout:.0f} s)", "", ""))
                    skip_slower.add((model, kind))
                    print(rows[-1], flush=True)
                    continue
                except subprocess.CalledProcessError as exc:
                    rows.append((label, "error: " + (exc.stderr.strip().splitlines() or ["?"])[-1][:60], "", ""))
                    print(rows[-1], flush=True)
                    continue
                result = json.loads(done.stdout.strip().splitlines()[-1])
                timings = result["timings"]
                rows.append(
                    (
                        label,
                        f"{result['seconds']:.1f}",
                        f"{result['peak_mb']:.0f}",
                        f"{timings.get('sampling', 0):.1f} / {timings.get('decode', 0):.1f}",
                    )
                )
                print(rows[-1], flush=True)
    print()
    print(f"Sampler speed per volume ({machine(args.device)})")
    print()
    print(f"{'model  size         sampler steps':<34}{'seconds':>12}{'peak MB':>10}  sampling / decode s")
    print("-" * 80)
    for label, seconds, peak, split in rows:
        print(f"{label:<34}{seconds:>12}{peak:>10}  {split}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
