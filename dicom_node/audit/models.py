"""The audit database's tables (SQLAlchemy 2.0 typed models) and the states they hold.

Files carry the data (spool, outbox); these tables carry the state and the history that a medical
physicist reviews: every instance received, every series and the decision taken on it, every job
with its state changes, model, checkpoint hash, seed, timings, QA results, review decisions and send
results. Only portable SQLAlchemy is used, so the same code runs on SQLite (default) and PostgreSQL.
How the events are chained: ``dicom_node.audit.chain``.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

GENESIS_HASH = "0" * 64  # the prev_hash of the first event
CHAIN_HEAD_ID = 1  # the one row of audit_chain_head


def utcnow() -> dt.datetime:
    """Naive UTC timestamps everywhere (SQLite keeps no time zone; PostgreSQL then agrees)."""
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    pass


class SeriesState:
    RECEIVING = "RECEIVING"  # instances arriving; not yet quiet for quiet_period_s
    ROUTED = "ROUTED"  # complete, checked, a job was created
    NOT_ROUTED = "NOT_ROUTED"  # complete and valid, but no routing rule wants an sCT of it
    QUARANTINED = "QUARANTINED"  # failed the checks; its files are in quarantine/


class JobState:
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SENDING = "SENDING"
    DONE = "DONE"
    FAILED = "FAILED"
    QUARANTINED = "QUARANTINED"
    HELD = "HELD"  # the QA held it: waits for a person to release or reject it (sct-node review)
    REJECTED = "REJECTED"  # never sent: rejected by a person, or by a route's "block" QA policy

    UNFINISHED = (QUEUED, RUNNING, SENDING)


class InstanceRow(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    calling_aet: Mapped[str] = mapped_column(String(16))
    received_at: Mapped[dt.datetime] = mapped_column(DateTime)
    path: Mapped[str] = mapped_column(Text)
    size_bytes: Mapped[int] = mapped_column(Integer)
    # True when this SOP Instance UID had already been received in the series (a re-send).
    duplicate: Mapped[bool] = mapped_column(Boolean, default=False)
    # True when the instance arrived after its series was closed (checked and routed or quarantined).
    late: Mapped[bool] = mapped_column(Boolean, default=False)
    # True when the row was rebuilt from the spool at start-up (the node had died before writing it).
    recovered: Mapped[bool] = mapped_column(Boolean, default=False)

    series: Mapped[SeriesRow] = relationship(back_populates="instances")


class SeriesRow(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    patient_id: Mapped[str] = mapped_column(String(64), default="")
    patient_name: Mapped[str] = mapped_column(String(324), default="")
    modality: Mapped[str] = mapped_column(String(16), default="")
    series_description: Mapped[str] = mapped_column(String(64), default="")
    protocol_name: Mapped[str] = mapped_column(String(64), default="")
    calling_aet: Mapped[str] = mapped_column(String(16), default="")
    first_received_at: Mapped[dt.datetime] = mapped_column(DateTime)
    last_received_at: Mapped[dt.datetime] = mapped_column(DateTime, index=True)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(16), default=SeriesState.RECEIVING, index=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    closed_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    # When retention deleted the series' spooled files (never before its sCT was delivered).
    cleaned_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)

    instances: Mapped[list[InstanceRow]] = relationship(back_populates="series")
    jobs: Mapped[list[JobRow]] = relationship(back_populates="series")


class JobRow(Base):
    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    route_name: Mapped[str] = mapped_column(String(64))
    destinations: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    # The model settings the job runs with (copied from the config when the job is created).
    method: Mapped[str] = mapped_column(String(32))
    checkpoint_path: Mapped[str] = mapped_column(Text, default="")
    checkpoint_sha256: Mapped[str] = mapped_column(String(64), default="")
    model_name: Mapped[str] = mapped_column(String(64), default="")
    model_version: Mapped[str] = mapped_column(String(64), default="")
    device: Mapped[str] = mapped_column(String(16), default="")
    steps: Mapped[int] = mapped_column(Integer)
    samples: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(Integer)
    # Fixed when the job is created, so that a re-run after a crash writes the same UIDs and a
    # destination never receives the same sCT twice under different UIDs.
    sct_series_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sct_instance_count: Mapped[int] = mapped_column(Integer, default=0)
    output_dir: Mapped[str] = mapped_column(Text, default="")
    uncertainty_path: Mapped[str] = mapped_column(Text, default="")
    uncertainty_mean_hu: Mapped[float | None] = mapped_column(Float, nullable=True)
    uncertainty_p95_hu: Mapped[float | None] = mapped_column(Float, nullable=True)
    # Seconds per stage: load, sampling, writing, sending (and quiet period, measured).
    timings_s: Mapped[dict[str, float]] = mapped_column(JSON, default=dict)
    send_attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_send_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    run_attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str] = mapped_column(Text, default="")
    # When retention deleted the outbox (the sCT files) after delivery.
    cleaned_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)
    # The QA gate (dicom_node.qa): the route's policy and what goes with the sCT, copied from the
    # route when the job is created; the overall verdict and the folder of the report and the
    # uncertainty map once the checks have run ("" before).
    qa_policy: Mapped[str] = mapped_column(String(8), default="hold")
    send_qa_report: Mapped[bool] = mapped_column(Boolean, default=True)
    send_uncertainty: Mapped[bool] = mapped_column(Boolean, default=True)
    qa_verdict: Mapped[str] = mapped_column(String(8), default="", index=True)
    qa_decision: Mapped[str] = mapped_column(String(8), default="")  # the policy's: "send", "hold" or "reject"
    qa_dir: Mapped[str] = mapped_column(Text, default="")
    # The files of qa_dir that go to the destinations with the sCT (the report, the uncertainty map),
    # fixed when the checks ran: the sender sends them, a resend checks they are there.
    qa_deliverables: Mapped[list[str]] = mapped_column(JSON, default=list)
    # A person's decision on a HELD job (sct-node review release | reject); also an audit event.
    review_decision: Mapped[str] = mapped_column(String(16), default="")  # "released" or "rejected"
    reviewed_by: Mapped[str] = mapped_column(String(64), default="")
    review_reason: Mapped[str] = mapped_column(Text, default="")
    reviewed_at: Mapped[dt.datetime | None] = mapped_column(DateTime, nullable=True)

    series: Mapped[SeriesRow] = relationship(back_populates="jobs")
    sends: Mapped[list[SendRow]] = relationship(back_populates="job", order_by="SendRow.id")
    qa_results: Mapped[list[QAResultRow]] = relationship(back_populates="job", order_by="QAResultRow.id")


class SendRow(Base):
    """One attempt to deliver a job's sCT series to one destination."""

    __tablename__ = "sends"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    attempt: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime)
    finished_at: Mapped[dt.datetime] = mapped_column(DateTime)
    ok: Mapped[bool] = mapped_column(Boolean)
    instances_sent: Mapped[int] = mapped_column(Integer)
    instances_failed: Mapped[int] = mapped_column(Integer)
    message: Mapped[str] = mapped_column(Text, default="")

    job: Mapped[JobRow] = relationship(back_populates="sends")


