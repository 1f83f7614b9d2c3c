"""The viewer's web application (Starlette): pages, the review API, and the guards in front of them.

Guards, in order, on every request: the token when one is set (`?token=` once, then a cookie; or
`Authorization: Bearer`), the Host header when serving on loopback (a page on another site cannot
reach the viewer through DNS rebinding), and for the review API a JSON body with the X-Sift-Viewer
header (a form on another site cannot send one without a CORS preflight, which is never granted).
Pages are Jinja2 templates with autoescaping on, served with a Content-Security-Policy that allows
only the viewer's own script and style: a record's text is always shown as text.
"""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import jinja2
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from pipeline.errors import SiftError
from pipeline.io.artifacts import file_sha256
from pipeline.io.review import REVIEW_FILE, append_decisions, decision_line, latest, read_review
from pipeline.views.viewer import evalsets, record
from pipeline.views.viewer.catalog import Catalog
from pipeline.views.viewer.fields import describe, texts
from pipeline.views.viewer.index import NONE, Query
from pipeline.views.viewer.indexes import SYNC_BYTES, Indexes, preview

HERE = Path(__file__).parent
STATIC = {"viewer.css": "text/css", "viewer.js": "text/javascript"}
CSP = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; form-action 'self'"
COOKIE = "sift_view_token"
SHOWN = ("reason", "score", "teacher", "recipe", "is_classification")  # table columns when the artifact has them
MAX_SCORE_COLUMNS = 4
SNIPPET = 160


def _num(x: Any) -> Any:
    """A cell: true/false as in JSON, floats to four significant digits."""
    if isinstance(x, bool):
        return str(x).lower()
    return f"{x:.4g}" if isinstance(x, float) else x


