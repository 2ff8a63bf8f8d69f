"""The volumes the review page's viewer shows: the MR resampled onto the sCT grid, the sCT and (with
samples > 1) the uncertainty, as gzipped NIfTI in the job's QA folder (``viewer-*.nii.gz``).

SimpleITK writes them (it turns DICOM's LPS into NIfTI's RAS in the header; NiiVue reads the sform).
The sCT and the MR are stored as int16 (HU; the MR's values rounded: display only), the uncertainty
as float32. A node that serves the page writes them right after each job, once the sender has the
job (``after_job``); for any other job the page builds them from the job's files on first view
(``ensure``): the sCT series in the outbox, the uncertainty beside it, the MR from the spool.
"""

from __future__ import annotations

import math
import os
import tempfile
import threading
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from dicom_node.audit import JobRow
from dicom_node.config import Config
from sct_model.volume import Grid, Volume, resample

VIEWER_FILES = {"mr": "viewer-mr.nii.gz", "sct": "viewer-sct.nii.gz", "std": "viewer-std.nii.gz"}
COMPRESSION_LEVEL = 1  # fast: most of the size is won at level 1 on these volumes
MAX_VIEWER_VOXELS = 8_000_000  # more are shown on a coarser grid (the PACS has the sCT at full resolution)
_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


class VolumesUnavailableError(RuntimeError):
    """The job's files needed for the viewer are gone (retention) or were never written; says which."""


def viewer_grid(grid: Grid, max_voxels: int = MAX_VIEWER_VOXELS) -> Grid:
    """``grid``, or the same box on coarser voxels (the same factor on each axis) when it has more
    than ``max_voxels``: a browser draws three such volumes in a second or two."""
    voxels = math.prod(grid.size)
    if voxels <= max_voxels:
        return grid
    factor = (voxels / max_voxels) ** (1 / 3)
    size = tuple(max(1, int(n / factor)) for n in grid.size)
    extent = np.asarray(grid.size) * np.asarray(grid.spacing_mm)  # the box the voxels cover, kept
    spacing = extent / np.asarray(size)
    corner = np.asarray(grid.index_to_point(np.asarray([[-0.5, -0.5, -0.5]]))[0])  # the box's corner
    origin = corner + grid.direction_matrix @ (spacing / 2)
    return Grid(size=size, spacing_mm=tuple(spacing), origin_mm=tuple(origin), direction=grid.direction)  # type: ignore[arg-type]


def write_viewer_volumes(folder: Path, mr: Volume, sct: Volume, std: Volume | None) -> None:
    """The viewer's NIfTI files of one job in ``folder`` (on ``viewer_grid`` of the sCT), each written
    atomically; the uncertainty in steps of 0.1 HU (int16 with a scale), which it does not need finer."""
    folder.mkdir(parents=True, exist_ok=True)
    grid = viewer_grid(sct.grid)

    def on_grid(volume: Volume, outside: float) -> np.ndarray:
        return (volume if volume.grid == grid else resample(volume, grid, default_value=outside)).array

    _write(folder / VIEWER_FILES["mr"], Volume(_int16(on_grid(mr, 0.0)), grid))
    _write(folder / VIEWER_FILES["sct"], Volume(_int16(on_grid(sct, -1024.0)), grid))
    if std is not None:
        _write(folder / VIEWER_FILES["std"], Volume(_int16(on_grid(std, 0.0) * 10), grid), scale=0.1)


def available(folder: Path) -> dict[str, Path]:
    """The viewer files present in ``folder``, by name (mr, sct, std)."""
    return {name: folder / file for name, file in VIEWER_FILES.items() if (folder / file).is_file()}


def ensure(config: Config, job: JobRow, mr_paths: list[Path]) -> dict[str, Path]:
    """The job's viewer files, built from its files on disk when they are not there yet (``mr_paths``:
    the MR series' files in the spool, ``series.series_instance_paths``)."""
    folder = Path(job.qa_dir) if job.qa_dir else config.storage.outbox / f"job_{job.id}_qa"
    with _lock_for(str(folder)):
        found = available(folder)
        if "mr" in found and "sct" in found:
            return found
        if not job.output_dir or not Path(job.output_dir).is_dir():
            raise VolumesUnavailableError(f"job {job.id}: no sCT files in the outbox (not written, or cleaned)")
        existing = [path for path in mr_paths if path.is_file()]
        if not existing:
            raise VolumesUnavailableError(f"job {job.id}: its MR series is no longer in the spool (cleaned)")
        sct = _read_sct(Path(job.output_dir))
        std = None
        if job.uncertainty_path and Path(job.uncertainty_path).is_file():
            std = Volume.of_image(sitk.ReadImage(job.uncertainty_path, sitk.sitkFloat32))
        write_viewer_volumes(folder, _read_mr(existing), sct, std)
        return available(folder)


def _read_sct(outbox: Path) -> Volume:
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(outbox))
    if not files:
        raise VolumesUnavailableError(f"no sCT DICOM files in {outbox}")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.SetOutputPixelType(sitk.sitkFloat32)
    return Volume.of_image(reader.Execute())


def _read_mr(paths: list[Path]) -> Volume:
    from dicom_node.mr_series import check_series, load_mr_volume, read_headers

    return load_mr_volume(check_series(read_headers(paths), paths))


def _int16(array: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(array), -32768, 32767).astype(np.int16)


def _write(path: Path, volume: Volume, *, scale: float = 1.0) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".nii.gz")
    os.close(handle)
    try:
        sitk.WriteImage(volume.to_image(), temporary, True, COMPRESSION_LEVEL)
        if scale != 1.0:  # NIfTI's scl_slope: the viewer shows stored value x scale
            _set_nifti_scale(Path(temporary), scale)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _set_nifti_scale(path: Path, slope: float) -> None:
    """Set scl_slope (byte 112 of the NIfTI-1 header, float32) and scl_inter (116) of a .nii.gz file."""
    import gzip
    import struct

    data = bytearray(gzip.decompress(path.read_bytes()))
    if struct.unpack_from("<i", data, 0)[0] != 348:
        raise ValueError(f"{path}: not a little-endian NIfTI-1 file")
    struct.pack_into("<ff", data, 112, slope, 0.0)
    path.write_bytes(gzip.compress(bytes(data), compresslevel=COMPRESSION_LEVEL))


def _lock_for(key: str) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(key, threading.Lock())
