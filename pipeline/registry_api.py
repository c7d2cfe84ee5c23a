"""The registry as a service, in the spirit of VerCD's dataset/model/metrics services: a REST API (FastAPI,
typed pydantic models, OpenAPI at ``/docs``) and two HTML pages over ``pipeline.registry``.

One app (``create_app``), run two ways:

* inside Airflow: the plugin ``pipeline/airflow_plugins/avp_registry.py`` mounts it at ``/avp`` of the API
  server and Airflow's login says who calls (``AirflowAuth``): reading needs a logged-in user, writing needs
  permission to trigger ``avp_daily``;
* on its own: ``avp registry serve`` (uvicorn on ``registry.api_host``, 127.0.0.1 by default); every request
  carries the bearer token held by the environment variable ``registry.token_env`` (``TokenAuth``).

JSON routes, under ``/api``::

    GET  /artifacts                       filters: kind, name, state, blessed, created_from, created_to, dag_run_id
    GET  /artifacts/{ref}                 every recorded field, parents, children, events, promotions, links
    GET  /artifacts/{ref}/lineage         ?direction=up|down, breadth first with depth and each node's parents
    GET  /artifacts/{ref}/files/{path}    a file of the artifact (the reports and the model card link here)
    POST /artifacts/{ref}/deprecate       {"reason": ...}
    POST /artifacts/{ref}/end-of-life     {"reason": ...}
    GET  /promotions                      ?namespace=&name=
    GET  /promotions/{namespace}/{name}   production and the whole history
    POST /promotions/{namespace}/{name}   {"ref": ..., "major": 1}: a blessed model or package becomes production
    POST /promotions/{namespace}/{name}/rollback
    POST /datasets, POST /models          start an avp_daily run through Airflow's REST API (202)

Pages: ``/`` (the artifact table with filters) and ``/artifacts/{ref}`` (fields, links, lineage graph,
promote/rollback buttons for callers who may write). Errors: 404 an unknown reference, 409 a lifecycle move
or promotion the registry refuses, 422 a bad body, query or name, 401/403 no or too few rights, 503 no
Airflow to start a build on. The rules stay in ``Registry``: writes call its methods inside
``provenance.acting_as(caller)``, so every event records who did it.
"""

from __future__ import annotations

import datetime as dt
import functools
import hmac
import html
import json
import os
import time
import typing
from dataclasses import dataclass
from typing import Any, Callable, Literal, Optional
from urllib.parse import quote

import httpx
from fastapi import Depends, FastAPI, Form, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse
from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator
from sqlalchemy import exc as sa_exc

from pipeline import config as config_mod
from pipeline import provenance
from pipeline.home import UnsafeNameError, check_name, is_url
from pipeline.registry import KINDS, STATES, Artifact, NotFound, Promotion, Registry, RegistryError

DAG_ID = "avp_daily"
URL_PREFIX = "/avp"  # where the Airflow plugin mounts the app
Kind = Literal[KINDS]
State = Literal[STATES]
SplitMode = config_mod.describe("ingest.split").annotation
Source = config_mod.describe("ingest.source").annotation
Backend = config_mod.describe("train.backend").annotation


# ----------------------------------------------------------------------------------------------- models
class Event(BaseModel):
    at: dt.datetime
    by: str
    from_state: Optional[str]
    to_state: str
    reason: str


class _ArtifactFields(BaseModel):
    @classmethod
    def of(cls, art: Artifact) -> "ArtifactOut":
        return cls(ref=art.ref, **{k: v for k, v in vars(art).items() if k != "cached"})

    def artifact(self) -> Artifact:
        return Artifact(**self.model_dump(include=set(ArtifactOut.model_fields) - {"ref"}))


# Every recorded field of an artifact, typed as ``pipeline.registry.Artifact`` declares it, and its reference.
ArtifactOut = create_model(
    "ArtifactOut", __base__=_ArtifactFields, ref=(str, ...),
    **{name: (hint, ...) for name, hint in typing.get_type_hints(Artifact).items() if name != "cached"})


class PromotionOut(BaseModel):
    label: str  # namespace/name/major.minor
    namespace: str
    name: str
    major: int
    minor: int
    status: str  # production, previous or rolled_back
    ref: str
    artifact_id: int
    promoted_at: dt.datetime
    promoted_by: str

    def promotion(self) -> Promotion:
        return Promotion(**self.model_dump(exclude={"label", "ref"}))


class PromotionHistory(BaseModel):
    namespace: str
    name: str
    production: Optional[PromotionOut]
    history: list[PromotionOut]  # oldest first


class Links(BaseModel):
    """Where to read more; relative to the API's own address, or None where there is nothing."""

    validation_report: Optional[str]
    evaluation_report: Optional[str]
    model_card: Optional[str]  # the serving package's MODEL_CARD.html (metadata.json for older packages)
    airflow_run: Optional[str]


class ArtifactDetail(ArtifactOut):
    parents: list[str]
    children: list[str]
    events: list[Event]
    promotions: list[PromotionOut]
    links: Links


class LineageNode(BaseModel):
    depth: int
    artifact: ArtifactOut
    parents: list[str]  # references of its parents, for drawing the graph


class Lineage(BaseModel):
    ref: str
    direction: Literal["up", "down"]
    nodes: list[LineageNode]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PromoteBody(_Body):
    ref: str = Field(description="the model or package: kind:name@vN or an id")
    major: int = Field(1, ge=0)


