"""Run the reliability tests (issue 5) and write their report: ``make reliability``.

    .venv/bin/python scripts/reliability_report.py [--short] [--output docs/reliability.md]
                                                   [--results DIR] [-- PYTEST ARGS]

Runs ``pytest tests/reliability`` with ``SCT_RELIABILITY=long`` (the long versions: 20+ kills,
thousands of fuzzed inputs, 300-slice series from four scanners...; ``--short`` runs the CI sizes)
and writes a Markdown table: each test, what it did (kills, inputs, series, minutes of outage),
what it found, its outcome and its duration. The figures come from the tests themselves (the
``report`` fixture in tests/reliability/conftest.py), so the table says what was actually run.
``--results DIR`` keeps the raw results (figures.jsonl, one junit XML per run) in DIR and renders
the report from everything in it, so that the tests can be run in parts into one report (pytest
options in ``--opt=value`` form; e.g. ``-- tests/reliability/test_fuzz_pdu.py``). Exit status:
pytest's (0 when every test passed).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _nodeid(testcase: ET.Element) -> str:
    module = testcase.get("classname", "")
    parts = module.split(".")
    # pytest's junit classname is the dotted module path (plus the class, if any).
    for cut in range(len(parts), 0, -1):
        candidate = REPO / Path(*parts[:cut]).with_suffix(".py")
        if candidate.exists():
            nodeid = "/".join(parts[:cut]) + ".py"
            rest = parts[cut:]
            return "::".join([nodeid, *rest, testcase.get("name", "")])
    return f"{module}::{testcase.get('name', '')}"


def _outcomes(junit_paths: list[Path]) -> dict[str, tuple[str, float, str]]:
    outcomes: dict[str, tuple[str, float, str]] = {}
    testcases = [case for path in sorted(junit_paths) for case in ET.parse(path).getroot().iter("testcase")]
    for testcase in testcases:  # a later run of the same test replaces the earlier one
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            found = testcase.find(tag)
            if found is not None:
                outcome = {"failure": "FAILED", "error": "ERROR", "skipped": "skipped"}[tag]
                message = (found.get("message") or "").splitlines()[0][:200] if found.get("message") else ""
                break
        outcomes[_nodeid(testcase)] = (outcome, float(testcase.get("time", 0.0)), message)
    return outcomes


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(rows: list[dict], outcomes: dict[str, tuple[str, float, str]], mode: str, command: str) -> str:
    by_test = {row["test"]: row for row in rows}
    lines = [
        "# Reliability report",
        "",
        "Fault, load, bad-input and security tests of sct-node (issue 5), as run by "
        f"`{command}` on {dt.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}.",
        f"Mode: **{mode}** ({'the long versions' if mode == 'long' else 'the short versions that CI runs'}). "
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}.",
        "",
        "| test | what it did | result | outcome | seconds |",
        "|---|---|---|---|---:|",
    ]
    passed = sum(1 for outcome, _, _ in outcomes.values() if outcome == "passed")
    for nodeid in sorted(outcomes):
        outcome, seconds, message = outcomes[nodeid]
        row = by_test.get(nodeid)
        name = nodeid.removeprefix("tests/reliability/")
        did = row["did"] if row else "(no figures recorded)"
        result = row["result"] if row else (message or "")
        if outcome != "passed" and message:
            result = f"{result} — {message}" if row else message
        lines.append(f"| `{_cell(name)}` | {_cell(did)} | {_cell(result)} | {outcome} | {seconds:.0f} |")
    lines += [
        "",
        f"{passed} of {len(outcomes)} tests passed.",
        "",
        "Each row's text is written by the test itself after its assertions passed (the `report` fixture of "
        "`tests/reliability/conftest.py`); a failed test has no figures, only pytest's message. "
        "`make test` runs the same tests in their short versions on every CI run.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", action="store_true", help="run the CI sizes instead of the long versions")
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "reliability.md")
    parser.add_argument("--results", type=Path, help="keep raw results here and report all of them")
    parser.add_argument("pytest_args", nargs="*", help="pytest arguments (after --); default: tests/reliability")
    args = parser.parse_args(argv)
    mode = "short" if args.short else "long"
    with tempfile.TemporaryDirectory(prefix="sct-reliability-") as tmp:
        results = args.results or Path(tmp)
        results.mkdir(parents=True, exist_ok=True)
        figures = results / "figures.jsonl"
        junit = results / f"junit-{dt.datetime.now():%Y%m%d-%H%M%S}.xml"
        command = [
            sys.executable,
            "-m",
            "pytest",
            *(args.pytest_args if any(not a.startswith("-") for a in args.pytest_args) else ["tests/reliability"]),
            "-p",
            "no:cacheprovider",
            f"--junitxml={junit}",
            "-o",
            "timeout=7200",
            *(a for a in args.pytest_args if a.startswith("-")),
        ]
        env = {**os.environ, "SCT_RELIABILITY": mode, "SCT_RELIABILITY_REPORT": str(figures)}
        status = subprocess.call(command, cwd=REPO, env=env)
        if not junit.exists():
            print("pytest wrote no results; no report written", file=sys.stderr)
            return status or 1
        rows = [json.loads(line) for line in figures.read_text().splitlines()] if figures.exists() else []
        outcomes = _outcomes(list(results.glob("junit-*.xml")))
        text = render(rows, outcomes, mode, "make reliability" if mode == "long" else "make reliability-short")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    print(f"report written to {args.output}")
    return status


if __name__ == "__main__":
    sys.exit(main())
