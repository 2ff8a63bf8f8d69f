"""The QA report (dicom_node.qa.report): the planes it shows, the PDF and PNG pages, the files next to the job.

The PDF is checked with poppler-utils as a reader would see it: pdftoppm draws its pages (not blank),
pdftotext reads its text (job, checkpoint hash, every check, the verdicts, the reviewer and reason).
"""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dicom_node.qa import report
from dicom_node.qa.report import RenderedReport, clean_text, extract_planes, redraw_report, render_report, write_report
from dicom_node.qa.report_data import (
    PLANES_NPZ,
    REPORT_JSON,
    Histogram,
    Planes,
    Provenance,
    ReportData,
    Review,
    TissueRow,
)
from dicom_node.qa.results import ABOVE, BELOW, FAIL, PASS, WARN, CheckResult, Measurement, QAOutcome
from sct_model.volume import Grid, Volume

SHA256 = "9c1f" * 16
JOB_ID = 4711
PATIENT_NAME = "Doe^Jane $x^2$ \x07\u202e"  # mathtext markup, a bell and a right-to-left override
REVIEW = Review(
    decision="released",
    by="Dr. Ada Physicist",
    reason="Bone share high but plausible for this skull; checked on the MR.",
    at_utc="2026-03-04T09:12:00+00:00",
)
SPACING_MM = 3.0
SIZE = 40
CENTRE_LPS_MM = np.array([4.0, -6.0, 10.0])
MARKER_HU = 3000.0


# --- data -------------------------------------------------------------------------------------------------


def report_data(*, model_name: str = "sct-ldm-demo", decision: str = "held for review") -> ReportData:
    """All five checks: some pass, some warn, one fails; units, levels on both sides, a note, an unmeasured one."""
    checks = (
        CheckResult(
            "in_distribution",
            (Measurement.judged("in_distribution", "mahalanobis", 3.4, "", warn_at=3.0, fail_at=5.0, worse=ABOVE),),
            "MR further from the training MRs than most",
        ),
        CheckResult(
            "body_agreement",
            (
                Measurement.judged("body_agreement", "dice", 0.981, "", warn_at=0.95, fail_at=0.9, worse=BELOW),
                Measurement.judged("body_agreement", "hd95", 2.2, "mm", warn_at=5.0, fail_at=10.0, worse=ABOVE),
            ),
            "outlines agree",
        ),
        CheckResult(
            "hu_plausibility",
            (
                Measurement.judged(
                    "hu_plausibility", "bone_outside_body", 0.0, "mL", warn_at=1.0, fail_at=5.0, worse=ABOVE
                ),
                Measurement.judged(
                    "hu_plausibility",
                    "tissues_outside_range",
                    1,
                    "",
                    warn_at=0,
                    fail_at=2,
                    worse=ABOVE,
                    note="bone 21.4 % (training 8.1 to 17.9 %)",
                ),
            ),
            "tissue shares against training",
        ),  # fmt: skip
        CheckResult(
            "uncertainty",
            (Measurement.judged("uncertainty", "p95_std", 131.0, "HU", warn_at=80.0, fail_at=110.0, worse=ABOVE),),
            "sample spread inside the body",
        ),
        CheckResult(
            "field_of_view",
            (Measurement.unmeasured("field_of_view", "truncation", WARN, "no field-of-view edge found", unit="%"),),
            "body cut by the MR's field of view",
        ),
    )
    provenance = Provenance(
        job_id=JOB_ID,
        patient_name=PATIENT_NAME,
        patient_id="PAT-0042",
        study_instance_uid="1.2.826.0.1.3680043.8.498.1",
        mr_series_uid="1.2.826.0.1.3680043.8.498.2",
        mr_series_description="T1 MPRAGE 3D",
        mr_instances=176,
        mr_scanner="ACME Magnet 3T",
        sct_series_uid="1.2.826.0.1.3680043.8.498.3",
        sct_slices=SIZE,
        method="diffusion",
        model_name=model_name,
        model_version="0.1.0+ckpt.3",
        checkpoint_sha256=SHA256,
        sampler="DDIM",
        device="cpu",
        steps=50,
        samples=4,
        seed=1234,
        route="brain",
        qa_policy="hold",
        computed_at_utc="2026-03-04T05:06:07+00:00",
    )
    edges = tuple(float(v) for v in range(-1000, 2001, 50))
    centres = np.arange(-975.0, 2000.0, 50.0)

    def percent(peaks: list[tuple[float, float, float]]) -> tuple[float, ...]:
        density = np.zeros_like(centres)
        for weight, mean, sd in peaks:
            density += weight * np.exp(-0.5 * ((centres - mean) / sd) ** 2)
        return tuple(float(v) for v in 100 * density / density.sum())

    histogram = Histogram(
        edges_hu=edges,
        sct_percent=percent([(3, -90, 40), (30, 40, 30), (6, 900, 300)]),
        training_percent=percent([(3, -90, 40), (34, 40, 30), (4, 800, 300)]),
    )
    tissues = (
        TissueRow("fat", -200, -20, 9.5, 6.0, 15.0),
        TissueRow("soft tissue", -20, 200, 67.1, 62.0, 80.0),
        TissueRow("bone", 200, 3072, 21.4, 8.1, 17.9),
    )
    return ReportData(provenance, QAOutcome(checks), tissues, histogram, decision)


