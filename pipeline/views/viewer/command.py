"""`sift view`: browse, search and review a run's records in the browser.

    sift view --run demo                 # every artifact of runs/demo, its stages, eval sets, review
    sift view runs/demo/filtered.rejected.jsonl
    sift view --run demo --host 0.0.0.0 --token "$(python -c 'import secrets; print(secrets.token_urlsafe())')"

Serves on 127.0.0.1 (a free port unless --port), prints the address, and stops on Ctrl-C.
"""

from __future__ import annotations

import ipaddress
import socket
import threading
import webbrowser
from pathlib import Path

from pipeline.errors import SiftError
from pipeline.io.runs import run_dir
from pipeline.views.viewer.catalog import Catalog

MIN_TOKEN = 16  # characters: a token guards a server others can reach


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve anywhere


def check_access(host: str, token: str | None) -> None:
    """Loopback needs nothing; any other address needs a token of at least MIN_TOKEN characters."""
    if token is not None and len(token) < MIN_TOKEN:
        raise SiftError(f"use at least {MIN_TOKEN} characters (python -c 'import secrets; "
                        "print(secrets.token_urlsafe())')", field="token")
    if not is_loopback(host) and token is None:
        raise SiftError(f"serving on {host} lets other machines read the run: give --token as well",
                        field="token")


def catalog_for(file: str | None, run: str) -> Catalog:
    if file is not None:
        path = Path(file)
        if path.is_dir():
            return Catalog.for_run(path)
        if not path.is_file():
            raise SiftError("no such file", path=path)
        if path.suffix != ".jsonl":
            raise SiftError("the viewer reads JSON Lines files (.jsonl)", path=path)
        return Catalog.for_file(path)
    return Catalog.for_run(run_dir(run))


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port); port 0 takes a free one."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as e:
        sock.close()
        raise SiftError(f"cannot listen on {host}:{port}: {e.strerror or e}", field="port") from None
    sock.listen(64)
    return sock


def view(file: str | None = None, /, *, run: str = "demo", host: str = "127.0.0.1", port: int = 0,
         token: str | None = None, open: bool = False) -> int:
    """Browse, search and review a run's records in the browser (a local web page).

    Pages: the run's stages and funnels, a table per artifact (paged, full-text search, filters by any
    field, sorting by any score or length), each record with its provenance, prompts, scores, the kept
    record a duplicate lost to and what the student made of it, and the eval sets side by side.
    Review decisions (accept, reject, edit, undo) go to runs/<run>/review.jsonl; `sift export` applies
    them. An index per artifact is kept in runs/<run>/.view/ and rebuilt when the artifact changes.

    Args:
        file: one JSONL file (any artifact) or a run folder to view instead of --run
        run: run name; artifacts live in runs/<run>/
        host: address to serve on; anything but loopback needs --token
        port: port to serve on (0: a free one)
        token: a secret every page and API call must carry (?token=... once, then a cookie)
        open: open the address in the default browser
    """
    if not 0 <= port <= 65535:
        raise SiftError(f"must be in [0, 65535], got {port}", field="port")
    check_access(host, token)
    catalog = catalog_for(file, run)
    if not catalog.artifacts():
        raise SiftError("no JSON Lines artifact to show yet (run `sift seeds` first)", path=catalog.root)
    import uvicorn

    from pipeline.views.viewer.app import create_app

    sock = bind(host, port)
    bound = sock.getsockname()[1]
    app = create_app(catalog, token=token, loopback_port=bound if is_loopback(host) and token is None else None)
    shown_host = f"[{host.strip('[]')}]" if ":" in host.strip("[]") else host
    url = f"http://{shown_host}:{bound}/" + (f"?token={token}" if token else "")
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off", ws="none"))
    print(f"sift view: {catalog.root if catalog.is_run else catalog.single} at {url}  (Ctrl-C stops)", flush=True)
    if open:
        threading.Timer(0.5, webbrowser.open, args=(url,)).start()
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    print("sift view: stopped", flush=True)
    return 0
