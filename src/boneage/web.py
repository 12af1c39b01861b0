"""FastAPI app: the REST API (``/api/v1``) and an offline page at ``/``, a thin wrapper on the library.

Everything clinical happens in :func:`boneage.assessment.assess_image`, so the page, the API and the CLI give
the same numbers and warnings for the same file. This module only adds what a network service needs: bounded
uploads that stay in memory, content sniffing, one-line errors, a worker pool so inference never blocks the
event loop, and a request log.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, TypeVar

import anyio
import anyio.to_thread
from anyio.lowlevel import RunVar
from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from boneage import __version__
from boneage.assessment import assess_image
from boneage.clinical import parse_age
from boneage.data.io import Radiograph, read_radiograph, sniff_format
from boneage.data.labels import parse_sex
from boneage.errors import BoneAgeInputError
from boneage.growth import HISTORY_MAX_BYTES, Calibration, check_height_cm, read_history
from boneage.predict import Predictor, load_predictor
from boneage.report import DISCLAIMER, sd_chart_png

__all__ = ["API_PREFIX", "ConnectionCounts", "background_server", "create_app", "serve"]

log = logging.getLogger("boneage.web")

API_PREFIX = "/api/v1"
#: Multipart framing and the two small text fields on top of the file itself.
_FORM_OVERHEAD_BYTES = 64 * 1024
_HEAD_BYTES = 132  # enough for sniff_format to see the DICOM "DICM" marker
#: Seconds a client gets to send a whole request body. uvicorn's timeout_keep_alive only covers idle
#: connections between requests; without this a client trickling a few bytes per second would hold a
#: connection (and the multipart parser) for as long as it likes. 20 MB in 120 s needs ~1.4 Mbit/s.
UPLOAD_TIMEOUT_S = 120.0
#: Seconds a client gets to send a request's head (request line and headers), counted from connecting or from
#: the first byte of a later request on the connection (issue #43 item 6). h11 waits for ever for a head that
#: never ends, and uvicorn's timeout_keep_alive only covers idle connections after a response. A head is a
#: few hundred bytes that a LAN or VPN delivers in milliseconds; 10 s still allows three lost-packet
#: retransmissions (1 + 2 + 4 s) and a held-open connection is gone well before anyone could pile up many.
HEADER_TIMEOUT_S = 10.0
#: Open connections at most. A connection beyond the cap closes the one that has waited longest for a request
#: head (a slow or idle client, never one whose request is being read, computed or answered), so clients
#: holding heads open cannot lock others out; only when every connection is busy with a request is the
#: newcomer answered 503. Uvicorn's own ``limit_concurrency`` is not used: it counts idle connections too
#: and answers 503 to everyone once slow clients fill it. 100 is far above what one or two CPU cores can
#: serve (a prediction takes ~0.5-1 s of a core) and far below the file-descriptor limit.
MAX_CONNECTIONS = 100
#: Radiographs decoded at once, in a pool of their own beside the inference workers (issue #43 item 7): a
#: 40 Mpx upload briefly holds its full-size 8/16-bit decode before it is shrunk to the working size
#: (``boneage.data.io.WORKING_SIDE``), so four at once would hold four. Decoding a radiograph takes well under
#: a second, so two slots keep the inference workers fed.
DECODE_SLOTS = 2
_INTERNAL_ERROR = "internal error while processing the request (details are in the server log)"
_TRAINING_DATA = "RSNA Pediatric Bone Age Challenge 2017 radiographs (non-commercial research licence)"
_PRIVATE_INFO_KEYS = {"config", "source"}  # a checkpoint path on the server is nobody's business
_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'; form-action 'self'"
)

T = TypeVar("T")


def _static_dir() -> Path:
    return Path(str(resources.files("boneage") / "static"))


def _one_line(text: str, limit: int = 300) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _safe_label(filename: str | None) -> str:
    """The upload's name for messages only: its last path part, tame characters, bounded length."""
    base = re.split(r"[/\\]", filename or "")[-1]
    base = re.sub(r"[^A-Za-z0-9._ ()+-]", "_", base).strip(" .")
    return base[:80] or "upload"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _public_facts(info: dict[str, Any]) -> dict[str, Any]:
    """Model metadata safe to show anyone: no server paths, no training config, JSON values only."""
    facts: dict[str, Any] = {}
    for key, value in info.items():
        if key in _PRIVATE_INFO_KEYS:
            continue
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            continue
        facts[key] = value
    facts.setdefault("training_data", _TRAINING_DATA)
    return facts


