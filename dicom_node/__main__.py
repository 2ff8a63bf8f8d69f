"""The command line: ``sct-node serve | demo | resend | review | web | audit | check-config``."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from dicom_node import __version__
from dicom_node.config import DEFAULT_CONFIG_PATH, WEB_ROLES, Config, load_config
from dicom_node.errors import ConfigError, JobStateError, StorageInUseError
from dicom_node.text_safety import SafeLogFormatter

log = logging.getLogger("dicom_node")


def _add_config(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"configuration file (default: the embedded {DEFAULT_CONFIG_PATH.name})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sct-node",
        description="DICOM node for MR-only radiotherapy: MR series in, synthetic CT out, every step audited.",
    )
    parser.add_argument("--version", action="version", version=f"sct-node {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (may show identifiers)")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the node until SIGTERM or Ctrl-C")
    _add_config(serve)

    check = commands.add_parser("check-config", help="validate a configuration file and print it")
    _add_config(check)

    resend = commands.add_parser("resend", help="send a FAILED (or DONE) job's sCT again")
    resend.add_argument("job", type=int)
    _add_config(resend)

    review = commands.add_parser("review", help="jobs the QA held: list, show, release (send once) or reject")
    review_commands = review.add_subparsers(dest="review_command", required=True)
    review_list = review_commands.add_parser("list", help="the jobs held for review (--all: and those decided)")
    review_list.add_argument("--all", action="store_true", help="also the jobs already released or rejected")
    review_list.add_argument("--limit", type=int, default=50)
    _add_config(review_list)
    review_show = review_commands.add_parser("show", help="a job's QA checks, report and decision")
    review_show.add_argument("job", type=int)
    _add_config(review_show)
    for name, what in (("release", "send the held sCT, once"), ("reject", "never send the held sCT")):
        decide = review_commands.add_parser(name, help=f"{what} (an audited decision)")
        decide.add_argument("job", type=int)
        decide.add_argument("--by", required=True, help="who decides (recorded in the audit trail and the report)")
        decide.add_argument("--reason", required=True, help="why (recorded in the audit trail and the report)")
        _add_config(decide)

    audit = commands.add_parser("audit", help="read the audit database")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)
    jobs_cmd = audit_commands.add_parser("jobs", help="list jobs (state, patient, series, times)")
    jobs_cmd.add_argument("--limit", type=int, default=50)
    _add_config(jobs_cmd)
    series_cmd = audit_commands.add_parser(
        "series", help="list series (state and reason: routed, not routed, quarantined)"
    )
    series_cmd.add_argument("--limit", type=int, default=50)
    _add_config(series_cmd)
    show = audit_commands.add_parser("show", help="a job's whole history")
    show.add_argument("job", type=int)
    _add_config(show)
    verify = audit_commands.add_parser(
        "verify", help="check the events' hash chain: OK (exit 0), or each edited, missing, inserted, reordered event"
    )
    _add_config(verify)
    restore = audit_commands.add_parser(
        "restore-head",
        help="re-create a deleted chain head when every event still verifies (the node cannot add events without it)",
    )
    _add_config(restore)

    web = commands.add_parser(
        "web", help="the physicists' review page: serve it, or manage its accounts (add-user, set-password, disable)"
    )
    _add_config(web)
    web_commands = web.add_subparsers(dest="web_command")
    add_user = web_commands.add_parser(
        "add-user", help="a new account; the password is prompted for (or read from stdin)"
    )
    add_user.add_argument("name")
    add_user.add_argument("--role", required=True, choices=WEB_ROLES, help="physicist: may release, reject, resend")
    set_password = web_commands.add_parser("set-password", help="a new password for an account (and enable it)")
    set_password.add_argument("name")
    disable = web_commands.add_parser("disable", help="an account may no longer log in (its sessions end)")
    disable.add_argument("name")
    web_commands.add_parser("users", help="the accounts, their roles and whether they are enabled")
    for sub in (add_user, set_password, disable, web_commands.choices["users"]):
        # --config after the account command too; SUPPRESS keeps the one given before it
        sub.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="configuration file")

    demo = commands.add_parser("demo", help="end-to-end demo: node + receiving PACS on free ports, one MR series")
    demo.add_argument("--input", type=Path, default=None, help="a folder of real MR DICOM files (default: generated)")
    demo.add_argument("--output", type=Path, default=Path("demo-output"), help="folder for the demo's files")
    demo.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for the sCT")
    _add_config(demo)
    return parser


def configure_logging(verbose: bool) -> None:
    handler = logging.StreamHandler()
    # Every log line that starts at the margin is a real record; peers' text cannot forge one.
    handler.setFormatter(SafeLogFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    # pynetdicom logs every PDU at INFO and, at DEBUG, dataset contents (patient names): keep it quiet.
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if verbose else logging.WARNING)
    # Interval ticks that find the task still busy are routine here ("skipped: maximum number of
    # running instances reached"); task failures are logged by the node itself.
    logging.getLogger("apscheduler").setLevel(logging.ERROR)


def cmd_serve(config: Config) -> int:
    from dicom_node.node import Node

    node = Node(config)
    stop = threading.Event()

    def _stop(signum: int, _frame: object) -> None:
        log.info("signal %d: stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        node.start()
    except StorageInUseError as exc:
        print(f"sct-node: {exc}", file=sys.stderr)
        return 3
    try:
        stop.wait()
    finally:
        node.stop()
    return 0


def cmd_resend(config: Config, job_id: int) -> int:
    from dicom_node import jobs
    from dicom_node.audit import AuditDB

    db = AuditDB(config.audit.url)
    try:
        with db.session() as session:
            state = jobs.request_resend(session, job_id)
    except JobStateError as exc:
        print(f"sct-node resend: {exc}", file=sys.stderr)
        return 1
    print(f"job {job_id}: {state} (a running node picks it up within seconds)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"sct-node: configuration error: {exc}", file=sys.stderr)
        return 2
    if args.command == "serve":
        return cmd_serve(config)
    if args.command == "check-config":
        print(f"{config.source}: OK")
        print(f"  node {config.node.ae_title} on {config.node.bind}:{config.node.port}, storage {config.storage.root}")
        certificate = f", certificate {config.tls.certificate}" if config.tls.configured else ""
        print(f"  listener TLS {config.node.tls}{certificate}")
        print(f"  audit {config.audit.url}")
        checkpoint = config.model.checkpoint if config.model.method == "diffusion" else "no checkpoint"
        print(f"  model {config.model.method} ({checkpoint})")
        for destination in config.destinations:
            where = f"{destination.ae_title}@{destination.host}:{destination.port}"
            print(f"  destination {destination.name}: {where}{' over TLS' if destination.tls else ''}")
        for route in config.routes:
            sent = [
                name
                for name, on in (("QA report", route.send_qa_report), ("uncertainty", route.send_uncertainty))
                if on
            ]
            print(
                f"  route {route.name} -> {', '.join(route.destinations)} (QA policy {route.qa_policy}"
                + (f"; with the {' and '.join(sent)}" if sent else "")
                + ")"
            )
        return 0
    if args.command == "resend":
        return cmd_resend(config, args.job)
    if args.command == "review":
        from dicom_node.qa import review

        if args.review_command == "list":
            return review.print_list(config, include_decided=args.all, limit=args.limit)
        if args.review_command == "show":
            return review.print_show(config, args.job)
        decision = review.RELEASED if args.review_command == "release" else review.REJECTED
        return review.run_decision(config, args.job, decision, by=args.by, reason=args.reason)
    if args.command == "audit":
        from dicom_node.audit import report as audit_report

        if args.audit_command == "jobs":
            return audit_report.print_jobs(config, limit=args.limit)
        if args.audit_command == "series":
            return audit_report.print_series(config, limit=args.limit)
        if args.audit_command == "verify":
            return audit_report.print_verify(config)
        if args.audit_command == "restore-head":
            return audit_report.print_restore_head(config)
        return audit_report.print_job(config, args.job)
    if args.command == "web":
        from dicom_node.web import server

        if args.web_command is None:
            return server.serve(config)
        return server.run_account_command(
            config, args.web_command, getattr(args, "name", ""), getattr(args, "role", None)
        )
    if args.command == "demo":
        from dicom_node import demo

        return demo.run_demo(config, input_dir=args.input, output_dir=args.output, timeout_s=args.timeout)
    raise AssertionError(args.command)


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
