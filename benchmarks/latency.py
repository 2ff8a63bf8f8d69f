"""Latency of one series: last MR instance received → last sCT instance stored in Orthanc, by stage.

``--pacs storescp`` replaces Orthanc by DCMTK storescp (which costs next to nothing per instance) to
separate the node's own time from the PACS's ingest time; ``--associations N`` sends over N
parallel associations (destination.associations).

    .venv/bin/python benchmarks/latency.py [--slices 300] [--runs 3] [--quiet-period 2] [--method bulk_density]
                                           [--associations 1] [--pacs orthanc|storescp]
                                           [--source-references compact|full]

Runs ``sct-node serve`` (a subprocess, as in production) and Orthanc on free ports, sends a
``--slices`` MR series built from the GE series of ../shared/data with DCMTK storescu, and polls
Orthanc until the whole sCT series is stored. The node runs the default configuration: the QA gate
(policy "hold") and its report go with the sCT. The split comes from the job's audit row: quiet
period, series check, load, sampling, writing, QA checks, QA outputs (the report's PDF, its DICOM
object), sending; the QA gate runs beside the writing, so that part takes the longer of the two;
"scheduling" is what the stages do not explain (sweep and runner ticks, Orthanc's indexing). The
node's own overhead is the total without the quiet period and the sampling, which must stay under
5 s for a 300-slice series.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from sqlalchemy import select

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from ingest import build_series, machine  # noqa: E402

from dicom_node.audit import JobRow, JobState, SendRow, SeriesRow  # noqa: E402
from dicom_node.peers import Orthanc, free_port  # noqa: E402
from tests.integration.harness import NodeProcess, node_config, require_binary, storescu, wait_for  # noqa: E402

OVERHEAD_LIMIT_S = 5.0
STAGES = ("quiet_period", "check", "load", "sampling", "writing", "qa", "qa_outputs", "sending")
CONCURRENT = ("writing", "qa", "qa_outputs")  # writing runs beside the QA gate (qa, then qa_outputs)


class StoreSCP:
    """DCMTK storescp writing files: a receiver that costs next to nothing per instance (to separate
    the node's own time from the PACS's ingest time)."""

    ae_title = "PLANNING"

    def __init__(self, workdir: Path) -> None:
        self.folder = workdir / "storescp"
        self.dicom_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> StoreSCP:
        self.folder.mkdir(parents=True)
        self.process = subprocess.Popen(
            [require_binary("storescp", "dcmtk"), "-aet", self.ae_title, "-od", str(self.folder), str(self.dicom_port)],
            env={**os.environ, "TCP_NODELAY": "1"},
        )
        wait_for(lambda: _port_open(self.dicom_port), 20, "storescp to listen")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.process is not None
        self.process.terminate()
        self.process.wait(timeout=20)

    def stored(self, _series_uid: str) -> int:
        return sum(1 for _ in self.folder.iterdir())


class OrthancPACS(Orthanc):
    def stored(self, series_uid: str) -> int:
        found = self.find_series(series_uid)
        return len(found["Instances"]) if found else 0


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def one_run(
    workdir: Path,
    series_dir: Path,
    quiet_period_s: float,
    method: str,
    associations: int,
    pacs_kind: str,
    source_references: str = "compact",
) -> dict[str, float]:
    receiver = OrthancPACS(workdir / "orthanc") if pacs_kind == "orthanc" else StoreSCP(workdir)
    with receiver as pacs:
        config = node_config(
            workdir,
            pacs_port=pacs.dicom_port,
            qa_policy="hold",  # the default configuration: the QA gate and its report go with the sCT
            send_qa_objects=True,
            destination=[
                {
                    "name": "planning_pacs",
                    "ae_title": pacs.ae_title,
                    "host": "127.0.0.1",
                    "port": pacs.dicom_port,
                    "tls": False,
                    "associations": associations,
                }
            ],
            series={"quiet_period_s": quiet_period_s, "sweep_interval_s": 0.25},
            node={"source_references": source_references},
            model={"method": method},
        )
        node = NodeProcess(config).start()
        try:
            sent = storescu(node.port, series_dir)
            if sent.returncode != 0:
                raise RuntimeError(sent.stdout + sent.stderr)
            db = node.db()

            def job_row() -> JobRow | None:
                with db.session() as session:
                    return session.scalars(select(JobRow)).first()

            def stored_count() -> int:
                job = job_row()
                if job is None or job.state not in (JobState.SENDING, JobState.DONE):
                    if job is not None and job.state == JobState.FAILED:
                        raise RuntimeError(job.error)
                    return 0
                return pacs.stored(job.sct_series_uid)

            def complete() -> bool:
                job = job_row()
                return job is not None and job.sct_instance_count > 0 and stored_count() >= job.sct_instance_count

            wait_for(complete, 900, "the sCT at the receiver", interval_s=0.05)
            stored_at = dt.datetime.now(dt.UTC).replace(tzinfo=None)
            wait_for(lambda: (j := job_row()) is not None and j.state == JobState.DONE, 60, "the job to be DONE")
            with db.session() as session:
                job = session.scalars(select(JobRow)).one()
                series = session.get(SeriesRow, job.series_id)
                assert series is not None
                total_s = (stored_at - series.last_received_at).total_seconds()
                timings = {stage: float(job.timings_s.get(stage, 0.0)) for stage in STAGES}
                timings["total"] = total_s
                # The QA gate (checks, report, its DICOM) runs while the sCT files are written: that
                # part of the job takes the longer of the two.
                gate_s = timings["qa"] + timings["qa_outputs"]
                in_line = sum(timings[s] for s in STAGES if s not in CONCURRENT) + max(timings["writing"], gate_s)
                timings["scheduling"] = total_s - in_line
                timings["overhead"] = total_s - timings["quiet_period"] - timings["sampling"]
                timings["slices_in"], timings["slices_out"] = series.instance_count, job.sct_instance_count
                if job.send_attempts != 1:  # a retry would be in the sending time: say so
                    messages = session.scalars(select(SendRow.message).where(SendRow.job_id == job.id)).all()
                    print(f"  note: {job.send_attempts} send attempts: {messages}", flush=True)
            db.dispose()
            return timings
        finally:
            node.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quiet-period", type=float, default=2.0)
    parser.add_argument("--method", default="bulk_density", choices=("bulk_density", "diffusion"))
    parser.add_argument("--associations", type=int, default=1, help="destination.associations (1: the default)")
    parser.add_argument(
        "--pacs", default="orthanc", choices=("orthanc", "storescp"), help="the receiver (storescp: node's own time)"
    )
    parser.add_argument(
        "--source-references",
        default="compact",
        choices=("compact", "full"),
        help="node.source_references: how each sCT slice references the MR (full: DESIGN.md's literal form)",
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sct-latency-") as tmp:
        root = Path(tmp)
        series_dir = root / "series"
        build_series(series_dir, args.slices)
        runs = []
        for index in range(args.runs):
            runs.append(
                one_run(
                    root / f"run{index}",
                    series_dir,
                    args.quiet_period,
                    args.method,
                    args.associations,
                    args.pacs,
                    args.source_references,
                )
            )
            print(
                f"run {index + 1}: total {runs[-1]['total']:.2f} s, overhead {runs[-1]['overhead']:.2f} s", flush=True
            )
    print()
    print(
        f"Latency, last MR instance received -> last sCT instance stored in {args.pacs} ({args.method}, "
        f"{args.associations} association{'s' if args.associations > 1 else ''}, "
        f"{args.source_references} references, "
        f"{int(runs[0]['slices_in'])} MR slices -> {int(runs[0]['slices_out'])} sCT slices, median of {args.runs})"
    )
    print(f"machine: {machine()}")
    print()
    print(f"{'stage':<28}{'seconds':>10}")
    print("-" * 38)
    for stage in (*STAGES, "scheduling", "total"):
        label = f"{stage} (beside writing)" if stage in ("qa", "qa_outputs") else stage
        print(f"{label:<28}{statistics.median(r[stage] for r in runs):>10.2f}")
    overhead = statistics.median(r["overhead"] for r in runs)
    print("-" * 38)
    print(
        f"{'overhead (total - quiet - sampling)':<28}{overhead:>10.2f}   limit {OVERHEAD_LIMIT_S:.1f} s: "
        f"{'OK' if overhead < OVERHEAD_LIMIT_S else 'OVER'}"
    )
    return 0 if overhead < OVERHEAD_LIMIT_S else 1


if __name__ == "__main__":
    sys.exit(main())