class _BodyRefused(HTTPException):
    """Raised from ``receive`` when the body breaks a limit; an HTTPException so FastAPI answers it, and the
    connection is closed because the rest of the body is never read."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(status_code=status, detail=detail, headers={"Connection": "close"})


class _TooLarge(_BodyRefused):
    def __init__(self, detail: str) -> None:
        super().__init__(413, detail)


class _TooSlow(_BodyRefused):
    def __init__(self, detail: str) -> None:
        super().__init__(408, detail)


class _BodyLimitMiddleware:
    """Refuse big bodies by Content-Length up front, count streamed bytes for chunked uploads, and give the
    whole body ``timeout_s`` seconds to arrive (408 after that).

    Starlette spools a multipart file before the endpoint runs, so the limits must sit below the router.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, detail: str, timeout_s: float | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.detail = detail
        self.timeout_s = timeout_s
        self.slow_detail = f"upload too slow: the request body did not arrive within {timeout_s or 0:g} s"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            try:
                length = int(declared)
            except ValueError:
                await JSONResponse({"detail": "invalid Content-Length header"}, 400)(scope, receive, send)
                return
            if length > self.max_bytes:
                await JSONResponse({"detail": self.detail}, 413, headers={"Connection": "close"})(
                    scope, receive, send
                )
                return

        seen = 0
        started = False
        body_done = False
        deadline = time.monotonic() + self.timeout_s if self.timeout_s else None

        async def counting_receive() -> Message:
            nonlocal seen, body_done
            if deadline is None or body_done:  # after the body only http.disconnect is left to wait for
                message = await receive()
            else:
                try:
                    with anyio.fail_after(max(0.0, deadline - time.monotonic())):
                        message = await receive()
                except TimeoutError:
                    log.warning("request body not received within %g s; connection closed", self.timeout_s)
                    raise _TooSlow(self.slow_detail) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if seen > self.max_bytes:
                    raise _TooLarge(self.detail)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _BodyRefused as exc:  # raised outside the router's own HTTPException handling
            if started:
                raise
            await JSONResponse({"detail": exc.detail}, exc.status_code, headers={"Connection": "close"})(
                scope, receive, send
            )


