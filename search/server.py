"""`./run.sh serve INDEX_OR_OUTPUT`: the search page and JSON API over one index (docs/serve.md).

Starlette routes over `search.service.Service` (which holds the index, the lazily loaded model and
the thumbnails), served by uvicorn in one process:

    GET  /                         the search page (Jinja2 template, autoescape; JS in /static)
    GET  /api/search?tag=T&k=N     images carrying tag T (a wnid or a lemma, as `search --tag`)
    GET  /api/search?key=K&k=N     the nearest neighbours of an indexed image
    POST /api/search?k=N           the nearest images to a photo (multipart field `image`)
         ... &filter=WNID          (repeatable) only images whose categories include it
    GET  /api/suggest?q=TEXT       tag terms as one types
    GET  /api/thumbnail/<id>       a JPEG of at most 256 px of an indexed image, by id only
    GET  /api/info                 what the index holds

Safe by default: it listens on 127.0.0.1 (another --host gets a loud warning), answers only
requests whose Host header names the address it listens on (no DNS rebinding), reads images only
by an id of the index (never a path), refuses uploads over `MAX_UPLOAD_BYTES` with 413 before
reading them, decodes them with the job's decoder and pixel limit, escapes every string (Jinja2
autoescape; the page's script writes text, never HTML), and sends a Content-Security-Policy with
no inline script, `X-Content-Type-Options: nosniff` and `Referrer-Policy: no-referrer`.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import signal
import socket
import sys
from pathlib import Path

import jinja2
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import MutableHeaders, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from search import SearchError
from search.service import MAX_K, BadRequest, NotFound, Service

_LOG = logging.getLogger(__name__)

HERE = Path(__file__).parent
STATIC = HERE / "static"
TEMPLATES = HERE / "templates"
MAX_UPLOAD_BYTES = 20 << 20  # the photo; the multipart body may add `_MULTIPART_SLACK`
_MULTIPART_SLACK = 64 << 10
PAGE_K = 36  # results the page asks for (a grid of 6 x 6)
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' blob:",
        "connect-src 'self'",
        "form-action 'self'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
}


class SecurityHeaders:
    """ASGI middleware: `SECURITY_HEADERS` on every response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)


class _TooLarge(Exception):
    pass


def _error(status: int, message: str, **extra) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def _size(n: int) -> str:
    return f"{n / (1 << 20):.3g} MB" if n >= 1 << 20 else f"{n / 1024:.3g} KB"


def _int_param(request: Request, name: str, default: int) -> int:
    value = request.query_params.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise BadRequest(f"{name} must be an integer from 1 to {MAX_K}, not {value!r}") from None


def _bad_request_is_400(endpoint):
    """An endpoint whose `BadRequest` (a parameter it checks itself) answers 400 with JSON."""

    async def checked(request: Request) -> Response:
        try:
            return await endpoint(request)
        except BadRequest as e:
            return _error(400, str(e))

    return checked


async def _answer(call, *args) -> JSONResponse:
    """The service's answer as JSON, its errors as JSON with their status."""
    try:
        return JSONResponse(await run_in_threadpool(call, *args))
    except NotFound as e:
        return _error(404, str(e), suggestions=e.suggestions)
    except BadRequest as e:
        return _error(400, str(e))
    except SearchError as e:  # a damaged index, a model that cannot load: the server's problem
        _LOG.error("%s", e)
        return _error(500, str(e))


def asset_version() -> str:
    """A hash of the static files, in their URLs: a new version is fetched, never a stale one."""
    digest = hashlib.sha256()
    for path in sorted(STATIC.iterdir()):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()[:10]


