"""How well the QA gate tells the checkpoint's own kind of MR from the rest, and what it costs.

    python benchmarks/qa.py [--checkpoint PATH] [--per-region 10] [--per-kind 10] [--steps 25]
                            [--timing-slices 300] [--out benchmarks/results/qa]

1. **Separation.** Held-out phantoms of the checkpoint's generator (``training.phantoms``, seed 2025,
   case numbers above the 50 per region the demo checkpoint's data was drawn from: never seen) against
   generated out-of-distribution MRs of six kinds (``training.ood``: inverted contrast, an anatomy-free
   block, unseen anatomy (meat), noise only, T2 contrast, a body cut by the field of view), each run
   through the sampler and every check with the default ``[qa]`` levels. Printed: the
   ``in_distribution`` score per kind, its ROC AUC (in-distribution against all out-of-distribution
   inputs, and per kind), the false-hold rate of the in-distribution phantoms at the default levels (by
   ``in_distribution`` alone and by any check), and which check catches each kind. The real MR
   series of ``../shared/data/mr`` and the demo's own phantom are scored too, when present.
2. **Cost.** On a generated ``--timing-slices``-slice head series (256 x 256, 0.9 x 0.9 x 0.6 mm): the
   sampling time (the predictor's whole call), each check's time, the report and DICOM objects'
   time, and the peak memory the checks add (tracemalloc; numpy's buffers are traced).

Writes ``qa-benchmark.json`` and ``qa-scores.png`` (score per kind, log scale, with the levels) under
``--out``. Minutes on a CPU (about 100 sampler runs of a 64³ phantom and one of the big series).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dicom_node.config import QAConfig, load_config  # noqa: E402
from dicom_node.mr_series import check_series, load_mr_volume, read_headers  # noqa: E402
from dicom_node.qa import checks  # noqa: E402
from dicom_node.qa.checks import QAInputs, mr_body_on_sct, run_checks  # noqa: E402
from dicom_node.qa.results import PASS  # noqa: E402
from sct_model.factory import DEMO_CHECKPOINT  # noqa: E402
from sct_model.sampler import SCTSampler  # noqa: E402
from sct_model.volume import Volume, axial_grid_covering  # noqa: E402
from training.ood import KINDS, make_ood  # noqa: E402
from training.phantoms import _case_seed, make_phantom  # noqa: E402

REGIONS = ("HN", "TH", "AB")
FIRST_HELD_OUT = 51  # the demo checkpoint's data: cases 1-50 per region (sct-train phantoms --cases 150)
SHARED_MR = ROOT.parent / "shared" / "data" / "mr"


def run_case(sampler: SCTSampler, mr: Volume, qa: QAConfig, steps: int) -> dict[str, object]:
    result = sampler.predict(mr, steps=steps, samples=1, seed=1, output_grid=axial_grid_covering(mr.grid))
    outcome, _ = run_checks(QAInputs.of(mr, result, 1), qa)
    score = next(m.value for m in outcome.measurements if m.check == "in_distribution")
    return {
        "score": score,
        "verdict": outcome.verdict,
        "checks": {check.name: check.verdict for check in outcome.checks},
    }


def auc(positives: Sequence[float], negatives: Sequence[float]) -> float:
    """ROC AUC of scores where the positives (out-of-distribution) should score higher."""
    from sklearn.metrics import roc_auc_score

    labels = [1] * len(positives) + [0] * len(negatives)
    return float(roc_auc_score(labels, list(positives) + list(negatives)))


def separation(args: argparse.Namespace, sampler: SCTSampler, qa: QAConfig) -> dict[str, list[dict[str, object]]]:
    rng = np.random.default_rng(2026)
    rows: dict[str, list[dict[str, object]]] = {"in_distribution": [], **{kind: [] for kind in KINDS}}
    per_kind_sources = max(1, -(-args.per_kind // len(REGIONS)))
    for region in REGIONS:
        for number in range(FIRST_HELD_OUT, FIRST_HELD_OUT + max(args.per_region, per_kind_sources)):
            phantom = make_phantom(
                region, seed=_case_seed(2025, region, number), shape_zyx=(64, 64, 64), spacing_mm=(3, 3, 3)
            )
            if number < FIRST_HELD_OUT + args.per_region:
                rows["in_distribution"].append(run_case(sampler, phantom.mr, qa, args.steps))
            for kind in KINDS:
                if len(rows[kind]) < args.per_kind and number < FIRST_HELD_OUT + per_kind_sources:
                    rows[kind].append(run_case(sampler, make_ood(kind, phantom, rng), qa, args.steps))
            print(f"  {region} {number}: done", flush=True)
    return rows


def real_series(sampler: SCTSampler, qa: QAConfig, steps: int) -> dict[str, dict[str, object]]:
    found: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory() as folder:
        from dicom_node.demo import generate_demo_series

        files = generate_demo_series(Path(folder))
        found["demo phantom (sct-node demo)"] = run_case(
            sampler, load_mr_volume(check_series(read_headers(files), files)), qa, steps
        )
    if SHARED_MR.is_dir():
        for series in sorted(p for p in SHARED_MR.iterdir() if p.is_dir()):
            files = sorted(series.glob("*.dcm"))
            if files:
                mr = load_mr_volume(check_series(read_headers(files), files))
                found[f"real MR: {series.name}"] = run_case(sampler, mr, qa, steps)
    return found


def cost(sampler: SCTSampler, qa: QAConfig, slices: int, steps: int) -> dict[str, float]:
    from dicom_node.qa.report import extract_planes, render_report
    from dicom_node.synthetic_mr import generate_mr_series

    with tempfile.TemporaryDirectory() as folder:
        files = generate_mr_series(
            Path(folder), slices=slices, rows=256, columns=256, pixel_spacing_mm=0.9, slice_spacing_mm=0.6
        )
        mr = load_mr_volume(check_series(read_headers(files), files))
    started = time.perf_counter()
    result = sampler.predict(mr, steps=steps, samples=1, seed=1, output_grid=axial_grid_covering(mr.grid))
    sampling_s = time.perf_counter() - started
    body = mr_body_on_sct(mr, result)
    run_checks(QAInputs.of(mr, result, 1, body), qa)  # warm-up (imports, first-call costs)

    def checked(max_voxels: int) -> tuple[object, dict[str, float], float, float]:
        """The checks as the node runs them (the inputs taken on every n-th voxel included), timed and traced."""
        saved, checks.MAX_CHECK_VOXELS = checks.MAX_CHECK_VOXELS, max_voxels
        try:
            tracemalloc.start()
            started = time.perf_counter()
            outcome, seconds = run_checks(QAInputs.of(mr, result, 1, body), qa)
            elapsed = time.perf_counter() - started
            _, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
        finally:
            checks.MAX_CHECK_VOXELS = saved
        return outcome, seconds, elapsed, peak

    full_outcome, full_seconds, full_s, full_peak = checked(10**12)  # every voxel
    outcome, seconds, checks_s, peak = checked(checks.MAX_CHECK_VOXELS)
    started = time.perf_counter()
    planes = extract_planes(mr, result.hu, result.std_hu, body)
    planes_s = time.perf_counter() - started
    from dicom_node.qa.report_data import Histogram, Provenance, ReportData

    provenance = Provenance(
        0,
        "",
        "",
        "",
        "",
        "",
        len(files),
        "",
        "",
        result.hu.grid.size[2],
        "diffusion",
        "",
        "",
        "",
        "",
        "",
        steps,
        1,
        1,
        "",
        "hold",
        "",
    )
    data = ReportData(provenance, outcome, (), Histogram((0.0, 1.0), (100.0,), None), "benchmark")
    started = time.perf_counter()
    render_report(data, planes)
    report_s = time.perf_counter() - started
    return {
        "sct_voxels": float(np.prod(result.hu.grid.size)),
        "sampling_s": sampling_s,
        "checks_s": checks_s,
        "stride": float(checks.stride_for(result.hu.grid)),
        **{f"check.{name}_s": value for name, value in seconds.items()},
        "checks_peak_mib": peak / 2**20,
        "full_checks_s": full_s,
        **{f"full.{name}_s": value for name, value in full_seconds.items()},
        "full_checks_peak_mib": full_peak / 2**20,
        "verdicts_agree": float(
            [m.verdict for m in full_outcome.measurements] == [m.verdict for m in outcome.measurements]  # type: ignore[attr-defined]
        ),
        "planes_s": planes_s,
        "report_s": report_s,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=DEMO_CHECKPOINT)
    parser.add_argument("--per-region", type=int, default=10, help="held-out phantoms per region (3 regions)")
    parser.add_argument("--per-kind", type=int, default=10, help="out-of-distribution volumes per kind (6 kinds)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--timing-slices", type=int, default=300)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "qa")
    parser.add_argument(
        "--reuse-separation", action="store_true", help="take part 1 from --out's qa-separation.json (cost only)"
    )
    args = parser.parse_args(argv)
    qa = load_config().qa
    sampler = SCTSampler.from_checkpoint(args.checkpoint, device="cpu")
    print(f"checkpoint {args.checkpoint} (sha256 {sampler.checkpoint.file_sha256[:12]}), {args.steps} steps")
    args.out.mkdir(parents=True, exist_ok=True)
    saved = args.out / "qa-separation.json"
    if args.reuse_separation:
        stored = json.loads(saved.read_text(encoding="utf-8"))
        rows, extra = stored["rows"], stored["other"]
    else:
        rows = separation(args, sampler, qa)
        extra = real_series(sampler, qa, args.steps)
        saved.write_text(json.dumps({"rows": rows, "other": extra}, indent=1), encoding="utf-8")
    timing = cost(sampler, qa, args.timing_slices, args.steps)

    inside = [float(r["score"]) for r in rows["in_distribution"]]  # type: ignore[arg-type]
    outside = [float(r["score"]) for kind in KINDS for r in rows[kind]]  # type: ignore[arg-type]
    print()
    print(f"in_distribution levels: warn > {qa.in_distribution_warn:g}, fail > {qa.in_distribution_fail:g}")
    print()
    print(
        "| inputs | n | score median [min, max] | AUC vs in-dist. | in_distribution fail | held (any check) "
        "| checks that flag them |"
    )
    print("|---|---:|---|---:|---:|---:|---|")
    for kind, kind_rows in rows.items():
        scores = [float(r["score"]) for r in kind_rows]  # type: ignore[arg-type]
        failing = sum(1 for r in kind_rows if r["checks"]["in_distribution"] == "fail")  # type: ignore[index]
        held = sum(1 for r in kind_rows if r["verdict"] != PASS)
        flagged: dict[str, int] = {}
        for r in kind_rows:
            for name, verdict in r["checks"].items():  # type: ignore[attr-defined]
                if verdict != PASS:
                    flagged[name] = flagged.get(name, 0) + 1
        area = "-" if kind == "in_distribution" else f"{auc(scores, inside):.3f}"
        flags = ", ".join(f"{name} {count}/{len(kind_rows)}" for name, count in sorted(flagged.items())) or "none"
        print(
            f"| {kind} | {len(kind_rows)} | {statistics.median(scores):.2f} [{min(scores):.2f}, {max(scores):.2f}] "
            f"| {area} "
            f"| {failing}/{len(kind_rows)} | {held}/{len(kind_rows)} | {flags} |"
        )
    overall = auc(outside, inside)
    false_hold_score = sum(1 for s in inside if s > qa.in_distribution_warn)
    false_hold_any = sum(1 for r in rows["in_distribution"] if r["verdict"] != PASS)
    print()
    print(
        f"ROC AUC of in_distribution, {len(inside)} in-distribution vs {len(outside)} out-of-distribution: "
        f"{overall:.3f}"
    )
    print(
        f"false holds of the in-distribution phantoms at the default levels: {false_hold_score}/{len(inside)} by "
        f"in_distribution, {false_hold_any}/{len(inside)} by any check"
    )
    print()
    print("| other inputs | score | verdict | checks that flag it |")
    print("|---|---:|---|---|")
    for name, row in extra.items():
        flags = ", ".join(f"{c} {v}" for c, v in row["checks"].items() if v != PASS) or "none"  # type: ignore[attr-defined]
        print(f"| {name} | {float(row['score']):.2f} | {row['verdict']} | {flags} |")  # type: ignore[arg-type]
    print()
    share = 100.0 * timing["checks_s"] / timing["sampling_s"]
    print(f"cost on a {args.timing_slices}-slice series ({timing['sct_voxels'] / 1e6:.1f} M sCT voxels), CPU:")
    stride = int(timing["stride"])
    print(f"| step | seconds, as the node runs them (every {stride}. voxel) | seconds, every voxel |")
    print("|---|---:|---:|")
    print(f"| sampling (the predictor's whole call, {args.steps} steps) | {timing['sampling_s']:.2f} | |")
    for name in ("in_distribution", "body_agreement", "hu_plausibility", "uncertainty", "field_of_view"):
        print(f"| check {name} | {timing[f'check.{name}_s']:.3f} | {timing[f'full.{name}_s']:.3f} |")
    full_share = 100.0 * timing["full_checks_s"] / timing["sampling_s"]
    print(
        f"| **all checks** (with taking their inputs) | **{timing['checks_s']:.2f}** ({share:.1f} % of sampling; "
        f"target < 10 %) | {timing['full_checks_s']:.2f} ({full_share:.1f} %) |"
    )
    print(f"| report planes | {timing['planes_s']:.2f} | |")
    print(f"| report PDF + PNG | {timing['report_s']:.2f} | |")
    print(
        f"peak memory the checks add: {timing['checks_peak_mib']:.0f} MiB (every voxel: "
        f"{timing['full_checks_peak_mib']:.0f} MiB); the same verdicts both ways: {bool(timing['verdicts_agree'])}"
    )

    (args.out / "qa-benchmark.json").write_text(
        json.dumps({"rows": rows, "other": extra, "timing": timing, "auc": overall}, indent=1), encoding="utf-8"
    )
    _plot(rows, extra, qa, args.out / "qa-scores.png")
    print(f"\nwrote {args.out / 'qa-benchmark.json'} and {args.out / 'qa-scores.png'}")
    return 0


def _plot(
    rows: dict[str, list[dict[str, object]]], extra: dict[str, dict[str, object]], qa: QAConfig, path: Path
) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.2), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    names = list(rows) + list(extra)
    for index, name in enumerate(names):
        scores = [float(r["score"]) for r in rows[name]] if name in rows else [float(extra[name]["score"])]  # type: ignore[arg-type]
        jitter = np.random.default_rng(index).uniform(-0.18, 0.18, len(scores))
        colour = "#1a7f37" if name == "in_distribution" else ("#555555" if name in extra else "#c62828")
        axes.scatter(index + jitter, scores, s=14, color=colour, alpha=0.8)
    axes.axhline(qa.in_distribution_warn, color="#b35900", linestyle="--", linewidth=1, label="warn")
    axes.axhline(qa.in_distribution_fail, color="#c62828", linestyle="--", linewidth=1, label="fail")
    axes.set_yscale("log")
    axes.set_xticks(
        range(len(names)),
        [n.replace("real MR: ", "").replace(" (sct-node demo)", "") for n in names],
        rotation=30,
        ha="right",
        fontsize=8,
    )
    axes.set_ylabel("in_distribution score (1 = 95th pct. of training)")
    axes.legend(loc="upper left", fontsize=8)
    axes.set_title("QA in_distribution score: held-out phantoms (green), generated OOD kinds (red), others", fontsize=9)
    figure.tight_layout()
    figure.savefig(path)


if __name__ == "__main__":
    sys.exit(main())