class _RequestLogMiddleware:
    """One log line per request (method, path, status, duration) and the browser-hardening headers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        path = scope.get("path", "")
        status = 500
        swagger = path.startswith(("/docs", "/redoc"))  # the docs pages run inline scripts

        async def send_with_headers(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = list(message.get("headers", []))
                headers += [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer")]
                if not swagger:
                    headers.append((b"content-security-policy", _CSP.encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            elapsed_ms = (time.perf_counter() - start) * 1000
            log.info("%s %s %d %.1f ms", scope.get("method", "?"), path, status, elapsed_ms)


class _Service:
    """The one predictor of this app, loaded once and shared by the worker threads.

    Both engines are thread-safe (the heatmap is computed inside the graph, nothing hooks the network), so
    requests run side by side in the worker pool, each worker on its own core.
    """

    def __init__(
        self,
        checkpoint: str | Path | None,
        workers: int,
        engine: str | None = None,
        calibration: Calibration | None = None,
        decodes: int = DECODE_SLOTS,
    ) -> None:
        self.checkpoint = checkpoint
        self.calibration = calibration  # issue #45: applied inside assess_image to every prediction
        self.workers = max(1, int(workers))
        self.engine = engine
        self.predictor: Predictor | None = None
        self.load_error: str | None = None
        self._load_lock = threading.Lock()
        # one limiter per event loop (a limiter must not outlive its loop, e.g. across TestClient calls)
        self._limiter: RunVar[anyio.CapacityLimiter] = RunVar(f"boneage-web-limiter-{id(self)}")
        self.decodes = max(1, int(decodes))
        self._decode_limiter: RunVar[anyio.CapacityLimiter] = RunVar(f"boneage-web-decodes-{id(self)}")

    def load(self) -> Predictor:
        """Load the model once (thread-safe); a failure is remembered for /health and retried next time."""
        with self._load_lock:
            if self.predictor is None:
                # ONNX Runtime threads per request: the cores divided among the workers that run at once
                threads = max(1, (os.cpu_count() or 1) // self.workers)
                try:
                    predictor = load_predictor(self.checkpoint, engine=self.engine, threads=threads)
                    if self.calibration is not None:  # a calibration for another model must not be used
                        self.calibration.check_model(predictor.info)
                    self.predictor = predictor
                except BoneAgeInputError as exc:
                    self.load_error = exc.problem
                    log.error("model not loaded: %s", exc)
                    raise
                except Exception as exc:  # e.g. a damaged file the loader did not anticipate
                    log.exception("model not loaded")
                    self.load_error = f"cannot load the model ({type(exc).__name__})"
                    raise BoneAgeInputError(self.load_error) from exc
                self.load_error = None
                info = self.predictor.info
                headline = info.get("headline") or {}
                log.info(
                    "model %s loaded (%s, %s px, %s engine; held-out MAE %s months)",
                    info.get("model_version"),
                    info.get("backbone"),
                    info.get("input_size"),
                    info.get("engine"),
                    headline.get("mae_months", "unknown"),
                )
            return self.predictor

    async def run(self, func: Callable[..., T], *args: Any) -> T:
        """Run blocking work in the bounded worker pool so the event loop keeps serving."""
        limiter = self._limiter.get(None)
        if limiter is None:
            limiter = anyio.CapacityLimiter(self.workers)
            self._limiter.set(limiter)
        return await anyio.to_thread.run_sync(partial(func, *args), limiter=limiter)

    async def decode(self, data: bytes, label: str) -> Radiograph:
        """Decode an upload in the decode pool (``decodes`` at once): memory, not cores, bounds decoding."""
        limiter = self._decode_limiter.get(None)
        if limiter is None:
            limiter = anyio.CapacityLimiter(self.decodes)
            self._decode_limiter.set(limiter)
        return await anyio.to_thread.run_sync(partial(read_radiograph, data, name=label), limiter=limiter)

    async def get_predictor(self) -> Predictor:
        if self.predictor is not None:
            return self.predictor
        try:
            return await self.run(self.load)
        except BoneAgeInputError as exc:
            raise HTTPException(503, f"model not available: {_one_line(exc.problem)}") from None

    def assess(
        self,
        predictor: Predictor,
        radiograph: Radiograph,
        label: str,
        sex: str | None,
        age: str | None,
        growth: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Predict, then draw the SD chart (the upload is decoded before, see ``decode``); ``growth``: the
        heights and history for ``assess_image``."""
        result = assess_image(
            predictor,
            radiograph,
            sex,
            age,
            name=label,
            heatmap=True,
            calibration=self.calibration,
            **(growth or {}),
        )
        trajectory = result.workup.trajectory if result.workup is not None else []
        body = result.to_dict(images=True)
        body["sd_chart_png_base64"] = _b64(sd_chart_png(result.assessment, trajectory=trajectory))
        body["model"] = _public_facts(predictor.info)
        body["disclaimer"] = DISCLAIMER
        return body


def _validation_detail(exc: RequestValidationError) -> str:
    """FastAPI's list of pydantic errors as one readable line, e.g. ``image: Field required``."""
    parts = []
    for error in exc.errors():
        loc = [str(p) for p in error.get("loc", ()) if p not in ("body", "query", "path", "header")]
        parts.append(f"{'.'.join(loc) or 'request'}: {error.get('msg', 'invalid')}")
    return _one_line("; ".join(parts) or "invalid request")


