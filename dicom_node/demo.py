"""``sct-node demo``: the whole product on one machine, in one command.

Starts a node on free ports with the given (default) configuration, a receiving PACS (Orthanc
when installed, otherwise a storage SCP writing files), sends an MR series by C-STORE, waits for
the job to finish, prints a summary (series, slices, stage timings, the QA verdicts, where the sCT
and the QA report are, the audit history) and writes a PNG montage MR | sCT.

The generated MR is a head-and-neck phantom from the demo checkpoint's own distribution (the
generator it was trained on, a case it never saw), so that its sCT passes the QA checks and is
delivered. A series given with ``--input`` that the checkpoint does not know (a real MR, for the
phantom-trained demo checkpoint) is held by the QA: the demo then says why, and writes its node's
configuration so that the printed ``sct-node review release`` command works on it.
"""

from __future__ import annotations

import dataclasses
import io
import shutil
import time
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from sqlalchemy import select

from dicom_node import scu
from dicom_node.audit import AuditDB, JobRow, JobState, QAResultRow, SeriesRow, SeriesState
from dicom_node.audit.report import describe_job
from dicom_node.config import Config, Destination, dump_config, with_overrides
from dicom_node.mr_series import check_series, load_mr_volume, read_headers
from dicom_node.node import Node
from dicom_node.peers import FileStoreSCP, Orthanc, free_port, orthanc_binary
from dicom_node.qa.results import Measurement
from dicom_node.synthetic_mr import write_volume_series
from dicom_node.text_safety import escape_controls
from sct_model.volume import Grid, Volume, resample

DEMO_SCANNER_AET = "DEMOSCANNER"
# The demo phantom: a head-and-neck case of the demo checkpoint's generator at its training size
# (64³ at 3 mm), from a seed the checkpoint's training cases were not drawn with.
DEMO_PHANTOM_REGION, DEMO_PHANTOM_SEED = "HN", 20261203
DEMO_PHANTOM_SHAPE_ZYX, DEMO_PHANTOM_SPACING_MM = (64, 64, 64), 3.0


def generate_demo_series(out_dir: Path) -> list[Path]:
    """The demo's MR series: a phantom from the demo checkpoint's own distribution, as DICOM."""
    from training.phantoms import make_phantom  # the generator the demo checkpoint was trained on

    spacing = DEMO_PHANTOM_SPACING_MM
    phantom = make_phantom(
        DEMO_PHANTOM_REGION,
        seed=DEMO_PHANTOM_SEED,
        shape_zyx=DEMO_PHANTOM_SHAPE_ZYX,
        spacing_mm=(spacing, spacing, spacing),
    )
    return write_volume_series(
        phantom.mr,
        out_dir,
        series_description="T1 HEAD NECK PHANTOM",
        protocol_name="T1_3D_PHANTOM",
        study_description="MR HEAD NECK PHANTOM (demo checkpoint's distribution)",
        body_part="HEADNECK",
    )


def demo_config(config: Config, output_dir: Path, pacs_ae_title: str, pacs_port: int) -> Config:
    """The given configuration on free ports, with its files under ``output_dir`` and one destination."""
    storage_root = output_dir / "node"
    destination = Destination(name="demo_pacs", ae_title=pacs_ae_title, host="127.0.0.1", port=pacs_port)
    routes = tuple(dataclasses.replace(route, destinations=(destination.name,)) for route in config.routes)
    return with_overrides(
        config,
        node={"port": free_port(), "bind": "127.0.0.1"},
        storage={"root": storage_root},
        audit={"url": f"sqlite:///{storage_root / 'audit.sqlite'}"},
        series={"quiet_period_s": 2.0, "sweep_interval_s": 0.5},
        sender={"first_retry_s": 2.0},
        destinations=(destination,),
        routes=routes,
    )


