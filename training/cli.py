"""``sct-train``: phantoms, the two training stages, the UNet baseline and the evaluation.

    sct-train phantoms --out DIR --cases N [--seed S] [--regions HN TH AB] [--size 64] [--spacing 2.0]
    sct-train vae --data DIR --out RUN_DIR [--preset tiny|paper] [--spacing MM] [training options]
    sct-train ldm --data DIR --vae VAE_RUN --out RUN_DIR [--scheduler ddpm|rflow] [training options]
    sct-train baseline-unet --data DIR --out RUN_DIR [--spacing MM] [training options]
    sct-train evaluate --data DIR --out DIR --checkpoint NAME=PATH ... [--unet-baseline PATH]
    sct-train qa-reference --checkpoint PATH --data DIR [--out PATH] [--device cpu] [--steps 25]

Training options (all trainers): --steps --batch-size --accumulate --lr --lr-schedule --warmup-steps
--patch Z Y X --val-every --checkpoint-every --resume --seed --device --no-amp --num-workers, and the
split: --split-file --split-seed --val-fraction --test-fraction --regions. Interrupt a run at any time
and continue it with the same command and ``--resume``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm.contrib.logging import logging_redirect_tqdm

log = logging.getLogger(__name__)

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _add_data_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data and split")
    group.add_argument("--data", type=Path, required=True, help="SynthRAD Task1 data root (or its Task1 folder)")
    group.add_argument("--regions", nargs="+", default=None, help="only these regions (default: all)")
    group.add_argument(
        "--split-file", type=Path, default=None, help="JSON split (train/val/test case ids): read, or written"
    )
    group.add_argument("--split-seed", type=int, default=0, help="seed of the stratified split (default 0)")
    group.add_argument("--val-fraction", type=float, default=0.1)
    group.add_argument("--test-fraction", type=float, default=0.2)


def _add_training_options(parser: argparse.ArgumentParser, *, steps: int, lr: float, batch_size: int) -> None:
    _add_data_options(parser)
    group = parser.add_argument_group("training")
    group.add_argument("--out", type=Path, required=True, help="run directory (state, metrics, results)")
    group.add_argument("--steps", type=int, default=steps, help=f"optimiser steps in total (default {steps})")
    group.add_argument("--batch-size", type=int, default=batch_size, help=f"patches per micro-batch ({batch_size})")
    group.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimiser step (1)")
    group.add_argument("--lr", type=float, default=lr, help=f"peak learning rate ({lr:g})")
    group.add_argument("--lr-schedule", choices=("constant", "cosine"), default="cosine")
    group.add_argument("--warmup-steps", type=int, default=0)
    group.add_argument("--patch", type=int, nargs=3, metavar=("Z", "Y", "X"), default=(32, 32, 32))
    group.add_argument("--val-every", type=int, default=0, help="validate every N steps (0: at the end only)")
    group.add_argument("--checkpoint-every", type=int, default=500, help="save the state every N steps")
    group.add_argument("--resume", action="store_true", help="continue the run in --out at its last state")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    group.add_argument("--no-amp", action="store_true", help="no mixed precision on CUDA")
    group.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0: none)")
    group.add_argument("--num-workers", type=int, default=0, help="data loader worker processes")
    group.add_argument("--samples-per-case", type=int, default=4, help="patches per case per pass")
    group.add_argument("--val-cases", type=int, default=None, help="validation volumes per validation")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sct-train", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v: debug logging")
    commands = parser.add_subparsers(dest="command", required=True)

    phantoms = commands.add_parser("phantoms", help="generate paired MR/CT phantoms (SynthRAD2025 layout)")
    phantoms.add_argument("--out", type=Path, required=True)
    phantoms.add_argument("--cases", type=int, required=True, help="number of cases")
    phantoms.add_argument("--seed", type=int, default=0)
    phantoms.add_argument("--regions", nargs="+", default=["HN", "TH", "AB"])
    phantoms.add_argument("--size", type=int, default=64, help="voxels along each axis (default 64)")
    phantoms.add_argument("--spacing", type=float, default=2.0, help="voxel spacing in mm (default 2.0)")

    vae = commands.add_parser("vae", help="train the CT autoencoder (stage 1)")
    _add_training_options(vae, steps=2000, lr=1e-4, batch_size=2)
    vae.add_argument("--preset", choices=("tiny", "paper"), default="tiny")
    vae.add_argument("--spacing", type=float, default=1.0, help="the model's isotropic voxel spacing in mm")
    vae.add_argument("--latent-channels", type=int, default=None, help="latent channels (default: the preset's)")
    vae.add_argument("--kl-weight", type=float, default=1e-6)
    vae.add_argument("--adversarial-weight", type=float, default=0.0, help="patch-GAN loss weight (0: off)")
    vae.add_argument("--adversarial-start", type=int, default=0, help="the adversarial loss joins after N steps")

    ldm = commands.add_parser("ldm", help="train the MR-conditioned latent diffusion model (stage 2)")
    _add_training_options(ldm, steps=5000, lr=2e-4, batch_size=4)
    ldm.add_argument("--vae", type=Path, required=True, help="a finished VAE run directory or its vae_state.pt")
    ldm.add_argument("--preset", choices=("tiny", "paper"), default="tiny")
    ldm.add_argument("--scheduler", choices=("ddpm", "rflow"), default="ddpm")
    ldm.add_argument(
        "--prediction-type",
        choices=("epsilon", "v_prediction", "sample"),
        default="epsilon",
        help="ddpm target (rflow always predicts the velocity)",
    )
    ldm.add_argument("--ema-decay", type=float, default=0.999, help="EMA of the weights (0: off)")
    ldm.add_argument("--latent-cache", choices=("auto", "on", "off"), default="auto")
    ldm.add_argument("--val-sampling-steps", type=int, default=10, help="DDIM/RFlow steps at validation")
    ldm.add_argument("--name", default="sct-ldm", help="model name in the checkpoint")
    ldm.add_argument("--model-version", default="1", help="model version in the checkpoint")
    ldm.add_argument("--intended-use", default="demo, not for clinical use")
    ldm.add_argument("--data-note", default="", help="how the data was made (kept in the checkpoint)")
    ldm.add_argument(
        "--qa-reference-steps", type=int, default=25, help="sampling steps of the QA reference's sCTs (the node's)"
    )

    unet = commands.add_parser("baseline-unet", help="train the supervised 3D UNet baseline")
    _add_training_options(unet, steps=2000, lr=2e-4, batch_size=2)
    unet.add_argument("--spacing", type=float, default=1.0, help="the model's isotropic voxel spacing in mm")
    unet.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64, 128])
    unet.add_argument("--name", default="unet-baseline")

    evaluate = commands.add_parser("evaluate", help="evaluate sCT methods on the held-out test cases")
    _add_data_options(evaluate)
    evaluate.add_argument("--out", type=Path, required=True, help="report directory")
    evaluate.add_argument(
        "--checkpoint",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a diffusion checkpoint to evaluate (repeatable)",
    )
    evaluate.add_argument("--unet-baseline", type=Path, default=None, help="a UNet baseline file")
    evaluate.add_argument(
        "--bulk-density", action=argparse.BooleanOptionalAction, default=True, help="include bulk density"
    )
    evaluate.add_argument("--split", choices=("test", "val", "train"), default="test")
    evaluate.add_argument("--steps", type=int, default=25, help="sampling steps (default 25, as the node)")
    evaluate.add_argument("--samples", type=int, default=1)
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--device", default="auto")
    evaluate.add_argument("--no-figures", action="store_true", help="tables only (no box plots, error maps)")

    reference = commands.add_parser(
        "qa-reference",
        help="add the training data's statistics (the node's QA reference) to a checkpoint, without retraining",
    )
    reference.add_argument("--checkpoint", type=Path, required=True, help="the checkpoint (rewritten in place)")
    reference.add_argument("--data", type=Path, required=True, help="the data root it was trained on")
    reference.add_argument("--out", type=Path, default=None, help="write the new checkpoint here instead")
    reference.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    reference.add_argument("--steps", type=int, default=25, help="sampling steps of the sCTs (the node's, 25)")
    return parser


def _data_options(args: argparse.Namespace):  # noqa: ANN202 - typed by its import
    from training.loop import DataOptions

    return DataOptions(
        root=args.data,
        split_file=args.split_file,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        split_seed=args.split_seed,
        regions=tuple(args.regions) if args.regions else None,
    )


def _loop_options(args: argparse.Namespace):  # noqa: ANN202
    from training.loop import LoopOptions

    return LoopOptions(
        steps=args.steps,
        batch_size=args.batch_size,
        accumulate=args.accumulate,
        lr=args.lr,
        lr_schedule=args.lr_schedule,
        warmup_steps=args.warmup_steps,
        patch_zyx=tuple(args.patch),
        val_every=args.val_every,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        seed=args.seed,
        device=args.device,
        amp=not args.no_amp,
        max_grad_norm=args.max_grad_norm or None,
        num_workers=args.num_workers,
    )


def _run_phantoms(args: argparse.Namespace) -> int:
    from training.phantoms import generate_phantoms

    cases = generate_phantoms(
        args.out,
        args.cases,
        seed=args.seed,
        regions=tuple(args.regions),
        shape_zyx=(args.size,) * 3,
        spacing_mm=(args.spacing,) * 3,
    )
    print(f"{len(cases)} phantom case(s) in {args.out}")
    return EXIT_OK


def _run_vae(args: argparse.Namespace) -> int:
    from training.train_vae import VAEOptions, train_vae

    options = VAEOptions(
        preset=args.preset,
        latent_channels=args.latent_channels,
        spacing_mm=args.spacing,
        kl_weight=args.kl_weight,
        adversarial_weight=args.adversarial_weight,
        adversarial_start_step=args.adversarial_start,
        samples_per_case=args.samples_per_case,
        **({"val_cases": args.val_cases} if args.val_cases is not None else {}),
    )
    result = train_vae(_data_options(args), args.out, _loop_options(args), options)
    print(f"VAE: step {result.step}, scale factor {result.scale_factor:.6g}, state {result.state_path}")
    return EXIT_OK


def _run_ldm(args: argparse.Namespace) -> int:
    from training.train_ldm import LDMOptions, train_ldm

    options = LDMOptions(
        preset=args.preset,
        scheduler=args.scheduler,
        prediction_type=args.prediction_type,
        ema_decay=args.ema_decay,
        samples_per_case=args.samples_per_case,
        latent_cache=args.latent_cache,
        val_sampling_steps=args.val_sampling_steps,
        name=args.name,
        version=args.model_version,
        intended_use=args.intended_use,
        data_note=args.data_note,
        qa_reference_steps=args.qa_reference_steps,
        **({"val_cases": args.val_cases} if args.val_cases is not None else {}),
    )
    path, sha256 = train_ldm(_data_options(args), args.vae, args.out, _loop_options(args), options)
    print(f"checkpoint {path} (sha256 {sha256})")
    return EXIT_OK


def _run_unet(args: argparse.Namespace) -> int:
    from training.baselines import UNetBaselineOptions, UNetConfig, train_unet_baseline

    channels = tuple(args.channels)
    options = UNetBaselineOptions(
        spacing_mm=args.spacing,
        config=UNetConfig(channels=channels, strides=(2,) * (len(channels) - 1)),
        samples_per_case=args.samples_per_case,
        name=args.name,
        **({"val_cases": args.val_cases} if args.val_cases is not None else {}),
    )
    path, sha256 = train_unet_baseline(_data_options(args), args.out, _loop_options(args), options)
    print(f"UNet baseline {path} (sha256 {sha256})")
    return EXIT_OK


def _parse_named_paths(values: Sequence[str]) -> dict[str, Path]:
    named: dict[str, Path] = {}
    for value in values:
        name, separator, path = value.partition("=")
        if not separator or not name or not path:
            raise ValueError(f"--checkpoint {value!r}: expected NAME=PATH")
        if name in named:
            raise ValueError(f"--checkpoint: the name {name!r} is given twice")
        named[name] = Path(path)
    return named


def _run_evaluate(args: argparse.Namespace) -> int:
    from sct_model.baseline import BulkDensityBaseline
    from sct_model.sampler import SCTSampler
    from training.baselines import UNetBaselinePredictor
    from training.evaluate import ALL, evaluate
    from training.loop import load_split

    checkpoints = _parse_named_paths(args.checkpoint)
    split = load_split(_data_options(args))
    cases = {"train": split.train, "val": split.val, "test": split.test}[args.split]
    if not cases:
        raise ValueError(f"no {args.split} cases to evaluate")
    evaluated = {f"{case.region}/{case.case_id}" for case in cases}
    methods: dict[str, object] = {}
    for name, path in checkpoints.items():
        sampler = SCTSampler.from_checkpoint(path, device=args.device)
        seen = evaluated & set(sampler.checkpoint.training_data.get("train_ids", []))
        if seen:
            log.warning("%d evaluated case(s) were in %s's training set: %s", len(seen), name, sorted(seen))
        methods[name] = sampler
    if args.unet_baseline is not None:
        methods["unet-baseline"] = UNetBaselinePredictor.from_checkpoint(args.unet_baseline, device=args.device)
    if args.bulk_density:
        methods["bulk-density"] = BulkDensityBaseline()
    if not methods:
        raise ValueError("nothing to evaluate: give --checkpoint, --unet-baseline or --bulk-density")
    report = evaluate(
        cases,
        methods,  # type: ignore[arg-type]
        args.out,
        reference_method=next(iter(methods)),
        steps=args.steps,
        samples=args.samples,
        seed=args.seed,
        write_figures=not args.no_figures,
    )
    print(f"{len(cases)} {args.split} case(s); MAE in HU inside the mask, mean ± std (All regions):")
    for name in report.methods:
        row = report.row("mae_hu", name, ALL)
        print(f"  {name:24s} {row.mean:8.1f} ± {row.std:6.1f}  {row.significance}")
    print(f"report: {report.files['summary_md']}")
    return EXIT_OK


def _run_qa_reference(args: argparse.Namespace) -> int:
    from training.qa_reference import add_reference

    path, sha256, reference = add_reference(
        args.checkpoint, args.data, out_path=args.out, device=args.device, steps=args.steps
    )
    print(reference.summary())
    print(f"checkpoint {path} (sha256 {sha256})")
    return EXIT_OK


_COMMANDS = {
    "phantoms": _run_phantoms,
    "vae": _run_vae,
    "ldm": _run_ldm,
    "baseline-unet": _run_unet,
    "evaluate": _run_evaluate,
    "qa-reference": _run_qa_reference,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``sct-train`` with ``argv`` (default: the command line); returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error (argparse printed it)
        return int(exc.code) if isinstance(exc.code, int) else EXIT_USAGE
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from sct_model.checkpoint import CheckpointError
    from training.data import DataError
    from training.loop import TrainingError

    try:
        with logging_redirect_tqdm():
            return _COMMANDS[args.command](args)
    except (TrainingError, DataError, CheckpointError, ValueError, FileNotFoundError) as exc:
        log.error("%s: %s", args.command, exc)
        return EXIT_ERROR
    except KeyboardInterrupt:
        log.error("%s: interrupted; continue a training run with the same command and --resume", args.command)
        return EXIT_INTERRUPTED


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