class ReasonBody(_Body):
    reason: str = Field("", max_length=2000)
    # also when the artifact is production: production then rolls back to the previous succeeded version
    production: bool = False


class DatasetBuild(_Body):
    """A dataset build: ingest (and validation) of the logs a window selects."""

    window: Literal["cumulative", "rolling"] = "cumulative"
    window_days: int = Field(7, ge=1)
    split: Optional[SplitMode] = None  # default: ingest.split
    source: Optional[Source] = None
    source_path: Optional[str] = None
    name: Optional[str] = None  # dataset name; default ingest.dataset_name
    until: Literal["validate", "train", "evaluate", "serve"] = "validate"
    force: bool = False

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: Optional[str]) -> Optional[str]:
        return value if value is None else check_name(value, "dataset name")

    def conf(self) -> dict[str, Any]:
        conf = {"until": self.until, "window": self.window, "window_days": self.window_days, "split": self.split,
                "force": self.force, "ingest.source": self.source, "ingest.source_path": self.source_path,
                "ingest.dataset_name": self.name}
        return {k: v for k, v in conf.items() if v is not None}


class ModelBuild(_Body):
    """A model build on a registered, succeeded dataset: train, then evaluate and package unless ``until``."""

    dataset: str = Field(description="dataset:name@vN or an id")
    model: Optional[str] = None  # default: train.model
    epochs: Optional[int] = Field(None, ge=1)
    backend: Optional[Backend] = None
    np: Optional[int] = Field(None, ge=1)
    batch_size: Optional[int] = Field(None, ge=1)
    until: Literal["train", "evaluate", "serve"] = "serve"
    force: bool = False

    @field_validator("model")
    @classmethod
    def _safe_model(cls, value: Optional[str]) -> Optional[str]:
        return value if value is None else check_name(value, "model name")

    def conf(self, dataset_ref: str) -> dict[str, Any]:
        conf = {"dataset": dataset_ref, "until": self.until, "epochs": self.epochs, "backend": self.backend,
                "np": self.np, "force": self.force, "train.model": self.model, "train.batch_size": self.batch_size}
        return {k: v for k, v in conf.items() if v is not None}


class BuildStarted(BaseModel):
    dag_id: str
    dag_run_id: str
    state: str
    conf: dict[str, Any]
    artifacts: str  # the artifact list of this run (they appear as each stage starts)


# ------------------------------------------------------------------------------------------------- auth
@dataclass(frozen=True)
class Caller:
    name: str
    may_write: bool


class TokenAuth:
    """``avp registry serve``: one shared bearer token (header, or the ``avp_registry_token`` cookie for a
    browser); the caller names itself with ``X-AVP-User``. Builds go to ``airflow_url`` with ``airflow_token``."""

    COOKIE = "avp_registry_token"

    def __init__(self, token: str, airflow_url: str = "", airflow_token: str = ""):
        if not token:
            raise ValueError("TokenAuth needs a token")
        self._token, self.airflow_url, self._airflow_token = token, airflow_url.rstrip("/"), airflow_token

    async def caller(self, request: Request) -> Caller:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        given = given if scheme.lower() == "bearer" else request.cookies.get(self.COOKIE, "")
        if not given:
            raise HTTPException(401, "not authenticated: send Authorization: Bearer <token>",
                                headers={"WWW-Authenticate": "Bearer"})
        if not self.valid(given):
            raise HTTPException(403, "invalid token")
        return Caller((request.headers.get("x-avp-user") or "api-token")[:128], may_write=True)  # the "by" column

    def login_url(self, request: Request) -> str:
        return f"{request.scope.get('root_path', '').rstrip('/')}/login"

    def valid(self, given: str) -> bool:
        return hmac.compare_digest(given.encode(), self._token.encode())

    def airflow(self, request: Request) -> tuple[str, dict[str, str]] | None:
        if not self.airflow_url:
            return None
        return self.airflow_url, ({"Authorization": f"Bearer {self._airflow_token}"} if self._airflow_token else {})

    def airflow_ui(self) -> str | None:
        return self.airflow_url or None


class AirflowAuth:
    """Inside Airflow's API server: the caller is Airflow's logged-in user (JWT in the Authorization header or
    the UI's cookie); writing needs permission to trigger ``avp_daily`` (POST on its DAG runs). Builds are
    triggered on this same API server with the caller's own credentials."""

    async def caller(self, request: Request) -> Caller:
        from airflow.api_fastapi.app import get_auth_manager
        from airflow.api_fastapi.auth.managers.models.resource_details import DagAccessEntity, DagDetails
        from airflow.api_fastapi.core_api.security import get_user
        from fastapi.security import HTTPAuthorizationCredentials

        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        bearer = HTTPAuthorizationCredentials(scheme=scheme, credentials=token) if token else None
        user = await get_user(request, None, bearer)
        may_write = get_auth_manager().is_authorized_dag(method="POST", access_entity=DagAccessEntity.RUN,
                                                         details=DagDetails(id=DAG_ID), user=user)
        return Caller(user.get_name(), may_write)

    def login_url(self, request: Request) -> str:
        from airflow.api_fastapi.app import get_auth_manager

        return get_auth_manager().get_url_login(next_url=str(request.url))

    def airflow(self, request: Request) -> tuple[str, dict[str, str]] | None:
        from airflow.api_fastapi.auth.managers.base_auth_manager import COOKIE_NAME_JWT_TOKEN

        forwarded = request.headers.get("authorization") or f"Bearer {request.cookies.get(COOKIE_NAME_JWT_TOKEN, '')}"
        return f"{request.url.scheme}://{request.url.netloc}", {"Authorization": forwarded}

    def airflow_ui(self) -> str | None:
        return ""  # the same origin


