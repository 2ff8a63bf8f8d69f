"""sct-train end to end on tiny phantoms: both training stages, exact resumption, the sampler checkpoint,
the UNet baseline, the evaluation report; and the pieces of the training loop on their own."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from sct_model.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from sct_model.networks import SchedulerConfig, preset
from sct_model.preprocessing import PreprocessingConfig
from sct_model.result import HU_MAX, HU_MIN
from sct_model.sampler import SCTSampler
from tests.sct_model.phantom import HEAD_CENTRE_LPS, grid_around, head_mr, rotation
from training.baselines import UNetBaselinePredictor
from training.cli import main
from training.data import DataError, find_cases, load_case
from training.loop import (
    EMA,
    GradientStep,
    LoopOptions,
    MetricsLog,
    StepBatchSampler,
    TrainingError,
    lr_lambda,
    read_metrics,
)
from training.qa_reference import compute_reference
from training.train_ldm import LatentPatches, diffusion_target
from training.train_vae import load_vae

SPACING_MM = "6"  # 24³ phantoms at 6 mm: the model grid is the phantom grid
SPLIT = ["--val-fraction", "0.25", "--test-fraction", "0.25"]  # 8 cases: 4 train, 2 val, 2 test


def train_args(data: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [
        "--data", str(data), "--out", str(out), "--steps", str(steps), "--patch", "16", "16", "16",
        "--batch-size", "2", "--device", "cpu", "--checkpoint-every", "2", *SPLIT, *extra,
    ]  # fmt: skip


def metric_rows(run: Path) -> list[dict[str, str]]:
    return read_metrics(run / "metrics.csv")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("phantoms")
    assert main(["phantoms", "--out", str(root), "--cases", "8", "--size", "24", "--spacing", SPACING_MM]) == 0
    return root


@pytest.fixture(scope="module")
def vae_run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vae")
    assert main(["vae", *train_args(data, out, 4, "--val-every", "2", "--spacing", SPACING_MM)]) == 0
    return out


@pytest.fixture(scope="module")
def ldm_run(data: Path, vae_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ldm")
    args = train_args(data, out, 4, "--val-cases", "1", "--val-sampling-steps", "2")
    args += ["--vae", str(vae_run), "--name", "sct-ldm-test", "--intended-use", "tests only"]
    assert main(["ldm", *args]) == 0
    return out


@pytest.fixture(scope="module")
def unet_run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("unet")
    args = train_args(data, out, 2, "--spacing", SPACING_MM, "--channels", "8", "16", "32")
    assert main(["baseline-unet", *args]) == 0
    return out


# -- end to end ------------------------------------------------------------------------------------------


def test_vae_run_writes_metrics_state_split_and_scale_factor(vae_run: Path):
    rows = metric_rows(vae_run)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(math.isfinite(float(r["loss"])) and float(r["loss"]) > 0 for r in rows)
    validated = {int(r["step"]): float(r["val_mae_hu"]) for r in rows if r["val_mae_hu"]}
    assert set(validated) == {2, 4} and all(math.isfinite(v) and v > 0 for v in validated.values())
    vae = load_vae(vae_run)
    assert vae.step == 4 and math.isfinite(vae.scale_factor) and vae.scale_factor > 0
    assert vae.preprocessing.spacing_mm == (6.0, 6.0, 6.0)
    summary = json.loads((vae_run / "vae_summary.json").read_text())
    assert summary["scale_factor"] == pytest.approx(vae.scale_factor)
    split = json.loads((vae_run / "split.json").read_text())
    assert (len(split["train"]), len(split["val"]), len(split["test"])) == (4, 2, 2)
    assert not set(split["train"]) & set(split["test"])


def test_ldm_checkpoint_describes_itself_and_predicts_an_arbitrary_mr(ldm_run: Path, vae_run: Path):
    rows = metric_rows(ldm_run)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert [math.isfinite(float(r["val_mae_hu"])) for r in rows if r["val_mae_hu"]] == [True]  # at the end
    checkpoint = load_checkpoint(ldm_run / "checkpoint.pt")
    assert (checkpoint.model_name, checkpoint.intended_use) == ("sct-ldm-test", "tests only")
    assert checkpoint.scale_factor == pytest.approx(load_vae(vae_run).scale_factor)
    assert checkpoint.preprocessing.spacing_mm == (6.0, 6.0, 6.0) and checkpoint.latent_patch_shape == (
        4,
        4,
        4,
    )
    described = checkpoint.training_data
    assert described["ldm_steps"] == 4 and described["scheduler"] == "ddpm" and described["train_cases"] == 4
    assert described["test_ids"] and not set(described["train_ids"]) & set(described["test_ids"])
    # the saved autoencoder is the VAE run's, untouched by the diffusion training
    vae = load_vae(vae_run)
    for name, tensor in vae.state.items():
        assert torch.equal(checkpoint.autoencoder_state[name], tensor), name

    sampler = SCTSampler.from_checkpoint(ldm_run / "checkpoint.pt", "cpu")
    mr = head_mr(grid_around(HEAD_CENTRE_LPS, (40, 36, 20), (2.5, 2.5, 4.0), rotation("x", 10.0)))
    result = sampler.predict(mr, steps=3, samples=2, seed=1)
    hu = result.hu.array
    assert np.isfinite(hu).all() and hu.min() >= HU_MIN and hu.max() <= HU_MAX
    assert result.std_hu is not None and np.isfinite(result.std_hu.array).all()
    assert result.info.checkpoint_sha256 == checkpoint.file_sha256
    again = sampler.predict(mr, steps=3, samples=2, seed=1)
    np.testing.assert_array_equal(again.hu.array, hu)


def test_the_qa_reference_of_a_checkpoint_is_computed_from_training_cases_and_travels_in_it(
    data: Path, ldm_run: Path, tmp_path: Path
):
    checkpoint = load_checkpoint(ldm_run / "checkpoint.pt")
    assert checkpoint.qa_reference is None  # 4 training cases: too few, the run said so and wrote none
    cases = find_cases(data)  # all 8 phantoms stand in for a training set here
    reference = compute_reference(checkpoint, cases, description="test", steps=2, progress=False)
    encoder = checkpoint.model.mr_encoder
    assert (
        reference.cases == 8 and len(reference.features.names) == 2 * (encoder.channels[0] + encoder.out_channels) + 8
    )
    assert len(reference.features.training_scores) == 8 and reference.features.unit_distance > 0
    stats = reference.tissues
    for low, high in zip(stats.sct_fraction_min, stats.sct_fraction_max, strict=True):
        assert 0.0 <= low <= high <= 1.0
    assert sum(stats.ct_histogram_mean) == pytest.approx(1.0)
    path = tmp_path / "with-reference.pt"
    save_checkpoint(dataclasses.replace(checkpoint, qa_reference=reference), path)
    loaded = load_checkpoint(path)
    assert loaded.qa_reference == reference  # exactly, through the file
    mr, _, _ = load_case(cases[0])
    result = SCTSampler(loaded, device="cpu").predict(mr, steps=2, samples=1, seed=0)
    assert result.reference == reference and result.mr_features is not None
    assert reference.features.score(result.mr_features) < 3.0  # one of its own cases
    with pytest.raises(DataError, match="at least 5"):
        compute_reference(checkpoint, cases[:4], description="too few", steps=2, progress=False)
    # sct-train qa-reference: the checkpoint names 4 training cases, too few
    assert (
        main(
            [
                "qa-reference",
                "--checkpoint",
                str(ldm_run / "checkpoint.pt"),
                "--data",
                str(data),
                "--out",
                str(tmp_path / "x.pt"),
                "--steps",
                "2",
            ]
        )
        == 1
    )


def test_resume_continues_at_the_exact_step(data: Path, tmp_path: Path):
    """2 steps, then a crash that left a metrics row for step 3 behind, then --resume to 4: the same
    weights as 4 uninterrupted steps, and every step once in metrics.csv."""
    common = [
        "--spacing",
        SPACING_MM,
        "--lr-schedule",
        "constant",
        "--val-cases",
        "0",
        "--patch",
        "8",
        "8",
        "8",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["vae", *train_args(data, straight, 4, *common)]) == 0
    assert main(["vae", *train_args(data, resumed, 2, *common)]) == 0
    assert torch.load(resumed / "vae_state.pt", weights_only=True)["step"] == 2
    with open(resumed / "metrics.csv", "a", newline="") as handle:
        handle.write("3,0.0001,1.0,0.5,0.5,1.0,\n")  # written after the last state, before a crash

    assert main(["vae", *train_args(data, resumed, 4, *common, "--resume")]) == 0

    state = torch.load(resumed / "vae_state.pt", weights_only=True)
    assert state["step"] == 4
    assert [int(r["step"]) for r in metric_rows(resumed)] == [1, 2, 3, 4]
    assert metric_rows(resumed)[2]["loss"] != "0.5"  # the crashed run's row was replaced
    expected = torch.load(straight / "vae_state.pt", weights_only=True)["task_state"]["autoencoder"]
    for name, tensor in state["task_state"]["autoencoder"].items():
        assert torch.equal(tensor, expected[name]), name


def test_resumed_diffusion_training_matches_an_uninterrupted_run(data: Path, vae_run: Path, tmp_path: Path):
    """The optimiser, EMA, RNG and cached-latent batches all come back: the same EMA weights."""
    common = ["--vae", str(vae_run), "--lr-schedule", "constant", "--val-cases", "0"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["ldm", *train_args(data, straight, 4, *common)]) == 0
    assert main(["ldm", *train_args(data, resumed, 2, *common)]) == 0
    assert main(["ldm", *train_args(data, resumed, 4, *common, "--resume")]) == 0
    assert [int(r["step"]) for r in metric_rows(resumed)] == [1, 2, 3, 4]
    expected, got = load_checkpoint(straight / "checkpoint.pt"), load_checkpoint(resumed / "checkpoint.pt")
    for name, tensor in expected.unet_state.items():
        assert torch.equal(got.unet_state[name], tensor), name
    for name, tensor in expected.mr_encoder_state.items():
        assert torch.equal(got.mr_encoder_state[name], tensor), name


def test_a_run_directory_is_never_overwritten_and_resume_needs_a_state(data: Path, vae_run: Path, tmp_path):
    before = (vae_run / "vae_state.pt").read_bytes()
    assert main(["vae", *train_args(data, vae_run, 4, "--spacing", SPACING_MM)]) == 1
    assert (vae_run / "vae_state.pt").read_bytes() == before
    assert main(["vae", *train_args(data, tmp_path / "empty", 4, "--resume")]) == 1
    assert main(["ldm", *train_args(data, tmp_path / "ldm", 2, "--vae", str(tmp_path / "missing"))]) == 1
    assert main(["vae", "--data", str(data)]) == 2  # usage error: no --out


def test_rectified_flow_without_latent_cache(data: Path, vae_run: Path, tmp_path: Path):
    out = tmp_path / "rflow"
    args = train_args(data, out, 2, "--vae", str(vae_run), "--scheduler", "rflow", "--latent-cache", "off")
    assert main(["ldm", *args, "--val-sampling-steps", "2", "--val-cases", "1", "--ema-decay", "0"]) == 0
    checkpoint = load_checkpoint(out / "checkpoint.pt")
    assert (checkpoint.model.scheduler.kind, checkpoint.model.scheduler.prediction_type) == (
        "rflow",
        "v_prediction",
    )
    mr, _, _ = load_case(find_cases(data)[0])
    result = SCTSampler(checkpoint, device="cpu").predict(mr, steps=2, samples=1, seed=0)
    assert result.info.sampler == "RFlow" and np.isfinite(result.hu.array).all()


def test_unet_baseline_is_a_predictor(data: Path, unet_run: Path):
    assert [int(r["step"]) for r in metric_rows(unet_run)] == [1, 2]
    predictor = UNetBaselinePredictor.from_checkpoint(unet_run / "unet_baseline.pt", device="cpu")
    mr, ct, _ = load_case(find_cases(data)[0])
    result = predictor.predict(mr, steps=1, samples=1, seed=0, output_grid=ct.grid)
    assert result.hu.grid == ct.grid and np.isfinite(result.hu.array).all()
    assert result.info.method == "unet_regression" and len(result.info.checkpoint_sha256) == 64
    assert np.unique(result.hu.array[result.body_mask.array > 0]).size > 10  # the network's values


def test_evaluate_reports_every_method_on_the_held_out_cases(data: Path, ldm_run: Path, unet_run: Path, tmp_path):
    out = tmp_path / "report"
    args = ["evaluate", "--data", str(data), *SPLIT, "--out", str(out), "--device", "cpu", "--no-figures"]
    args += [
        "--checkpoint",
        f"ldm={ldm_run / 'checkpoint.pt'}",
        "--unet-baseline",
        str(unet_run / "unet_baseline.pt"),
    ]
    assert main([*args, "--steps", "2"]) == 0
    with open(out / "per_case.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    test_ids = set(json.loads((ldm_run / "split.json").read_text())["test"])
    assert {r["case"] for r in rows} == test_ids
    assert sorted({r["method"] for r in rows}) == ["bulk-density", "ldm", "unet-baseline"]
    assert len(rows) == 3 * len(test_ids)
    assert all(math.isfinite(float(r["mae_hu"])) and float(r["mae_hu"]) > 0 for r in rows)
    assert "ldm" in (out / "summary.md").read_text()
    assert main([*args, "--checkpoint", "no-equals-sign"]) == 1


# -- the diffusion conventions ------------------------------------------------------------------------------


class _Oracle(nn.Module):
    """A "UNet" that knows the clean latent: it returns the exact training target for its noisy input."""

    def __init__(self, config: SchedulerConfig, clean: torch.Tensor) -> None:
        super().__init__()
        self.config, self.clean = config, clean
        self.scheduler = config.build_training_scheduler()

    def forward(self, inputs: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        noisy = inputs[:, : self.clean.shape[1]].double()
        clean = self.clean.double()
        t = timesteps.double()
        if self.config.kind == "rflow":  # x_t = (1 - t/T) x0 + t/T noise
            s = (t / self.config.num_train_timesteps).reshape(-1, 1, 1, 1, 1)
            noise = (noisy - (1 - s) * clean) / s
        else:  # x_t = sqrt(abar) x0 + sqrt(1 - abar) noise
            abar = self.scheduler.alphas_cumprod.double()[timesteps.long()].reshape(-1, 1, 1, 1, 1)
            noise = (noisy - abar.sqrt() * clean) / (1 - abar).sqrt()
        t_long = timesteps.long() if self.config.kind == "ddpm" else timesteps
        target = diffusion_target(self.scheduler, self.config.prediction_type, clean, noise, t_long)
        return target.float()


@pytest.mark.parametrize(
    ("kind", "prediction_type"),
    [("ddpm", "epsilon"), ("ddpm", "v_prediction"), ("ddpm", "sample"), ("rflow", "v_prediction")],
)
def test_the_training_target_is_what_the_sampler_integrates(kind: str, prediction_type: str):
    """With a network that predicts the training target exactly, the sampler lands on the clean latent."""
    config = SchedulerConfig(kind=kind, prediction_type=prediction_type)
    checkpoint = Checkpoint.from_networks(
        preset("tiny", scheduler=config).build(),
        scale_factor=1.0,
        preprocessing=PreprocessingConfig(),
        latent_patch_shape=(4, 4, 4),
    )
    sampler = SCTSampler(checkpoint, device="cpu")
    clean = torch.randn((1, 3, 4, 4, 4), generator=torch.Generator().manual_seed(3))
    sampler.networks.unet = _Oracle(config, clean)
    latent = sampler.sample_latent(torch.zeros((1, 4, 4, 4, 4)), seed=0, steps=10)
    torch.testing.assert_close(latent, clean, atol=2e-3, rtol=0)


def test_latent_patches_keep_mr_and_latent_aligned():
    factor = 4
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in (32, 24, 16)), indexing="ij")
    mr = (z * 1000 + y * 10 + x)[None]  # each voxel names its position
    latent = np.stack([mr[0, ::factor, ::factor, ::factor]] * 3)
    mask = np.ones_like(mr, dtype=np.uint8)
    patches = LatentPatches([(mr, latent, mask)], (4, 2, 2), factor, samples_per_case=8, seed=1)
    seen = set()
    for index in range(len(patches)):
        item = patches[index]
        assert item["mr"].shape == (1, 16, 8, 8) and item["latent"].shape == (3, 4, 2, 2)
        torch.testing.assert_close(item["latent"][0], item["mr"][0, ::factor, ::factor, ::factor])
        seen.add(float(item["mr"][0, 0, 0, 0]))
    assert len(seen) > 1  # the crops move
    patches.set_epoch(5)
    first = patches[0]["mr"]
    patches.set_epoch(6)
    patches.set_epoch(5)
    torch.testing.assert_close(patches[0]["mr"], first)  # a function of (seed, epoch, index)


# -- the loop's parts ----------------------------------------------------------------------------------------


def test_step_batches_cover_each_epoch_and_resume_where_they_stopped():
    sampler = StepBatchSampler(length=5, batch_size=2, seed=7)
    stream = iter(sampler)
    batches = [next(stream) for _ in range(10)]  # 20 items: 4 epochs of 5
    for epoch in range(4):
        items = [k for batch in batches for k in batch][epoch * 5 : (epoch + 1) * 5]
        assert sorted(k % 5 for k in items) == list(range(5)) and all(k // 5 == epoch for k in items)
    resumed = iter(StepBatchSampler(length=5, batch_size=2, seed=7, start_batch=6))
    assert [next(resumed) for _ in range(4)] == batches[6:]
    other_seed = iter(StepBatchSampler(length=5, batch_size=2, seed=8))
    assert [next(other_seed) for _ in range(10)] != batches


def test_learning_rate_warms_up_then_follows_a_cosine_to_its_floor():
    options = LoopOptions(steps=100, warmup_steps=10, lr_schedule="cosine", lr_min_fraction=0.1)
    multiplier = lr_lambda(options)
    assert multiplier(0) == pytest.approx(0.1) and multiplier(9) == pytest.approx(1.0)
    assert multiplier(10) == pytest.approx(1.0) and multiplier(100) == pytest.approx(0.1)
    assert multiplier(55) == pytest.approx(0.55)
    constant = lr_lambda(LoopOptions(steps=100, lr_schedule="constant"))
    assert constant(0) == constant(99) == 1.0


def test_metrics_log_keeps_rows_up_to_the_resumed_step(tmp_path: Path):
    log = MetricsLog(tmp_path, ["loss", "val"], keep_through_step=None)
    for step in (1, 2, 3):
        log.write({"step": step, "loss": float(step)})
    log.close()
    log = MetricsLog(tmp_path, ["loss", "val"], keep_through_step=2)
    log.write({"step": 3, "loss": 30.0, "val": 1.5})
    log.close()
    rows = read_metrics(tmp_path / "metrics.csv")
    assert [(r["step"], r["loss"], r["val"]) for r in rows] == [
        ("1", "1", ""),
        ("2", "2", ""),
        ("3", "30", "1.5"),
    ]
    with pytest.raises(ValueError, match="column"):
        MetricsLog(tmp_path, ["loss"], keep_through_step=3).write({"step": 4, "unknown": 1.0})


def test_a_non_finite_gradient_step_is_skipped_and_too_many_stop_training():
    layer = nn.Linear(3, 1)
    before = [p.detach().clone() for p in layer.parameters()]
    step = GradientStep(torch.optim.SGD(layer.parameters(), lr=0.1), LoopOptions(steps=10))
    step.backward(layer(torch.full((1, 3), float("nan"))).sum())
    assert step.step() is False
    for old, new in zip(before, layer.parameters(), strict=True):
        assert torch.equal(old, new)
    step.backward(layer(torch.ones((1, 3))).sum())
    assert step.step() is True and not torch.equal(before[0], layer.weight)
    with pytest.raises(TrainingError, match="diverged"):
        for _ in range(25):
            step.backward(layer(torch.full((1, 3), float("inf"))).sum())
            step.step()


def test_ema_follows_the_weights_with_warm_up():
    layer = nn.Linear(1, 1, bias=False)
    nn.init.zeros_(layer.weight)
    ema = EMA(layer, decay=0.9)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    ema.update(layer)  # decay min(0.9, 2/11)
    assert float(ema.shadow["weight"]) == pytest.approx(1 - 2 / 11)
    for _ in range(200):
        ema.update(layer)
    assert float(ema.shadow["weight"]) == pytest.approx(1.0, abs=1e-6)
