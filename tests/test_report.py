"""The chart is a real PNG and the HTML report is self-contained, complete and escaped."""

from __future__ import annotations

import base64
import html
import io
import json
import re
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from boneage.clinical import REFERENCE_CITATION, assess
from boneage.report import safe_stem, sd_chart_png, write_html_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png(color: tuple[int, int, int], size: tuple[int, int] = (32, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), color, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def radiograph() -> bytes:
    return _png((200, 200, 200))


@pytest.fixture(scope="module")
def heatmap() -> bytes:
    return _png((255, 0, 0))


def _open_png(data: bytes) -> Image.Image:
    assert data.startswith(PNG_MAGIC)
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.format == "PNG"
    return image


def test_chart_png_with_age(tmp_path: Path) -> None:
    result = assess(150.0, "male", 120.0, uncertainty_months=6.0)
    out = tmp_path / "chart.png"
    data = sd_chart_png(result, out)
    image = _open_png(data)
    assert 300 <= image.width <= 2000 and 300 <= image.height <= 2000
    assert out.read_bytes() == data


def test_chart_png_without_age_and_extremes() -> None:
    for result in (
        assess(90.0, "female"),
        assess(5.0, "F", 1.0),
        assess(239.0, "male", 230.0, uncertainty_months=12.0),
    ):
        image = _open_png(sd_chart_png(result))
        assert image.width >= 300 and image.height >= 300


def test_chart_has_no_software_url() -> None:
    assert b"matplotlib.org" not in sd_chart_png(assess(90.0, "female"))


def _images(text: str) -> list[str]:
    return re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)


def test_html_report_contents(tmp_path: Path, radiograph: bytes, heatmap: bytes) -> None:
    result = assess(150.0, "male", 120.0, uncertainty_months=6.0, warnings=["left hand not detected"])
    path = write_html_report(
        result,
        radiograph,
        heatmap,
        tmp_path / "out",
        "patient-001",
        model_info={
            "model_version": "1.2.3",
            "backbone": "efficientnet_b0",
            "input_size": 299,
            "headline": {"mae_months": 7.25, "images": 1001, "on": "held-out radiographs"},
        },
    )
    assert path == tmp_path / "out" / "patient-001.html"
    text = path.read_text(encoding="utf-8")
    sd = 9.79
    z = 30.0 / sd  # 3.06
    for expected in [
        "150.0 months",
        "12 y 6 m",  # bone age
        "120.0 months",
        "10 y 0 m",  # chronological age
        "+30.0 months",  # difference
        f"+{z:.2f}",  # SD score
        "9.79 months",  # reference SD
        "advanced",
        "± 6.0 months",
        "left hand not detected",
        "efficientnet_b0",
        "7.25 months",
        "male",
    ]:
        assert expected in text, expected
    assert REFERENCE_CITATION.replace("&", "&amp;") in text
    assert "not a medical device" in text
    assert "Research use only — not a medical device." in text
    assert "RSNA Pediatric Bone Age data (non-commercial research licence)" in text
    images = _images(text)
    assert text.count("data:image/png;base64,") == 3
    assert len(images) == 3
    decoded = [base64.b64decode(b) for b in images]
    assert radiograph in decoded and heatmap in decoded
    for blob in decoded:
        _open_png(blob)


def test_html_report_without_heatmap_or_age(tmp_path: Path, radiograph: bytes) -> None:
    path = write_html_report(assess(100.0, "female"), radiograph, None, tmp_path, "p2")
    text = path.read_text(encoding="utf-8")
    assert text.count("data:image/png;base64,") == 2
    assert "not given" in text
    assert "8 y 4 m" in text
    assert "Not provided." in text  # no model info


def test_html_report_is_self_contained(tmp_path: Path, radiograph: bytes, heatmap: bytes) -> None:
    path = write_html_report(assess(150.0, "male", 120.0), radiograph, heatmap, tmp_path, "x")
    text = path.read_text(encoding="utf-8")
    assert "http://" not in text and "https://" not in text
    assert "//" not in re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", text)
    assert not re.search(r"<(script|link|iframe|object|embed)\b", text, re.IGNORECASE)
    assert not re.search(r"""\b(src|href)=["'](?!data:)""", text)


