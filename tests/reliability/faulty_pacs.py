"""A storage SCP (pynetdicom, on loopback) that misbehaves on purpose: the PACS of the fault tests.

It refuses chosen C-STOREs with a failure status (every k-th instance of an association, or listed
SOP Instance UIDs), can answer slowly (a delay per C-STORE), and can be switched to accept at any
time. It keeps what it stored as a PACS does, one file per SOP Instance UID (a second copy of the
same UID replaces the first), and counts every C-STORE it was offered, so a test can tell "held
once" from "received twice".
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydicom import dcmread

from dicom_node.peers import FileStoreSCP

OUT_OF_RESOURCES = 0xA700


@dataclasses.dataclass(frozen=True)
class Offer:
    """One C-STORE the peer was offered, and what it answered."""

    sop_instance_uid: str
    series_instance_uid: str
    status: int
    at: float  # time.monotonic() when the answer was given


class FaultyPACS(FileStoreSCP):
    """peers.FileStoreSCP with faults; files under ``folder/<series UID>/<SOP UID>.dcm``."""

    timeout_s = 60.0

    def __init__(
        self,
        folder: Path,
        *,
        ae_title: str = "PLANNING",
        port: int | None = None,
        refuse_every: int = 0,
        refuse_uids: Iterable[str] = (),
        refuse_status: int = OUT_OF_RESOURCES,
        delay_s: float = 0.0,
    ) -> None:
        super().__init__(folder, ae_title=ae_title, port=port)
        self._lock = threading.Lock()
        self._refuse_every = refuse_every
        self._refuse_uids = set(refuse_uids)
        self._refuse_status = refuse_status
        self._delay_s = delay_s
        self._per_association: dict[int, int] = collections.defaultdict(int)
        self.offers: list[Offer] = []

    # --- behaviour, switchable while running ---------------------------------------------------

    def refuse(self, *, every: int = 0, uids: Iterable[str] = (), status: int = OUT_OF_RESOURCES) -> None:
        """Refuse every ``every``-th C-STORE of each association (1-based), and the listed UIDs."""
        with self._lock:
            self._refuse_every, self._refuse_uids, self._refuse_status = every, set(uids), status

    def accept_all(self) -> None:
        self.refuse()

    def set_delay(self, delay_s: float) -> None:
        with self._lock:
            self._delay_s = delay_s

    # --- what it holds -------------------------------------------------------------------------

    def stored(self) -> dict[str, dict[str, Path]]:
        """{series UID: {SOP Instance UID: file}} of what the peer holds now (its final state)."""
        held: dict[str, dict[str, Path]] = {}
        if not self.folder.is_dir():
            return held
        for series_dir in self.folder.iterdir():
            if series_dir.is_dir():
                held[series_dir.name] = {p.name.removesuffix(".dcm"): p for p in series_dir.glob("*.dcm")}
        return held

    def offers_of(self, series_instance_uid: str) -> list[Offer]:
        with self._lock:
            return [o for o in self.offers if o.series_instance_uid == series_instance_uid]

    # --- the SCP -------------------------------------------------------------------------------

    def _on_store(self, event: Any) -> int:
        with self._lock:
            delay_s = self._delay_s
            key = id(event.assoc)
            self._per_association[key] += 1
            position = self._per_association[key]
            sop_uid = str(event.request.AffectedSOPInstanceUID)
            refused = sop_uid in self._refuse_uids or (self._refuse_every > 0 and position % self._refuse_every == 0)
            status = self._refuse_status if refused else 0x0000
        if delay_s:
            time.sleep(delay_s)
        dataset = event.dataset
        series_uid = str(dataset.SeriesInstanceUID)
        if not refused:
            dataset.file_meta = event.file_meta
            target = self.folder / series_uid / f"{sop_uid}.dcm"
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".tmp")
            dataset.save_as(tmp, enforce_file_format=True)
            tmp.replace(target)  # a second copy of the same UID replaces the first, as in a PACS
        with self._lock:
            self.offers.append(Offer(sop_uid, series_uid, status, time.monotonic()))
        return status


def sop_instance_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
