"""Every QA check function on small arrays with known answers, and the policy table."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from dicom_node.config import load_config
from dicom_node.qa.body_agreement import check_body_agreement, dice, hausdorff95_mm, sct_body
from dicom_node.qa.field_of_view import check_field_of_view, cranio_caudal_axes, truncation
from dicom_node.qa.hu_plausibility import check_hu_plausibility, outside_range_pp
from dicom_node.qa.in_distribution import check_in_distribution
from dicom_node.qa.policy import HOLD, REJECT, SEND, decide
from dicom_node.qa.results import ABOVE, BELOW, FAIL, PASS, WARN, CheckResult, Measurement, QAOutcome, judge, worst
from dicom_node.qa.uncertainty import check_uncertainty
from sct_model.reference import (
    FEATURE_SET,
    HU_HISTOGRAM_EDGES,
    TISSUE_CLASSES,
    FeatureDistribution,
    TissueStatistics,
    TrainingReference,
    fit_feature_distribution,
    tissue_fractions,
)
from sct_model.volume import Grid, Volume

QA = load_config().qa


def _grid(shape_zyx: tuple[int, int, int], spacing: tuple[float, float, float] = (1.0, 1.0, 1.0), **kw: object) -> Grid:
    return Grid(size=(shape_zyx[2], shape_zyx[1], shape_zyx[0]), spacing_mm=spacing, origin_mm=(0.0, 0.0, 0.0), **kw)  # type: ignore[arg-type]


def _box(shape: tuple[int, int, int], low: tuple[int, int, int], high: tuple[int, int, int]) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[low[0] : high[0], low[1] : high[1], low[2] : high[2]] = True
    return mask


# --- verdicts ----------------------------------------------------------------------------------------


def test_judge_levels_are_crossed_strictly_and_nan_fails() -> None:
    assert judge(1.0, 1.0, 2.0, ABOVE) == PASS
    assert judge(1.01, 1.0, 2.0, ABOVE) == WARN
    assert judge(2.01, 1.0, 2.0, ABOVE) == FAIL
    assert judge(0.95, 0.95, 0.9, BELOW) == PASS
    assert judge(0.94, 0.95, 0.9, BELOW) == WARN
    assert judge(0.89, 0.95, 0.9, BELOW) == FAIL
    assert judge(5.0, None, None, ABOVE) == PASS
    assert judge(float("nan"), 1.0, 2.0, ABOVE) == FAIL
    assert worst([PASS, WARN, PASS]) == WARN and worst([WARN, FAIL]) == FAIL and worst([]) == PASS
    with pytest.raises(ValueError):
        judge(1.0, 1.0, 2.0, "sideways")


def test_outcome_reasons_list_failures_first() -> None:
    warn = Measurement.judged("a", "x", 1.5, "mm", warn_at=1.0, fail_at=2.0, worse=ABOVE)
    fail = Measurement.judged("b", "y", 0.5, "", warn_at=0.9, fail_at=0.8, worse=BELOW)
    fine = Measurement.judged("c", "z", 0.0, "", warn_at=1.0, fail_at=2.0, worse=ABOVE)
    outcome = QAOutcome((CheckResult("a", (warn,), ""), CheckResult("b", (fail,), ""), CheckResult("c", (fine,), "")))
    assert outcome.verdict == FAIL
    assert outcome.reasons() == [
        "b.y = 0.5 (warn < 0.9, fail < 0.8): fail",
        "a.x = 1.5 mm (warn > 1, fail > 2): warn",
    ]
    assert outcome.verdict_line() == "fail (a warn, b fail, 1 pass)"


@pytest.mark.parametrize(
    ("policy", "verdict", "expected"),
    [
        ("send", PASS, SEND),
        ("send", WARN, SEND),
        ("send", FAIL, SEND),
        ("hold", PASS, SEND),
        ("hold", WARN, HOLD),
        ("hold", FAIL, HOLD),
        ("block", PASS, SEND),
        ("block", WARN, HOLD),
        ("block", FAIL, REJECT),
    ],
)
def test_policy_table(policy: str, verdict: str, expected: str) -> None:
    assert decide(policy, verdict) == expected


# --- body agreement ------------------------------------------------------------------------------------


def test_dice_of_two_boxes() -> None:
    a = _box((10, 10, 10), (0, 0, 0), (10, 10, 5))  # 500 voxels
    b = _box((10, 10, 10), (0, 0, 0), (10, 10, 4))  # 400 voxels, all inside a
    assert dice(a, b) == pytest.approx(2 * 400 / 900)
    assert dice(a, a) == 1.0
    assert dice(np.zeros_like(a), np.zeros_like(a)) == 1.0


def test_hausdorff95_of_shifted_slabs_in_millimetres() -> None:
    shape = (20, 20, 20)
    a = _box(shape, (2, 2, 2), (18, 18, 10))
    b = _box(shape, (2, 2, 2), (18, 18, 13))  # the x extent grows by 3 voxels at one end
    # x spacing 2 mm: the far faces lie 6 mm apart; far more than 5 % of the surface points see it
    assert hausdorff95_mm(a, b, (1.0, 1.0, 2.0)) == pytest.approx(6.0)
    assert hausdorff95_mm(a, a, (1.0, 1.0, 2.0)) == 0.0
    assert hausdorff95_mm(a, np.zeros_like(a), (1.0, 1.0, 1.0)) == math.inf
    assert hausdorff95_mm(np.zeros_like(a), np.zeros_like(a), (1.0, 1.0, 1.0)) == 0.0


def test_sct_body_fills_the_lungs_of_each_axial_slice() -> None:
    hu = np.full((3, 12, 12), -1000.0, np.float32)
    hu[:, 2:10, 2:10] = 40.0
    hu[:, 4:8, 4:8] = -800.0  # a lung inside the body, closed in every slice
    body = sct_body(hu)
    assert body[:, 2:10, 2:10].all() and body.sum() == 3 * 64


def test_body_agreement_passes_identical_outlines_and_fails_a_shrunken_one() -> None:
    grid = _grid((16, 32, 32), (2.0, 2.0, 3.0))
    body = _box((16, 32, 32), (2, 4, 4), (14, 28, 28))
    hu = np.where(body, 40.0, -1000.0).astype(np.float32)
    same = check_body_agreement(Volume(hu, grid), Volume(body.astype(np.uint8), grid), QA)
    assert same.verdict == PASS
    assert {m.quantity: m.value for m in same.measurements} == {"dice": 1.0, "hd95": 0.0}
    shrunk = np.where(_box((16, 32, 32), (2, 10, 10), (14, 22, 22)), 40.0, -1000.0).astype(np.float32)
    result = check_body_agreement(Volume(shrunk, grid), Volume(body.astype(np.uint8), grid), QA)
    values = {m.quantity: m for m in result.measurements}
    assert values["dice"].value == pytest.approx(2 * 12 * 12 * 12 / (12 * 12 * 12 + 12 * 24 * 24))
    assert values["dice"].verdict == FAIL and values["hd95"].verdict == FAIL
    assert result.verdict == FAIL


# --- HU plausibility ------------------------------------------------------------------------------------


def _reference(low: float = 0.0, high: float = 1.0) -> TrainingReference:
    n = len(TISSUE_CLASSES)
    bins = len(HU_HISTOGRAM_EDGES) - 1
    tissues = TissueStatistics(
        classes=TISSUE_CLASSES,
        ct_fraction_min=(0.0,) * n,
        ct_fraction_max=(1.0,) * n,
        sct_fraction_min=(low,) * n,
        sct_fraction_max=(high,) * n,
        sct_steps=25,
        histogram_edges_hu=HU_HISTOGRAM_EDGES,
        ct_histogram_mean=(1.0 / bins,) * bins,
        sct_histogram_mean=(1.0 / bins,) * bins,
    )
    features = FeatureDistribution(
        FEATURE_SET, ("a", "b"), (0.0, 0.0), (1.0, 1.0), ((1.0, 0.0), (0.0, 1.0)), 0.0, 2.0, (0.5,)
    )
    return TrainingReference(10, "test", features, tissues)


def test_tissue_fractions_count_each_class_inside_the_body() -> None:
    hu = np.array([[[-1000.0, -850.0, -100.0, 40.0, 40.0, 1200.0, 5000.0, 0.0]]], np.float32)
    body = np.array([[[1, 1, 1, 1, 1, 1, 1, 0]]], bool)
    # air 1, lung 1, fat 1, soft 2, bone 2 (5000 HU clipped into the top class) of 7
    assert tissue_fractions(hu, body) == pytest.approx(np.array([1, 1, 1, 2, 2]) / 7)
    assert outside_range_pp(0.30, 0.10, 0.25) == pytest.approx(5.0)
    assert outside_range_pp(0.05, 0.10, 0.25) == pytest.approx(5.0)
    assert outside_range_pp(0.20, 0.10, 0.25) == 0.0


def test_hu_plausibility_flags_a_class_outside_the_models_usual_range() -> None:
    grid = _grid((4, 10, 10))
    body = np.ones((4, 10, 10), np.uint8)
    hu = np.full((4, 10, 10), 40.0, np.float32)  # 100 % soft tissue
    reference = _reference(0.0, 0.80)  # the model never made more than 80 % of any class
    result = check_hu_plausibility(Volume(hu, grid), Volume(body, grid), reference, "diffusion", QA)
    soft = next(m for m in result.measurements if m.quantity == "soft_tissue")
    assert soft.value == pytest.approx(20.0) and soft.verdict == FAIL and result.verdict == FAIL
    fine = check_hu_plausibility(Volume(hu, grid), Volume(body, grid), _reference(0.0, 1.0), "diffusion", QA)
    assert fine.verdict == PASS


def test_hu_plausibility_bone_outside_the_body_and_impossible_values() -> None:
    grid = _grid((4, 10, 10), (2.0, 2.0, 2.0))  # 8 mm³ voxels
    body = np.zeros((4, 10, 10), np.uint8)
    body[:, 2:8, 2:8] = 1
    hu = np.where(body > 0, 40.0, -1000.0).astype(np.float32)
    hu[0, 0, :] = 1500.0  # 10 bone voxels outside the body: 0.08 mL
    hu[1, 0, :] = 1500.0
    hu[2, 0, :] = 1500.0  # 30 voxels: 0.24 mL
    result = check_hu_plausibility(Volume(hu, grid), Volume(body, grid), _reference(), "diffusion", QA)
    bone = next(m for m in result.measurements if m.quantity == "bone_outside_body")
    assert bone.value == pytest.approx(0.24)
    assert bone.verdict == judge(0.24, QA.bone_outside_body_warn_ml, QA.bone_outside_body_fail_ml, ABOVE)
    strict = dataclasses.replace(QA, bone_outside_body_warn_ml=0.1, bone_outside_body_fail_ml=0.2)
    assert (
        check_hu_plausibility(Volume(hu, grid), Volume(body, grid), _reference(), "diffusion", strict).verdict == FAIL
    )
    hu[2, 4, 4] = 4000.0  # inside the body, above 3071 HU
    impossible = check_hu_plausibility(Volume(hu, grid), Volume(body, grid), _reference(), "diffusion", QA)
    out = next(m for m in impossible.measurements if m.quantity == "outside_hu_range")
    assert out.value == pytest.approx(100.0 / body.sum()) and out.verdict == FAIL


def test_hu_plausibility_without_training_statistics() -> None:
    grid = _grid((2, 4, 4))
    volume, body = Volume(np.zeros((2, 4, 4), np.float32), grid), Volume(np.ones((2, 4, 4), np.uint8), grid)
    assert check_hu_plausibility(volume, body, None, "diffusion", QA).verdict == FAIL
    assert check_hu_plausibility(volume, body, None, "bulk_density", QA).verdict == PASS


# --- uncertainty -------------------------------------------------------------------------------------------


def test_uncertainty_mean_and_p95_inside_the_body() -> None:
    grid = _grid((1, 10, 10))
    body = np.zeros((1, 10, 10), np.uint8)
    body[0, :, :5] = 1  # 50 voxels
    std = np.zeros((1, 10, 10), np.float32)
    std[0, :, :5] = np.arange(50, dtype=np.float32).reshape(10, 5)  # 0..49 HU inside
    std[0, :, 5:] = 1000.0  # outside the body: ignored
    result = check_uncertainty(Volume(std, grid), Volume(body, grid), 4, QA)
    values = {m.quantity: m.value for m in result.measurements}
    assert values["mean"] == pytest.approx(24.5)
    assert values["p95"] == pytest.approx(np.percentile(np.arange(50), 95))
    loud = check_uncertainty(Volume(std + 500.0, grid), Volume(body, grid), 4, QA)
    assert loud.verdict == FAIL
    one = check_uncertainty(None, Volume(body, grid), 1, QA)
    assert one.verdict == PASS and [m.value for m in one.measurements] == [None]


# --- field of view ---------------------------------------------------------------------------------------------


def test_field_of_view_ignores_the_head_foot_ends_and_counts_lateral_cuts() -> None:
    shape = (10, 20, 20)
    grid = _grid(shape)
    inside = _box(shape, (0, 4, 4), (10, 16, 16))  # runs through the first and last slice: head-foot ends only
    assert truncation(grid, Volume(inside.astype(np.uint8), grid))[1] == 0
    assert check_field_of_view(grid, Volume(inside.astype(np.uint8), grid), QA).verdict == PASS
    cut = _box(shape, (2, 4, 0), (8, 16, 20))  # touches the left and right faces (x)
    share, touching, counted = truncation(grid, Volume(cut.astype(np.uint8), grid))
    # on each x face: a 6 (z) x 12 (y) cut; the outline: every surface voxel
    assert touching == 2 * 6 * 12
    assert share == pytest.approx(touching / counted)
    assert check_field_of_view(grid, Volume(cut.astype(np.uint8), grid), QA).verdict == FAIL


def test_field_of_view_of_a_sagittal_mr_knows_which_faces_are_head_foot() -> None:
    # a sagittal grid: image x along anterior-posterior (+y), image y along head-foot (-z), slices along x
    sagittal = Grid(
        size=(10, 10, 10), spacing_mm=(1.0, 1.0, 1.0), origin_mm=(0.0, 0.0, 0.0), direction=(0, 0, 1, 1, 0, 0, 0, -1, 0)
    )
    assert cranio_caudal_axes(sagittal) == (False, True, False)
    axial = _grid((4, 4, 4))
    assert cranio_caudal_axes(axial) == (False, False, True)


# --- in distribution ------------------------------------------------------------------------------------------


def test_in_distribution_score_is_the_mahalanobis_distance_in_units() -> None:
    reference = _reference()  # identity precision, unit distance 2
    result = check_in_distribution((3.0, 4.0), reference, "diffusion", QA)  # distance 5, score 2.5
    (score,) = result.measurements
    assert score.value == pytest.approx(2.5) and score.verdict == FAIL and "furthest from training" in score.note
    assert check_in_distribution((0.2, 0.0), reference, "diffusion", QA).verdict == PASS


def test_in_distribution_without_statistics_fails_and_bulk_density_does_not_apply() -> None:
    missing = check_in_distribution((1.0, 2.0), None, "diffusion", QA)
    assert missing.verdict == FAIL and "sct-train qa-reference" in missing.measurements[0].note
    assert check_in_distribution(None, None, "bulk_density", QA).verdict == PASS
    assert check_in_distribution((1.0, 2.0, 3.0), _reference(), "diffusion", QA).verdict == FAIL  # another feature set


def test_fit_feature_distribution_scores_its_own_kind_near_one() -> None:
    rng = np.random.default_rng(0)
    covariance = np.array([[1.0, 0.8, 0.0], [0.8, 1.0, 0.0], [0.0, 0.0, 4.0]])
    rows = rng.multivariate_normal([10.0, -5.0, 3.0], covariance, size=200)
    distribution = fit_feature_distribution(rows, ("a", "b", "c"))
    fresh = rng.multivariate_normal([10.0, -5.0, 3.0], covariance, size=200)
    scores = np.array([distribution.score(row) for row in fresh])
    assert 0.85 < np.mean(scores <= 1.0) <= 1.0  # 1.0 is the 95th percentile of unseen cases of the same kind
    # against the correlation: a and b move apart (2.5 standard deviations each)
    assert distribution.score([12.5, -7.5, 3.0]) > 2.0
    assert distribution.score([12.5, -2.5, 3.0]) < distribution.score([12.5, -7.5, 3.0])
    assert max(distribution.training_scores) > 1.0
    with pytest.raises(ValueError):
        fit_feature_distribution(rows[:3], ("a", "b", "c"))


def test_big_grids_are_checked_on_every_nth_voxel_with_the_same_centres() -> None:
    from dicom_node.qa.checks import MAX_CHECK_VOXELS, every, stride_for

    small = _grid((50, 100, 100))
    assert stride_for(small) == 1 and every(Volume(np.zeros((50, 100, 100)), small), 1).grid == small
    big = Grid(size=(285, 347, 346), spacing_mm=(0.9, 0.9, 0.6), origin_mm=(-100.0, -120.0, -50.0))
    step = stride_for(big)
    assert step == 2 and np.prod([-(-n // step) for n in big.size]) <= MAX_CHECK_VOXELS
    array = np.arange(np.prod(big.shape_zyx), dtype=np.float32).reshape(big.shape_zyx)
    coarse = every(Volume(array, big), step)
    assert coarse.grid.spacing_mm == (1.8, 1.8, 1.2) and coarse.grid.origin_mm == big.origin_mm
    index = np.array([[3.0, 5.0, 7.0]])  # a coarse voxel lies where the fine voxel at twice its index lies
    np.testing.assert_allclose(coarse.grid.index_to_point(index), big.index_to_point(2 * index))
    assert coarse.array[7, 5, 3] == array[14, 10, 6]