def test_html_report_escapes_everything(tmp_path: Path, radiograph: bytes) -> None:
    evil = "<script>alert('x')</script>"
    result = assess(100.0, "male", 100.0, warnings=[f"bad {evil}"])
    path = write_html_report(
        result,
        radiograph,
        None,
        tmp_path,
        f"a{evil}",
        model_info={"backbone": evil, "trained_on": '"><img src=x onerror=alert(1)>'},
    )
    text = path.read_text(encoding="utf-8")
    assert "<script" not in text.lower()
    assert "&lt;script&gt;" in text
    assert "<img src=x" not in text
    assert "onerror=alert(1)&gt;" in text
    assert path.parent == tmp_path
    assert "<" not in path.name and "/" not in path.name


def test_html_report_escapes_script_in_file_name(tmp_path: Path, radiograph: bytes) -> None:
    name = "hand<script>alert(1)</script>.png"
    path = write_html_report(assess(100.0, "male", 100.0), radiograph, None, tmp_path, name)
    text = path.read_text(encoding="utf-8")
    escaped = "hand&lt;script&gt;alert(1)&lt;/script&gt;.png"
    assert f"<title>Bone age report — {escaped}</title>" in text
    assert f"<h1>Bone age report — {escaped}</h1>" in text
    assert "<script" not in text.lower()
    assert html.unescape(escaped) == name


def test_report_template_is_package_data() -> None:
    template = resources.files("boneage").joinpath("templates", "report.html.j2")
    assert template.is_file()
    source = template.read_text(encoding="utf-8")
    assert "{{ name }}" in source and "|safe" not in source.replace(" ", "")


def test_html_report_markup_is_literal_not_escaped(tmp_path: Path, radiograph: bytes) -> None:
    # autoescaping escapes values once and leaves the template's own markup alone
    path = write_html_report(
        assess(100.0, "male", 100.0, warnings=["a & b"]), radiograph, None, tmp_path, "m"
    )
    text = path.read_text(encoding="utf-8")
    assert text.startswith('<!DOCTYPE html>\n<html lang="en">')
    assert text.endswith("</html>\n")
    assert "<li>a &amp; b</li>" in text
    assert "&amp;amp;" not in text and "&amp;lt;" not in text
    assert "Greulich &amp; Pyle ±2 SD band</figcaption>" in text
    assert '<span class="flag-normal">normal</span>' in text


@pytest.mark.parametrize("name", ["../../evil", "/etc/passwd", "..\\..\\evil", "..", "a/../../b", ".hidden"])
def test_html_report_name_stays_inside(tmp_path: Path, radiograph: bytes, name: str) -> None:
    out = tmp_path / "reports"
    path = write_html_report(assess(100.0, "male"), radiograph, None, out, name)
    assert path.parent.resolve() == out.resolve()
    assert path.exists()
    assert not path.name.startswith(".")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["reports"]


def test_safe_stem() -> None:
    assert safe_stem("../../evil") == "evil"
    assert safe_stem("patient 001.dcm") == "patient_001.dcm"
    assert safe_stem("..") == "report"
    assert safe_stem("") == "report"
    assert "/" not in safe_stem("a/b\\c") and "\\" not in safe_stem("a/b\\c")


def test_rejects_non_image_bytes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="PNG or JPEG"):
        write_html_report(assess(100.0, "male"), b"not an image", None, tmp_path, "x")


def test_report_names_are_distinct_readable_and_stable() -> None:
    from boneage.report import report_names

    paths = [
        "d/case1.png",
        "d/case1.jpg",
        "d/case 2.png",
        "d/case_2.png",
        "a/x.png",
        "b/x.png",
        "b/X.PNG",
        "d/" + "long" * 40 + ".png",
    ]
    names = report_names(paths)
    assert list(names) == paths
    assert len({n.lower() for n in names.values()}) == len(paths)  # distinct even on case-blind disks
    assert names["d/case1.png"] == "case1.png" and names["d/case1.jpg"] == "case1.jpg"
    assert names["d/case_2.png"] == "case_2.png"  # the file whose name needed no change keeps it
    assert re.fullmatch(r"case_2\.png-[0-9a-f]{6}", names["d/case 2.png"])
    assert names["a/x.png"] == "x.png" and re.fullmatch(r"x\.png-[0-9a-f]{6}", names["b/x.png"])
    assert all(safe_stem(n) == n for n in names.values())  # write_html_report keeps them as they are
    assert report_names(paths[::-1])["d/case 2.png"] == names["d/case 2.png"]  # not order-dependent