def create_app(
    checkpoint: str | Path | None = None,
    *,
    max_upload_mb: float = 20,
    workers: int | None = None,
    upload_timeout_s: float = UPLOAD_TIMEOUT_S,
    engine: str | None = None,
    calibration: Calibration | str | Path | None = None,
    header_timeout_s: float = HEADER_TIMEOUT_S,
    max_connections: int = MAX_CONNECTIONS,
    decodes: int = DECODE_SLOTS,
) -> FastAPI:
    """Build the app; ``checkpoint`` None serves the bundled model, loaded once at startup or first use.

    ``workers`` inference threads (default one per CPU core) share one predictor; ``engine`` is ``onnx``,
    ``torch`` or None (onnx when onnxruntime is installed). A request
    body must arrive within ``upload_timeout_s`` seconds (408 and the connection closed after).
    ``calibration`` (a ``Calibration`` or its file) corrects every bone age for a site, and the answers say
    so. ``decodes`` uploads (default 2) are decoded at once, beside the inference workers.

    ``header_timeout_s`` (default 10) and ``max_connections`` (default 100) are enforced by the connection
    layer of :func:`serve` and :func:`background_server` (see ``HEADER_TIMEOUT_S``, ``MAX_CONNECTIONS``):
    a request head must arrive within that time (408, or a silent close when nothing came), and beyond that
    many open connections the one idle longest is closed. Another ASGI server does not apply them.
    """
    if max_upload_mb <= 0:
        raise ValueError("max_upload_mb must be positive")
    if upload_timeout_s <= 0:
        raise ValueError("upload_timeout_s must be positive")
    if header_timeout_s <= 0:
        raise ValueError("header_timeout_s must be positive")
    if max_connections < 1:
        raise ValueError("max_connections must be at least 1")
    max_bytes = int(max_upload_mb * 1024 * 1024)
    too_large = f"upload larger than the {max_upload_mb:g} MB limit"
    if calibration is not None and not isinstance(calibration, Calibration):
        calibration = Calibration.load(calibration)
    service = _Service(checkpoint, workers or os.cpu_count() or 1, engine, calibration, decodes)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        # Load before serving so the first user does not wait; a missing model must not stop the page.
        with contextlib.suppress(BoneAgeInputError):
            await service.run(service.load)
        yield

    app = FastAPI(
        title="boneage",
        version=__version__,
        summary="Pediatric bone age from a left-hand radiograph. " + DISCLAIMER,
        lifespan=lifespan,
        docs_url=None,  # served below from packaged assets: FastAPI's own pages load them from a CDN
        redoc_url=None,
    )
    app.state.service = service
    app.state.connection_limits = _ConnectionLimits(float(header_timeout_s), int(max_connections))
    app.add_middleware(
        _BodyLimitMiddleware,
        max_bytes=max_bytes + _FORM_OVERHEAD_BYTES,
        detail=too_large,
        timeout_s=upload_timeout_s,
    )
    app.add_middleware(_RequestLogMiddleware)

    @app.exception_handler(BoneAgeInputError)
    async def _input_error(request: Request, exc: BoneAgeInputError) -> JSONResponse:
        return JSONResponse({"detail": _one_line(str(exc))}, status_code=422)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if request.url.path == f"{API_PREFIX}/predict" and kind != "multipart/form-data":
            detail = (
                "send the radiograph as multipart/form-data with an 'image' file field (and sex, age as "
                f"form fields); this request was {kind or 'without a content type'}"
            )
            return JSONResponse({"detail": detail}, status_code=415)
        return JSONResponse({"detail": _validation_detail(exc)}, status_code=422)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": _INTERNAL_ERROR}, status_code=500)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(_static_dir() / "index.html", media_type="text/html; charset=utf-8")

    app.mount("/static", StaticFiles(directory=_static_dir()), name="static")
    _offline_docs(app)

    @app.get(f"{API_PREFIX}/health", tags=["service"])
    async def health() -> dict[str, Any]:
        """Liveness plus whether the model is loaded (and why not), for monitors and the page."""
        return {
            "status": "ok" if service.predictor is not None else "model not loaded",
            "model_loaded": service.predictor is not None,
            "model_error": service.load_error,
            "version": __version__,
            "model_version": service.predictor.facts.model_version if service.predictor else None,
            "max_upload_mb": max_upload_mb,
            "calibration": service.calibration.describe() if service.calibration is not None else None,
        }

    @app.get(f"{API_PREFIX}/model", tags=["service"])
    async def model() -> dict[str, Any]:
        """Backbone, input size, training data, validation MAE and version of the served model."""
        predictor = await service.get_predictor()
        facts = {**_public_facts(predictor.info), "disclaimer": DISCLAIMER}
        if service.calibration is not None:
            facts["calibration"] = {"file": service.calibration.name, "cases": service.calibration.cases}
        return facts

    @app.post(
        f"{API_PREFIX}/predict",
        tags=["assessment"],
        responses={
            408: {"description": "the upload did not arrive within the time limit"},
            413: {"description": "upload over the size limit"},
            415: {"description": "not an image (content sniffed, not the file name)"},
            422: {"description": "bad input: corrupt image, missing or unknown sex, absurd age"},
            503: {"description": "no model could be loaded"},
        },
    )
    async def predict(
        image: Annotated[UploadFile, File(description="left-hand radiograph: PNG, JPEG or DICOM")],
        sex: Annotated[
            str | None, Form(description="female or male; may be omitted when a DICOM has PatientSex")
        ] = None,
        age: Annotated[
            str | None,
            Form(description="chronological age like 7.5y, 7y6m or 90m; DICOM dates are used when empty"),
        ] = None,
        height_cm: Annotated[
            str | None, Form(description="the child's height in cm: Bayley-Pinneau adult height prediction")
        ] = None,
        mother_height_cm: Annotated[
            str | None, Form(description="mother's height in cm (with the father's: Tanner target height)")
        ] = None,
        father_height_cm: Annotated[str | None, Form(description="father's height in cm")] = None,
        history: Annotated[
            UploadFile | None,
            File(
                description="earlier results of this child: predict --json output, batch CSV or history file"
            ),
        ] = None,
    ) -> JSONResponse:
        """Bone age, SD score (Greulich & Pyle), uncertainty, heatmap and SD chart for one radiograph; with
        heights or earlier results, the Bayley-Pinneau adult height, Tanner target height and follow-up."""
        label = _safe_label(image.filename)
        sex_norm = parse_sex(sex, label)  # cheap checks first, documented spellings only: `1` is refused
        age_text = age.strip() if age and age.strip() else None
        parse_age(age_text)
        growth = await _growth_form(height_cm, mother_height_cm, father_height_cm, history)
        if growth["history"] is not None and sex_norm is not None and growth["history"].sex is not sex_norm:
            raise BoneAgeInputError(
                f"the history is for a {growth['history'].sex.value} child, the form says {sex_norm.value}",
                growth["history"].source,
            )
        data = await image.read(max_bytes + 1)  # bounded even if the cap above were bypassed
        await image.close()
        if len(data) > max_bytes:
            raise HTTPException(413, too_large)
        if not data:
            raise BoneAgeInputError("empty file", label)
        radiograph: Radiograph | None = None
        if sniff_format(data[:_HEAD_BYTES]) is None:
            try:  # a DICOM data set without its preamble is still a radiograph
                radiograph = await service.decode(data, label)
            except BoneAgeInputError as exc:
                raise HTTPException(415, _one_line(str(exc))) from None
        predictor = await service.get_predictor()
        try:
            if radiograph is None:
                radiograph = await service.decode(data, label)
            del data  # the decoded radiograph is all that is needed from here on
            body = await service.run(service.assess, predictor, radiograph, label, sex_norm, age_text, growth)
        except BoneAgeInputError:
            raise
        except Exception:  # the client gets one generic line, the log gets the traceback
            log.exception("prediction failed for %s", label)
            return JSONResponse({"detail": _INTERNAL_ERROR}, status_code=500)
        return JSONResponse(body)

    return app