# -------------------------------------------------------------------------------------------------- app
class _SignIn(Exception):
    """A page was opened without credentials: redirect to ``url`` to sign in."""

    def __init__(self, url: str):
        super().__init__(url)
        self.url = url


def _status_for(exc: RegistryError) -> int:
    return 404 if isinstance(exc, NotFound) else 409


def create_app(registry: Callable[[], Registry], auth: TokenAuth | AirflowAuth, namespace: str = "perception",
               title: str = "avp registry") -> FastAPI:
    """The API and pages over ``registry()`` (called per request; cache it), authenticated by ``auth``;
    ``namespace`` is where the pages promote to (``serve.namespace``)."""
    app = FastAPI(title=title, version="1", description=__doc__.split("\n\n")[0])

    @app.exception_handler(RegistryError)
    async def _registry_error(_request: Request, exc: RegistryError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=_status_for(exc))

    @app.exception_handler(UnsafeNameError)
    async def _bad_name(_request: Request, exc: UnsafeNameError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    # A value the database cannot hold (an id beyond its integers) is bad input too, not a server error.
    @app.exception_handler(OverflowError)
    @app.exception_handler(sa_exc.DataError)
    async def _out_of_range(_request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": f"a value is out of the registry's range: {str(exc).splitlines()[0]}"},
                            status_code=422)

    async def reader(request: Request) -> Caller:
        return await auth.caller(request)

    async def page_reader(request: Request) -> Caller:
        """``reader`` for the HTML pages: a browser without credentials is sent to sign in instead."""
        try:
            return await auth.caller(request)
        except HTTPException as exc:
            if exc.status_code == 401:
                raise _SignIn(auth.login_url(request)) from None
            raise

    @app.exception_handler(_SignIn)
    async def _sign_in(_request: Request, exc: _SignIn) -> RedirectResponse:
        return RedirectResponse(exc.url, status_code=303)

    async def writer(request: Request) -> Caller:
        caller = await auth.caller(request)
        if not caller.may_write:
            raise HTTPException(403, f"{caller.name} may not change the registry: it needs permission to "
                                     f"trigger the {DAG_ID} DAG")
        return caller

    def base(request: Request) -> str:
        return request.scope.get("root_path", "").rstrip("/")

    def detail(request: Request, art: Artifact) -> ArtifactDetail:
        reg = registry()
        return ArtifactDetail(
            **ArtifactOut.of(art).model_dump(),
            parents=[p.ref for p in reg.parents(art.id)], children=[c.ref for c in reg.children(art.id)],
            events=[Event(**e) for e in reg.events(art.id)],
            promotions=[_promotion(reg, p) for p in reg.promotions() if p.artifact_id == art.id],
            links=_links(reg, art, base(request), auth.airflow_ui()))

    # ------------------------------------------------------------------------------------------ reading
    @app.get("/api/artifacts", response_model=list[ArtifactOut], tags=["artifacts"])
    def list_artifacts(kind: Optional[Kind] = None, name: Optional[str] = None, state: Optional[State] = None,
                       blessed: Optional[bool] = None, created_from: Optional[dt.date] = None,
                       created_to: Optional[dt.date] = Query(None, description="inclusive"),
                       dag_run_id: Optional[str] = None, _: Caller = Depends(reader)) -> list[ArtifactOut]:
        arts = registry().list(kind, name, state)
        return [ArtifactOut.of(a) for a in arts if _matches(a, blessed, created_from, created_to, dag_run_id)]

    @app.get("/api/artifacts/{ref}", response_model=ArtifactDetail, tags=["artifacts"])
    def get_artifact(ref: str, request: Request, _: Caller = Depends(reader)) -> ArtifactDetail:
        return detail(request, registry().get(ref))

    @app.get("/api/artifacts/{ref}/lineage", response_model=Lineage, tags=["artifacts"])
    def lineage(ref: str, direction: Literal["up", "down"] = "up", _: Caller = Depends(reader)) -> Lineage:
        reg = registry()
        art = reg.get(ref)
        return Lineage(ref=art.ref, direction=direction, nodes=[
            LineageNode(depth=depth, artifact=ArtifactOut.of(a), parents=[p.ref for p in reg.parents(a.id)])
            for depth, a in reg.lineage(art.id, direction)])

    @app.get("/api/artifacts/{ref}/files/{path:path}", tags=["artifacts"], response_class=FileResponse)
    def artifact_file(ref: str, path: str, _: Caller = Depends(reader)) -> FileResponse:
        return FileResponse(_artifact_file(registry().get(ref), path))

    @app.get("/api/promotions", response_model=list[PromotionOut], tags=["promotions"])
    def list_promotions(namespace: Optional[str] = None, name: Optional[str] = None,
                        _: Caller = Depends(reader)) -> list[PromotionOut]:
        reg = registry()
        return [_promotion(reg, p) for p in reg.promotions(namespace, name)]

    @app.get("/api/promotions/{namespace}/{name}", response_model=PromotionHistory, tags=["promotions"])
    def promotion_history(namespace: str, name: str, _: Caller = Depends(reader)) -> PromotionHistory:
        reg = registry()
        history = [_promotion(reg, p) for p in reg.promotions(namespace, name)]
        if not history:
            raise NotFound(f"nothing was ever promoted as {namespace}/{name}")
        current = [p for p in history if p.status == "production"]
        return PromotionHistory(namespace=namespace, name=name, production=current[-1] if current else None,
                                history=history)

    # ------------------------------------------------------------------------------------------ writing
    @app.post("/api/promotions/{namespace}/{name}", response_model=PromotionOut, tags=["promotions"])
    def promote(namespace: str, name: str, body: PromoteBody, caller: Caller = Depends(writer)) -> PromotionOut:
        reg = registry()
        with provenance.acting_as(caller.name):
            return _promotion(reg, reg.promote(body.ref, namespace, name, body.major))

    @app.post("/api/promotions/{namespace}/{name}/rollback", response_model=PromotionOut, tags=["promotions"])
    def rollback(namespace: str, name: str, caller: Caller = Depends(writer)) -> PromotionOut:
        reg = registry()
        with provenance.acting_as(caller.name):
            return _promotion(reg, reg.rollback(namespace, name))

    def lifecycle_route(path: str, to_state: str) -> None:
        @app.post(f"/api/artifacts/{{ref}}/{path}", response_model=ArtifactOut, tags=["artifacts"],
                  name=to_state, summary=f"mark a succeeded artifact {to_state.replace('_', ' ')}")
        def move(ref: str, body: ReasonBody, caller: Caller = Depends(writer)) -> ArtifactOut:
            with provenance.acting_as(caller.name):
                return ArtifactOut.of(registry().transition(ref, to_state, body.reason, production=body.production))

    lifecycle_route("deprecate", "deprecated")
    lifecycle_route("end-of-life", "end_of_life")

    def start_run(request: Request, conf: dict[str, Any]) -> BuildStarted:
        target = auth.airflow(request)
        if target is None:
            raise HTTPException(503, "no Airflow to build on: set registry.airflow_url (and the token variable "
                                     "registry.airflow_token_env) for avp registry serve")
        run = _trigger(*target, conf)
        return BuildStarted(dag_id=DAG_ID, dag_run_id=run["dag_run_id"], state=run.get("state", "queued"),
                            conf=conf, artifacts=f"{base(request)}/api/artifacts?dag_run_id="
                                                  f"{quote(run['dag_run_id'], safe='')}")

    @app.post("/api/datasets", response_model=BuildStarted, status_code=202, tags=["builds"])
    def build_dataset(body: DatasetBuild, request: Request, _: Caller = Depends(writer)) -> BuildStarted:
        return start_run(request, body.conf())

    @app.post("/api/models", response_model=BuildStarted, status_code=202, tags=["builds"])
    def build_model(body: ModelBuild, request: Request, _: Caller = Depends(writer)) -> BuildStarted:
        dataset = registry().get(body.dataset)
        if dataset.kind != "dataset" or dataset.state != "succeeded":
            raise HTTPException(409, f"{dataset.ref} is a {dataset.state} {dataset.kind}; a model is built on a "
                                     "succeeded dataset")
        return start_run(request, body.conf(dataset.ref))

    # -------------------------------------------------------------------------------------------- pages
    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def table_page(request: Request, caller: Caller = Depends(page_reader)) -> HTMLResponse:
        query = {k: v for k, v in request.query_params.items() if v}
        blessed = {"yes": True, "no": False}.get(query.get("blessed", ""))
        try:
            created = [dt.date.fromisoformat(query[k]) if k in query else None for k in ("created_from", "created_to")]
        except ValueError as exc:
            raise HTTPException(422, f"bad date: {exc}") from None
        arts = [a for a in registry().list(query.get("kind"), query.get("name"), query.get("state"))
                if _matches(a, blessed, *created, None)]
        return HTMLResponse(_table_html(base(request), caller, arts, query))

    @app.get("/artifacts/{ref}", response_class=HTMLResponse, include_in_schema=False)
    def artifact_page(ref: str, request: Request, caller: Caller = Depends(page_reader)) -> HTMLResponse:
        reg = registry()
        art = reg.get(ref)
        return HTMLResponse(_artifact_html(base(request), caller, detail(request, art), _graph(reg, art),
                                           _actions(reg, art, namespace) if caller.may_write else []))

    if isinstance(auth, TokenAuth):  # a browser signs in once; the token then travels in an HttpOnly cookie
        @app.get("/login", response_class=HTMLResponse, include_in_schema=False)
        def login_form(request: Request) -> HTMLResponse:
            return HTMLResponse(_page("sign in", f"<h2>avp registry</h2><form method='post' action='{base(request)}"
                                                 "/login'><label>token <input type='password' name='token'></label>"
                                                 "<button type='submit'>Sign in</button></form>"))

        @app.post("/login", include_in_schema=False)
        def login(request: Request, token: str = Form(...)) -> RedirectResponse:
            if not auth.valid(token):
                raise HTTPException(403, "invalid token")
            signed_in = RedirectResponse(f"{base(request)}/", status_code=303)
            signed_in.set_cookie(TokenAuth.COOKIE, token, httponly=True, samesite="strict", path=base(request) or "/")
            return signed_in

    return app


def _matches(art: Artifact, blessed: bool | None, created_from: dt.date | None, created_to: dt.date | None,
             dag_run_id: str | None) -> bool:
    return ((blessed is None or bool(art.blessed) == blessed)
            and (created_from is None or art.created_at.date() >= created_from)
            and (created_to is None or art.created_at.date() <= created_to)
            and (dag_run_id is None or art.dag_run_id == dag_run_id))


def _promotion(registry: Registry, p: Promotion) -> PromotionOut:
    return PromotionOut(label=p.label, ref=registry.get(p.artifact_id).ref, **vars(p))


def _artifact_file(art: Artifact, path: str) -> str:
    """The local file ``path`` inside the artifact's folder; NotFound for anything else (no escaping it)."""
    if not art.location or is_url(art.location):
        raise NotFound(f"{art.ref} has no local files to serve")
    root = os.path.realpath(art.location)
    full = os.path.realpath(os.path.join(root, path))
    if not full.startswith(root + os.sep) or not os.path.isfile(full):
        raise NotFound(f"{art.ref} has no file {path!r}")
    return full


def _links(registry: Registry, art: Artifact, base: str, airflow_ui: str | None) -> Links:
    def newest_child(kind: str) -> Artifact | None:
        found = [c for c in registry.children(art.id) if c.kind == kind and c.state == "succeeded"]
        return found[-1] if found else None

    def file_link(owner: Artifact | None, *names: str) -> str | None:
        """The first of ``names`` in the artifact's folder, or in a folder inside it (a package's files sit in
        ``<location>/<name>-v<N>/``)."""
        if owner is None or not owner.location or is_url(owner.location) or not os.path.isdir(owner.location):
            return None
        folders = ["", *sorted(d for d in os.listdir(owner.location) if os.path.isdir(os.path.join(owner.location, d)))]
        for name in names:
            for folder in folders:
                relative = f"{folder}/{name}" if folder else name
                if os.path.isfile(os.path.join(owner.location, relative)):
                    return f"{base}/api/artifacts/{owner.id}/files/{quote(relative)}"
        return None

    validation = art if art.kind == "validation" else newest_child("validation") if art.kind == "dataset" else None
    metrics = art if art.kind == "metrics" else newest_child("metrics") if art.kind == "model" else None
    package = art if art.kind == "package" else newest_child("package") if art.kind == "model" else None
    run = None
    if airflow_ui is not None and art.dag_id and art.dag_run_id:
        run = f"{airflow_ui}/dags/{quote(art.dag_id, safe='')}/runs/{quote(art.dag_run_id, safe='')}"
    return Links(validation_report=file_link(validation, "report.html"),
                 evaluation_report=file_link(metrics, "report.html"),
                 model_card=file_link(package, "MODEL_CARD.html", "metadata.json"), airflow_run=run)


def _trigger(base_url: str, headers: dict[str, str], conf: dict[str, Any]) -> dict[str, Any]:
    """``POST /api/v2/dags/avp_daily/dagRuns`` on Airflow; its refusal is passed on, its failure is a 502."""
    url = f"{base_url}/api/v2/dags/{DAG_ID}/dagRuns"
    for attempt in range(5):
        try:
            answer = httpx.post(url, json={"logical_date": None, "conf": conf}, headers=headers, timeout=60)
        except httpx.HTTPError as exc:
            raise HTTPException(502, f"cannot reach Airflow at {base_url}: {exc}") from None
        if answer.status_code < 500:
            break
        time.sleep(1 + attempt)  # SQLite behind a busy scheduler answers "database is locked" with a 500
    if answer.status_code in (401, 403):
        raise HTTPException(answer.status_code, f"Airflow refused to trigger {DAG_ID}: {answer.text[:500]}")
    if answer.status_code >= 400:
        raise HTTPException(502, f"Airflow answered {answer.status_code} to the trigger: {answer.text[:500]}")
    return answer.json()


# ------------------------------------------------------------------------------------------ HTML pages
_CSS = """
body{font:14px system-ui,sans-serif;margin:16px;color:#1a202c} a{color:#2b6cb0;text-decoration:none}
table{border-collapse:collapse} td,th{border-bottom:1px solid #e2e8f0;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f7fafc} form.filters{display:flex;gap:8px;flex-wrap:wrap;margin:8px 0 12px;align-items:end}
form.filters label{display:flex;flex-direction:column;font-size:12px;color:#4a5568}
.state{padding:1px 6px;border-radius:8px;font-size:12px;background:#edf2f7}
.succeeded{background:#c6f6d5}.failed,.aborted{background:#fed7d7}.building,.registered{background:#fefcbf}
.deprecated,.end_of_life{background:#e2e8f0;color:#718096}
button{padding:4px 10px;border:1px solid #2b6cb0;border-radius:4px;background:#ebf8ff;cursor:pointer;margin:2px}
pre{background:#f7fafc;padding:6px;max-width:900px;overflow:auto;margin:0} svg a:hover rect{stroke-width:3}
.confirm{border:1px solid #dd6b20;background:#fffaf0;padding:8px 12px;max-width:700px} #message{color:#c53030}
"""
# Airflow shows the pages in an iframe sandboxed without allow-modals, so confirm()/alert() would be ignored:
# the confirmation and any refusal are shown in the page itself.
_SCRIPT = """
let pendingAction = null;
function askFirst(url, body, question) {
  pendingAction = {url: url, body: body};
  document.getElementById("confirm-question").textContent = question;
  document.getElementById("confirm").hidden = false;
}
function cancelAction() { pendingAction = null; document.getElementById("confirm").hidden = true; }
async function confirmAction() {
  const action = pendingAction;
  cancelAction();
  const r = await fetch(action.url, {method: "POST", credentials: "same-origin",
                                     headers: {"Content-Type": "application/json"}, body: JSON.stringify(action.body)});
  if (r.ok) { location.reload(); return; }
  let why = r.status + ""; try { why += ": " + (await r.json()).detail; } catch (e) {}
  document.getElementById("message").textContent = "refused: " + why;
}
"""


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style><script>{_SCRIPT}</script></head><body>{body}</body></html>")


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _state(state: str) -> str:
    return f"<span class='state {_e(state)}'>{_e(state)}</span>"


def _select(name: str, options: tuple[str, ...], chosen: str) -> str:
    items = "".join(f"<option{' selected' if o == chosen else ''}>{_e(o)}</option>" for o in ("", *options))
    return f"<label>{name}<select name='{name}'>{items}</select></label>"


def _table_html(base: str, caller: Caller, arts: list[Artifact], query: dict[str, str]) -> str:
    def text(name: str, kind: str = "text") -> str:
        return f"<label>{name}<input type='{kind}' name='{name}' value='{_e(query.get(name, ''))}'></label>"

    filters = (f"<form class='filters' method='get' action='{base}/'>"
               + _select("kind", KINDS, query.get("kind", "")) + text("name")
               + _select("state", STATES, query.get("state", "")) + _select("blessed", ("yes", "no"),
                                                                            query.get("blessed", ""))
               + text("created_from", "date") + text("created_to", "date")
               + "<button type='submit'>Filter</button></form>")
    rows = "".join(
        f"<tr><td><a href='{base}/artifacts/{a.id}'>{_e(a.ref)}</a></td><td>{_e(a.kind)}</td><td>{_state(a.state)}</td>"
        f"<td>{'' if a.blessed is None else ('yes' if a.blessed else 'no')}</td><td>{_e(a.git_sha[:10])}</td>"
        f"<td>{a.created_at:%Y-%m-%d %H:%M}</td><td>{_e(a.created_by)}</td><td>{_e(a.dag_run_id)}</td></tr>"
        for a in sorted(arts, key=lambda a: a.id, reverse=True))  # newest first
    return _page("avp registry", f"<h2>Artifact registry</h2><p>signed in as {_e(caller.name)} · "
                 f"<a href='{base}/docs'>API</a></p>{filters}<table id='artifacts'><tr><th>artifact</th><th>kind</th>"
                 f"<th>state</th><th>blessed</th><th>code</th><th>created (UTC)</th><th>by</th><th>Airflow run</th>"
                 f"</tr>{rows}</table><p>{len(arts)} artifacts</p>")


@dataclass
class _Graph:
    nodes: list[tuple[int, Artifact]]  # (column: negative upstream, 0 the artifact, positive downstream)
    edges: list[tuple[int, int]]  # (parent id, child id)


MAX_GRAPH_COLUMN = 24  # nodes drawn per column; the rest are counted


def _graph(registry: Registry, art: Artifact) -> _Graph:
    nodes = [(0, art)] + [(-d, a) for d, a in registry.lineage(art.id, "up")] + \
            [(d, a) for d, a in registry.lineage(art.id, "down")]
    ids = {a.id for _, a in nodes}
    edges = [(p.id, a.id) for _, a in nodes for p in registry.parents(a.id) if p.id in ids]
    return _Graph(nodes, edges)


def _graph_svg(base: str, graph: _Graph) -> str:
    width, height, gap_x, gap_y = 190, 26, 60, 12
    columns: dict[int, list[Artifact]] = {}
    for col, a in sorted(graph.nodes, key=lambda n: (n[0], n[1].kind, n[1].name, n[1].version)):
        columns.setdefault(col, []).append(a)
    first = min(columns)
    where: dict[int, tuple[int, int]] = {}
    parts, extra = [], []
    for col, arts in columns.items():
        x = (col - first) * (width + gap_x) + 4
        for row, a in enumerate(arts[:MAX_GRAPH_COLUMN]):
            y = row * (height + gap_y) + 4
            where[a.id] = (x, y)
            parts.append(f"<a href='{base}/artifacts/{a.id}' class='node' data-ref='{_e(a.ref)}'><rect x='{x}' y='{y}' "
                         f"width='{width}' height='{height}' rx='5' fill='{'#fefcbf' if col == 0 else '#ebf8ff'}' "
                         f"stroke='#2b6cb0'/><text x='{x + 6}' y='{y + 17}' font-size='12'>{_e(a.ref)[:30]}</text></a>")
        if len(arts) > MAX_GRAPH_COLUMN:
            extra.append(f"<text x='{x}' y='{MAX_GRAPH_COLUMN * (height + gap_y) + 16}' font-size='12'>"
                         f"+{len(arts) - MAX_GRAPH_COLUMN} more</text>")
    lines = [f"<line x1='{where[p][0] + width}' y1='{where[p][1] + height / 2}' x2='{where[c][0]}' "
             f"y2='{where[c][1] + height / 2}' stroke='#a0aec0'/>" for p, c in graph.edges if p in where and c in where]
    rows = min(max(len(a) for a in columns.values()), MAX_GRAPH_COLUMN) + (1 if extra else 0)
    return (f"<svg id='lineage' width='{len(columns) * (width + gap_x)}' height='{rows * (height + gap_y) + 10}'>"
            + "".join(lines + parts + extra) + "</svg>")


@dataclass
class _Action:
    label: str
    url: str  # relative to the app
    body: dict[str, Any]
    question: str


def _actions(registry: Registry, art: Artifact, namespace: str) -> list[_Action]:
    """The promote button (to ``namespace/<artifact name>``) and a rollback button for every name this artifact is
    production of, each with the question that says what production becomes."""
    actions = []
    if art.kind in ("model", "package") and art.state == "succeeded":
        current = registry.production(namespace, art.name)
        history = registry.promotions(namespace, art.name)
        minor = 1 + max([p.minor for p in history if p.major == 1], default=-1)
        now = f"{registry.get(current.artifact_id).ref} ({current.label})" if current else "nothing"
        actions.append(_Action(
            f"Promote to {namespace}/{art.name}", f"/api/promotions/{namespace}/{art.name}", {"ref": art.ref},
            f"Promote {art.ref}? Production of {namespace}/{art.name} becomes {art.ref} "
            f"({namespace}/{art.name}/1.{minor}); now it is {now}."))
    for p in registry.promotions():
        if p.artifact_id != art.id or p.status != "production":
            continue
        previous = [q for q in registry.promotions(p.namespace, p.name) if q.status == "previous"]
        if previous:
            back = previous[-1]
            actions.append(_Action(
                f"Roll back {p.namespace}/{p.name}", f"/api/promotions/{p.namespace}/{p.name}/rollback", {},
                f"Roll back {p.namespace}/{p.name}? Production becomes {registry.get(back.artifact_id).ref} "
                f"({back.label}) instead of {art.ref} ({p.label})."))
    return actions


def _artifact_html(base: str, caller: Caller, art: ArtifactDetail, graph: _Graph, actions: list[_Action]) -> str:
    fields = art.model_dump(exclude={"parents", "children", "events", "promotions", "links"})
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_field(v)}</td></tr>" for k, v in fields.items())
    links = "".join(f"<li><a href='{_e(url)}' target='_blank' id='link-{k}'>{k.replace('_', ' ')}</a></li>"
                    for k, url in art.links.model_dump().items() if url)
    events = "".join(f"<tr><td>{e.at:%Y-%m-%d %H:%M:%S}</td><td>{_e(e.from_state)} → {_e(e.to_state)}</td>"
                     f"<td>{_e(e.by)}</td><td>{_e(e.reason)}</td></tr>" for e in art.events)
    promotions = "".join(f"<tr><td>{_e(p.label)}</td><td class='promotion-status'>{_e(p.status)}</td>"
                         f"<td>{p.promoted_at:%Y-%m-%d %H:%M}</td><td>{_e(p.promoted_by)}</td></tr>"
                         for p in art.promotions)
    buttons = "".join(
        f"<button onclick='askFirst({_e(json.dumps(base + a.url))}, {_e(json.dumps(a.body))}, "
        f"{_e(json.dumps(a.question))})'>{_e(a.label)}</button>" for a in actions)
    return _page(art.ref, (
        f"<p><a href='{base}/'>← all artifacts</a></p><h2>{_e(art.ref)} {_state(art.state)}</h2>"
        f"<div id='actions'>{buttons}</div><div id='confirm' class='confirm' hidden><p id='confirm-question'></p>"
        f"<button onclick='confirmAction()'>Confirm</button><button onclick='cancelAction()'>Cancel</button></div>"
        f"<p id='message'></p>"
        f"<h3>Lineage</h3>{_graph_svg(base, graph)}"
        f"<h3>Links</h3><ul id='links'>{links or '<li>none</li>'}</ul>"
        f"<h3>Promotions</h3><table id='promotions'><tr><th>version</th><th>status</th><th>when (UTC)</th>"
        f"<th>by</th></tr>{promotions}</table>"
        f"<h3>Record</h3><table id='record'>{rows}</table>"
        f"<h3>Events</h3><table id='events'><tr><th>when (UTC)</th><th>state</th><th>by</th><th>reason</th></tr>"
        f"{events}</table><p>viewed by {_e(caller.name)}</p>"))


