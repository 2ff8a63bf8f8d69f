"""The one entry point the node uses: an sCT predictor by method name (loaded once per worker)."""

from __future__ import annotations

import logging
from pathlib import Path

from sct_model.result import SCTPredictor

log = logging.getLogger(__name__)

METHODS = ("bulk_density", "diffusion")
DEMO_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / "demo.pt"


def load_predictor(method: str, checkpoint: Path | None, device: str = "auto") -> SCTPredictor:
    """The predictor for ``method``: ``"bulk_density"`` or ``"diffusion"``.

    ``checkpoint`` is the diffusion model's file (None: the shipped demo checkpoint,
    :data:`DEMO_CHECKPOINT`); the baseline takes none. ``device`` is ``"auto"`` (CUDA when
    available, else the CPU), ``"cpu"``, ``"cuda"`` or ``"cuda:N"``. Raises ``ValueError`` for an
    unknown method and :class:`~sct_model.checkpoint.CheckpointError` for an unusable checkpoint.
    """
    if method == "bulk_density":
        from sct_model.baseline import BulkDensityBaseline

        if checkpoint is not None:
            log.warning("the bulk-density method takes no checkpoint; %s is ignored", checkpoint)
        return BulkDensityBaseline()
    if method == "diffusion":
        from sct_model.sampler import SCTSampler

        path = Path(checkpoint) if checkpoint is not None else DEMO_CHECKPOINT
        return SCTSampler.from_checkpoint(path, device=device)
    raise ValueError(f"unknown sCT method {method!r}; known: {', '.join(METHODS)}")
