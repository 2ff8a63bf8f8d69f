"""The review page's routes (FastAPI + Jinja2 templates, plain HTML forms; no JavaScript build).

Who may do what: every route but the login form needs a session (a page without one redirects to
the login, anything else gets 401); a session is Starlette's signed cookie (``SessionMiddleware``,
key in ``<storage>/web/session.key``), ended after ``[web] session_minutes`` without a request, and
re-checked against the account on every request (a disabled account is logged out at once). Only a
``physicist`` may release, reject or resend (403 for a ``viewer``). Every form carries the session's
CSRF token; a POST without it is refused (403). URLs hold job and series numbers only, never a
patient's name or ID, so the server's access log holds no identifiers.
"""

import datetime as dt
import os
import secrets
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import Depends, FastAPI, Form, HTTPException, Request, Response
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates
from starlette.middleware.sessions import SessionMiddleware

from dicom_node import __version__, jobs
from dicom_node.audit import AuditDB, JobRow, JobState, add_event, utcnow
from dicom_node.audit.verify import verify_chain
from dicom_node.config import Config
from dicom_node.errors import JobStateError
from dicom_node.qa.layout import PAGE_PNG
from dicom_node.qa.review import REJECTED, RELEASED, ReviewError, take_decision
from dicom_node.series import series_instance_paths
from dicom_node.web import queries, volumes
from dicom_node.web.accounts import User, authenticate, current

TEMPLATES = Path(__file__).parent / "templates"
STATIC = Path(__file__).parent / "static"
STATIC_FILES = {"niivue-0.69.0.umd.js": "text/javascript", "viewer.js": "text/javascript"}
SESSION_COOKIE = "sct_node_session"
SECRET_FILE = "session.key"


class NotLoggedInError(Exception):
    """The request has no (valid) session."""


def session_secret(storage_root: Path) -> str:
    """The key that signs session cookies: ``<storage>/web/session.key`` (0600), made at the first start."""
    folder = Path(storage_root) / "web"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = folder / SECRET_FILE
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise PermissionError(f"{path} must be readable by its owner only (chmod 600)") from None
        return path.read_text().strip()
    with os.fdopen(descriptor, "w") as stream:
        stream.write(secrets.token_urlsafe(48))
    return path.read_text().strip()