def points_of(grid: Grid) -> np.ndarray:
    """The LPS point (z, y, x, 3) of every voxel of ``grid``."""
    z, y, x = np.meshgrid(*(np.arange(n) for n in grid.shape_zyx), indexing="ij")
    index = np.stack([x.ravel(), y.ravel(), z.ravel()], axis=1)
    return grid.index_to_point(index).reshape(*grid.shape_zyx, 3)


def marker(points: np.ndarray) -> np.ndarray:
    """A box mostly to the patient's left, anterior and superior of the centre, reaching just across
    the three planes through the centre (so that each plane shows it, off-centre)."""
    offset = points - CENTRE_LPS_MM
    return (
        (offset[..., 0] > -4) & (offset[..., 0] < 20)  # x to the patient's left
        & (offset[..., 1] < 4) & (offset[..., 1] > -20)  # y: anterior is -y
        & (offset[..., 2] > -4) & (offset[..., 2] < 20)  # z superior
    )  # fmt: skip


def oblique_grid(size: int = 36, spacing_mm: float = 3.4) -> Grid:
    """A double-oblique MR grid (rotated 20° about L-R, then 10° about A-P) centred on the body."""

    def rotation(axis: int, degrees: float) -> np.ndarray:
        c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
        i, j = [k for k in range(3) if k != axis]
        matrix = np.eye(3)
        matrix[i, i], matrix[i, j], matrix[j, i], matrix[j, j] = c, -s, s, c
        return matrix

    direction = rotation(1, 10.0) @ rotation(0, 20.0)
    grid = Grid(size=(size,) * 3, spacing_mm=(spacing_mm,) * 3, origin_mm=(0.0, 0.0, 0.0), direction=direction.ravel())
    origin = CENTRE_LPS_MM - grid.index_to_point((np.asarray(grid.size) - 1) / 2)[0]
    return Grid(grid.size, grid.spacing_mm, tuple(origin), grid.direction)


def volumes() -> tuple[Volume, Volume, Volume, Volume]:
    """(MR on an oblique grid, sCT, std, body on a 3 mm axial 40^3 grid): an ellipsoid body with the marker."""
    grid = Grid(
        size=(SIZE,) * 3,
        spacing_mm=(SPACING_MM,) * 3,
        origin_mm=tuple(CENTRE_LPS_MM - (SIZE - 1) / 2 * SPACING_MM),
    )
    points = points_of(grid)
    relative = (points - CENTRE_LPS_MM) / np.array([50.0, 55.0, 45.0])
    body = np.sum(relative**2, axis=-1) < 1.0
    sct = np.where(body, 40.0, -1000.0).astype(np.float32)
    sct[marker(points) & body] = MARKER_HU
    std = np.where(body, 20.0 + 10.0 * relative[..., 0], 0.0).astype(np.float32)
    mr_grid = oblique_grid()
    mr_points = points_of(mr_grid)
    mr_relative = (mr_points - CENTRE_LPS_MM) / np.array([50.0, 55.0, 45.0])
    mr = np.where(np.sum(mr_relative**2, axis=-1) < 1.0, 400.0, 0.0)
    mr[marker(mr_points)] = 1000.0
    return Volume(mr.astype(np.float32), mr_grid), Volume(sct, grid), Volume(std, grid), Volume(body, grid)


@pytest.fixture(scope="module")
def planes() -> Planes:
    return extract_planes(*volumes())


@pytest.fixture(scope="module")
def rendered(planes: Planes) -> RenderedReport:
    return render_report(report_data(), planes, REVIEW)