def run_demo(config: Config, *, input_dir: Path | None, output_dir: Path, timeout_s: float) -> int:
    output_dir = output_dir.resolve()
    if output_dir.exists():
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True)
    if input_dir is None:
        input_dir = output_dir / "mr-input"
        mr_files = generate_demo_series(input_dir)
        print(
            f"generated a synthetic MR series: {len(mr_files)} slices in {input_dir} "
            "(a phantom from the demo checkpoint's own distribution)"
        )
    else:
        mr_files = sorted(p for p in Path(input_dir).rglob("*") if p.is_file() and _is_dicom(p))
        print(f"input: {len(mr_files)} DICOM files from {input_dir}")
    if not mr_files:
        print("no DICOM files to send")
        return 1

    use_orthanc = orthanc_binary() is not None
    pacs: Orthanc | FileStoreSCP = (
        Orthanc(output_dir / "orthanc") if use_orthanc else FileStoreSCP(output_dir / "pacs-received")
    )
    pacs_port = pacs.dicom_port if isinstance(pacs, Orthanc) else pacs.port
    node_config = demo_config(config, output_dir, pacs.ae_title, pacs_port)
    config_path = output_dir / "node" / "config.toml"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(dump_config(node_config), encoding="utf-8")
    node = Node(node_config)
    try:
        pacs.start()
        node.start()
        print(
            f"receiving PACS: {'Orthanc ' + pacs.url if isinstance(pacs, Orthanc) else 'storage SCP'} "
            f"(DICOM port {pacs_port}); node {node_config.node.ae_title} on port {node.port}; "
            f"sCT method: {node_config.model.method}"
        )
        started = time.perf_counter()
        sent = scu.send_series(
            mr_files,
            Destination("node", node_config.node.ae_title, "127.0.0.1", node.port),
            calling_aet=DEMO_SCANNER_AET,
            timeout_s=60,
        )
        send_s = time.perf_counter() - started
        print(f"C-STORE of the MR to the node: {sent.message} in {send_s:.1f} s")
        if not sent.ok:
            return 1
        assert node.db is not None
        job = _wait_for_job(node, timeout_s)
        if job is None:
            return 1
        if job.state in (JobState.HELD, JobState.REJECTED):
            print()
            print(describe_job(node.db, job.id))
            _explain_not_sent(node.db, job, config_path)
            return 0
        sct_files = _wait_for_pacs(pacs, job.sct_series_uid, job.sct_instance_count, timeout_s=60)
        print()
        print(describe_job(node.db, job.id))
        print()
        if job.qa_dir:
            print(f"QA report: {job.qa_dir}/report.pdf (pages as PNG beside it), {job.qa_verdict}")
        where = (
            f"Orthanc {pacs.url}/app/explorer.html (series {job.sct_series_uid})"
            if isinstance(pacs, Orthanc)
            else str(pacs.folder)
        )
        print(f"sCT: {len(sct_files)} CT slices received by the PACS: {where}")
        print(f"     node outbox copy: {job.output_dir}")
        montage = output_dir / "montage.png"
        write_montage(mr_files, sct_files, montage)
        print(f"montage (MR | sCT): {montage}")
        return 0 if len(sct_files) == job.sct_instance_count else 1
    finally:
        node.stop()
        pacs.stop()


def _explain_not_sent(db: AuditDB, job: JobRow, config_path: Path) -> None:
    print()
    if job.state == JobState.REJECTED:
        print(f"job {job.id} was REJECTED by the route's QA policy: its sCT is never sent ({job.error}).")
        return
    with db.reading() as session:
        flagged = session.scalars(
            select(QAResultRow)
            .where(QAResultRow.job_id == job.id, QAResultRow.verdict != "pass")
            .order_by(QAResultRow.id)
        ).all()
        why = [
            Measurement(
                r.check, r.quantity, r.value, r.unit, r.warn_at, r.fail_at, r.worse, r.verdict, r.note
            ).describe()
            for r in sorted(flagged, key=lambda r: r.verdict != "fail")
        ]
    reasons = "".join(f"\n    {escape_controls(line, keep_newlines=False)}" for line in why)
    print(
        f"job {job.id} is HELD: the QA checks found what a physicist must look at before the sCT may be used.\n"
        f"  why:{reasons}\n"
        f"  the QA report: {job.qa_dir}/report.pdf (and report-page-1.png beside it)\n"
        f"  release it (sent once, when this node runs again with that configuration):\n"
        f"    sct-node review release {job.id} --by NAME --reason TEXT --config {config_path}\n"
        f"  or reject it (never sent):\n"
        f"    sct-node review reject {job.id} --by NAME --reason TEXT --config {config_path}"
    )