async def _growth_form(
    height: str | None, mother: str | None, father: str | None, history: UploadFile | None
) -> dict[str, Any]:
    """The issue #45 form fields, checked before the image is read: heights in cm, both parents or neither,
    and a history upload that is bounded and readable."""
    growth: dict[str, Any] = {
        "height_cm": check_height_cm(height, "height", "height_cm"),
        "mother_height_cm": check_height_cm(mother, "mother's height", "mother_height_cm", parent=True),
        "father_height_cm": check_height_cm(father, "father's height", "father_height_cm", parent=True),
        "history": None,
    }
    if (growth["mother_height_cm"] is None) != (growth["father_height_cm"] is None):
        raise BoneAgeInputError("the Tanner target height needs both mother_height_cm and father_height_cm")
    if history is not None and history.filename:
        name = _safe_label(history.filename)
        raw = await history.read(HISTORY_MAX_BYTES + 1)
        await history.close()
        if raw:
            growth["history"] = read_history(raw, name=name)
    return growth


def _docs_assets() -> Path | None:
    """Swagger UI and ReDoc files shipped by the ``fastapi-offline`` package (None when not installed)."""
    import importlib.util

    found = importlib.util.find_spec("fastapi_offline")
    if found is None or not found.submodule_search_locations:
        return None
    folder = Path(list(found.submodule_search_locations)[0]) / "static"
    return folder if (folder / "swagger-ui-bundle.js").is_file() else None


