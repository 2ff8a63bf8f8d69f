"""The review page in a real browser (Playwright driving Debian's Chromium, /usr/bin/chromium) against
a real node (the demo checkpoint, the default QA policy "hold", the page served by ``sct-node serve``)
and Orthanc: a phantom of the checkpoint's own distribution is DONE, two inputs it does not know are
HELD; a physicist opens one, the viewer draws the volumes, the bone window changes the picture, she
rejects it (nothing sent) and releases the other (its sCT in Orthanc once); a viewer may look only.

``SCT_WEB_SCREENSHOTS=docs`` (``make screenshots``) keeps the worklist's and the job page's
screenshots there for the README.
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from dicom_node import scu
from dicom_node.audit import EventRow, JobRow, JobState
from dicom_node.config import Config, Destination
from dicom_node.demo import generate_demo_series
from dicom_node.node import Node
from dicom_node.peers import Orthanc, free_port
from dicom_node.synthetic_mr import write_volume_series
from dicom_node.web import accounts
from tests.integration.harness import in_process_config, require_binary, wait_for
from training.ood import make_ood
from training.phantoms import make_phantom

pytestmark = pytest.mark.integration
CHROMIUM = Path("/usr/bin/chromium")
PHYSICIST, VIEWER = ("ada", "a physicist's passphrase"), ("vic", "a viewer's passphrase")
CHROMIUM_ARGS = ["--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist"]


@pytest.fixture
def orthanc(tmp_path: Path):
    require_binary("Orthanc", "orthanc")
    with Orthanc(tmp_path / "orthanc") as pacs:
        yield pacs


def node_config(tmp_path: Path, pacs_port: int) -> Config:
    """The default configuration (QA policy "hold", the demo checkpoint, two samples), the page served."""
    return in_process_config(
        tmp_path, pacs_port, qa_policy="hold", sender={"max_attempts": 3, "timeout_s": 30.0},
        model={"device": "cpu", "samples": 2}, web={"enabled": True, "port": free_port()},
    )  # fmt: skip


def send(node: Node, folder: Path) -> None:
    files = sorted(folder.glob("*.dcm"))
    result = scu.send_series(
        files, Destination("node", "SCTNODE", "127.0.0.1", node.port), calling_aet="MRSIM", timeout_s=60
    )
    assert result.ok, result.message


def png_array(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32)


def test_a_physicist_reviews_in_a_real_browser(tmp_path: Path, orthanc: Orthanc) -> None:
    if not CHROMIUM.exists():
        pytest.fail("Debian's chromium is missing (apt-get install chromium; scripts/ensure-peers.sh installs it)")
    from playwright.sync_api import expect, sync_playwright

    config = node_config(tmp_path, orthanc.dicom_port)
    node = Node(config)
    node.start()
    try:
        assert node.db is not None
        accounts.add_user(node.db, PHYSICIST[0], "physicist", PHYSICIST[1])
        accounts.add_user(node.db, VIEWER[0], "viewer", VIEWER[1])
        generate_demo_series(tmp_path / "phantom")
        send(node, tmp_path / "phantom")
        phantom = make_phantom("AB", seed=20261208, shape_zyx=(64, 64, 64), spacing_mm=(3.0, 3.0, 3.0))
        for index in (1, 2):
            meat = make_ood("unseen_anatomy", phantom, np.random.default_rng(100 + index))
            write_volume_series(meat, tmp_path / f"meat{index}", series_description=f"T2 PORCINE {index}",
                                patient_id=f"PIG00{index}")  # fmt: skip
            send(node, tmp_path / f"meat{index}")

        seen: list[str] = []

        def settled() -> list[JobRow] | None:
            with node.db.session() as session:  # type: ignore[union-attr]
                found = list(session.scalars(select(JobRow).order_by(JobRow.id)))
            seen[:] = [f"job {j.id} {j.state} {j.qa_verdict} {j.error}" for j in found]
            states = sorted(job.state for job in found)
            return found if states == [JobState.DONE, JobState.HELD, JobState.HELD] else None

        try:
            found = wait_for(settled, 300, "one DONE and two HELD jobs")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the jobs: {seen}") from None
        done, first_held, second_held = sorted(found, key=lambda j: (j.state != "DONE", j.id))
        base = f"http://127.0.0.1:{config.web.port}"
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            # Log in as the physicist: the worklist, HELD first, with the verdicts
            page.goto(base + "/")
            expect(page).to_have_url(f"{base}/login?next=%2F")
            page.fill("input[name=username]", PHYSICIST[0])
            page.fill("input[name=password]", PHYSICIST[1])
            page.click("button[type=submit]")
            expect(page.locator("h1")).to_contain_text("Worklist")
            rows = page.locator("tbody tr")
            expect(rows).to_have_count(3)
            expect(rows.nth(0)).to_contain_text("HELD")
            expect(rows.nth(0)).to_contain_text("fail")
            expect(page.locator("tbody")).to_contain_text("DONE")
            expect(page.locator("tbody")).to_contain_text("pass")
            shots = tmp_path / "screenshots"
            shots.mkdir()
            page.screenshot(path=str(shots / "review-worklist.png"), full_page=True)

            # The HELD job: the viewer draws the volumes
            page.click(f"a[href='/jobs/{first_held.id}']")
            viewer = page.locator("#viewer")
            expect(viewer).to_have_attribute("data-ready", "true", timeout=90_000)
            page.wait_for_timeout(500)
            page.screenshot(path=str(shots / "review-job.png"), full_page=True)
            sct = page.locator("canvas[data-kind=sct]")
            soft = png_array(sct.screenshot())
            assert soft.std() > 10 and (soft > 40).mean() > 0.05, "the sCT pane looks blank"
            sct.hover()
            for _ in range(5):
                page.mouse.wheel(0, 120)
            page.wait_for_timeout(300)
            scrolled = png_array(sct.screenshot())
            assert np.abs(scrolled - soft).mean() > 0.5, "scrolling did not change the slice"
            mr = png_array(page.locator("canvas[data-kind=mr]").screenshot())
            assert mr.std() > 10, "the MR pane looks blank"
            page.click("button[data-action=window][data-value=bone]")
            page.wait_for_timeout(300)
            bone = png_array(sct.screenshot())
            assert np.abs(bone - scrolled).mean() > 0.5, "the bone window did not change the picture"
            expect(page.locator("table").first).to_contain_text("in_distribution")

            # Reject it with a reason: audited, nothing sent
            page.fill(f"form[action='/jobs/{first_held.id}/reject'] textarea", "invented tissue around a phantom")
            page.click(f"form[action='/jobs/{first_held.id}/reject'] button")
            expect(page.locator(".notice")).to_contain_text("rejected: the job is REJECTED")
            expect(page.locator("body")).to_contain_text("invented tissue around a phantom")
            # Release the other: its sCT reaches Orthanc, once
            page.goto(f"{base}/jobs/{second_held.id}")
            page.fill(f"form[action='/jobs/{second_held.id}/release'] textarea", "checked against the MR")
            page.click(f"form[action='/jobs/{second_held.id}/release'] button")
            expect(page.locator(".notice")).to_contain_text("released")
            page.goto(base + "/audit")
            expect(page.locator(".notice")).to_contain_text("The hash chain verifies")

            # A viewer sees the pages, and may not decide
            page.click("header form button")  # log out
            page.fill("input[name=username]", VIEWER[0])
            page.fill("input[name=password]", VIEWER[1])
            page.click("button[type=submit]")
            page.goto(f"{base}/jobs/{done.id}")
            expect(page.locator("h1")).to_contain_text(f"Job {done.id}")
            token = page.locator("input[name=csrf]").first.get_attribute("value")
            for action in ("release", "reject", "resend"):
                response = page.request.post(
                    f"{base}/jobs/{done.id}/{action}", form={"csrf": token or "", "reason": "x"}
                )
                assert response.status == 403, action
            browser.close()

        def delivered() -> list[dict] | None:
            found = [
                s for s in orthanc.series() if s["MainDicomTags"].get("SeriesInstanceUID") == second_held.sct_series_uid
            ]
            if len(found) == 1 and len(found[0]["Instances"]) == second_held.sct_instance_count:
                return found
            return None

        wait_for(delivered, 60, "the released sCT in Orthanc")
        uids = {s["MainDicomTags"].get("SeriesInstanceUID") for s in orthanc.series()}
        assert first_held.sct_series_uid not in uids  # the rejected sCT was never sent
        assert done.sct_series_uid in uids
        with node.db.session() as session:
            reviews = [e.detail for e in session.scalars(select(EventRow).where(EventRow.kind == "review"))]
        assert [(r["decision"], r["by"]) for r in reviews] == [("rejected", "ada"), ("released", "ada")]
    finally:
        node.stop()
        keep = os.environ.get("SCT_WEB_SCREENSHOTS")
        if keep:
            for shot in (tmp_path / "screenshots").glob("*.png"):
                shutil.copy(shot, Path(keep) / shot.name)
                (Path(keep) / shot.name).chmod(0o644)  # the node set a private umask