def _field(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return f"<pre>{_e(json.dumps(value, indent=1, sort_keys=True, default=str))}</pre>"
    return _e(value)


# -------------------------------------------------------------------------------------- ways to run it
def airflow_app() -> FastAPI:
    """The app the Airflow plugin mounts: the registry of this environment's config (AVP_HOME, ...), opened at
    the first request, behind Airflow's login."""
    cfg = config_mod.load()
    return create_app(functools.cache(lambda: Registry.open(cfg)), AirflowAuth(), namespace=cfg.serve.namespace)


def standalone_app(cfg: config_mod.PipelineConfig) -> FastAPI:
    """The app of ``avp registry serve``: ``cfg``'s registry behind the token in ``registry.token_env``."""
    rcfg = cfg.registry
    token = os.environ.get(rcfg.token_env, "")
    if not token:
        raise config_mod.ConfigError(f"avp registry serve needs a bearer token: set the environment variable "
                                     f"{rcfg.token_env} (registry.token_env); it is never read from a file")
    registry = Registry.open(cfg)
    return create_app(lambda: registry, TokenAuth(token, rcfg.airflow_url, os.environ.get(rcfg.airflow_token_env, "")),
                      namespace=cfg.serve.namespace)


def serve(cfg: config_mod.PipelineConfig) -> int:
    import uvicorn

    app = standalone_app(cfg)
    print(f"avp registry API on http://{cfg.registry.api_host}:{cfg.registry.api_port}/ "
          f"(docs: /docs; Ctrl-C to stop)", flush=True)
    uvicorn.run(app, host=cfg.registry.api_host, port=cfg.registry.api_port, log_level="warning")
    return 0


# ----------------------------------------------------------------------------------------------- client
class RemoteRegistry:
    """The registry behind an API, for ``avp registry ... --remote URL``: the methods ``pipeline.ui`` calls on a
    ``Registry``, over HTTP. The token comes from the environment variable ``registry.token_env`` (inside Airflow:
    a JWT from Airflow's ``/auth/token``)."""

    def __init__(self, url: str, token: str = "", client: httpx.Client | None = None):
        self.url = url.rstrip("/")
        headers = {"X-AVP-User": provenance.user(), **({"Authorization": f"Bearer {token}"} if token else {})}
        self._http = client or httpx.Client(base_url=self.url, headers=headers, timeout=120)

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            answer = self._http.request(method, "/api" + path, **kwargs)
        except httpx.HTTPError as exc:
            raise RegistryError(f"cannot reach the registry API at {self.url}: {exc}") from None
        if answer.status_code < 400:
            return answer.json()
        try:
            why = answer.json().get("detail")
        except ValueError:
            why = answer.text[:500]
        if answer.status_code == 404:
            raise NotFound(str(why))
        raise RegistryError(f"{self.url} answered {answer.status_code}: {why}")

    @staticmethod
    def _ref(ref: str | int) -> str:
        return quote(str(ref), safe=":@")

    def get(self, ref: str | int) -> Artifact:
        return self._detail(ref).artifact()

    def _detail(self, ref: str | int) -> ArtifactDetail:
        return ArtifactDetail.model_validate(self._call("GET", f"/artifacts/{self._ref(ref)}"))

    def list(self, kind: str | None = None, name: str | None = None, state: str | None = None) -> list[Artifact]:
        query = {k: v for k, v in {"kind": kind, "name": name, "state": state}.items() if v}
        return [ArtifactOut.model_validate(a).artifact() for a in self._call("GET", "/artifacts", params=query)]

    def parents(self, artifact_id: int) -> list[Artifact]:
        return [self.get(r) for r in self._detail(artifact_id).parents]

    def children(self, artifact_id: int) -> list[Artifact]:
        return [self.get(r) for r in self._detail(artifact_id).children]

    def events(self, artifact_id: int) -> list[dict[str, Any]]:
        return [e.model_dump() for e in self._detail(artifact_id).events]

    def lineage(self, ref: str | int, direction: str = "up") -> list[tuple[int, Artifact]]:
        found = Lineage.model_validate(self._call("GET", f"/artifacts/{self._ref(ref)}/lineage",
                                                  params={"direction": direction}))
        return [(n.depth, n.artifact.artifact()) for n in found.nodes]

    def promote(self, ref: str | int, namespace: str, name: str, major: int = 1) -> Promotion:
        return PromotionOut.model_validate(self._call(
            "POST", f"/promotions/{quote(namespace)}/{quote(name)}", json={"ref": str(ref), "major": major})).promotion()

    def rollback(self, namespace: str, name: str) -> Promotion:
        return PromotionOut.model_validate(self._call(
            "POST", f"/promotions/{quote(namespace)}/{quote(name)}/rollback")).promotion()

    def transition(self, ref: str | int, to_state: str, reason: str = "", *, production: bool = False) -> Artifact:
        paths = {"deprecated": "deprecate", "end_of_life": "end-of-life"}
        if to_state not in paths:
            raise RegistryError(f"the registry API moves artifacts only to {', '.join(paths)}, not {to_state!r}")
        return ArtifactOut.model_validate(self._call(
            "POST", f"/artifacts/{self._ref(ref)}/{paths[to_state]}",
            json={"reason": reason, "production": production})).artifact()

    def production_of(self, artifact_id: int) -> list[Promotion]:
        return [p for p in self.promotions() if p.status == "production" and p.artifact_id == artifact_id]

    def promotions(self, namespace: str | None = None, name: str | None = None) -> list[Promotion]:
        query = {k: v for k, v in {"namespace": namespace, "name": name}.items() if v}
        return [PromotionOut.model_validate(p).promotion() for p in self._call("GET", "/promotions", params=query)]


def remote_registry(url: str, cfg: config_mod.PipelineConfig) -> RemoteRegistry:
    return RemoteRegistry(url, os.environ.get(cfg.registry.token_env, ""))