def _offline_docs(app: FastAPI) -> None:
    """/docs (Swagger UI) and /redoc with their JavaScript and CSS served by this app, so the API docs work
    on a hospital network without internet; without the assets package they are left out (/openapi.json
    still describes the API)."""
    from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html

    assets = _docs_assets()
    if assets is None:
        return
    app.mount("/docs-assets", StaticFiles(directory=assets), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> Any:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} API",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon.png",
        )

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> Any:
        return get_redoc_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title=f"{app.title} API",
            redoc_js_url="/docs-assets/redoc.standalone.js",
            redoc_favicon_url="/docs-assets/favicon.png",
            with_google_fonts=False,
        )


# ---- connection layer (issue #43 item 6): request-head timeout and connection cap -----------------------


@dataclass(frozen=True)
class _ConnectionLimits:
    """What ``create_app`` asked of the connection layer; read by ``serve`` and ``background_server``."""

    header_timeout_s: float = HEADER_TIMEOUT_S
    max_connections: int = MAX_CONNECTIONS


@dataclass
class ConnectionCounts:
    """Connections the guard closed, by reason (``app.state.connection_counts``): for tests and monitors."""

    head_timeouts: int = 0  # request head incomplete after the timeout: 408 and closed
    idle_timeouts: int = 0  # connected and sent nothing within the timeout: closed
    evicted: int = 0  # closed to make room for a newer connection (it was waiting for a request head)
    refused: int = 0  # over the cap with every connection busy: answered 503

    def bump(self, reason: str) -> int:
        setattr(self, reason, getattr(self, reason) + 1)
        return int(getattr(self, reason))


