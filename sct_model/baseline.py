"""Bulk-density assignment: the classical sCT that needs no training (the fallback, and the floor).

The body outline, found on the MR, is set to water (0 HU), everything else in the MR's field of
view to air (-1000 HU), and HU_MIN outside the field of view. Optionally, very dark MR voxels well
inside the body (cortical bone on T1) get a bone density: this also catches air cavities and
flow voids, which are dark too, so it is off by default.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import SimpleITK as sitk  # noqa: N813

from sct_model import __version__
from sct_model.preprocessing import PreprocessingConfig, output_masks, resample_to_grid
from sct_model.result import HU_AIR, HU_MIN, HU_WATER, PredictorInfo, SCTResult
from sct_model.volume import Grid, Volume, axial_grid_covering

log = logging.getLogger(__name__)


class BulkDensityBaseline:
    """An :class:`~sct_model.result.SCTPredictor` that assigns bulk densities; deterministic.

    ``bone_hu``: None (default) for no bone class; otherwise the HU given to voxels inside the body,
    at least ``bone_margin_mm`` from its outline, whose MR intensity is below ``bone_threshold`` on
    the body's robust intensity scale (0 at its 0.5th, 1 at its 99.5th percentile).
    """

    def __init__(
        self,
        *,
        body_hu: float = HU_WATER,
        air_hu: float = HU_AIR,
        bone_hu: float | None = None,
        bone_threshold: float = 0.1,
        bone_margin_mm: float = 5.0,
        preprocessing: PreprocessingConfig | None = None,
    ) -> None:
        self.body_hu, self.air_hu, self.bone_hu = float(body_hu), float(air_hu), bone_hu
        self.bone_threshold, self.bone_margin_mm = float(bone_threshold), float(bone_margin_mm)
        self.preprocessing = preprocessing or PreprocessingConfig()
        self.info = PredictorInfo(
            method="bulk_density",
            model_name="bulk-density",
            model_version=__version__,
            checkpoint_sha256="",
            sampler="none",
            device="cpu",
        )

    def predict(self, mr: Volume, *, steps: int, samples: int, seed: int, output_grid: Grid | None = None) -> SCTResult:
        """The bulk-density sCT on ``output_grid`` (None: the axial grid covering the MR).

        ``steps``, ``samples`` and ``seed`` do not change the result; they are checked and recorded
        (``seeds``) like the diffusion model's, so that the node treats both methods alike.
        """
        if steps < 1 or samples < 1 or seed < 0:
            raise ValueError(f"need steps >= 1, samples >= 1 and seed >= 0, got {steps}, {samples}, {seed}")
        timings: dict[str, float] = {}
        started = time.perf_counter()
        grid = output_grid if output_grid is not None else axial_grid_covering(mr.grid)
        masks = output_masks(mr, grid, self.preprocessing)
        timings["preprocess"] = time.perf_counter() - started

        started = time.perf_counter()
        body = masks.body.array.astype(bool)
        hu = np.full(grid.shape_zyx, self.air_hu, dtype=np.float32)
        hu[body] = self.body_hu
        if self.bone_hu is not None and body.any():
            bone = self._bone(mr, masks.body)
            hu[bone] = float(self.bone_hu)
        hu[masks.fov.array == 0] = HU_MIN
        timings["assign"] = time.perf_counter() - started
        timings["total"] = sum(timings.values())
        seeds = tuple(seed + i for i in range(samples))
        return SCTResult(
            hu=Volume(hu, grid),
            std_hu=None,
            body_mask=masks.body,
            timings_s=timings,
            info=self.info,
            seeds=seeds,
        )

    def _bone(self, mr: Volume, body: Volume) -> np.ndarray:
        """Dark voxels at least ``bone_margin_mm`` inside the body, on ``body.grid``."""
        mr_on_grid = resample_to_grid(mr, body.grid, linear=True, default_value=0.0).array
        inside = body.array.astype(bool)
        low, high = np.percentile(mr_on_grid[inside], [0.5, 99.5])
        if not high > low:
            return np.zeros_like(inside)
        scale = (mr_on_grid - low) / (high - low)
        body_image = sitk.GetImageFromArray(body.array.astype(np.uint8))
        body_image.CopyInformation(body.grid.reference_image())
        # distance (mm) from the outline, positive inside the body
        depth = sitk.GetArrayFromImage(
            sitk.SignedMaurerDistanceMap(body_image, insideIsPositive=True, squaredDistance=False, useImageSpacing=True)
        )
        return inside & (depth >= self.bone_margin_mm) & (scale < self.bone_threshold)
