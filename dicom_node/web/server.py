"""Serving the review page: uvicorn on ``[web] bind`` and ``port``, HTTPS with the ``[tls]`` files when
``[web] tls = true``; on its own (``sct-node web``) or in a thread of ``sct-node serve``
(``[web] enabled = true``), and the account commands of ``sct-node web``."""

from __future__ import annotations

import logging
import threading
import time

import uvicorn

from dicom_node.audit import AuditDB
from dicom_node.config import Config
from dicom_node.web import accounts

log = logging.getLogger(__name__)


def _uvicorn_config(config: Config, db: AuditDB | None = None) -> uvicorn.Config:
    from dicom_node.web.app import create_app

    web = config.web
    tls = {}
    if web.tls:
        tls = {"ssl_certfile": str(config.tls.certificate), "ssl_keyfile": str(config.tls.private_key)}
    return uvicorn.Config(
        create_app(config, db),
        host=web.bind,
        port=web.port,
        log_config=None,  # the node's logging; the access log has paths (job numbers), never identifiers
        access_log=True,
        server_header=False,
        proxy_headers=False,
        **tls,  # type: ignore[arg-type]
    )


def url(config: Config) -> str:
    host = "localhost" if config.web.bind in ("127.0.0.1", "0.0.0.0", "::", "::1") else config.web.bind
    return f"{'https' if config.web.tls else 'http'}://{host}:{config.web.port}/"


def serve(config: Config) -> int:
    """``sct-node web``: the review page in the foreground until SIGTERM or Ctrl-C."""
    server = uvicorn.Server(_uvicorn_config(config))
    log.info("review page on %s", url(config))
    server.run()
    return 0


class WebThread:
    """The review page in a thread of ``sct-node serve``: started with the node, stopped with it."""

    def __init__(self, config: Config, db: AuditDB) -> None:
        self.config = config
        self.server = uvicorn.Server(_uvicorn_config(config, db))
        self.thread = threading.Thread(target=self.server.run, name="web", daemon=True)

    def start(self, timeout_s: float = 20.0) -> None:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the review page did not start on {self.config.web.bind}:{self.config.web.port}")
            time.sleep(0.05)
        log.info("review page on %s", url(self.config))

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def run_account_command(config: Config, command: str, name: str, role: str | None) -> int:
    """``sct-node web add-user | set-password | disable | users``."""
    import sys

    db = AuditDB(config.audit.url)
    try:
        if command == "add-user":
            assert role is not None
            accounts.add_user(db, name, role, accounts.read_password())
            print(f"account {name} added ({role})")
        elif command == "set-password":
            accounts.set_password(db, name, accounts.read_password())
            print(f"account {name}: password set")
        elif command == "disable":
            accounts.disable(db, name)
            print(f"account {name} disabled (its sessions end at their next request)")
        else:
            for user, user_role, enabled in accounts.list_users(db):
                print(f"{user:<32} {user_role:<10} {'enabled' if enabled else 'disabled'}")
    except accounts.AccountError as exc:
        print(f"sct-node web {command}: {exc}", file=sys.stderr)
        return 1
    finally:
        db.dispose()
    return 0