def _env() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(HERE / "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    env.filters["snip"] = lambda s, n=SNIPPET: (s[:n] + "…") if isinstance(s, str) and len(s) > n else s
    env.filters["num"] = _num
    return env


class Viewer:
    """The state behind the routes: what may be served, the indexes, the review ledger."""

    def __init__(self, catalog: Catalog, *, sync_bytes: int = SYNC_BYTES) -> None:
        self.catalog = catalog
        self.indexes = Indexes(catalog, sync_bytes=sync_bytes)
        self.env = _env()

    def render(self, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        context.setdefault("catalog", self.catalog)
        query = context.get("query")
        if isinstance(query, Query):
            context["selected"] = dict(query.where)
            context["ranges"] = {k: (lo, hi) for k, lo, hi in query.ranges}
        return HTMLResponse(self.env.get_template(template).render(**context), status_code=status)

    @property
    def review_path(self) -> Path:
        return self.catalog.review_dir() / REVIEW_FILE

    def review_lines(self) -> list[dict[str, Any]]:
        return read_review(self.review_path)

    def decisions(self) -> dict[str, str]:
        return {i: d["decision"] for i, d in latest(self.review_lines()).items()}


# ---------------------------------------------------------------- requests -> queries


def parse_query(params: Any) -> Query:
    """A table request from the URL: q, page, per, sort, desc, review, w.FIELD=value, lo.FIELD, hi.FIELD."""
    where, lo, hi = [], {}, {}
    for key, value in params.multi_items():
        if key.startswith("w.") and value != "":
            where.append((key[2:], value))
        elif key.startswith(("lo.", "hi.")) and value.strip():
            try:
                (lo if key[:2] == "lo" else hi)[key[3:]] = float(value)
            except ValueError:
                raise SiftError(f"expected a number, got {value!r}", field=key) from None
    ranges = tuple((k, lo.get(k), hi.get(k)) for k in dict.fromkeys([*lo, *hi]))

    def _int(name: str, default: int) -> int:
        try:
            return int(params.get(name) or default)
        except ValueError:
            raise SiftError(f"expected a whole number, got {params.get(name)!r}", field=name) from None

    return Query(q=params.get("q", ""), where=tuple(where), ranges=ranges, sort=params.get("sort") or None,
                 desc=params.get("desc") == "1", page=_int("page", 1), per=_int("per", 50),
                 review=params.get("review") or None)


def _url(path: str, params: dict[str, Any]) -> str:
    return path + ("?" + urlencode([(k, v) for k, v in params.items() if v not in (None, "")]) if params else "")


# ---------------------------------------------------------------- pages


def overview(request: Request) -> Response:
    v: Viewer = request.app.state.viewer
    if not v.catalog.is_run:
        return RedirectResponse(_url("/t", {"a": v.catalog.artifacts()[0]}), status_code=303)
    sizes = {a: (v.catalog.root / a).stat().st_size for a in v.catalog.artifacts()}
    return v.render("run.html", stages=v.catalog.stages(), artifacts=v.catalog.artifacts(), sizes=sizes,
                    has_eval=bool(v.catalog.eval_sets()), reviewed=len(v.decisions()))


def _display_columns(columns: dict[str, Any]) -> list[str]:
    shown = [c for c in SHOWN if c in columns]
    scores = [c for c in columns if c.startswith("scores.") and columns[c].kind == "num"][:MAX_SCORE_COLUMNS]
    return shown + scores + [c for c in ("len.output",) if c in columns]


def table(request: Request) -> Response:
    v: Viewer = request.app.state.viewer
    name = request.query_params.get("a", "")
    path = v.catalog.resolve(name)
    query = parse_query(request.query_params)
    decisions = v.decisions()
    idx = v.indexes.open(name)
    params = dict(request.query_params)
    if idx is None:  # building: the first records straight from the file
        rows = [{"rowid": None, "record": r, "texts": texts(r), "cells": describe(r)[0]}
                for r in preview(path, query.per)]
        return v.render("table.html", name=name, building=True, rows=rows, total=None, columns={},
                        shown=[c for c in SHOWN if any(c in r["cells"] for r in rows)], query=query, params=params,
                        decisions=decisions, values={}, pages=1, url=_url, absent=NONE)
    with idx:
        total, found = idx.query(query, review=decisions)
        rows = [{"rowid": row.rowid, "record": r, "texts": texts(r), "cells": describe(r)[0]}
                for row, r in zip(found, idx.read_many(found), strict=True)]
        return v.render("table.html", name=name, building=False, rows=rows, total=total, columns=idx.columns,
                        shown=_display_columns(idx.columns), query=query, params=params, decisions=decisions,
                        values=idx.values, pages=max(1, -(-total // max(1, query.per))), url=_url, absent=NONE,
                        sha256=idx.sha256)


def record_page(request: Request) -> Response:
    v: Viewer = request.app.state.viewer
    name = request.query_params.get("a", "")
    v.catalog.resolve(name)
    try:
        rowid = int(request.query_params.get("n", ""))
    except ValueError:
        return v.render("error.html", 400, message="n must be a record number")
    idx = v.indexes.open(name)
    if idx is None:
        return v.render("error.html", 503, message=f"{name} is still being indexed; reload in a moment")
    with idx:
        row = idx.row(rowid)
        if row is None:
            return v.render("error.html", 404, message=f"no record {rowid} in {name}")
        raw = idx.read(row)
        sha = idx.sha256
        count = idx.count
    rid = raw.get("id") if isinstance(raw.get("id"), str) else None
    history = [x for x in v.review_lines() if x["id"] == rid] if rid else []
    ctx = record.page(v.catalog, v.indexes, name, raw, history)
    return v.render("record.html", name=name, rowid=rowid, count=count, sha256=sha, r=ctx, url=_url)


def by_id(request: Request) -> Response:
    """The first artifact (in stage order) holding a record with this id."""
    v: Viewer = request.app.state.viewer
    rid = request.path_params["rid"]
    for name in v.catalog.artifacts():
        hit = v.indexes.find(name, rid)
        if hit:
            return RedirectResponse(_url("/r", {"a": name, "n": hit["rowid"]}), status_code=303)
    return v.render("error.html", 404, message=f"no record with id {rid} in this run")


def go(request: Request) -> Response:
    """The navigation bar's id box."""
    from urllib.parse import quote

    return RedirectResponse("/id/" + quote(request.query_params.get("id", "").strip(), safe=""), status_code=303)


def eval_page(request: Request) -> Response:
    v: Viewer = request.app.state.viewer
    worse = request.query_params.get("worse") == "1"
    return v.render("eval.html", sets=evalsets.sets(v.catalog.eval_sets(), only_worse=worse), worse=worse)


def static(request: Request) -> Response:
    name = request.path_params["name"]
    if name not in STATIC:
        return PlainTextResponse("not found", status_code=404)
    return FileResponse(HERE / "static" / name, media_type=STATIC[name])


def status(request: Request) -> Response:
    v: Viewer = request.app.state.viewer
    s = v.indexes.status(request.query_params.get("a", ""))
    return JSONResponse({"state": s.state, "error": s.error})


# ---------------------------------------------------------------- the review API


async def review_api(request: Request) -> Response:
    """POST {a, decision, note?, output?, id? | ids? | query?}: one line per record into review.jsonl.
    `query` (a table's query string) applies the decision to every record that matches it."""
    v: Viewer = request.app.state.viewer
    if request.headers.get("x-sift-viewer") != "1" or "application/json" not in request.headers.get("content-type", ""):
        return JSONResponse({"error": "send JSON with the X-Sift-Viewer header"}, status_code=403)
    try:
        body = await request.json()
    except ValueError:
        return JSONResponse({"error": "the body is not JSON"}, status_code=400)
    if not isinstance(body, dict):
        return JSONResponse({"error": "expected a JSON object"}, status_code=400)
    name = str(body.get("a", ""))
    path = v.catalog.resolve(name)
    if "query" in body:
        from starlette.datastructures import QueryParams

        idx = v.indexes.open(name)
        if idx is None:
            return JSONResponse({"error": f"{name} is still being indexed"}, status_code=503)
        with idx:
            ids = idx.ids(parse_query(QueryParams(str(body["query"]))), review=v.decisions())
    else:
        ids = body.get("ids") if isinstance(body.get("ids"), list) else [body.get("id")]
    sha = file_sha256(path)
    output = body.get("output") if body.get("decision") == "edit" else None
    lines = [decision_line(i, str(body.get("decision")), note=body.get("note") or "", output=output,
                           artifact=name, sha256=sha) for i in ids]
    if lines:
        append_decisions(v.catalog.review_dir(), lines)
    return JSONResponse({"written": len(lines), "ledger": str(v.review_path)})


# ---------------------------------------------------------------- guards


def _loopback_hosts(port: int) -> set[str]:
    names = ("127.0.0.1", "localhost", "[::1]")
    return {*names, *(f"{n}:{port}" for n in names)}


class Guard:
    """ASGI middleware: the token, the Host check on loopback, errors as pages, the security headers."""

    def __init__(self, app: Any, *, token: str | None, hosts: set[str] | None) -> None:
        self.app, self.token, self.hosts = app, token, hosts

    def _refuse(self, status: int, text: str) -> Response:
        return PlainTextResponse(text, status_code=status, headers={"Content-Security-Policy": CSP})

    def _token_ok(self, request: Request) -> tuple[bool, bool]:
        """(allowed, came in the URL): the URL's token is then kept in a cookie."""
        if self.token is None:
            return True, False
        given = request.query_params.get("token")
        auth = request.headers.get("authorization", "")
        for candidate, from_url in ((given, True), (request.cookies.get(COOKIE), False),
                                    (auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None, False)):
            if candidate and hmac.compare_digest(candidate.encode(), self.token.encode()):
                return True, from_url
        return False, False

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        if self.hosts is not None and request.headers.get("host", "") not in self.hosts:
            await self._refuse(403, "refused: unexpected Host header")(scope, receive, send)
            return
        ok, from_url = self._token_ok(request)
        if not ok:
            await self._refuse(401, "refused: this viewer needs its token (open the address printed by "
                                    "`sift view`, with ?token=...)")(scope, receive, send)
            return

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(b"content-security-policy", CSP.encode()), (b"x-content-type-options", b"nosniff"),
                            (b"referrer-policy", b"no-referrer"), (b"x-frame-options", b"DENY")]
                if from_url:
                    headers.append((b"set-cookie", f"{COOKIE}={self.token}; HttpOnly; SameSite=Strict; Path=/"
                                    .encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def _refused(request: Request, exc: Exception) -> Response:
    return PlainTextResponse(f"refused: {exc}", status_code=403)


async def _bad_request(request: Request, exc: Exception) -> Response:
    return PlainTextResponse(f"error: {exc}", status_code=400)


def create_app(catalog: Catalog, *, token: str | None = None, loopback_port: int | None = None,
               sync_bytes: int = SYNC_BYTES) -> Any:
    """The ASGI app: Starlette's routes behind the Guard. `loopback_port` turns on the Host check."""
    app = Starlette(routes=[
        Route("/", overview),
        Route("/t", table),
        Route("/r", record_page),
        Route("/id/{rid:path}", by_id),
        Route("/go", go),
        Route("/eval", eval_page),
        Route("/static/{name}", static),
        Route("/api/status", status),
        Route("/api/review", review_api, methods=["POST"]),
    ], exception_handlers={PermissionError: _refused, SiftError: _bad_request})
    app.state.viewer = Viewer(catalog, sync_bytes=sync_bytes)
    guarded = Guard(app, token=token, hosts=_loopback_hosts(loopback_port) if loopback_port is not None else None)
    guarded.state = app.state  # type: ignore[attr-defined]
    return guarded
