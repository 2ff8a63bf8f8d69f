"""Evaluate sCT methods on paired cases as the paper reports them: per-region tables, paired tests, figures.

For every case and method: the method's sCT of the case's MR, resampled onto the CT grid (linear,
HU_MIN outside the sCT) where it is not there already, then MAE, PSNR, SSIM and MS-SSIM inside the
case's mask (:mod:`training.metrics`). A method is an :class:`~sct_model.result.SCTPredictor`
(asked for its sCT directly on the CT grid, with ``steps``, ``samples`` and ``seed``) or any
callable from the MR :class:`~sct_model.volume.Volume` to an HU Volume.

Written to ``out_dir``:

- ``per_case.csv``: case, region, method, mae_hu, psnr_db, ssim, ms_ssim, seconds (``inf`` PSNR
  where the sCT equals the CT inside the mask).
- ``summary.csv`` and ``summary.md``: per metric, rows for each region and All, a column per
  method, mean ± standard deviation (ddof 1), and the two-sided paired Wilcoxon signed-rank test
  (``scipy.stats.wilcoxon``) of each method against ``reference_method`` over the same cases,
  marked * (p < 0.05), ** (p < 0.01), *** (p < 0.001); n/a with fewer than two pairs or no
  nonzero difference. For these statistics an infinite PSNR counts as :data:`PSNR_CAP_DB`.
- ``boxplot_<metric>.png``: a panel per region and All, a box per method.
- ``error_map_<method>.png``: the median case by the reference method's MAE: MR | CT | sCT |
  abs(sCT - CT), axial and coronal slices through the centre of the mask.

:func:`evaluate_checkpoints` (a data root and a split file) and :func:`run_evaluation` (``sct-train
evaluate``: the trainers' own split) load the methods with :func:`build_methods`: the diffusion
checkpoints, the UNet baseline and bulk density, the first of them the reference.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from sct_model.preprocessing import resample_to_grid
from sct_model.result import HU_MAX, HU_MIN, SCTPredictor
from sct_model.volume import Grid, Volume
from training import figures
from training.data import Case, find_cases, load_case, same_grid, split_cases
from training.metrics import mae_hu, ms_ssim, psnr_db, ssim

log = logging.getLogger(__name__)

Method = Callable[[Volume], Volume]
METRICS = ("mae_hu", "psnr_db", "ssim", "ms_ssim")
METRIC_TITLES = {"mae_hu": "MAE (HU)", "psnr_db": "PSNR (dB)", "ssim": "SSIM", "ms_ssim": "MS-SSIM"}
_DECIMALS = {"mae_hu": 1, "psnr_db": 2, "ssim": 3, "ms_ssim": 3}
PSNR_CAP_DB = 100.0  # an exact sCT (infinite PSNR) counts as this in means, tests and plots
ALL = "All"
ERROR_MAX_HU = 500.0  # the top of the error map's colour scale
CT_WINDOW_HU = (-1000.0, 1500.0)


@dataclasses.dataclass(frozen=True)
class CaseResult:
    case_id: str
    region: str
    method: str
    mae_hu: float
    psnr_db: float
    ssim: float
    ms_ssim: float
    seconds: float


@dataclasses.dataclass(frozen=True)
class SummaryRow:
    metric: str
    region: str  # a region or "All"
    method: str
    n: int
    mean: float
    std: float
    median: float
    p_value: float | None  # paired Wilcoxon against the reference method; None for the reference or n/a
    significance: str  # "", "*", "**" or "***"


@dataclasses.dataclass(frozen=True)
class EvaluationReport:
    out_dir: Path
    methods: tuple[str, ...]
    reference_method: str
    results: tuple[CaseResult, ...]
    summary: tuple[SummaryRow, ...]
    median_case_id: str
    files: dict[str, Path]  # "per_case", "summary_md", "summary_csv", "boxplot_<metric>", "error_map_<method>"

    def __str__(self) -> str:
        return str(self.out_dir)

    def row(self, metric: str, method: str, region: str = ALL) -> SummaryRow:
        for row in self.summary:
            if (row.metric, row.method, row.region) == (metric, method, region):
                return row
        raise KeyError((metric, method, region))


def _stars(p_value: float | None) -> str:
    if p_value is None:
        return ""
    return "***" if p_value < 0.001 else "**" if p_value < 0.01 else "*" if p_value < 0.05 else ""


def _statistic_value(metric: str, value: float) -> float:
    return min(value, PSNR_CAP_DB) if metric == "psnr_db" else value


def paired_wilcoxon(reference: Sequence[float], other: Sequence[float]) -> float | None:
    """Two-sided paired Wilcoxon signed-rank p-value (None: fewer than two pairs, or all equal)."""
    x, y = np.asarray(reference, dtype=float), np.asarray(other, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size < 2 or not np.any(x != y):
        return None
    try:
        return float(stats.wilcoxon(x, y, alternative="two-sided").pvalue)
    except ValueError:
        return None


def _sct_on_grid(
    method: Method | SCTPredictor, mr: Volume, grid: Grid, steps: int, samples: int, seed: int
) -> np.ndarray:
    predict = getattr(method, "predict", None)
    if predict is not None:
        hu = predict(mr, steps=steps, samples=samples, seed=seed, output_grid=grid).hu
    else:
        hu = method(mr)  # type: ignore[operator]
    if not same_grid(hu.grid, grid):
        hu = resample_to_grid(hu, grid, linear=True, default_value=HU_MIN)
    return np.clip(np.asarray(hu.array, dtype=np.float32), HU_MIN, HU_MAX)


@dataclasses.dataclass
class _Slices:
    """Axial and coronal slices through the mask centre of one case, for the error maps."""

    aspects: tuple[float, float]  # pixel height / width of the axial and the coronal slice
    images: dict[str, tuple[np.ndarray, np.ndarray]]  # "mr", "ct", and one per method


def _slice_indices(mask: np.ndarray) -> tuple[int, int]:
    z, y, _ = (np.flatnonzero(np.any(mask, axis=axes)) for axes in ((1, 2), (0, 2), (0, 1)))
    return int((z[0] + z[-1]) // 2), int((y[0] + y[-1]) // 2)


def _take(array: np.ndarray, z: int, y: int) -> tuple[np.ndarray, np.ndarray]:
    return array[z].copy(), array[::-1, y].copy()  # axial (anterior up), coronal (superior up)


def _write_per_case(results: Sequence[CaseResult], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["case", "region", "method", *METRICS, "seconds"])
        for r in results:
            writer.writerow(
                [
                    r.case_id,
                    r.region,
                    r.method,
                    *(f"{getattr(r, m):.6g}" for m in METRICS),
                    f"{r.seconds:.3f}",
                ]
            )


def _summarise(
    results: Sequence[CaseResult], methods: Sequence[str], reference: str, regions: Sequence[str]
) -> list[SummaryRow]:
    rows = []
    for metric in METRICS:
        for region in (*regions, ALL):
            chosen = [r for r in results if region == ALL or r.region == region]
            by_method = {
                m: {r.case_id: _statistic_value(metric, getattr(r, metric)) for r in chosen if r.method == m}
                for m in methods
            }
            for method in methods:
                values = np.array(list(by_method[method].values()), dtype=float)
                common = sorted(set(by_method[method]) & set(by_method[reference]))
                p_value = None
                if method != reference:
                    p_value = paired_wilcoxon(
                        [by_method[reference][c] for c in common], [by_method[method][c] for c in common]
                    )
                rows.append(
                    SummaryRow(
                        metric=metric,
                        region=region,
                        method=method,
                        n=int(values.size),
                        mean=float(values.mean()) if values.size else math.nan,
                        std=float(values.std(ddof=1)) if values.size > 1 else 0.0,
                        median=float(np.median(values)) if values.size else math.nan,
                        p_value=p_value,
                        significance=_stars(p_value),
                    )
                )
    return rows


def _write_summary(
    rows: Sequence[SummaryRow], methods: Sequence[str], reference: str, regions: Sequence[str], out_dir: Path
) -> tuple[Path, Path]:
    csv_path, md_path = out_dir / "summary.csv", out_dir / "summary.md"
    with csv_path.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(
            [
                "metric",
                "region",
                "method",
                "n",
                "mean",
                "std",
                "median",
                "p_value_vs_reference",
                "significance",
            ]
        )
        for r in rows:
            p_text = "" if r.p_value is None else f"{r.p_value:.4g}"
            writer.writerow(
                [
                    r.metric,
                    r.region,
                    r.method,
                    r.n,
                    f"{r.mean:.6g}",
                    f"{r.std:.6g}",
                    f"{r.median:.6g}",
                    p_text,
                    r.significance,
                ]
            )
    lookup = {(r.metric, r.region, r.method): r for r in rows}
    lines = [
        "# sCT evaluation",
        "",
        "Mean ± standard deviation over the cases, inside each case's mask. "
        f"Reference method: **{reference}**; the other methods are compared with it by the two-sided "
        "paired Wilcoxon signed-rank test over the same cases: * p < 0.05, ** p < 0.01, *** p < 0.001. "
        f"An infinite PSNR (sCT equal to the CT inside the mask) counts as {PSNR_CAP_DB:g} dB here.",
    ]
    for metric in METRICS:
        digits = _DECIMALS[metric]
        lines += ["", f"## {METRIC_TITLES[metric]}", "", "| Region | n | " + " | ".join(methods) + " |"]
        lines.append("|---|---:|" + "---:|" * len(methods))
        for region in (*regions, ALL):
            cells = []
            for method in methods:
                r = lookup[(metric, region, method)]
                cell = "–" if r.n == 0 else f"{r.mean:.{digits}f} ± {r.std:.{digits}f}"
                cells.append(f"{cell} {r.significance}".rstrip())
            n = lookup[(metric, region, reference)].n
            lines.append(f"| {region} | {n} | " + " | ".join(cells) + " |")
        others = [m for m in methods if m != reference]
        if others:
            lines += ["", f"p-values against {reference}:", "", "| Region | " + " | ".join(others) + " |"]
            lines.append("|---|" + "---:|" * len(others))
            for region in (*regions, ALL):
                values = [lookup[(metric, region, m)].p_value for m in others]
                lines.append(f"| {region} | " + " | ".join("n/a" if p is None else f"{p:.3g}" for p in values) + " |")
    md_path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return csv_path, md_path


def _file_name(method: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", method)


def _error_map(path: Path, case: Case, method: str, slices: _Slices, mae: float) -> Path:
    mr_axial, mr_coronal = slices.images["mr"]
    inside = np.concatenate([mr_axial.ravel(), mr_coronal.ravel()])
    low, high = (float(v) for v in np.percentile(inside, [1.0, 99.5]))
    rows = []
    for index, (name, aspect) in enumerate((("axial", slices.aspects[0]), ("coronal", slices.aspects[1]))):
        ct, sct = slices.images["ct"][index], slices.images[method][index]
        images = [
            figures.grey(slices.images["mr"][index], low, high),
            figures.grey(ct, *CT_WINDOW_HU),
            figures.grey(sct, *CT_WINDOW_HU),
            figures.heat(np.abs(sct - ct), ERROR_MAX_HU),
        ]
        rows.append((name, images, aspect))
    return figures.panel_grid_png(
        path,
        title=f"{method}: case {case.case_id} ({case.region}), MAE {mae:.1f} HU (median case)",
        column_titles=("MR", "CT", "sCT", "|sCT - CT|"),
        rows=rows,
        footer=f"CT and sCT window [{CT_WINDOW_HU[0]:g}, {CT_WINDOW_HU[1]:g}] HU; error scale 0 (black) to "
        f"{ERROR_MAX_HU:g} HU (white) and above",
    )


def evaluate(
    cases: Sequence[Case],
    methods: Mapping[str, Method | SCTPredictor],
    out_dir: Path,
    *,
    reference_method: str = "sct-ldm",
    steps: int = 50,
    samples: int = 1,
    seed: int = 0,
    write_figures: bool = True,
) -> EvaluationReport:
    """Evaluate ``methods`` on ``cases`` and write the report files into ``out_dir`` (see the module doc)."""
    if not cases:
        raise ValueError("no cases to evaluate")
    if not methods:
        raise ValueError("no methods to evaluate")
    if reference_method not in methods:
        raise ValueError(f"reference method {reference_method!r} is not among the methods {list(methods)}")
    names = [reference_method, *(m for m in methods if m != reference_method)]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results: list[CaseResult] = []
    slices: dict[str, _Slices] = {}
    for number, case in enumerate(cases, 1):
        mr, ct, mask = load_case(case)
        z, y = _slice_indices(mask.array)
        sx, sy, sz = ct.grid.spacing_mm
        case_slices = _Slices((sy / sx, sz / sx), {"mr": _take(mr.array, z, y), "ct": _take(ct.array, z, y)})
        for name in names:
            started = time.perf_counter()
            sct = _sct_on_grid(methods[name], mr, ct.grid, steps, samples, seed)
            seconds = time.perf_counter() - started
            values = {
                "mae_hu": mae_hu(sct, ct.array, mask.array),
                "psnr_db": psnr_db(sct, ct.array, mask.array),
                "ssim": ssim(sct, ct.array, mask.array),
                "ms_ssim": ms_ssim(sct, ct.array, mask.array),
            }
            results.append(CaseResult(case.case_id, case.region, name, **values, seconds=seconds))
            case_slices.images[name] = _take(sct, z, y)
            log.info(
                "case %d/%d %s %s: MAE %.1f HU, PSNR %.2f dB, SSIM %.3f, MS-SSIM %.3f (%.1f s)",
                number,
                len(cases),
                case.case_id,
                name,
                values["mae_hu"],
                values["psnr_db"],
                values["ssim"],
                values["ms_ssim"],
                seconds,
            )
        slices[case.case_id] = case_slices
    regions = sorted({case.region for case in cases})
    summary = _summarise(results, names, reference_method, regions)
    files = {"per_case": out_dir / "per_case.csv"}
    _write_per_case(results, files["per_case"])
    files["summary_csv"], files["summary_md"] = _write_summary(summary, names, reference_method, regions, out_dir)

    reference_mae = sorted((r.mae_hu, r.case_id) for r in results if r.method == reference_method)
    median_case_id = reference_mae[(len(reference_mae) - 1) // 2][1]
    if write_figures:
        for metric in METRICS:
            values_by_group: dict[tuple[str, str], list[float]] = {}
            for r in results:
                value = _statistic_value(metric, getattr(r, metric))
                values_by_group.setdefault((r.region, r.method), []).append(value)
                values_by_group.setdefault((ALL, r.method), []).append(value)
            files[f"boxplot_{metric}"] = figures.boxplot_png(
                out_dir / f"boxplot_{metric}.png",
                title=METRIC_TITLES[metric],
                groups=[*regions, ALL],
                methods=names,
                values=values_by_group,
            )
        median_case = next(case for case in cases if case.case_id == median_case_id)
        for name in names:
            mae = next(r.mae_hu for r in results if r.case_id == median_case_id and r.method == name)
            path = out_dir / f"error_map_{_file_name(name)}.png"
            files[f"error_map_{name}"] = _error_map(path, median_case, name, slices[median_case_id], mae)
    log.info("evaluation of %d case(s) x %d method(s) written to %s", len(cases), len(names), out_dir)
    return EvaluationReport(
        out_dir=out_dir,
        methods=tuple(names),
        reference_method=reference_method,
        results=tuple(results),
        summary=tuple(summary),
        median_case_id=median_case_id,
        files=files,
    )


def build_methods(
    checkpoints: Mapping[str, Path],
    *,
    unet_baseline: Path | None = None,
    bulk_density: bool = True,
    device: str = "auto",
) -> dict[str, Method | SCTPredictor]:
    """The predictors to compare, in this order: the diffusion checkpoints by name, ``"unet-baseline"``
    (``training.baselines.UNetBaselinePredictor``) and ``"bulk-density"`` (BulkDensityBaseline)."""
    from sct_model.baseline import BulkDensityBaseline
    from sct_model.factory import load_predictor

    methods: dict[str, Method | SCTPredictor] = {
        name: load_predictor("diffusion", Path(path), device) for name, path in checkpoints.items()
    }
    if unet_baseline is not None:
        from training.baselines import UNetBaselinePredictor

        methods["unet-baseline"] = UNetBaselinePredictor.from_checkpoint(unet_baseline, device=device)
    if bulk_density:
        methods["bulk-density"] = BulkDensityBaseline()
    if not methods:
        raise ValueError("nothing to evaluate: no checkpoint, no UNet baseline and no bulk density")
    return methods


def evaluate_checkpoints(
    data_root: Path,
    *,
    checkpoints: Mapping[str, Path],
    out_dir: Path,
    split: Path | None = None,
    subset: str = "test",
    include_bulk_density: bool = True,
    unet_baseline: Path | None = None,
    steps: int = 50,
    samples: int = 1,
    seed: int = 0,
    device: str = "auto",
    regions: Sequence[str] | None = None,
    layout: str = "auto",
) -> EvaluationReport:
    """Evaluate diffusion checkpoints (and the baselines) on SynthRAD-layout data under ``data_root``.

    ``split``: a split file (:func:`training.data.read_split`) whose ``subset`` list is evaluated;
    None evaluates every case found (logged: no hold-out). The reference method is the first of
    :func:`build_methods`' (the first checkpoint when there is one).
    """
    cases = find_cases(Path(data_root), layout=layout, regions=regions)
    if split is not None:
        cases = split_cases(cases, split_file=split)[subset]
    else:
        log.warning("no split file: evaluating all %d case(s) under %s", len(cases), data_root)
    methods = build_methods(checkpoints, unet_baseline=unet_baseline, bulk_density=include_bulk_density, device=device)
    reference = next(iter(methods))
    return evaluate(cases, methods, out_dir, reference_method=reference, steps=steps, samples=samples, seed=seed)


def run_evaluation(
    *,
    data: Any,
    out_dir: Path,
    checkpoints: Mapping[str, Path],
    unet_baseline: Path | None = None,
    bulk_density: bool = True,
    split: str = "test",
    steps: int = 50,
    samples: int = 1,
    seed: int = 0,
    device: str = "auto",
) -> EvaluationReport:
    """``sct-train evaluate``: the ``split`` cases of ``data`` (``training.loop.DataOptions``, split exactly
    as the trainers split it, ``training.loop.load_split``) through :func:`build_methods`' methods."""
    from training.loop import load_split

    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be train, val or test, got {split!r}")
    cases = list(getattr(load_split(data), split))
    if not cases:
        raise ValueError(f"no {split} cases to evaluate under {data.root}")
    methods = build_methods(checkpoints, unet_baseline=unet_baseline, bulk_density=bulk_density, device=device)
    reference = next(iter(methods))
    return evaluate(cases, methods, out_dir, reference_method=reference, steps=steps, samples=samples, seed=seed)
