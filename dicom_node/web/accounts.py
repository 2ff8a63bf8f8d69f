"""The review page's accounts: ``sct-node web add-user | set-password | disable``, and the login check.

Accounts live in the audit database (``WebUserRow``), next to the decisions they take. A password is
kept only as an argon2id hash (argon2-cffi's ``PasswordHasher``, its RFC 9106 low-memory profile);
a hash made with older parameters is replaced at the next successful login. Every change of an
account, every login and every failed login is a hash-chained audit event; the event names the
account, never the password.
"""

from __future__ import annotations

import dataclasses
import getpass
import re
import sys
from typing import TextIO

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_node.audit import AuditDB, WebUserRow, add_event, utcnow
from dicom_node.config import WEB_ROLES

VIEWER, PHYSICIST = WEB_ROLES
MIN_PASSWORD_CHARS = 12
MAX_PASSWORD_CHARS = 256
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")

_hasher = PasswordHasher()  # argon2id, RFC 9106 low-memory profile (64 MiB, 3 passes)
# Verified against when the name is unknown, so that an unknown name takes as long as a wrong password.
_DUMMY_HASH = _hasher.hash("not a password of anyone's")


class AccountError(ValueError):
    """An account command that cannot be done (bad name, role or password; no such account); says why."""


@dataclasses.dataclass(frozen=True)
class User:
    """Who is logged in: the account's name and role."""

    name: str
    role: str

    @property
    def may_decide(self) -> bool:
        """Release, reject and resend are for physicists only."""
        return self.role == PHYSICIST


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise AccountError(
            "account names are 1-64 characters: letters, digits and . _ @ - (starting with a letter or digit)"
        )
    return name


def check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_CHARS:
        raise AccountError(f"the password must have at least {MIN_PASSWORD_CHARS} characters")
    if len(password) > MAX_PASSWORD_CHARS:
        raise AccountError(f"the password must have at most {MAX_PASSWORD_CHARS} characters")
    if password != password.strip() or any(ord(c) < 32 for c in password):
        raise AccountError("the password must not start or end with white space or hold control characters")
    return password


def add_user(db: AuditDB, name: str, role: str, password: str) -> None:
    name, password = check_name(name), check_password(password)
    if role not in WEB_ROLES:
        raise AccountError(f"the role must be one of {', '.join(WEB_ROLES)}")
    with db.session() as session:
        if session.scalars(select(WebUserRow).where(WebUserRow.name == name)).first() is not None:
            raise AccountError(f"an account {name!r} exists already (set-password changes its password)")
        now = utcnow()
        session.add(
            WebUserRow(
                name=name, role=role, password_hash=_hasher.hash(password), enabled=True, created_at=now,
                password_changed_at=now,
            )
        )  # fmt: skip
        add_event(session, "web_user", f"account {name} added, role {role}", detail={"user": name, "role": role})


def set_password(db: AuditDB, name: str, password: str) -> None:
    password = check_password(password)
    with db.session() as session:
        user = _existing(session, name)
        user.password_hash, user.password_changed_at = _hasher.hash(password), utcnow()
        user.enabled = True
        add_event(session, "web_user", f"account {name}: password set", detail={"user": name})


def disable(db: AuditDB, name: str) -> None:
    with db.session() as session:
        user = _existing(session, name)
        user.enabled = False
        add_event(session, "web_user", f"account {name} disabled", detail={"user": name})


def list_users(db: AuditDB) -> list[tuple[str, str, bool]]:
    with db.session() as session:
        rows = session.scalars(select(WebUserRow).order_by(WebUserRow.name)).all()
        return [(row.name, row.role, row.enabled) for row in rows]


def authenticate(db: AuditDB, name: str, password: str, *, client: str) -> User | None:
    """The account if ``password`` is its password and it is enabled, else None; either way an audit
    event (``web_login`` or ``web_login_failed``, with the client's address)."""
    name = name.strip()[:64]
    with db.session() as session:
        row = session.scalars(select(WebUserRow).where(WebUserRow.name == name)).first()
        ok = False
        try:
            ok = _hasher.verify(row.password_hash if row is not None else _DUMMY_HASH, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            ok = False
        if row is None or not ok or not row.enabled:
            why = "no such account" if row is None else "wrong password" if not ok else "account disabled"
            add_event(session, "web_login_failed", f"login refused from {client}: {why}",
                      detail={"user": name, "client": client, "why": why})  # fmt: skip
            return None
        if _hasher.check_needs_rehash(row.password_hash):
            row.password_hash = _hasher.hash(password)
        add_event(session, "web_login", f"{row.name} logged in from {client}",
                  detail={"user": row.name, "role": row.role, "client": client})  # fmt: skip
        return User(row.name, row.role)


def current(db: AuditDB, name: str) -> User | None:
    """The account ``name`` as it is now (None when unknown or disabled): a session's role follows it."""
    with db.session() as session:
        row = session.scalars(select(WebUserRow).where(WebUserRow.name == name)).first()
        return User(row.name, row.role) if row is not None and row.enabled else None


def read_password(stdin: TextIO | None = None, *, prompt: str = "password: ") -> str:
    """The new password: prompted for twice on a terminal, else the first line of standard input."""
    stream = stdin if stdin is not None else sys.stdin
    if stream.isatty():
        first = getpass.getpass(prompt)
        if getpass.getpass("again: ") != first:
            raise AccountError("the two passwords differ")
        return first
    line = stream.readline()
    return line[:-1] if line.endswith("\n") else line


def _existing(session: Session, name: str) -> WebUserRow:
    row = session.scalars(select(WebUserRow).where(WebUserRow.name == name)).first()
    if row is None:
        raise AccountError(f"no account {name!r} (add-user creates it)")
    return row