def pdf_text(pdf: bytes, scratch: Path) -> str:
    path = scratch / "pdftotext-input.pdf"
    path.write_bytes(pdf)
    result = subprocess.run(["pdftotext", "-enc", "UTF-8", str(path), "-"], capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return " ".join(result.stdout.decode("utf-8").split())  # lines joined, as one reads wrapped text


def assert_not_blank(png: bytes) -> None:
    grey = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=float)
    assert grey.std() > 25, f"page looks blank (grey level SD {grey.std():.1f})"
    assert np.mean(grey < 200) > 0.04, f"only {np.mean(grey < 200):.1%} of the page is not white"


# --- planes -------------------------------------------------------------------------------------------------


def test_planes_are_isotropic_and_cover_the_sct(planes: Planes) -> None:
    assert planes.pixel_mm == pytest.approx(SPACING_MM)
    axial, coronal, sagittal = planes.sct
    assert axial.shape == coronal.shape == sagittal.shape == (SIZE, SIZE)  # 40 voxels of 3 mm in each direction
    for group in (planes.mr, planes.sct, planes.std or ()):
        assert all(plane.dtype == np.float32 for plane in group)
    assert all(plane.dtype == np.bool_ and plane.any() and not plane.all() for plane in planes.body)
    low, high = planes.mr_window
    assert 0.0 <= low < 400.0 < high <= 1000.0  # body MR is 400, the marker 1000


def test_planes_are_capped_for_large_grids() -> None:
    grid = Grid(size=(512, 512, 300), spacing_mm=(0.9, 0.9, 0.6), origin_mm=(-230.0, -230.0, -90.0))
    body = np.zeros(grid.shape_zyx, dtype=bool)
    body[100:200, 150:350, 150:350] = True
    hu = Volume(np.zeros(grid.shape_zyx, dtype=np.float32), grid)
    result = extract_planes(hu, hu, None, Volume(body, grid))
    assert result.std is None
    assert max(max(plane.shape) for plane in result.sct) == report.MAX_PLANE_PIXELS
    assert result.pixel_mm == pytest.approx(512 * 0.9 / report.MAX_PLANE_PIXELS)
    assert result.sct[1].shape == (round(300 * 0.6 / result.pixel_mm), report.MAX_PLANE_PIXELS)


def centroid(mask: np.ndarray) -> tuple[float, float]:
    rows, columns = np.nonzero(mask)
    assert rows.size, "the marker is not on the plane"
    return float(rows.mean()), float(columns.mean())


@pytest.mark.parametrize("source", ["sct", "mr"])
def test_planes_are_oriented_as_radiologists_look_at_them(planes: Planes, source: str) -> None:
    """The marker lies to the patient's left, anterior and superior: axial (seen from the feet, anterior
    up) shows it up and right; coronal (seen from the front, head up) up and right; sagittal (seen from
    the patient's left, head up, anterior on the left) up and left. The MR, on an oblique grid, too."""
    stack = planes.sct if source == "sct" else planes.mr
    threshold = MARKER_HU / 2 if source == "sct" else 700.0
    middle = (SIZE - 1) / 2
    (axial_row, axial_column), (coronal_row, coronal_column), (sagittal_row, sagittal_column) = (
        centroid(plane > threshold) for plane in stack
    )
    assert axial_row < middle < axial_column  # anterior up, left on the right
    assert coronal_row < middle < coronal_column  # superior up, left on the right
    assert sagittal_row < middle and sagittal_column < middle  # superior up, anterior on the left