def test_chart_is_drawn_per_patient_and_safe_across_threads() -> None:
    """The reference part is cached per thread and the patient blitted onto it: each chart shows its own
    patient only, and charts drawn concurrently equal the ones drawn one by one."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    cases = [
        assess(60.0 + 12 * i, "male" if i % 2 else "female", 72.0 + 10 * i, uncertainty_months=4.0)
        for i in range(8)
    ]
    serial = [sd_chart_png(a) for a in cases]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(sd_chart_png, cases))
    assert parallel == serial
    first, again = (np.asarray(_open_png(sd_chart_png(cases[0])).convert("RGB")) for _ in range(2))
    assert (first == again).all()  # a previous patient's point never stays on the cached background
    other = np.asarray(_open_png(serial[2]).convert("RGB"))
    assert first.shape == other.shape and (first != other).any()


# ---- issue #45: adult height, target height, follow-up and calibration in the report --------------------
def _workup(tmp_path: Path, label: str = "2024 visit"):
    from boneage.growth import growth_workup, read_history

    history = tmp_path / "child.json"
    visit = {
        "label": label,
        "chronological_age_months": 108,
        "bone_age_months": 100,
        "uncertainty_months": 3,
        "sex": "female",
    }
    history.write_text(json.dumps({"visits": [visit]}))
    return growth_workup(
        sex="female",
        bone_age_months=126.0,
        chronological_age_months=120.0,
        uncertainty_months=2.0,
        sd_score=0.5,
        source="/x/now.png",
        height_cm=140.0,
        mother_height_cm=165.0,
        father_height_cm=178.0,
        history=read_history(history),
    )


def test_html_report_has_the_growth_work_up_with_methods_sources_and_limits(
    tmp_path: Path, radiograph: bytes
) -> None:
    workup = _workup(tmp_path)
    result = assess(126.0, "female", 120.0, uncertainty_months=2.0)
    path = write_html_report(result, radiograph, None, tmp_path, "child", workup=workup)
    text = html.unescape(path.read_text())
    assert "Adult height prediction — Bayley–Pinneau method" in text
    assert f"{workup.adult_height.predicted_adult_height_cm:.1f} cm" in text
    assert "J Pediatr 1952;40:423-441" in text and "Limits:" in text and "Tarim" in text
    assert "Target height — Tanner mid-parental method" in text and "165.0 cm (range 156.5–173.5 cm)" in text
    assert "Follow-up across visits" in text and "2024 visit" in text and "now.png (this visit)" in text
    assert "26.0 ± 3.6" in text  # 26 bone-age months in a year, hypot(3, 2) / 1 y


def test_chart_draws_the_trajectory_of_earlier_visits(tmp_path: Path) -> None:
    result = assess(126.0, "female", 120.0, uncertainty_months=2.0)
    alone = sd_chart_png(result)
    with_visits = sd_chart_png(result, trajectory=[(96.0, 90.0, 3.0), (108.0, 100.0, 3.0)])
    assert with_visits != alone
    a = np.asarray(_open_png(alone).convert("RGB"), dtype=np.int16)
    b = np.asarray(_open_png(with_visits).convert("RGB"), dtype=np.int16)
    assert a.shape == b.shape and np.abs(a - b).sum() > 1000


def test_growth_sections_escape_history_labels(tmp_path: Path, radiograph: bytes) -> None:
    workup = _workup(tmp_path, label="<script>alert(1)</script>")
    result = assess(126.0, "female", 120.0, uncertainty_months=2.0)
    text = write_html_report(result, radiograph, None, tmp_path, "child", workup=workup).read_text()
    assert "<script>alert(1)</script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