def _is_dicom(path: Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(132)[128:132] == b"DICM"


def _wait_for_job(node: Node, timeout_s: float) -> JobRow | None:
    assert node.db is not None
    deadline = time.monotonic() + timeout_s
    last_state = ""
    while time.monotonic() < deadline:
        with node.db.session() as session:
            job = session.scalars(select(JobRow).order_by(JobRow.id.desc())).first()
            series = session.scalars(select(SeriesRow).order_by(SeriesRow.id.desc())).first()
            if series is not None and series.state in (SeriesState.NOT_ROUTED, SeriesState.QUARANTINED):
                print(f"series {series.state}: {series.reason}")
                return None
            if job is not None:
                if job.state != last_state:
                    print(f"  job {job.id}: {job.state}")
                    last_state = job.state
                if job.state in (JobState.DONE, JobState.HELD, JobState.REJECTED):
                    return job
                if job.state == JobState.FAILED:
                    print(f"job {job.id} FAILED: {job.error}")
                    return None
        time.sleep(0.2)
    print(f"no sCT within {timeout_s:.0f} s")
    return None


def _wait_for_pacs(pacs: Orthanc | FileStoreSCP, series_uid: str, count: int, timeout_s: float) -> list[bytes]:
    deadline = time.monotonic() + timeout_s
    files: list[bytes] = []
    while time.monotonic() < deadline:
        if isinstance(pacs, Orthanc):
            found = pacs.find_series(series_uid)
            files = pacs.series_files(found["ID"]) if found and len(found["Instances"]) >= count else []
        else:
            files = [p.read_bytes() for p in sorted(pacs.folder.glob("*.dcm"))]
            files = [
                f
                for f in files
                if pydicom.dcmread(io.BytesIO(f), stop_before_pixels=True).SeriesInstanceUID == series_uid
            ]
        if len(files) >= count:
            return files
        time.sleep(0.3)
    return files


def _ct_volume(files: list[bytes]) -> Volume:
    datasets = sorted((pydicom.dcmread(io.BytesIO(f)) for f in files), key=lambda d: float(d.ImagePositionPatient[2]))
    first = datasets[0]
    spacing_z = (float(datasets[-1].ImagePositionPatient[2]) - float(first.ImagePositionPatient[2])) / max(
        1, len(datasets) - 1
    )
    grid = Grid(
        size=(int(first.Columns), int(first.Rows), len(datasets)),
        spacing_mm=(float(first.PixelSpacing[1]), float(first.PixelSpacing[0]), spacing_z or 1.0),
        origin_mm=(
            float(first.ImagePositionPatient[0]),
            float(first.ImagePositionPatient[1]),
            float(first.ImagePositionPatient[2]),
        ),
    )
    array = np.stack([d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in datasets]).astype(
        np.float32
    )
    return Volume(array, grid)


def _window(image: np.ndarray, low: float, high: float) -> np.ndarray:
    return (np.clip((image - low) / (high - low), 0, 1) * 255).astype(np.uint8)


def write_montage(mr_files: list[Path], sct_files: list[bytes], path: Path, tile_px: int = 256) -> None:
    """Axial, coronal and sagittal mid-slices: the MR and the sCT on the same isotropic display grid."""
    headers = read_headers(mr_files)
    mr = load_mr_volume(check_series(headers, mr_files))
    sct = _ct_volume(sct_files)
    spacing = min(sct.grid.spacing_mm)
    extent = np.asarray(sct.grid.size) * np.asarray(sct.grid.spacing_mm)
    nx, ny, nz = (int(n) for n in np.maximum(1, np.round(extent / spacing)))
    ox, oy, oz = (float(v) for v in np.asarray(sct.grid.origin_mm) - np.asarray(sct.grid.spacing_mm) / 2 + spacing / 2)
    display = Grid(size=(nx, ny, nz), spacing_mm=(spacing, spacing, spacing), origin_mm=(ox, oy, oz))
    mr_display = resample(mr, display, default_value=0.0).array
    ct_display = resample(sct, display, default_value=-1024.0).array
    body = mr_display[mr_display > 0]
    low, high = np.percentile(body, [1, 99.5]) if body.size else (0.0, 1.0)
    z, y, x = (n // 2 for n in mr_display.shape)
    # LPS arrays: axial as seen from the feet (anterior up), coronal and sagittal with the head up.
    views = (lambda a: a[z], lambda a: a[::-1, y, :], lambda a: a[::-1, :, x])
    rows = []
    for take in views:
        tiles = [_window(take(mr_display), low, high), _window(take(ct_display), -200, 1200)]
        scale = tile_px / max(tiles[0].shape)
        size = (max(1, round(tiles[0].shape[1] * scale)), max(1, round(tiles[0].shape[0] * scale)))
        resized = [np.asarray(Image.fromarray(t).resize(size, Image.Resampling.BILINEAR)) for t in tiles]
        rows.append(np.concatenate([resized[0], np.zeros((size[1], 4), np.uint8), resized[1]], axis=1))
    width = max(r.shape[1] for r in rows)
    canvas = np.concatenate([np.pad(r, ((0, 4), (0, width - r.shape[1]))) for r in rows], axis=0)
    Image.fromarray(canvas).save(path)