def _raw_reply(status: int, reason: str, detail: str) -> bytes:
    """A complete close-delimited HTTP/1.1 answer, for a connection h11 cannot answer (no request yet)."""
    body = json.dumps({"detail": detail}).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def _protocol_class(limits: _ConnectionLimits, counts: ConnectionCounts) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol with a deadline on the request head and a cap on open connections.

    h11 (the protocol uvicorn picks without httptools; set explicitly so the guard always applies) buffers an
    incomplete head for ever. This subclass starts a timer when a connection opens, or when the first byte of
    a later request arrives after a response (until then uvicorn's keep-alive timeout applies), and stops it
    when the head is complete; trickling more bytes does not move the deadline."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    timeout_s, cap = limits.header_timeout_s, limits.max_connections

    def note(reason: str, level: int, message: str, *args: Any) -> None:
        n = counts.bump(reason)  # the first, then every 100th: an attack must not flood the log
        if n == 1 or n % 100 == 0:
            log.log(level, message + " (%d so far)", *args, n)

    class GuardedH11Protocol(H11Protocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.head_timer: asyncio.TimerHandle | None = None
            self.idle_since = time.monotonic()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.idle_since = time.monotonic()
            self.head_timer = self.loop.call_later(timeout_s, self.head_timeout)
            if len(self.connections) > cap:
                self.make_room()

        def connection_lost(self, exc: Exception | None) -> None:
            self.stop_head_timer()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self.watch_head()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self.idle_since = time.monotonic()
            self.watch_head()

        def waiting_for_head(self) -> bool:
            return self.conn.their_state is h11.IDLE and not self.transport.is_closing()

        def has_partial_head(self) -> bool:
            return bool(self.conn.trailing_data[0])

        def watch_head(self) -> None:
            if not self.waiting_for_head():
                self.stop_head_timer()
            elif self.head_timer is None and self.has_partial_head():
                self.head_timer = self.loop.call_later(timeout_s, self.head_timeout)

        def stop_head_timer(self) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
                self.head_timer = None

        def head_timeout(self) -> None:
            self.head_timer = None
            if not self.waiting_for_head():
                return
            if self.has_partial_head():
                note(
                    "head_timeouts", logging.WARNING, "request head incomplete after %g s; closed", timeout_s
                )
                detail = f"request head not received within {timeout_s:g} s"
                self.transport.write(_raw_reply(408, "Request Timeout", detail))
            else:
                note("idle_timeouts", logging.INFO, "connection sent nothing within %g s; closed", timeout_s)
            self.transport.close()

        def make_room(self) -> None:
            """Over the cap: close the connection that has waited longest for a request head, or answer this
            one 503 when every other connection is busy with a request."""
            waiting = [
                c
                for c in self.connections
                if c is not self and isinstance(c, GuardedH11Protocol) and c.waiting_for_head()
            ]
            if waiting:
                oldest = min(waiting, key=lambda c: c.idle_since)
                oldest.stop_head_timer()
                note("evicted", logging.WARNING, "%d connections open: closed the longest idle one", cap)
                if oldest.has_partial_head():
                    detail = "server busy: too many open connections, retry"
                    oldest.transport.write(_raw_reply(503, "Service Unavailable", detail))
                oldest.transport.close()
            else:
                note("refused", logging.WARNING, "%d connections open and all busy: answering 503", cap)
                self.limit_concurrency = 0  # uvicorn answers this connection's request with 503

    return GuardedH11Protocol


def _uvicorn_options(app: FastAPI) -> dict[str, Any]:
    """The guarded protocol for ``app``'s connection limits (the defaults for an app not made here)."""
    limits = getattr(app.state, "connection_limits", None) or _ConnectionLimits()
    counts = getattr(app.state, "connection_counts", None)
    if counts is None:
        counts = app.state.connection_counts = ConnectionCounts()
    return {"http": _protocol_class(limits, counts), "limit_concurrency": None}


class _ThreadedServer:
    """A uvicorn server on a socket bound before the thread starts: no race for the port."""

    def __init__(self, app: FastAPI, host: str) -> None:
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.url = f"http://{host}:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(
            app, log_level="warning", access_log=False, timeout_graceful_shutdown=5, **_uvicorn_options(app)
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)


@contextlib.contextmanager
def background_server(app: FastAPI, host: str = "127.0.0.1", timeout: float = 120.0) -> Iterator[str]:
    """Serve ``app`` on a free port in a thread and yield its URL; for browser tests and benchmarks."""
    running = _ThreadedServer(app, host)
    running.thread.start()
    deadline = time.monotonic() + timeout
    while not running.server.started:
        if not running.thread.is_alive() or time.monotonic() > deadline:
            running.server.should_exit = True
            running.sock.close()
            raise RuntimeError("web server did not start")
        time.sleep(0.05)
    try:
        yield running.url
    finally:
        running.server.should_exit = True
        running.thread.join(timeout=30)
        running.sock.close()


def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    checkpoint: str | Path | None = None,
    *,
    engine: str | None = None,
    workers: int | None = None,
    calibration: Calibration | str | Path | None = None,
    max_upload_mb: float = 20,
    header_timeout_s: float = HEADER_TIMEOUT_S,
    max_connections: int = MAX_CONNECTIONS,
) -> None:
    """Run the web app with uvicorn until Ctrl+C; the model is loaded first so a bad one fails at once.

    ``max_upload_mb`` (default 20), ``header_timeout_s`` (default 10 s) and ``max_connections`` (default
    100): see :func:`create_app`."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("boneage").setLevel(logging.INFO)
    app = create_app(
        checkpoint,
        engine=engine,
        workers=workers,
        calibration=calibration,
        max_upload_mb=max_upload_mb,
        header_timeout_s=header_timeout_s,
        max_connections=max_connections,
    )
    app.state.service.load()  # BoneAgeInputError here: the CLI reports it and exits 2
    shown = f"[{host}]" if ":" in host else host
    print(f"boneage web app on http://{shown}:{port}/  (API docs: http://{shown}:{port}/docs; Ctrl+C stops)")
    uvicorn.run(app, host=host, port=port, log_level="info", access_log=False, **_uvicorn_options(app))
