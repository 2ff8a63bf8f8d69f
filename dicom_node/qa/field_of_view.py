"""``field_of_view``: is the body cut by the edge of the MR's field of view (truncated anatomy)?

Where the MR did not see the patient, the sCT has no patient either, and a beam through the missing
part is computed through air. What counts is the lateral and antero-posterior edges: every scan
cuts the body at its cranial and caudal ends, and that is expected. So, on the sCT grid, each
surface voxel of the MR's body (``body_agreement.surface``: a face neighbour outside the body, or
outside the MR's field of view, which the body mask already excludes) is located in the MR's own
voxel grid: a voxel within one sCT voxel of one of the MR grid's faces lies on that face. Faces
whose normal points head-foot (within 45 degrees) are the cranio-caudal ends: voxels only there do
not count at all. The value is the share of the counted outline that lies on the other faces.
"""

from __future__ import annotations

import math

import numpy as np

from dicom_node.config import QAConfig
from dicom_node.qa.body_agreement import surface
from dicom_node.qa.results import ABOVE, CheckResult, Measurement
from sct_model.volume import Grid, Volume

NAME = "field_of_view"
CRANIO_CAUDAL_COS = math.cos(math.radians(45.0))


def cranio_caudal_axes(grid: Grid) -> tuple[bool, bool, bool]:
    """For each image axis (x, y, z) of ``grid``: whether its faces are head-foot ends."""
    matrix = grid.direction_matrix  # columns: the axes' unit vectors in LPS
    return tuple(abs(float(matrix[2, axis])) >= CRANIO_CAUDAL_COS for axis in range(3))  # type: ignore[return-value]


def truncation(mr_grid: Grid, body: Volume) -> tuple[float, int, int]:
    """(share of the counted outline on a lateral face, voxels on a lateral face, counted outline voxels)."""
    mask = np.asarray(body.array, dtype=bool)
    edge = surface(mask)
    points_zyx = np.argwhere(edge)
    if points_zyx.size == 0:
        return 0.0, 0, 0
    lps = body.grid.index_to_point(points_zyx[:, ::-1].astype(np.float64))
    # continuous MR voxel index (x, y, z) of each point, then its distance (mm) to the low and high faces
    relative = (lps - np.asarray(mr_grid.origin_mm)) @ mr_grid.direction_matrix
    spacing = np.asarray(mr_grid.spacing_mm)
    size = np.asarray(mr_grid.size, dtype=np.float64)
    to_low = relative + 0.5 * spacing
    to_high = (size - 0.5) * spacing - relative
    tolerance = max(body.grid.spacing_mm)
    on_face = (to_low <= tolerance) | (to_high <= tolerance)  # (points, 3 axes)
    ends = np.asarray(cranio_caudal_axes(mr_grid))
    on_lateral = on_face[:, ~ends].any(axis=1)
    only_on_end = on_face[:, ends].any(axis=1) & ~on_lateral
    counted = int(np.count_nonzero(~only_on_end))
    touching = int(np.count_nonzero(on_lateral))
    return (touching / counted if counted else 0.0), touching, counted


def check_field_of_view(mr_grid: Grid, mr_body: Volume, qa: QAConfig) -> CheckResult:
    share, touching, counted = truncation(mr_grid, mr_body)
    measurement = Measurement.judged(
        NAME,
        "truncated_outline",
        100.0 * share,
        "%",
        warn_at=qa.fov_truncation_warn_percent,
        fail_at=qa.fov_truncation_fail_percent,
        worse=ABOVE,
        note=f"{touching} of {counted} outline voxels on a lateral or AP edge of the MR's view",
    )
    summary = (
        "the body lies inside the MR's field of view (head-foot ends excepted)"
        if touching == 0
        else f"{100 * share:.1f} % of the body outline is cut by the MR's field of view"
    )
    return CheckResult(NAME, (measurement,), summary)