def create_app(config: Config, db: AuditDB | None = None) -> FastAPI:
    """The review page of the node configured by ``config`` (its audit database unless ``db``)."""
    db = db if db is not None else AuditDB(config.audit.url)
    templates = Jinja2Templates(directory=str(TEMPLATES))
    templates.env.globals.update(version=__version__, node=config.node.ae_title)
    templates.env.filters["when"] = _when
    app = FastAPI(title="sct-node review", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.db = db

    # --- who is asking -------------------------------------------------------------------------

    def csrf_token(request: Request) -> str:
        token = request.session.get("csrf")
        if not token:
            token = request.session["csrf"] = secrets.token_urlsafe(32)
        return str(token)

    idle_s = config.web.session_minutes * 60

    def logged_in(request: Request) -> User:
        """The account of the request's session; the session ends after ``idle_s`` without a request
        (checked here, and by the signed cookie's age: each request signs it again)."""
        name = request.session.get("user")
        user = current(db, str(name)) if name else None
        now = time.time()
        if user is None or now - float(request.session.get("seen", 0)) > idle_s:
            request.session.pop("user", None)
            raise NotLoggedInError
        request.session["seen"] = now
        return user

    def physicist(user: Annotated[User, Depends(logged_in)]) -> User:
        if not user.may_decide:
            raise HTTPException(403, f"{user.name} is a {user.role}: only a physicist may release, reject or resend")
        return user

    def check_csrf(request: Request, csrf: str) -> None:
        expected = request.session.get("csrf")
        if not expected or not secrets.compare_digest(str(expected), csrf):
            raise HTTPException(403, "the form's CSRF token is missing or stale: reload the page and try again")

    def render(request: Request, name: str, user: User | None, status_code: int = 200, **values: Any) -> HTMLResponse:
        return templates.TemplateResponse(
            request, name, {"user": user, "csrf": csrf_token(request), **values}, status_code=status_code
        )

    @app.exception_handler(NotLoggedInError)
    async def to_login(request: Request, _: NotLoggedInError) -> Response:
        if request.method == "GET" and "text/html" in request.headers.get("accept", ""):
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)
        return Response("login required", status_code=401, media_type="text/plain")

    @app.exception_handler(HTTPException)
    async def error_page(request: Request, exc: HTTPException) -> Response:
        user = None
        name = request.session.get("user") if "session" in request.scope else None
        if name:
            user = current(db, str(name))
        if "text/html" in request.headers.get("accept", "") and user is not None:
            return render(request, "error.html", user, status_code=exc.status_code, message=exc.detail)
        return Response(str(exc.detail), status_code=exc.status_code, media_type="text/plain")

    @app.middleware("http")
    async def safety_headers(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        response.headers["Cache-Control"] = "no-store"  # patient data: not kept by the browser
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
            "script-src 'self' 'wasm-unsafe-eval'; frame-ancestors 'none'; form-action 'self'"
        )
        return response

    # Added last, so that it runs first: the session exists for every handler above.
    app.add_middleware(
        SessionMiddleware,
        secret_key=session_secret(config.storage.root),
        session_cookie=SESSION_COOKIE,
        max_age=int(config.web.session_minutes * 60),
        same_site="strict",
        https_only=config.web.tls,
    )

    # --- login ---------------------------------------------------------------------------------

    @app.get("/login", response_class=HTMLResponse)
    def login_form(request: Request, next: str = "/") -> HTMLResponse:
        return render(request, "login.html", None, next=_local(next), error="")

    @app.post("/login")
    def login(
        request: Request,
        username: Annotated[str, Form()],
        password: Annotated[str, Form()],
        csrf: Annotated[str, Form()] = "",
        next: Annotated[str, Form()] = "/",
    ) -> Response:
        check_csrf(request, csrf)
        client = request.client.host if request.client else "unknown"
        user = authenticate(db, username, password, client=client)
        if user is None:
            return render(request, "login.html", None, status_code=401, next=_local(next),
                          error="Wrong name or password, or the account is disabled.")  # fmt: skip
        request.session.clear()  # a new session: nothing of the anonymous one carries over
        request.session["user"] = user.name
        request.session["csrf"] = secrets.token_urlsafe(32)
        request.session["seen"] = time.time()
        return RedirectResponse(_local(next), status_code=303)

    @app.post("/logout")
    def logout(
        request: Request, user: Annotated[User, Depends(logged_in)], csrf: Annotated[str, Form()] = ""
    ) -> Response:
        check_csrf(request, csrf)
        with db.session() as session:
            add_event(session, "web_logout", f"{user.name} logged out", detail={"user": user.name})
        request.session.clear()
        return RedirectResponse("/login", status_code=303)

    # --- pages ---------------------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse)
    def worklist(
        request: Request,
        user: Annotated[User, Depends(logged_in)],
        state: str = "",
        verdict: str = "",
        route: str = "",
        day: str = "",
        page: int = 1,
    ) -> HTMLResponse:
        wanted = queries.WorklistFilter(
            state=state if state in queries.JOB_STATES else "",
            verdict=verdict if verdict in queries.VERDICTS else "",
            route=route[:64],
            day=_day(day),
            page=page,
        )
        with db.reading() as session:
            listing = queries.worklist(session, wanted)
            return render(request, "worklist.html", user, listing=listing, wanted=wanted, states=queries.JOB_STATES,
                          verdicts=queries.VERDICTS, refresh_s=20)  # fmt: skip

    @app.get("/jobs/{job_id}", response_class=HTMLResponse)
    def job(
        request: Request, job_id: int, user: Annotated[User, Depends(logged_in)], message: str = ""
    ) -> HTMLResponse:
        with db.reading() as session:
            found = queries.job_page(session, job_id)
            if found is None:
                raise HTTPException(404, f"no job {job_id}")
            shown, missing = viewer_volumes(found.job)
            return render(request, "job.html", user, page=found, JobState=JobState, message=message[:200],
                          volumes=shown, volumes_missing=missing)  # fmt: skip

    def viewer_volumes(job: JobRow) -> tuple[tuple[str, ...], str]:
        """The volumes the viewer will show (those there are, or can be built), or why none."""
        if job.state in (JobState.QUEUED, JobState.RUNNING) or not job.output_dir:
            return (), "No sCT yet: the job has not been computed."
        folder = Path(job.qa_dir) if job.qa_dir else None
        present = volumes.available(folder) if folder is not None else {}
        if "mr" in present and "sct" in present:
            return tuple(present), ""
        if not Path(job.output_dir).is_dir():
            return (), "The sCT's files have been deleted by retention: the PACS has the sCT."
        return ("mr", "sct", *(("std",) if job.uncertainty_path else ())), ""

    @app.get("/jobs/{job_id}/volumes/{kind}.nii")
    def volume(job_id: int, kind: str, user: Annotated[User, Depends(logged_in)]) -> FileResponse:
        """A viewer volume: the gzipped NIfTI file sent as it is, the browser unpacking it (Content-Encoding)."""
        if kind not in volumes.VIEWER_FILES:
            raise HTTPException(404, f"no volume {kind!r}")
        with db.reading() as session:
            found = session.get(JobRow, job_id)
            if found is None:
                raise HTTPException(404, f"no job {job_id}")
            mr_paths = series_instance_paths(session, found.series_id)
            session.expunge(found)
        try:
            files = volumes.ensure(config, found, mr_paths)
        except volumes.VolumesUnavailableError as exc:
            raise HTTPException(404, str(exc)) from exc
        if kind not in files:
            raise HTTPException(404, f"job {job_id} has no {kind} volume")
        return FileResponse(files[kind], media_type="application/octet-stream", headers={"Content-Encoding": "gzip"})

    @app.get("/static/{name}")
    def static(name: str, user: Annotated[User, Depends(logged_in)]) -> FileResponse:
        if name not in STATIC_FILES:
            raise HTTPException(404, f"no file {name!r}")
        return FileResponse(STATIC / name, media_type=STATIC_FILES[name])

    @app.get("/jobs/{job_id}/report-{number}.png")
    def report_page(job_id: int, number: int, user: Annotated[User, Depends(logged_in)]) -> FileResponse:
        with db.reading() as session:  # the job's row only: its QA folder
            found = session.get(JobRow, job_id)
            if found is None or number not in queries.report_page_numbers(found):
                raise HTTPException(404, f"job {job_id} has no report page {number}")
            path = Path(found.qa_dir) / PAGE_PNG.format(number)
        return FileResponse(path, media_type="image/png")

    @app.post("/jobs/{job_id}/release")
    def release(request: Request, job_id: int, user: Annotated[User, Depends(physicist)],
                reason: Annotated[str, Form()] = "", csrf: Annotated[str, Form()] = "") -> Response:  # fmt: skip
        check_csrf(request, csrf)
        return _decide(job_id, RELEASED, user, reason)

    @app.post("/jobs/{job_id}/reject")
    def reject(request: Request, job_id: int, user: Annotated[User, Depends(physicist)],
               reason: Annotated[str, Form()] = "", csrf: Annotated[str, Form()] = "") -> Response:  # fmt: skip
        check_csrf(request, csrf)
        return _decide(job_id, REJECTED, user, reason)

    def _decide(job_id: int, decision: str, user: User, reason: str) -> Response:
        try:
            state = take_decision(db, job_id, decision, by=user.name, reason=reason)
        except ReviewError as exc:
            raise HTTPException(409, str(exc)) from exc
        return RedirectResponse(f"/jobs/{job_id}?message={quote(f'{decision}: the job is {state}')}", status_code=303)

    @app.post("/jobs/{job_id}/resend")
    def resend(request: Request, job_id: int, user: Annotated[User, Depends(physicist)],
               csrf: Annotated[str, Form()] = "") -> Response:  # fmt: skip
        check_csrf(request, csrf)
        try:
            with db.session() as session:
                state = jobs.request_resend(session, job_id)
                add_event(session, "web_resend", f"resend asked by {user.name}", job_id=job_id,
                          detail={"user": user.name})  # fmt: skip
        except JobStateError as exc:
            raise HTTPException(409, str(exc)) from exc
        return RedirectResponse(f"/jobs/{job_id}?message={quote(f'resend: the job is {state}')}", status_code=303)

    @app.get("/series", response_class=HTMLResponse)
    def series(
        request: Request, user: Annotated[User, Depends(logged_in)], state: str = "", page: int = 1
    ) -> HTMLResponse:
        state = state if state in queries.SERIES_STATES else ""
        with db.reading() as session:
            rows, page, pages = queries.series_list(session, state=state, page=page)
            return render(request, "series.html", user, rows=rows, state=state, states=queries.SERIES_STATES,
                          page=page, pages=pages)  # fmt: skip

    @app.get("/audit", response_class=HTMLResponse)
    def audit(request: Request, user: Annotated[User, Depends(logged_in)]) -> HTMLResponse:
        report = verify_chain(db)
        return render(request, "audit.html", user, report=report, checked_at=utcnow())

    return app


def _local(target: str) -> str:
    """``target`` if it is a path on this site, else "/" (no redirect to another site after login)."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def _day(text: str) -> dt.date | None:
    try:
        return dt.date.fromisoformat(text) if text else None
    except ValueError:
        return None


def _when(value: dt.datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value is not None else "-"
