"""training.evaluate: per-case metrics, per-region tables with paired tests, figures."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sct_model.baseline import BulkDensityBaseline
from sct_model.checkpoint import save_checkpoint
from sct_model.volume import Grid, Volume
from training.data import Case, load_case, write_split
from training.evaluate import PSNR_CAP_DB, evaluate, evaluate_checkpoints, paired_wilcoxon, run_evaluation
from training.phantoms import generate_phantoms


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> list[Case]:
    return generate_phantoms(tmp_path_factory.mktemp("phantoms"), 6, seed=8, shape_zyx=(40, 40, 40))


def oracle_for(cases: list[Case]):
    """A "method" that returns the case's own CT (found by its MR)."""
    by_mr = {}
    for case in cases:
        mr, ct, _ = load_case(case)
        by_mr[mr.array.tobytes()] = ct

    def oracle(mr: Volume) -> Volume:
        return by_mr[mr.array.tobytes()]

    return oracle


@pytest.fixture(scope="module")
def report(cases: list[Case], tmp_path_factory: pytest.TempPathFactory):
    methods = {"bulk-density": BulkDensityBaseline(), "oracle": oracle_for(cases)}
    return evaluate(cases, methods, tmp_path_factory.mktemp("eval"), reference_method="oracle", steps=1)


def test_per_case_csv(report, cases: list[Case]) -> None:
    with report.files["per_case"].open() as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 2 * len(cases)
    assert set(rows[0]) == {"case", "region", "method", "mae_hu", "psnr_db", "ssim", "ms_ssim", "seconds"}
    oracle = [r for r in rows if r["method"] == "oracle"]
    assert all(float(r["mae_hu"]) == 0.0 and math.isinf(float(r["psnr_db"])) for r in oracle)
    assert all(float(r["ssim"]) == pytest.approx(1.0) and float(r["ms_ssim"]) == pytest.approx(1.0) for r in oracle)
    bulk = [r for r in rows if r["method"] == "bulk-density"]
    # water everywhere in the body: bone and lung errors of hundreds of HU
    assert all(50.0 < float(r["mae_hu"]) < 600.0 and 10.0 < float(r["psnr_db"]) < 40.0 for r in bulk)
    assert all(0.0 < float(r["ssim"]) < 1.0 for r in bulk)
    assert {r["region"] for r in rows} == {"AB", "HN", "TH"}


def test_summary_tables(report) -> None:
    assert report.methods == ("oracle", "bulk-density")
    text = report.files["summary_md"].read_text()
    for heading in ("MAE (HU)", "PSNR (dB)", "SSIM", "MS-SSIM"):
        assert f"## {heading}" in text
    table_rows = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")]
    assert [r for r in table_rows if r in {"AB", "HN", "TH", "All"}][:4] == ["AB", "HN", "TH", "All"]
    # the oracle: MAE 0, PSNR capped for the statistics
    assert report.row("mae_hu", "oracle").mean == 0.0
    assert report.row("psnr_db", "oracle").mean == PSNR_CAP_DB
    # six cases, bulk density always worse: the exact two-sided p-value is 2 / 2**6
    all_mae = report.row("mae_hu", "bulk-density")
    assert all_mae.n == 6 and all_mae.p_value == pytest.approx(2 / 64) and all_mae.significance == "*"
    assert report.row("mae_hu", "bulk-density").mean == pytest.approx(
        np.mean([r.mae_hu for r in report.results if r.method == "bulk-density"])
    )
    # two cases per region: p = 0.5, present but not significant
    assert report.row("mae_hu", "bulk-density", "TH").p_value == pytest.approx(0.5)
    assert report.row("mae_hu", "oracle").p_value is None  # the reference itself
    with report.files["summary_csv"].open() as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 4 * 4 * 2  # metrics x (3 regions + All) x methods
    row = next(r for r in rows if (r["metric"], r["region"], r["method"]) == ("mae_hu", "All", "bulk-density"))
    assert float(row["p_value_vs_reference"]) == pytest.approx(2 / 64) and row["significance"] == "*"
    assert " *" in next(line for line in text.splitlines() if line.startswith("| All |"))


