"""The review page's speed: the worklist with 10,000 jobs (SQLite and PostgreSQL) and the job page of a
300-slice sCT in a real browser (time to first paint of the viewer, bytes transferred).

    .venv/bin/python benchmarks/web.py [--jobs 10000] [--requests 20] [--no-postgres] [--no-browser]

Worklist: 10,000 series and jobs (a tenth HELD, each with a send), inserted in bulk, then the page
(query + template) asked ``--requests`` times through FastAPI's TestClient, unfiltered and filtered
by state; the median and the worst are printed. PostgreSQL: a throw-away cluster (Debian's
postgresql 15: initdb and pg_ctl as the postgres user) on a free port, the psycopg driver.

Job page: a job whose viewer volumes are on a 300-slice sCT grid (285 x 347 x 300 voxels, 0.94 x
0.94 x 0.6 mm: the latency benchmark's series; MR, sCT and uncertainty made from a phantom so that they
compress as real volumes do), served by uvicorn; Chromium (Playwright, /usr/bin/chromium, software
WebGL) opens the page logged in; timed from navigation start to the moment the viewer has drawn all
three volumes. Bytes: the sum of every response's body on the wire.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dicom_node.audit import AuditDB, JobRow, JobState, SendRow, SeriesRow, SeriesState  # noqa: E402
from dicom_node.config import Config, load_config, with_overrides  # noqa: E402
from dicom_node.peers import free_port  # noqa: E402
from dicom_node.web import accounts  # noqa: E402
from sct_model.volume import Grid, Volume  # noqa: E402
from tests.postgres import postgres  # noqa: E402

PASSWORD = "benchmark passphrase"


def bulk_jobs(db: AuditDB, count: int) -> None:
    """``count`` series with one job each (every 10th HELD, the others DONE with a send)."""
    start = dt.datetime(2026, 1, 1)
    with db.session() as session:
        series = [
            SeriesRow(
                series_instance_uid=f"1.2.826.0.1.99.{i}", study_instance_uid=f"1.2.826.0.1.98.{i}",
                patient_id=f"P{i:06d}", patient_name=f"Patient^{i}", modality="MR", series_description="T1 3D",
                calling_aet="MR_SIM", first_received_at=start + dt.timedelta(minutes=i),
                last_received_at=start + dt.timedelta(minutes=i), instance_count=176, state=SeriesState.ROUTED,
            )
            for i in range(count)
        ]  # fmt: skip
        session.add_all(series)
        session.flush()
        jobs = [
            JobRow(
                series_id=s.id, state=JobState.HELD if i % 10 == 0 else JobState.DONE, route_name="brain",
                destinations=["planning_pacs"], created_at=s.last_received_at, updated_at=s.last_received_at,
                method="diffusion", steps=25, samples=1, seed=1, sct_series_uid=f"1.2.826.0.1.97.{i}",
                sct_instance_count=300, timings_s={}, qa_verdict="fail" if i % 10 == 0 else "pass",
            )
            for i, s in enumerate(series)
        ]  # fmt: skip
        session.add_all(jobs)
        session.flush()
        now = dt.datetime(2026, 6, 1)
        session.add_all(
            SendRow(job_id=j.id, destination="planning_pacs", attempt=1, started_at=now, finished_at=now, ok=True,
                    instances_sent=300, instances_failed=0, message="stored")
            for j in jobs if j.state == JobState.DONE
        )  # fmt: skip


def time_worklist(config: Config, db: AuditDB, requests: int) -> dict[str, tuple[float, float]]:
    from fastapi.testclient import TestClient

    from dicom_node.web.app import create_app

    client = TestClient(create_app(config, db))
    form = client.get("/login")
    token = form.text.split('name="csrf" value="')[1].split('"')[0]
    client.post("/login", data={"username": "bench", "password": PASSWORD, "csrf": token})
    results = {}
    queries = {
        "all jobs": {},
        "state HELD": {"state": "HELD"},
        "verdict pass, page 50": {"verdict": "pass", "page": "50"},
    }
    for label, params in queries.items():
        client.get("/", params=params, headers={"accept": "text/html"})  # warm
        times = []
        for _ in range(requests):
            started = time.perf_counter()
            response = client.get("/", params=params, headers={"accept": "text/html"})
            times.append(time.perf_counter() - started)
            assert response.status_code == 200 and "Worklist" in response.text
        results[label] = (statistics.median(times), max(times))
    return results


def phantom_volumes(size: tuple[int, int, int], spacing: tuple[float, float, float]) -> tuple[Volume, Volume, Volume]:
    """MR, sCT and uncertainty on one axial grid: an ellipsoid head with a skull, ventricles and noise."""
    grid = Grid(size=size, spacing_mm=spacing, origin_mm=(-130.0, -160.0, -90.0))
    z, y, x = np.meshgrid(*(np.linspace(-1, 1, n, dtype=np.float32) for n in grid.shape_zyx), indexing="ij")
    r = np.sqrt((x / 0.8) ** 2 + (y / 0.9) ** 2 + (z / 0.95) ** 2)
    rng = np.random.default_rng(1)
    body, skull, ventricles = r < 0.9, (r > 0.8) & (r < 0.9), ((x / 0.15) ** 2 + (y / 0.3) ** 2 + (z / 0.3) ** 2) < 1
    sct = np.where(body, 35.0, -1000.0) + np.where(skull, 1200.0, 0.0) - np.where(ventricles, 30.0, 0.0)
    mr = np.where(body, 600.0, 0.0) - np.where(skull, 500.0, 0.0) - np.where(ventricles, 400.0, 0.0)
    mr += np.where(body, rng.normal(0, 25, mr.shape), rng.normal(0, 4, mr.shape))
    std = np.where(body, 20 + 40 * np.abs(x) + rng.normal(0, 3, x.shape), 0.0)
    return (Volume(mr.astype(np.float32), grid), Volume(sct.astype(np.float32), grid),
            Volume(std.astype(np.float32), grid))  # fmt: skip


def time_job_page(config: Config, db: AuditDB, folder: Path) -> dict[str, float]:
    from playwright.sync_api import sync_playwright

    from dicom_node.web.server import WebThread
    from dicom_node.web.volumes import write_viewer_volumes
    from tests.web.seed import add_job, add_series

    series_id = add_series(db, "1.2.826.0.1.300")
    job_id = add_job(db, config, series_id, [JobState.RUNNING, JobState.HELD], qa_dir=folder / "job_qa")
    outbox = folder / "outbox_job"
    outbox.mkdir()
    with db.session() as session:
        job = session.get(JobRow, job_id)
        assert job is not None
        job.output_dir, job.uncertainty_path, job.samples = str(outbox), str(outbox / "u.mha"), 2
    mr, sct, std = phantom_volumes((285, 347, 300), (0.9375, 0.9375, 0.6))
    started = time.perf_counter()
    write_viewer_volumes(folder / "job_qa", mr, sct, std)
    written_s = time.perf_counter() - started
    sizes = {p.name: p.stat().st_size for p in (folder / "job_qa").glob("viewer-*.nii.gz")}
    web = WebThread(config, db)
    web.start()
    try:
        base = f"http://127.0.0.1:{config.web.port}"
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path="/usr/bin/chromium",
                args=["--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist"],
            )
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            page.goto(base + "/login")
            page.fill("input[name=username]", "bench")
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_url(base + "/")
            runs = []
            transferred: list[int] = []
            page.on("response", lambda response: transferred.append(int(response.headers.get("content-length", "0"))))
            for _ in range(3):
                transferred.clear()
                page.goto(f"{base}/jobs/{job_id}")
                viewer = page.locator("#viewer[data-ready=true]")
                viewer.wait_for(timeout=180_000)
                ready_at_ms = float(viewer.get_attribute("data-ready-at-ms") or "nan")
                loaded_ms = float(viewer.get_attribute("data-loaded-ms") or "nan")
                runs.append((ready_at_ms, loaded_ms, sum(transferred)))
            browser.close()
    finally:
        web.stop()
    paint = statistics.median(r[0] for r in runs) / 1000
    return {
        "volumes written (s)": written_s,
        "first paint of the viewer (s)": paint,
        "of which loading and drawing the volumes (s)": statistics.median(r[1] for r in runs) / 1000,
        "bytes transferred (MB)": statistics.median(r[2] for r in runs) / 1e6,
        **{f"{name} (MB)": size / 1e6 for name, size in sorted(sizes.items())},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--no-browser", action="store_true")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="sct-web-bench-"))
    os.chmod(folder, 0o755)
    try:
        base = with_overrides(load_config(), storage={"root": folder / "node"}, web={"port": free_port()})
        databases = [("SQLite", f"sqlite:///{folder / 'audit.sqlite'}")]
        stack = contextlib.ExitStack()
        if not args.no_postgres:
            databases.append(("PostgreSQL 15", stack.enter_context(postgres(folder / "pg"))))
        with stack:
            print(f"Worklist, {args.jobs} jobs, median (worst) of {args.requests} requests, ms (target < 300)")
            for name, url in databases:
                config = with_overrides(base, audit={"url": url})
                db = AuditDB(url)
                accounts.add_user(db, "bench", "physicist", PASSWORD)
                started = time.perf_counter()
                bulk_jobs(db, args.jobs)
                seeded_s = time.perf_counter() - started
                for label, (median, worst) in time_worklist(config, db, args.requests).items():
                    print(f"  {name:<14} {label:<24} {median * 1000:8.0f} ({worst * 1000:.0f})")
                print(f"  {name:<14} (seeding {args.jobs} jobs took {seeded_s:.1f} s)")
                if name == "SQLite" and not args.no_browser:
                    results = time_job_page(config, db, folder)
                db.dispose()
        if not args.no_browser:
            print("\nJob page of a 300-slice sCT (285 x 347 x 300) with MR and uncertainty, Chromium, median of 3")
            for label, value in results.items():
                print(f"  {label:<48} {value:8.2f}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