class QAResultRow(Base):
    """One measured quantity of one QA check of a job (dicom_node.qa.results.Measurement): the value,
    the warn and fail levels it was judged against (from the [qa] configuration at the time) and the
    verdict. A job that is run again (after a crash) replaces its rows; the verdicts are in its
    hash-chained events too."""

    __tablename__ = "qa_results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"), index=True)
    check: Mapped[str] = mapped_column(String(32))  # "in_distribution", "body_agreement", ...
    quantity: Mapped[str] = mapped_column(String(32))  # "score", "dice", "hd95", "bone", ...
    value: Mapped[float | None] = mapped_column(Float, nullable=True)  # None: not measurable (note says why)
    unit: Mapped[str] = mapped_column(String(8), default="")
    warn_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    fail_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    worse: Mapped[str] = mapped_column(String(8))  # "above" or "below": which side of a level is worse
    verdict: Mapped[str] = mapped_column(String(8), index=True)  # "pass", "warn" or "fail"
    note: Mapped[str] = mapped_column(Text, default="")
    measured_at: Mapped[dt.datetime] = mapped_column(DateTime)

    job: Mapped[JobRow] = relationship(back_populates="qa_results")


class EventRow(Base):
    """Every state change and notable event, in order: the history `sct-node audit show` prints."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(DateTime, index=True)
    kind: Mapped[str] = mapped_column(String(32), index=True)
    series_id: Mapped[int | None] = mapped_column(ForeignKey("series.id"), nullable=True, index=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id"), nullable=True, index=True)
    from_state: Mapped[str] = mapped_column(String(16), default="")
    to_state: Mapped[str] = mapped_column(String(16), default="")
    message: Mapped[str] = mapped_column(Text, default="")
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # The hash chain (see the module docstring): position, the previous event's hash, this one's.
    seq: Mapped[int] = mapped_column(Integer, unique=True, index=True)
    prev_hash: Mapped[str] = mapped_column(String(64))
    row_hash: Mapped[str] = mapped_column(String(64), index=True)  # indexed: the verifier looks links up


class ChainHeadRow(Base):
    """The newest link of the events' hash chain: one row, updated in each event's transaction.

    It makes truncation visible (the newest events deleted) and is the row that appends lock.
    """

    __tablename__ = "audit_chain_head"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(Integer)
    head_hash: Mapped[str] = mapped_column(String(64))
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime)


class WebUserRow(Base):
    """An account of the review page (dicom_node.web.accounts): its role decides what it may do;
    the password is kept as an argon2id hash only. Accounts are disabled, never deleted, so that the
    audit events that name them keep a name that existed."""

    __tablename__ = "web_users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))  # "viewer" or "physicist"
    password_hash: Mapped[str] = mapped_column(Text)
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)
    password_changed_at: Mapped[dt.datetime] = mapped_column(DateTime)


class SendInstanceRow(Base):
    """What the destination answered for each instance of one send attempt (``SendRow``): the DICOM
    status of its C-STORE, or none (the association was lost or timed out before the answer)."""

    __tablename__ = "send_instances"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    send_id: Mapped[int] = mapped_column(ForeignKey("sends.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    status: Mapped[int | None] = mapped_column(Integer, nullable=True)  # 0x0000 success, 0xB000.. warning