def create_app(service: Service, *, allowed_hosts=None, max_upload_bytes=MAX_UPLOAD_BYTES):
    """The ASGI app over `service`; `allowed_hosts`: the Host headers it answers (None: any)."""
    templates = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=jinja2.select_autoescape(["html"], default=True),
        undefined=jinja2.StrictUndefined,
    )
    page = templates.get_template("index.html")
    assets = asset_version()

    async def home(request: Request) -> Response:
        params = request.query_params
        html = page.render(
            info=service.info(),
            tag=params.get("tag", ""),
            key=params.get("key", ""),
            page_k=PAGE_K,
            assets=assets,
        )
        return HTMLResponse(html, headers={"cache-control": "no-cache"})

    @_bad_request_is_400
    async def search(request: Request) -> Response:
        params = request.query_params
        k = _int_param(request, "k", 10)
        within = params.getlist("filter")
        tag, key = params.get("tag"), params.get("key")
        if (tag is None) == (key is None):
            return _error(400, "give one of tag or key (POST a photo in the field image)")
        if tag is not None:
            return await _answer(service.by_tag, tag, k, within)
        return await _answer(service.by_key, key, k, within)

    @_bad_request_is_400
    async def search_photo(request: Request) -> Response:
        params = request.query_params
        k = _int_param(request, "k", 10)
        limit = max_upload_bytes + _MULTIPART_SLACK
        length = request.headers.get("content-length", "")
        too_large = _error(413, f"the photo is over the {_size(max_upload_bytes)} limit")
        too_large.headers["connection"] = "close"  # the rest of the body is never read
        if length.isdigit() and int(length) > limit:
            return too_large  # refused before any of it is read
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            return _error(400, "send the photo as multipart/form-data, in the field image")

        async def capped():
            read = 0
            async for chunk in request.stream():
                read += len(chunk)
                if read > limit:
                    raise _TooLarge()
                yield chunk

        try:
            form = await MultiPartParser(
                request.headers, capped(), max_files=1, max_fields=8
            ).parse()
        except _TooLarge:
            return too_large
        except MultiPartException as e:
            return _error(400, f"the upload is not a valid form: {e.message}")
        try:
            upload = form.get("image")
            if not isinstance(upload, UploadFile):
                return _error(400, "no photo in the field image")
            data = await upload.read()
        finally:
            await form.close()
        if len(data) > max_upload_bytes:
            return too_large
        return await _answer(
            service.by_image, data, k, params.get("tag") or None, params.getlist("filter")
        )

    async def suggest(request: Request) -> Response:
        text = request.query_params.get("q", "")[:200]
        found = await run_in_threadpool(service.suggest, text)
        return JSONResponse({"suggestions": found})

    async def info(request: Request) -> Response:
        return JSONResponse(service.info())

    async def thumbnail(request: Request) -> Response:
        row_id = request.path_params["id"]
        version = request.query_params.get("v")
        try:
            jpeg = await run_in_threadpool(service.thumbnail, row_id, version)
        except NotFound as e:
            return _error(404, str(e))
        cache = "private, max-age=86400, immutable" if version else "no-cache"
        return Response(jpeg, media_type="image/jpeg", headers={"cache-control": cache})

    routes = [
        Route("/", home),
        Route("/api/search", search, methods=["GET"]),
        Route("/api/search", search_photo, methods=["POST"]),
        Route("/api/suggest", suggest),
        Route("/api/info", info),
        Route("/api/thumbnail/{id:int}", thumbnail),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    middleware = [Middleware(SecurityHeaders)]
    if allowed_hosts is not None:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts)))

    async def not_found(request: Request, exc) -> Response:
        return _error(404, "not found")

    async def server_error(request: Request, exc) -> Response:
        _LOG.error("error answering %s", request.url.path, exc_info=exc)
        return _error(500, "internal error (see the server's log)")

    return Starlette(
        routes=routes,
        middleware=middleware,
        exception_handlers={404: not_found, 405: not_found, 500: server_error},
    )


# ----------------------------------------------------------------------------------- running


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(host: str) -> list[str] | None:
    """The Host headers to answer: the loopback names when listening on loopback (a web page
    elsewhere cannot reach the API by pointing its own name at 127.0.0.1), else any."""
    if not is_loopback(host):
        return None
    return ["127.0.0.1", "localhost", "[::1]", host]


def listen(host: str, port: int) -> socket.socket:
    """A listening socket; SearchError (exit 2, one line) when the address cannot be used."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM, info[2])  # TCP: asyncio sets NODELAY
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(128)
    except OSError as e:
        raise SearchError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.setblocking(False)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def serve(
    index_or_output: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    embed_model: str | None = None,
    tags_model: str | None = None,
    model_cache_dir: str | None = None,
) -> int:
    """Opens the index, listens, prints the URL and serves until Ctrl-C (then returns 0)."""
    import uvicorn

    service = Service(
        index_or_output,
        embed_model=embed_model,
        tags_model=tags_model,
        model_cache_dir=model_cache_dir,
    )
    sock = listen(host, port)
    if not is_loopback(host):
        print(
            f"WARNING: listening on {host}, not only on this machine: anyone who can reach it can "
            "search the index and see its images (no login). Use --host 127.0.0.1 unless you "
            "mean that.",
            file=sys.stderr,
        )
    app = create_app(service, allowed_hosts=allowed_hosts(host))
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    # From the URL's line on, Ctrl-C (or SIGTERM) asks the server to stop instead of raising
    # KeyboardInterrupt wherever the main thread is: one that came before uvicorn installs its own
    # handlers (it saves and restores these) still ends in a clean start-up then shut-down, and
    # the one uvicorn raises again after shutting down is absorbed here.
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda *_: setattr(server, "should_exit", True))
    try:
        print(
            f"serving {service.rows:,} images of {service.index.dir} at {url_of(sock)} "
            "(Ctrl-C stops)",
            flush=True,
        )
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("stopped", file=sys.stderr)
    return 0