def test_std_plane_follows_the_std_volume(planes: Planes) -> None:
    assert planes.std is not None
    axial = planes.std[0]
    inside = axial[planes.body[0]]
    assert inside.min() > 0 and axial[~planes.body[0]].max() == 0
    row = axial[SIZE // 2][planes.body[0][SIZE // 2]]
    assert row[-1] > row[0]  # the std grows to the patient's left, on the right of the plane


def test_planes_round_trip_through_the_npz(planes: Planes, tmp_path: Path) -> None:
    planes.save(tmp_path)
    loaded = Planes.load(tmp_path)
    assert loaded.pixel_mm == planes.pixel_mm and loaded.mr_window == planes.mr_window
    assert loaded.std is not None and planes.std is not None
    for a, b in zip((*loaded.mr, *loaded.sct, *loaded.std, *loaded.body), (*planes.mr, *planes.sct, *planes.std,
                                                                           *planes.body), strict=True):  # fmt: skip
        np.testing.assert_array_equal(a, b)


def test_extract_planes_refuses_volumes_on_other_grids() -> None:
    mr, sct, std, body = volumes()
    shifted = Grid(body.grid.size, body.grid.spacing_mm, tuple(np.asarray(body.grid.origin_mm) + 1.0))
    with pytest.raises(ValueError, match="body"):
        extract_planes(mr, sct, std, Volume(body.array, shifted))


# --- the rendered report ------------------------------------------------------------------------------------


def test_every_page_is_drawn_and_readable(rendered: RenderedReport, tmp_path: Path) -> None:
    assert rendered.pdf.startswith(b"%PDF-")
    assert 1 <= len(rendered.pages_png) <= 2
    for png in rendered.pages_png:
        image = Image.open(io.BytesIO(png))
        assert image.format == "PNG"
        assert image.size == pytest.approx((8.27 * 150, 11.69 * 150), abs=2)  # A4 at 150 dpi
        assert_not_blank(png)
    (tmp_path / "report.pdf").write_bytes(rendered.pdf)
    subprocess.run(["pdftoppm", "-png", "-r", "50", str(tmp_path / "report.pdf"), str(tmp_path / "page")],
                   check=True, timeout=60)  # fmt: skip
    pages = sorted(tmp_path.glob("page-*.png"))
    assert len(pages) == len(rendered.pages_png)
    for page in pages:
        assert_not_blank(page.read_bytes())


def fullest_report_data() -> ReportData:
    """A report as full as the gate writes one: every quantity of every check judged, with the notes
    the checks write at their longest, a failing in_distribution with its reasons, long summaries."""
    summary = "a summary a physicist reads, " * 8
    in_distribution_note = "furthest from training: block1.c7.std -12.5 sd, output.c13.mean +11.4 sd"
    tissue_note = "100.0 % of the body; usual 100.0-100.0, CTs 100.0-100.0"
    fov_note = "1234567 of 12345678 outline voxels on a lateral or AP edge of the MR's view"

    def judged(check: str, quantity: str, value: float, note: str = "", *, worse: str = ABOVE) -> Measurement:
        return Measurement.judged(check, quantity, value, "pp", warn_at=3.0, fail_at=10.0, worse=worse, note=note)

    tissues = ("air", "lung", "fat", "soft_tissue", "bone")
    checks = (
        CheckResult("in_distribution", (judged("in_distribution", "score", 12.0, in_distribution_note),), summary),
        CheckResult(
            "body_agreement",
            (
                judged("body_agreement", "dice", 0.5, worse=BELOW),
                judged("body_agreement", "hd95", 30.0, "one of the two outlines is empty"),
            ),
            summary,
        ),  # fmt: skip
        CheckResult(
            "hu_plausibility",
            (
                *(judged("hu_plausibility", t, 40.0, tissue_note) for t in tissues),
                judged("hu_plausibility", "bone_outside_body", 4.0),
                judged("hu_plausibility", "outside_hu_range", 4.0, "of the body outside [-1024, 3071] HU"),
            ),
            summary,
        ),  # fmt: skip
        CheckResult("uncertainty", (judged("uncertainty", "mean", 90.0), judged("uncertainty", "p95", 400.0)), summary),
        CheckResult("field_of_view", (judged("field_of_view", "truncated_outline", 7.0, fov_note),), summary),
    )
    base = report_data()
    return ReportData(base.provenance, QAOutcome(checks), base.tissues, base.histogram, "not sent: blocked")


def test_the_fullest_report_stays_two_pages(planes: Planes, tmp_path: Path) -> None:
    """Every check as full as the gate writes it and a reviewer's longest reason: still two pages, with
    the provenance, the planes, the uncertainty and the histogram all there."""
    reason = "checked slice by slice on the MR; " * 30  # more than the box shows
    longest = Review("released", "Dr. Ada Physicist", reason, "2026-03-04T09:12:00+00:00")
    report = render_report(fullest_report_data(), planes, longest, png=False)
    text = pdf_text(report.pdf, tmp_path)
    assert "page 2/2" in text and "page 3/" not in text
    for title in ("Checks", "Provenance", "MR, synthetic CT and its uncertainty", "Uncertainty (SD)",
                  "HU histogram inside the body", "Dr. Ada Physicist"):  # fmt: skip
        assert title in text


def test_the_pdf_says_what_a_physicist_needs(rendered: RenderedReport, tmp_path: Path) -> None:
    text = pdf_text(rendered.pdf, tmp_path)
    assert "QA report" in text and "Synthetic CT" in text
    assert f"sct-node QA report — job {JOB_ID} — synthetic CT, not measured — page 1/" in text
    assert "not for clinical use unless validated" in text  # a demo model
    assert SHA256 in text
    for check in ("in_distribution", "body_agreement", "hu_plausibility", "uncertainty", "field_of_view"):
        assert check in text
    for word in ("PASS", "WARN", "FAIL"):
        assert word in text
    assert "QA VERDICT: FAIL" in text
    assert "2.2 mm" in text and "warn > 5, fail > 10" in text and "warn < 0.95" in text
    assert "bone 21.4 % (training 8.1 to 17.9 %)" in text  # the note
    assert "held for review" in text
    # The review, prominently
    assert "RELEASED" in text and REVIEW.by in text and REVIEW.reason in text and "2026-03-04 09:12:00 UTC" in text
    # Header text is printed as it is: no mathtext, no control characters
    assert "Doe^Jane $x^2$" in text and "\x07" not in text and "\u202e" not in text
    assert "PAT-0042" in text and "T1 MPRAGE 3D" in text and "ACME Magnet 3T" in text


def test_pdf_metadata(rendered: RenderedReport, tmp_path: Path) -> None:
    (tmp_path / "report.pdf").write_bytes(rendered.pdf)
    info = subprocess.run(["pdfinfo", str(tmp_path / "report.pdf")], capture_output=True, text=True, timeout=60)
    assert info.returncode == 0, info.stderr
    fields = dict(line.split(":", 1) for line in info.stdout.splitlines() if ":" in line)
    assert fields["Creator"].strip() == "sct-node"
    assert f"job {JOB_ID}" in fields["Title"] and "synthetic CT" in fields["Title"]
    assert "synthetic CT" in fields["Subject"]
    assert int(fields["Pages"]) == len(rendered.pages_png)


def test_clean_text_keeps_text_on_one_line() -> None:
    assert clean_text("a\nb\tc\x00d\u202ee  f") == "a b c d e f"
    assert clean_text("$x^2$ \\alpha") == "$x^2$ \\alpha"
    assert clean_text("x" * 300, 10) == "x" * 9 + "…"


# --- files next to the job ----------------------------------------------------------------------------------


def test_write_then_redraw_with_the_review(planes: Planes, tmp_path: Path) -> None:
    folder = tmp_path / "job"
    data = report_data(model_name="sct-ldm", decision="held for review")
    no_std = Planes(planes.pixel_mm, planes.mr, planes.sct, None, planes.body, planes.mr_window)
    written = write_report(folder, data, no_std)
    names = {path.name for path in folder.iterdir()}
    pages = [f"report-page-{k}.png" for k in range(1, len(written.pages_png) + 1)]
    assert names == {REPORT_JSON, PLANES_NPZ, "report.pdf", *pages}  # no temporary files left
    assert (folder / "report.pdf").read_bytes() == written.pdf
    assert [(folder / page).read_bytes() for page in pages] == list(written.pages_png)
    text = pdf_text(written.pdf, tmp_path)
    assert "not for clinical use" not in text and REVIEW.by not in text and "HELD FOR REVIEW" in text
    assert ReportData.load(folder) == data

    stale = folder / f"report-page-{len(pages) + 1}.png"
    stale.write_bytes(written.pages_png[0])  # as if an earlier report had had one page more
    redrawn = redraw_report(folder, REVIEW)
    assert not stale.exists()
    assert (folder / "report.pdf").read_bytes() == redrawn.pdf
    assert len(redrawn.pages_png) == len(pages)
    assert [(folder / page).read_bytes() for page in pages] == list(redrawn.pages_png)
    text = pdf_text(redrawn.pdf, tmp_path)
    assert REVIEW.by in text and REVIEW.reason in text and "RELEASED" in text


def test_redraw_without_stored_planes_fails_clearly(tmp_path: Path) -> None:
    report_data().save(tmp_path)
    with pytest.raises(FileNotFoundError, match=PLANES_NPZ):
        redraw_report(tmp_path, None)


def test_status_colours_follow_the_decision() -> None:
    data = report_data()
    assert report._status(data, None) == ("HELD FOR REVIEW", report.VERDICT_COLOURS[WARN])
    rejected = Review("rejected", "Dr. B", "outline wrong", "2026-03-04T10:00:00Z")
    assert report._status(data, rejected) == ("REJECTED", report.VERDICT_COLOURS[FAIL])
    sent = report_data(decision="sent")
    assert report._status(sent, None) == ("SENT", report.VERDICT_COLOURS[PASS])
