"""Bad input gets its DICOM status or its quarantine reason; the node stays up; the next good series
still goes through."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid
from pynetdicom import AE, _config
from sqlalchemy import select

from dicom_node.audit import EventRow, JobRow, JobState, SeriesRow
from dicom_node.synthetic_mr import generate_mr_series
from tests.integration.harness import NodeProcess, node_config, storescu, wait_for


def _ct_file(path: Path) -> Path:
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "CT", "X"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Rows = ds.Columns = 2
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = b"\x00" * 8
    ds.save_as(path, enforce_file_format=True)
    return path


def _send_raw_mr(port: int, payload: bytes, folder: Path) -> int | None:
    """C-STORE of an MR instance whose dataset bytes are ``payload`` (sent as they are, no encoding)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = folder / f"raw-{meta.MediaStorageSOPInstanceUID}.dcm"
    with open(path, "wb") as handle:
        handle.write(b"\x00" * 128 + b"DICM")
        pydicom.filewriter.write_file_meta_info(handle, meta, enforce_standard=True)
        handle.write(payload)
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(MRImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", port, ae_title="SCTNODE")
    assert assoc.is_established
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        status = assoc.send_c_store(path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
        assoc.release()
    return int(status.Status) if "Status" in status else None


def test_bad_input_then_a_good_series(orthanc, tmp_path):
    config = node_config(tmp_path, pacs_port=orthanc.dicom_port, node={"allowed_calling_aets": ["SCANNER"]})
    node = NodeProcess(config).start()
    try:
        # A CT instance: not an MR SOP class, refused (no presentation context), nothing stored.
        refused = storescu(node.port, [_ct_file(tmp_path / "ct.dcm")])
        assert refused.returncode != 0
        assert node.alive()

        # Undecodable datasets: a failure status, never a crash.
        for payload in (
            b"\xff" * 64,
            b"\x08\x00\x16\x00UI\xff\x7f" + b"1.2",
            b"\x10\x00\x10\x00PN\x05\x00ab",
        ):
            status = _send_raw_mr(node.port, payload, tmp_path)
            assert status is not None and status >= 0xA000, hex(status or 0)
        assert node.alive()

        # An unknown calling AE title is rejected at association.
        intruder_dir = tmp_path / "intruder"
        generate_mr_series(intruder_dir, slices=4)
        rejected = storescu(node.port, intruder_dir, calling_aet="INTRUDER")
        assert rejected.returncode != 0
        assert node.alive()

        # Series that fail the checks are quarantined with their reason.
        defects = {
            "missing": ({"drop_slices": (7,)}, "missing slice"),
            "dynamic": ({"temporal_positions": 3}, "4D"),
            "mixed": ({"mixed_orientation": True}, "orientation"),
        }
        for name, (options, _reason) in defects.items():
            generate_mr_series(tmp_path / name, slices=16, rows=32, columns=32, seed=len(name), **options)
            sent = storescu(node.port, tmp_path / name)
            assert sent.returncode == 0, sent.stdout + sent.stderr

        # And a good series still becomes an sCT.
        good_dir = tmp_path / "good"
        generate_mr_series(good_dir, slices=24, rows=48, columns=48)
        assert storescu(node.port, good_dir).returncode == 0

        db = node.db()

        def settled():
            with db.session() as session:
                states = session.execute(select(SeriesRow.series_description, SeriesRow.state)).all()
                job = session.scalars(select(JobRow)).first()
                return (
                    len(states) == 4
                    and all(s != "RECEIVING" for _, s in states)
                    and job is not None
                    and job.state in (JobState.DONE, JobState.FAILED)
                )

        wait_for(settled, 120, "all series closed and the good one's job finished")
        with db.session() as session:
            rows = session.scalars(select(SeriesRow).order_by(SeriesRow.id)).all()
            quarantined = [r for r in rows if r.state == "QUARANTINED"]
            assert len(quarantined) == 3, [(r.state, r.reason) for r in rows]
            reasons = " | ".join(r.reason for r in quarantined)
            for _options, reason in defects.values():
                assert reason.lower() in reasons.lower(), reasons
            for row in quarantined:
                folder = Path(config.parent / "node" / "quarantine" / row.series_instance_uid)
                assert folder.is_dir() and (folder / "QUARANTINE_REASON.txt").exists()
                assert len(list(folder.glob("*.dcm"))) == row.instance_count
            job = session.scalars(select(JobRow)).one()
            assert job.state == JobState.DONE, job.error
            refusals = session.scalars(select(EventRow.message).where(EventRow.kind == "store_refused")).all()
            assert len(refusals) >= 3
        assert any(s["MainDicomTags"].get("Modality") == "CT" for s in orthanc.series())
        assert node.alive()
    finally:
        node.stop()
