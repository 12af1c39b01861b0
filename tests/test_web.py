"""The web app through FastAPI's TestClient, with the tiny model so it runs in seconds on a CPU."""

from __future__ import annotations

import asyncio
import base64
import csv
import io
import json
import logging
import math
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import write_dicom
from fastapi.testclient import TestClient
from PIL import Image

import boneage.web as web
from boneage.web import create_app

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TRACEBACK_MARKERS = ("Traceback", 'File "', "site-packages")


@pytest.fixture(scope="module")
def client(tiny_bundle: Path) -> Iterator[TestClient]:
    with TestClient(create_app(tiny_bundle, workers=2)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def radiographs(shared_sample: Path) -> list[tuple[Path, str]]:
    """Three real radiographs with their sex, a girl and two boys if the sample has them."""
    with open(shared_sample / "labels.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    girls = [r for r in rows if r["male"].strip().lower() in ("false", "0")]
    boys = [r for r in rows if r["male"].strip().lower() in ("true", "1")]
    picked = (girls[:1] + boys[:2]) if girls and len(boys) >= 2 else rows[:3]
    return [
        (
            shared_sample / "images" / f"{r['id']}.png",
            "male" if r["male"].strip().lower() in ("true", "1") else "female",
        )
        for r in picked
    ]


def _png(size: tuple[int, int] = (96, 128)) -> bytes:
    ramp = np.linspace(0, 255, size[0] * size[1], dtype=np.float64).reshape(size[1], size[0])
    buf = io.BytesIO()
    Image.fromarray(ramp.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _post(client: TestClient, data: bytes, name: str = "hand.png", **form: str):
    files = {"image": (name, data, "application/octet-stream")}
    return client.post("/api/v1/predict", files=files, data=form)


def _assert_one_line_error(response, status: int) -> str:
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail and "\n" not in detail
    assert not any(marker in response.text for marker in TRACEBACK_MARKERS), response.text
    return detail


def _is_png(b64: str) -> bool:
    raw = base64.b64decode(b64, validate=True)
    with Image.open(io.BytesIO(raw)) as im:
        im.verify()
    return raw.startswith(PNG_MAGIC)


# ---- service endpoints ---------------------------------------------------------------------------------
def test_health_and_model(client: TestClient) -> None:
    health = client.get("/api/v1/health").json()
    assert health["model_loaded"] is True and health["model_error"] is None
    assert health["max_upload_mb"] == 20
    model = client.get("/api/v1/model").json()
    assert model["backbone"] == "test_efficientnet" and model["input_size"] == 64
    assert model["headline"]["mae_months"] == 99.0 and model["model_version"] == "test"
    assert "RSNA" in model["training_data"] and "not a medical device" in model["disclaimer"]
    assert "config" not in model and "source" not in model


def test_model_loads_lazily_without_lifespan(tiny_bundle: Path) -> None:
    lazy = TestClient(create_app(tiny_bundle))  # no `with`: startup never ran
    assert lazy.get("/api/v1/health").json()["model_loaded"] is False
    assert lazy.get("/api/v1/model").status_code == 200
    assert lazy.get("/api/v1/health").json()["model_loaded"] is True


def test_missing_model_is_503_and_reported(tmp_path: Path) -> None:
    with TestClient(create_app(tmp_path / "absent.safetensors")) as missing:
        health = missing.get("/api/v1/health").json()
        assert health["model_loaded"] is False and "not found" in health["model_error"]
        assert str(tmp_path) not in missing.get("/api/v1/health").text  # no server paths leak
        detail = _assert_one_line_error(_post(missing, _png(), sex="female"), 503)
        assert "model not available" in detail
        assert missing.get("/").status_code == 200  # the page still loads and can show the reason


def test_openapi_and_docs(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/v1/predict", "/api/v1/health", "/api/v1/model"} <= set(paths)
    assert client.get("/docs").status_code == 200


# ---- the page ------------------------------------------------------------------------------------------
def test_page_is_offline_and_has_the_form(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    for needle in (
        'id="predict-form"',
        'name="image"',
        'type="file"',
        'name="sex"',
        'name="age"',
        'id="bone-age"',
        'id="heatmap"',
        'id="sd-chart"',
        'id="error"',
        "Research use only",
        "not a medical device",
        "non-commercial research licence",
    ):
        assert needle in html
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assets = {"/static/app.js": "javascript", "/static/style.css": "text/css"}
    for url, kind in assets.items():
        asset = client.get(url)
        assert asset.status_code == 200 and kind in asset.headers["content-type"]
        assert not re.search(r"https?://", asset.text), url
    assert not re.search(r"https?://", html)
    assert client.get("/static/../web.py").status_code == 404


# ---- predictions ---------------------------------------------------------------------------------------
def test_predict_real_radiographs(client: TestClient, radiographs: list[tuple[Path, str]]) -> None:
    for path, sex in radiographs:
        response = _post(client, path.read_bytes(), name=path.name, sex=sex, age="90m")
        assert response.status_code == 200, response.text
        r = response.json()
        assert r["sex"] == sex and r["file"] == path.name
        numbers = [
            "bone_age_months",
            "bone_age_years",
            "uncertainty_months",
            "chronological_age_months",
            "difference_months",
            "sd_months",
            "sd_score",
        ]
        for key in numbers:
            assert isinstance(r[key], (int, float)) and math.isfinite(r[key]), key
        assert r["chronological_age_months"] == pytest.approx(90.0)
        assert r["difference_months"] == pytest.approx(r["bone_age_months"] - 90.0, abs=0.01)
        assert r["flag"] in {"normal", "advanced", "delayed"}
        assert re.fullmatch(r"\d+ y \d+ m", r["bone_age_text"]) and r["chronological_age_text"] == "7 y 6 m"
        assert len(r["tta_views_months"]) == 6 and isinstance(r["warnings"], list)
        for key in ("heatmap_png_base64", "input_png_base64", "sd_chart_png_base64"):
            assert _is_png(r[key]), key
        assert r["model"]["backbone"] == "test_efficientnet" and "Greulich" in r["reference"]


def test_dicom_header_supplies_sex_and_age(
    client: TestClient, radiographs: list[tuple[Path, str]], tmp_path: Path
) -> None:
    pixels = np.asarray(Image.open(radiographs[0][0]).convert("L"))
    path = write_dicom(
        tmp_path / "hand.dcm", pixels, PatientSex="F", PatientBirthDate="20100115", StudyDate="20170715"
    )
    dicom = path.read_bytes()
    response = _post(client, dicom, name="hand.dcm")  # no sex, no age in the form
    assert response.status_code == 200, response.text
    r = response.json()
    assert r["sex"] == "female"
    assert r["chronological_age_months"] == pytest.approx(90.0, abs=0.5)
    assert math.isfinite(r["sd_score"]) and _is_png(r["heatmap_png_base64"])


def test_upload_name_is_only_a_label(client: TestClient, radiographs: list[tuple[Path, str]]) -> None:
    response = _post(client, b"not an image at all", name="../../etc/<b>passwd</b>.png", sex="male")
    detail = _assert_one_line_error(response, 415)
    assert "/" not in detail.split(":")[0] and "<" not in detail


# ---- bad input: one line, 4xx, never a traceback -------------------------------------------------------
def _truncated_png() -> bytes:
    data = _png((256, 256))
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    ("content", "name", "form", "status", "needle"),
    [
        (b"hello, I am a text file\n" * 20, "notes.png", {"sex": "female"}, 415, "not an image"),
        (_truncated_png(), "cut.png", {"sex": "female"}, 422, "not a readable image"),
        (PNG_MAGIC + b"\x00" * 200, "header-only.png", {"sex": "female"}, 422, "not a readable image"),
        (b"", "empty.png", {"sex": "female"}, 422, "empty file"),
        (_png(), "hand.png", {}, 422, "sex is required"),
        (_png(), "hand.png", {"sex": "unknown"}, 422, "sex must be female or male"),
        (_png(), "hand.png", {"sex": "male", "age": "500y"}, 422, "out of range"),
        (_png(), "hand.png", {"sex": "male", "age": "-3m"}, 422, "age"),
        (_png(), "hand.png", {"sex": "male", "age": "seven"}, 422, "cannot read age"),
        (_png(), "hand.png", {"sex": "male", "age": "7"}, 422, "unit"),
        (_png((8, 8)), "tiny.png", {"sex": "male"}, 422, "too small"),
    ],
    ids=[
        "text-as-png",
        "truncated-png",
        "corrupt-png",
        "empty",
        "missing-sex",
        "bad-sex",
        "absurd-age",
        "negative-age",
        "unreadable-age",
        "unitless-age",
        "too-small",
    ],
)
def test_bad_input_is_a_one_line_4xx(
    client: TestClient, content: bytes, name: str, form: dict[str, str], status: int, needle: str
) -> None:
    detail = _assert_one_line_error(_post(client, content, name=name, **form), status)
    assert needle in detail


def test_missing_image_field(client: TestClient) -> None:
    multipart_without_image = client.post("/api/v1/predict", files={"sex": (None, "male")})
    detail = _assert_one_line_error(multipart_without_image, 422)
    assert "image" in detail


def test_oversize_upload_is_413(tiny_bundle: Path, radiographs: list[tuple[Path, str]]) -> None:
    small = TestClient(create_app(tiny_bundle, max_upload_mb=0.05))  # 52 kB
    real = radiographs[0][0].read_bytes()
    assert len(real) > 0.05 * 1024 * 1024 + 64 * 1024  # refused on Content-Length alone
    assert "0.05 MB" in _assert_one_line_error(_post(small, real, sex="male"), 413)
    # just over the file limit but within the multipart allowance: caught by the bounded read
    _assert_one_line_error(_post(small, PNG_MAGIC + b"\x00" * 60_000, sex="male"), 413)

    def chunks() -> Iterator[bytes]:  # no Content-Length: bytes are counted as they arrive
        yield (
            b'--BOUNDARY\r\nContent-Disposition: form-data; name="image"; filename="big.png"\r\n'
            b"Content-Type: image/png\r\n\r\n" + PNG_MAGIC
        )
        for _ in range(20):
            yield b"\x00" * 16384
        yield b"\r\n--BOUNDARY--\r\n"

    response = small.post(
        "/api/v1/predict",
        content=chunks(),
        headers={"content-type": "multipart/form-data; boundary=BOUNDARY"},
    )
    _assert_one_line_error(response, 413)


def test_unexpected_error_is_generic_500(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("secret internal detail /srv/model")

    monkeypatch.setattr(web, "assess_image", broken)
    with caplog.at_level(logging.ERROR, logger="boneage.web"):
        response = _post(client, _png(), sex="female")
    detail = _assert_one_line_error(response, 500)
    assert "secret" not in response.text and "RuntimeError" not in response.text and "server log" in detail
    assert any(record.exc_info and "secret" in str(record.exc_info[1]) for record in caplog.records)


def test_request_log_line(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="boneage.web"):
        client.get("/api/v1/health")
        _post(client, b"", sex="female")
    lines = [record.getMessage() for record in caplog.records if record.name == "boneage.web"]
    assert any(re.fullmatch(r"GET /api/v1/health 200 \d+\.\d ms", line) for line in lines), lines
    assert any(re.fullmatch(r"POST /api/v1/predict 422 \d+\.\d ms", line) for line in lines), lines


# ---- concurrency ---------------------------------------------------------------------------------------
def test_concurrent_predictions_all_succeed(client: TestClient, radiographs: list[tuple[Path, str]]) -> None:
    results: list[int] = []
    errors: list[BaseException] = []

    def one(i: int) -> None:
        path, sex = radiographs[i % len(radiographs)]
        try:
            response = _post(client, path.read_bytes(), name=path.name, sex=sex, age="10y")
            assert response.status_code == 200, response.text
            assert math.isfinite(response.json()["bone_age_months"])
            results.append(response.status_code)
        except BaseException as exc:  # collected so the main thread can report it
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    assert results == [200] * 8


def test_event_loop_stays_responsive_during_inference(
    client: TestClient, monkeypatch: pytest.MonkeyPatch, radiographs: list[tuple[Path, str]]
) -> None:
    """Predictions that block their worker thread must not delay /health on the event loop."""
    real_assess = web.assess_image
    entered = threading.Semaphore(0)
    release = threading.Event()

    def slow_assess(*args: object, **kwargs: object):
        entered.release()
        release.wait(timeout=60)
        return real_assess(*args, **kwargs)

    monkeypatch.setattr(web, "assess_image", slow_assess)
    path, sex = radiographs[0]
    statuses: list[int] = []
    workers = [
        threading.Thread(
            target=lambda: statuses.append(
                _post(client, path.read_bytes(), name=path.name, sex=sex).status_code
            )
        )
        for _ in range(2)
    ]
    try:
        for worker in workers:
            worker.start()
        assert entered.acquire(timeout=60), "no prediction started"
        start = time.perf_counter()
        health = client.get("/api/v1/health")
        elapsed = time.perf_counter() - start
        assert health.status_code == 200 and elapsed < 5.0, elapsed
        assert not release.is_set()  # the prediction really was still running
    finally:
        release.set()
        for worker in workers:
            worker.join(timeout=120)
    assert statuses == [200, 200]


def test_body_limit_counts_streamed_bytes_and_stops_reading() -> None:
    """Without Content-Length the cap must cut the stream short, not read it all and then refuse."""
    import anyio

    received: list[int] = []
    sent: list[dict] = []

    async def reads_everything(scope, receive, send) -> None:
        while True:
            message = await receive()
            if not message.get("more_body"):
                break
        raise AssertionError("the whole body was read")

    async def receive() -> dict:
        received.append(1)
        return {"type": "http.request", "body": b"x" * 1000, "more_body": len(received) < 10}

    async def send(message: dict) -> None:
        sent.append(message)

    app = web._BodyLimitMiddleware(reads_everything, max_bytes=2500, detail="too big")
    scope = {"type": "http", "method": "POST", "path": "/api/v1/predict", "headers": []}
    anyio.run(app, scope, receive, send)
    assert sent[0]["status"] == 413 and b"too big" in sent[1]["body"]
    assert len(received) == 3


def test_serve_loads_first_then_runs_uvicorn(
    tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import uvicorn

    from boneage.errors import BoneAgeInputError

    calls: list[dict] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append({"app": app, **kwargs}))
    with pytest.raises(BoneAgeInputError, match="model file not found"):
        web.serve(checkpoint=tmp_path / "absent.safetensors")  # fails before binding a port
    assert calls == []
    web.serve(host="127.0.0.1", port=8123, checkpoint=tiny_bundle)
    assert "http://127.0.0.1:8123/" in capsys.readouterr().out
    assert calls[0]["port"] == 8123 and calls[0]["app"].state.service.predictor is not None


# ---- hardening: slow uploads, sex spellings ------------------------------------------------------------
def test_slow_upload_is_cut_off(tiny_bundle: Path) -> None:
    """A client trickling a few bytes per second gets a 408 and a closed connection once the body deadline
    passes, instead of holding the connection (and the multipart parser) for as long as it likes."""
    import socket
    from urllib.parse import urlsplit

    app = create_app(tiny_bundle, upload_timeout_s=1.0)
    with web.background_server(app) as url:
        address = urlsplit(url)
        head = (
            f"POST /api/v1/predict HTTP/1.1\r\nHost: {address.hostname}\r\n"
            "Content-Type: multipart/form-data; boundary=BOUNDARY\r\nContent-Length: 100000\r\n\r\n"
            '--BOUNDARY\r\nContent-Disposition: form-data; name="image"; filename="slow.png"\r\n\r\n'
        ).encode()
        received = b""
        with socket.create_connection((address.hostname, address.port), timeout=5) as sock:
            sock.sendall(head)
            sock.settimeout(0.25)
            start = time.monotonic()
            closed = False
            while time.monotonic() - start < 15:
                try:
                    sock.sendall(b"\x00\x01")  # 8 bytes a second
                except OSError:  # the server hung up: broken pipe or reset
                    closed = True
                    break
                try:
                    chunk = sock.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    closed = True
                    break
                if not chunk:
                    closed = True
                    break
                received += chunk
            elapsed = time.monotonic() - start
    assert closed and elapsed < 10, (elapsed, received)
    status_line, _, rest = received.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 408"), received
    assert b"connection: close" in rest.lower()
    assert b"upload too slow" in rest and b"1 s" in rest


def test_gif_upload_is_named_an_unsupported_format(client: TestClient) -> None:
    buf = io.BytesIO()
    Image.open(io.BytesIO(_png())).save(buf, format="GIF")
    detail = _assert_one_line_error(_post(client, buf.getvalue(), name="hand.gif", sex="female"), 415)
    assert detail.startswith("hand.gif: unsupported image format (GIF)")


@pytest.mark.parametrize("value", ["1", "0", "true", "yes"])
def test_sex_form_field_takes_only_documented_spellings(client: TestClient, value: str) -> None:
    detail = _assert_one_line_error(_post(client, _png(), sex=value), 422)
    assert "sex must be female or male" in detail and repr(value) in detail


@pytest.mark.parametrize("value", ["Girl", "BOY", "F", "m", " female "])
def test_sex_form_field_accepts_documented_spellings(client: TestClient, value: str) -> None:
    response = _post(client, _png(), sex=value)
    assert response.status_code == 200, response.text
    female = value.strip().lower() in ("girl", "f", "female")
    assert response.json()["sex"] == ("female" if female else "male")


def test_docs_work_offline(client: TestClient) -> None:
    """Swagger UI and ReDoc load their scripts from this server (a hospital network has no CDN)."""
    page = client.get("/docs")
    assert page.status_code == 200
    assert "/docs-assets/swagger-ui-bundle.js" in page.text and "cdn.jsdelivr" not in page.text
    assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
    assert client.get("/docs-assets/swagger-ui.css").status_code == 200
    redoc = client.get("/redoc")
    assert redoc.status_code == 200 and "/docs-assets/redoc.standalone.js" in redoc.text
    assert "fonts.googleapis" not in redoc.text


def test_both_engines_serve_without_a_model_lock(tiny_bundle: Path) -> None:
    """Both engines run the same hook-free graph: requests share one predictor with no lock around it."""
    for engine in ("onnx", "torch"):
        service = create_app(tiny_bundle, workers=2, engine=engine).state.service
        predictor = service.load()
        assert predictor.engine.name == engine and predictor.thread_safe
        assert not hasattr(service, "_model_lock")


# ---- issue #45: the growth work-up through the API and page --------------------------------------------
@pytest.fixture(scope="module")
def growth_client(site_calibration: Path) -> Iterator[TestClient]:
    """The bundled model served with a site calibration (as ``boneage serve --calibration site.json``)."""
    with TestClient(create_app(None, workers=1, calibration=site_calibration)) as test_client:
        yield test_client


def _history_json(age: float, bone: float, sex: str) -> bytes:
    return json.dumps(
        {
            "visits": [
                {
                    "label": "last year",
                    "chronological_age_months": age,
                    "bone_age_months": bone,
                    "uncertainty_months": 2.0,
                    "sex": sex,
                }
            ]
        }
    ).encode()


@pytest.mark.integration
def test_predict_with_heights_history_and_calibration(
    growth_client: TestClient, radiographs: list[tuple[Path, str]]
) -> None:
    health = growth_client.get("/api/v1/health").json()
    assert health["model_loaded"] and health["calibration"] == "calibrated with site.json (110 cases)"
    path, sex = radiographs[0]
    files = {
        "image": (path.name, path.read_bytes(), "application/octet-stream"),
        "history": ("child.json", _history_json(156.0, 150.0, sex), "application/json"),
    }
    form = {
        "sex": sex,
        "age": "14y",
        "height_cm": "152.5",
        "mother_height_cm": "160",
        "father_height_cm": "175",
    }
    response = growth_client.post("/api/v1/predict", files=files, data=form)
    assert response.status_code == 200, response.text
    r = response.json()
    assert r["calibration"]["file"] == "site.json" and r["growth"]["bone_age_calibrated"]
    assert r["bone_age_uncalibrated_months"] == pytest.approx(
        r["calibration"]["bone_age_uncalibrated_months"], abs=0.01
    )
    assert any("fitted without test-time augmentation" in w for w in r["warnings"])  # served with TTA
    assert r["adult_height"]["height_cm"] == 152.5 and r["adult_height"]["method"] == "bayley-pinneau"
    assert r["target_height"]["target_height_cm"] == pytest.approx(
        (160 + 175 + (13 if sex == "male" else -13)) / 2
    )
    follow = r["follow_up"]
    assert follow["history"] == "child.json" and len(follow["visits"]) == 2
    assert follow["intervals"][0]["years"] == pytest.approx(1.0)
    assert r["growth"]["bone_age_velocity"] == follow["intervals"][0]["velocity_months_per_year"]
    assert _is_png(r["sd_chart_png_base64"])


@pytest.mark.parametrize(
    ("form", "history", "needle"),
    [
        ({"mother_height_cm": "160"}, None, "needs both mother_height_cm and father_height_cm"),
        ({"height_cm": "5000"}, None, "height_cm: height must be in cm"),
        ({"height_cm": "tall"}, None, "height must be a number"),
        ({}, b"{broken", "child.json: not valid JSON"),
        ({}, _history_json(100, 98, "male"), "the history is for a male child, the form says female"),
    ],
    ids=["one-parent", "absurd-height", "text-height", "bad-history", "history-other-sex"],
)
def test_growth_form_errors_are_one_line_422(
    client: TestClient, form: dict[str, str], history: bytes | None, needle: str
) -> None:
    files = {"image": ("hand.png", _png(), "application/octet-stream")}
    if history is not None:
        files["history"] = ("child.json", history, "application/json")
    response = client.post("/api/v1/predict", files=files, data={"sex": "female", **form})
    assert needle in _assert_one_line_error(response, 422)


def test_calibration_for_another_model_is_a_load_error(tiny_bundle: Path, site_calibration: Path) -> None:
    with TestClient(create_app(tiny_bundle, calibration=site_calibration)) as test_client:
        health = test_client.get("/api/v1/health").json()
        assert not health["model_loaded"] and "fitted for another model" in health["model_error"]
        response = _post(test_client, _png(), sex="female")
        assert "model not available" in _assert_one_line_error(response, 503)


def test_page_has_the_growth_fields(client: TestClient) -> None:
    html = client.get("/").text
    for name in ("height_cm", "mother_height_cm", "father_height_cm", "history"):
        assert f'name="{name}"' in html, name
    script = client.get("/static/app.js").text
    assert "adult_height" in script and "follow_up" in script and "textContent" in script


def test_a_url_encoded_form_gets_one_line_naming_multipart(client: TestClient) -> None:
    """A form posted url-encoded (no file can travel that way) once got "received: <class 'str'>"."""
    response = client.post("/api/v1/predict", data={"image": "hand.png", "sex": "female"})
    detail = _assert_one_line_error(response, 415)
    assert "multipart/form-data" in detail and "application/x-www-form-urlencoded" in detail
    assert "class" not in detail


def test_the_page_says_the_docs_need_no_internet(client: TestClient) -> None:
    page = client.get("/").text
    assert "needs internet" not in page and "no internet needed" in page
    assert client.get("/docs").status_code == 200


def test_the_start_up_log_line_is_short(tiny_bundle: Path, caplog: pytest.LogCaptureFixture) -> None:
    """One line at start naming the model, not every fact of its file (once 3,000 characters)."""
    import logging

    with caplog.at_level(logging.INFO, logger="boneage.web"):
        create_app(tiny_bundle).state.service.load()
    (line,) = [r.getMessage() for r in caplog.records if "loaded" in r.getMessage()]
    assert len(line) < 200 and "model test loaded" in line and "99.0" in line


# ---- issue #43 items 6-8: request-head deadline, connection cap, bounded decodes, serve options ---------
def _raw_socket(url: str, head: bytes = b"", timeout: float = 5.0):
    import socket
    from urllib.parse import urlsplit

    address = urlsplit(url)
    sock = socket.create_connection((address.hostname, address.port), timeout=timeout)
    if head:
        sock.sendall(head)
    return sock


def _read_until_closed(sock, limit_s: float) -> tuple[bytes, float, bool]:
    """(bytes received, seconds until the server closed, closed?) reading for at most ``limit_s``."""
    received, start = b"", time.monotonic()
    sock.settimeout(0.2)
    while time.monotonic() - start < limit_s:
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except OSError:
            return received, time.monotonic() - start, True
        if not chunk:
            return received, time.monotonic() - start, True
        received += chunk
    return received, time.monotonic() - start, False


INCOMPLETE_HEAD = b"POST /api/v1/predict HTTP/1.1\r\nHost: x\r\n"


def test_incomplete_request_head_is_closed_after_the_header_timeout(tiny_bundle: Path) -> None:
    """A head that never ends gets 408 and a closed connection after the timeout, trickling bytes does not
    move the deadline, a silent connection is closed too, and /health answers meanwhile."""
    import httpx

    app = create_app(tiny_bundle, header_timeout_s=1.0)
    with web.background_server(app) as url:
        start = time.monotonic()
        partial = _raw_socket(url, INCOMPLETE_HEAD)
        silent = _raw_socket(url)
        trickle = _raw_socket(url, b"GET /api/v1/health HTTP/1.1\r\n")
        for _ in range(3):  # one header byte every 0.3 s
            time.sleep(0.3)
            trickle.sendall(b"X")
        health = httpx.get(f"{url}/api/v1/health", timeout=5)
        assert health.status_code == 200 and health.json()["status"] == "ok"
        results = {}
        for name, sock in (("partial", partial), ("silent", silent), ("trickle", trickle)):
            with sock:
                received, _, closed = _read_until_closed(sock, 6)
                results[name] = (received, time.monotonic() - start, closed)
    for name, (received, elapsed, closed) in results.items():
        assert closed and elapsed < 3.0, (name, elapsed, received)
    for name in ("partial", "trickle"):
        status_line, _, rest = results[name][0].partition(b"\r\n")
        assert status_line == b"HTTP/1.1 408 Request Timeout", results[name]
        assert b"connection: close" in rest and b"request head not received within 1 s" in rest
    assert results["silent"][0] == b""  # nothing was asked, nothing is answered
    counts = app.state.connection_counts
    assert (counts.head_timeouts, counts.idle_timeouts) == (2, 1)


def test_connection_cap_closes_the_longest_idle_connection_first(tiny_bundle: Path) -> None:
    """Beyond max_connections the oldest connection still waiting for a head is closed, so a health check
    gets through while clients hold incomplete heads; newer ones are left alone."""
    import httpx

    app = create_app(tiny_bundle, header_timeout_s=30.0, max_connections=4)
    with web.background_server(app) as url:
        socks = []
        for _ in range(6):
            socks.append(_raw_socket(url, INCOMPLETE_HEAD))
            time.sleep(0.05)  # a defined age order
        health = httpx.get(f"{url}/api/v1/health", timeout=5)  # the 7th connection
        assert health.status_code == 200
        outcomes = []
        for sock in socks:
            with sock:
                outcomes.append(_read_until_closed(sock, 0.5))
    evicted = [i for i, (_, _, closed) in enumerate(outcomes) if closed]
    assert evicted == [0, 1, 2], outcomes  # 6 + 1 connections, cap 4: the three oldest
    for i in evicted:
        assert outcomes[i][0].startswith(b"HTTP/1.1 503 Service Unavailable"), outcomes[i]
    assert app.state.connection_counts.evicted == 3


def test_connection_cap_answers_503_when_every_connection_is_busy(
    tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch, radiographs: list[tuple[Path, str]]
) -> None:
    """Connections whose requests are being served are never closed to make room: the newcomer gets 503."""
    import httpx

    real_assess = web.assess_image
    entered = threading.Semaphore(0)
    release = threading.Event()

    def held_assess(*args: object, **kwargs: object):
        entered.release()
        release.wait(timeout=60)
        return real_assess(*args, **kwargs)

    monkeypatch.setattr(web, "assess_image", held_assess)
    path, sex = radiographs[0]
    app = create_app(tiny_bundle, workers=2, max_connections=2)
    statuses: list[int] = []
    with web.background_server(app) as url:

        def post() -> None:
            files = {"image": (path.name, path.read_bytes(), "image/png")}
            statuses.append(
                httpx.post(f"{url}/api/v1/predict", files=files, data={"sex": sex}, timeout=60).status_code
            )

        busy = [threading.Thread(target=post) for _ in range(2)]
        try:
            for thread in busy:
                thread.start()
            assert entered.acquire(timeout=30) and entered.acquire(timeout=30), "predictions did not start"
            refused = httpx.get(f"{url}/api/v1/health", timeout=5)
            assert refused.status_code == 503, refused.text
        finally:
            release.set()
            for thread in busy:
                thread.join(timeout=60)
        assert statuses == [200, 200]
        assert httpx.get(f"{url}/api/v1/health", timeout=5).status_code == 200  # room again
    assert app.state.connection_counts.refused == 1


def test_decodes_are_bounded_apart_from_the_inference_workers(
    tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch, radiographs: list[tuple[Path, str]]
) -> None:
    """With 4 inference workers and 6 uploads at once, never more than ``decodes`` radiographs are decoded
    at the same time (a near-40 Mpx decode is the memory peak of a request)."""
    import httpx

    real_read = web.read_radiograph
    lock = threading.Lock()
    active, peak = [0], [0]

    def counted_read(*args: object, **kwargs: object):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            time.sleep(0.3)  # long enough for the others to pile up
            return real_read(*args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(web, "read_radiograph", counted_read)
    path, sex = radiographs[0]
    data = path.read_bytes()
    statuses: list[int] = []
    app = create_app(tiny_bundle, workers=4, decodes=2)
    with web.background_server(app) as url:

        def post() -> None:
            files = {"image": (path.name, data, "image/png")}
            statuses.append(
                httpx.post(f"{url}/api/v1/predict", files=files, data={"sex": sex}, timeout=60).status_code
            )

        threads = [threading.Thread(target=post) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    assert statuses == [200] * 6
    assert peak[0] == 2, peak  # bounded, and the bound was reached (the uploads did overlap)


def test_serve_command_passes_the_connection_options(
    tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``boneage serve --max-upload-mb --header-timeout --max-connections`` reach the app and uvicorn's
    protocol; without them the documented defaults apply."""
    import uvicorn
    from typer.testing import CliRunner

    from boneage.cli import app as cli_app

    calls: list[dict] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append({"app": app, **kwargs}))
    runner = CliRunner()
    base = ["serve", "--checkpoint", str(tiny_bundle), "--port", "8124"]
    extra = ["--max-upload-mb", "5", "--header-timeout", "3", "--max-connections", "7"]
    for args in (base + extra, base):
        result = runner.invoke(cli_app, args)
        assert result.exit_code == 0, result.output
    (custom, default) = calls
    assert custom["app"].state.connection_limits == web._ConnectionLimits(3.0, 7)
    assert default["app"].state.connection_limits == web._ConnectionLimits(
        web.HEADER_TIMEOUT_S, web.MAX_CONNECTIONS
    )
    for call, limit_mb in ((custom, 5), (default, 20)):
        assert issubclass(call["http"], asyncio.Protocol) and call["limit_concurrency"] is None
        with TestClient(call["app"]) as test_client:
            assert test_client.get("/api/v1/health").json()["max_upload_mb"] == limit_mb