def test_figures(report) -> None:
    for metric in ("mae_hu", "psnr_db", "ssim", "ms_ssim"):
        path = report.files[f"boxplot_{metric}"]
        assert path.name == f"boxplot_{metric}.png"
        with Image.open(path) as image:
            assert image.width > 300 and len(np.unique(np.asarray(image.convert("L")))) > 10
    assert report.median_case_id in {r.case_id for r in report.results}
    for method in ("oracle", "bulk-density"):
        path = report.files[f"error_map_{method}"]
        with Image.open(path) as image:
            assert image.width > 800 and image.height > 300

    # the oracle's error panel is black, the baseline's is not
    def error_panel(method: str) -> np.ndarray:
        with Image.open(report.files[f"error_map_{method}"]) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=float)
        return pixels[60:260, 90 + 3 * 226 : 90 + 3 * 226 + 220]

    assert error_panel("oracle").max() < 10 and error_panel("bulk-density").max() > 100


def test_sct_on_another_grid_is_resampled_onto_the_ct(cases: list[Case], tmp_path: Path) -> None:
    """A method answering on a larger grid (two more voxels each side) is brought back onto the CT grid."""
    oracle = oracle_for(cases)

    def padded(mr: Volume) -> Volume:
        ct = oracle(mr)
        spacing = np.asarray(ct.grid.spacing_mm)
        grid = Grid(
            size=tuple(n + 4 for n in ct.grid.size),
            spacing_mm=ct.grid.spacing_mm,
            origin_mm=tuple(np.asarray(ct.grid.origin_mm) - 2 * spacing),
        )
        return Volume(np.pad(ct.array, 2, constant_values=-1000.0), grid)

    report = evaluate(cases[:1], {"padded": padded}, tmp_path, reference_method="padded", write_figures=False)
    (result,) = report.results
    assert result.mae_hu < 0.01 and result.psnr_db > 80.0 and result.ssim == pytest.approx(1.0, abs=1e-5)
    assert not (tmp_path / "boxplot_mae_hu.png").exists()


def test_paired_wilcoxon() -> None:
    assert paired_wilcoxon([1.0, 2.0], [1.0, 2.0]) is None
    assert paired_wilcoxon([1.0], [3.0]) is None
    assert paired_wilcoxon([1, 2, 3, 4, 5], [2, 3, 4, 5, 6]) == pytest.approx(2 / 32)


def test_reference_must_be_a_method(cases: list[Case], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="reference"):
        evaluate(cases[:1], {"bulk-density": BulkDensityBaseline()}, tmp_path)


def test_evaluate_checkpoints(cases: list[Case], tmp_path: Path) -> None:
    from tests.sct_model.phantom import tiny_checkpoint

    checkpoint = tmp_path / "tiny.pt"
    save_checkpoint(tiny_checkpoint(), checkpoint)
    split = write_split({"train": cases[2:], "test": cases[:2]}, tmp_path / "split.json")
    root = cases[0].mr_path.parents[3]
    report = evaluate_checkpoints(
        root, checkpoints={"tiny": checkpoint}, out_dir=tmp_path / "out", split=split, steps=2, device="cpu"
    )
    assert report.methods == ("tiny", "bulk-density") and report.reference_method == "tiny"
    assert {r.case_id for r in report.results} == {c.case_id for c in cases[:2]}
    assert all(math.isfinite(r.mae_hu) and r.seconds > 0 for r in report.results)
    assert (tmp_path / "out" / "error_map_tiny.png").stat().st_size > 1000


def test_run_evaluation_uses_the_training_split(cases: list[Case], tmp_path: Path) -> None:
    """``sct-train evaluate``'s entry: the held-out cases of the trainers' own split."""
    from training.loop import DataOptions, load_split

    root = cases[0].mr_path.parents[3]
    data = DataOptions(root=root, split_file=tmp_path / "split.json", test_fraction=0.5, val_fraction=0.0)
    report = run_evaluation(data=data, out_dir=tmp_path / "out", checkpoints={}, split="test", steps=1)
    expected = {c.case_id for c in load_split(data).test}
    assert {r.case_id for r in report.results} == expected and len(expected) == 3
    assert report.methods == ("bulk-density",) and str(report) == str(tmp_path / "out")
    assert (tmp_path / "out" / "summary.md").is_file()
