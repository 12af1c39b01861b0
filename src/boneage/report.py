"""Human-readable output: an SD chart and a single self-contained HTML report.

The HTML is one file with images inlined and no external resources, so it can be mailed, archived or
opened offline on a hospital workstation without leaking anything to a CDN. The markup lives in the Jinja2
template ``boneage/templates/report.html.j2``; this module only computes the plain-text values, which the
template autoescapes.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import html
import io
import re
import threading
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from boneage import __version__
from boneage.clinical import REFERENCE_CITATION, Assessment, format_months, reference_sd, sd_table
from boneage.files import atomic_write
from boneage.growth import GrowthWorkup

__all__ = [
    "DISCLAIMER",
    "report_names",
    "safe_stem",
    "sd_chart_png",
    "secondary_capture_pixels",
    "write_html_report",
]

DISCLAIMER = (
    "Research use only — not a medical device. "
    "Model trained on RSNA Pediatric Bone Age data (non-commercial research licence)."
)

_CHART_MAX_YEARS = 19.0
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_JPEG_MAGIC = b"\xff\xd8\xff"
_TEMPLATE = "report.html.j2"  # in boneage/templates, shipped as package data


def _chart_axes(sex: str, ylim: tuple[float, float], patient_label: str | None) -> tuple[Figure, Any]:
    """The reference part of the SD chart: the ±2 SD band, the identity line and the Brush mean."""
    ages_y = np.linspace(0.0, _CHART_MAX_YEARS, 229)
    sds_y = np.array([reference_sd(a * 12.0, sex)[1] for a in ages_y]) / 12.0
    table = sd_table()
    mean_rows = table[["chronological_age_years", f"{sex}_mean_bone_age_months"]].dropna()

    fig = Figure(figsize=(6.4, 5.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.fill_between(
        ages_y,
        ages_y - 2 * sds_y,
        ages_y + 2 * sds_y,
        color="#9ecae1",
        alpha=0.45,
        label="±2 SD (Greulich & Pyle)",
    )
    ax.plot(ages_y, ages_y, color="#3182bd", lw=1.0, ls="--", label="bone age = chronological age")
    ax.plot(
        mean_rows.iloc[:, 0],
        mean_rows.iloc[:, 1] / 12.0,
        color="#636363",
        lw=1.2,
        marker=".",
        label=f"Brush Foundation mean ({sex})",
    )
    if patient_label:  # legend entry only; the point itself is drawn per patient
        ax.errorbar([], [], yerr=[], fmt="o", color=_PATIENT, ms=7, capsize=4, label=patient_label)
    ax.set_xlim(0.0, _CHART_MAX_YEARS)
    ax.set_ylim(*ylim)
    ax.set_xlabel("chronological age (years)")
    ax.set_ylabel("bone age (years)")
    ax.set_title(f"Bone age vs chronological age — {sex}")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    fig.text(
        0.01,
        0.01,
        "Reference: Greulich & Pyle 1959 (Brush Foundation); values transcribed from public code",
        fontsize=6,
        color="#555555",
    )
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    return fig, ax


_PATIENT = "#d62728"
_STATIC_YLIM = (0.0, _CHART_MAX_YEARS)
_chart_cache = threading.local()  # per thread: Agg canvases are not safe to share between threads


def _static_chart(sex: str) -> tuple[Any, Any, Any, list[Any]]:
    """The reference part rendered once per thread and sex, plus the patient artists to blit onto it: the
    web app draws one chart per request, and a full matplotlib render cost most of a request's CPU."""
    cache = _chart_cache.__dict__.setdefault("charts", {})
    if sex not in cache:
        from matplotlib.lines import Line2D

        fig, ax = _chart_axes(sex, _STATIC_YLIM, "patient")
        canvas = fig.canvas
        canvas.draw()
        background = canvas.copy_from_bbox(fig.bbox)
        bar = Line2D([], [], color=_PATIENT, lw=1.5, zorder=5, animated=True)
        caps = Line2D([], [], color=_PATIENT, marker="_", ms=8, mew=1.5, ls="none", zorder=5, animated=True)
        point = Line2D([], [], color=_PATIENT, marker="o", ms=7, ls="none", zorder=6, animated=True)
        for artist in (bar, caps, point):
            ax.add_line(artist)
        cache[sex] = (canvas, ax, background, [bar, caps, point])
    return cache[sex]


def sd_chart_png(
    assessment: Assessment,
    path: str | Path | None = None,
    *,
    trajectory: Sequence[tuple[float, float, float]] = (),
) -> bytes:
    """Plot the patient against the ±2 SD band so the z-score can be seen, not just read.

    The band is chronological age ± 2·SD(age) around the identity line, the same definition the SD score
    uses; the Brush Foundation mean is drawn for context. Uses the object-oriented Agg API (no pyplot
    state), so it is safe to call from a web server thread. A patient with a chronological age inside the
    chart's range is blitted onto a cached rendering of the reference part; anything else is drawn in full.
    ``trajectory``: earlier visits as (chronological age, bone age, uncertainty) in months, drawn as points
    joined to this one (issue #45 follow-up).
    """
    sex = assessment.sex
    bone_y = assessment.bone_age_months / 12.0
    unc_y = (assessment.uncertainty_months or 0.0) / 12.0
    chron = assessment.chronological_age_months
    inside = bone_y - unc_y - 0.5 >= _STATIC_YLIM[0] and bone_y + unc_y + 0.5 <= _STATIC_YLIM[1]
    visits = [(c / 12.0, b / 12.0, u / 12.0) for c, b, u in trajectory] if chron is not None else []
    if chron is not None and inside and 0.0 <= chron / 12.0 <= _CHART_MAX_YEARS and not visits:
        canvas, ax, background, (bar, caps, point) = _static_chart(sex)
        chron_y = chron / 12.0
        canvas.restore_region(background)
        bar.set_data([chron_y, chron_y], [bone_y - unc_y, bone_y + unc_y])
        caps.set_data([chron_y, chron_y], [bone_y - unc_y, bone_y + unc_y])
        point.set_data([chron_y], [bone_y])
        for artist in (bar, caps, point) if unc_y > 0 else (point,):
            ax.draw_artist(artist)
        from PIL import Image

        rgb = np.asarray(canvas.buffer_rgba())[..., :3]
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, format="PNG", compress_level=1)
        data = buffer.getvalue()
    else:
        top = max(_CHART_MAX_YEARS, bone_y + unc_y + 0.5, *(b + u + 0.5 for _, b, u in visits))
        bottom = min(0.0, bone_y - unc_y - 0.5, *(b - u - 0.5 for _, b, u in visits))
        label = None if chron is None else "patient"
        fig, ax = _chart_axes(sex, (bottom, top), label)
        if visits:
            _draw_trajectory(ax, visits, (chron / 12.0, bone_y))
        if chron is not None:
            ax.errorbar(
                [chron / 12.0],
                [bone_y],
                yerr=[unc_y] if unc_y > 0 else None,
                fmt="o",
                color=_PATIENT,
                ms=7,
                capsize=4,
                zorder=5,
            )
        else:
            if unc_y > 0:
                ax.axhspan(bone_y - unc_y, bone_y + unc_y, color=_PATIENT, alpha=0.15, lw=0)
            ax.axhline(
                bone_y,
                color=_PATIENT,
                lw=1.5,
                label=f"predicted bone age {format_months(assessment.bone_age_months)} (no age given)",
            )
            ax.legend(loc="upper left", fontsize=8)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", metadata={"Software": None})
        data = buffer.getvalue()
    if path is not None:
        atomic_write(path, data)
    return data


def _draw_trajectory(ax: Any, visits: list[tuple[float, float, float]], now: tuple[float, float]) -> None:
    """Earlier visits as open points with their uncertainty, joined in order to this visit."""
    xs, ys, us = (np.array(col) for col in zip(*visits, strict=True))
    ax.plot([*xs, now[0]], [*ys, now[1]], color=_PATIENT, lw=1.0, alpha=0.6, zorder=4)
    ax.errorbar(
        xs,
        ys,
        yerr=us if np.any(us > 0) else None,
        fmt="o",
        mfc="white",
        color=_PATIENT,
        ms=6,
        capsize=3,
        zorder=5,
        label="earlier visits",
    )
    ax.legend(loc="upper left", fontsize=8)


def safe_stem(name: str) -> str:
    """A file stem that cannot escape the output folder or hide itself (no separators, no leading dots, no
    control characters); letters of any script are kept (``手.png`` stays ``手.png``), and the name is cut to
    120 bytes of UTF-8 so any file system takes it."""
    text = unicodedata.normalize("NFC", str(name))
    stem = re.sub(r"[^\w.-]+", "_", text).strip("._-")
    while len(stem.encode("utf-8")) > 120:
        stem = stem[:-1]
    return stem.strip("._-") or "report"


#: the meta element that says which radiograph a report belongs to (its absolute path)
_OWNER = re.compile(r'<meta name="boneage-report-of" content="(.*?)">')


def report_owner(path: str | Path) -> str | None:
    """The radiograph an existing report was written for (None: not a boneage report, or an older one)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            head = handle.read(4096)
    except OSError:
        return None
    found = _OWNER.search(head)
    return html.unescape(found.group(1)) if found else None


def owned_report_path(out_dir: Path, stem: str, owner: str) -> Path:
    """Where the report of ``owner`` goes: ``<stem>.html`` unless that file holds another radiograph's
    report (or a file that is not a boneage report), then ``<stem>-<hash of owner>.html``: a report never
    replaces another image's, and a re-run of the same file finds its own again."""
    target = out_dir / f"{stem}.html"
    if not target.exists() or report_owner(target) == owner:
        return target
    digest = hashlib.sha1(owner.encode("utf-8", "surrogateescape")).hexdigest()
    for width in range(8, len(digest) + 1, 4):
        candidate = out_dir / f"{stem[:100]}-{digest[:width]}.html"
        if not candidate.exists() or report_owner(candidate) == owner:
            return candidate
    raise ValueError(f"no free report name for {owner} in {out_dir}")


def report_names(paths: Sequence[str | Path]) -> dict[str, str]:
    """One distinct, readable report name per input file of a batch, keyed by ``str(path)``.

    The name is the file name with its suffix (``case1.png`` and ``case1.jpg`` stay apart) made safe by
    :func:`safe_stem`. Names that still collide, compared without case as on macOS and Windows
    (``case 2.png`` and ``case_2.png``, or one file name in two folders), get a short hash of the path: the
    file whose own name needed no change keeps the plain name (else the first one), the others become
    ``<name>-<6 hex>``. The same batch always gets the same names, so a resumed batch writes its reports
    where the first run did.
    """
    keys = list(dict.fromkeys(str(p) for p in paths))
    plain = {key: safe_stem(Path(key).name or key) for key in keys}
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(plain[key].lower(), []).append(key)
    names: dict[str, str] = {}
    taken = {name.lower() for name in plain.values()}
    for members in groups.values():
        keeper = next((k for k in members if plain[k] == Path(k).name), members[0])
        for key in members:
            if key == keeper:
                names[key] = plain[key]
                continue
            digest = hashlib.sha1(key.encode("utf-8", "surrogateescape")).hexdigest()
            base = plain[key][:100].rstrip("._-")
            for width in range(6, len(digest) + 1, 2):
                candidate = f"{base}-{digest[:width]}"
                if candidate.lower() not in taken:
                    break
            taken.add(candidate.lower())
            names[key] = candidate
    return names


def _image_mime(data: bytes, what: str) -> str:
    if data.startswith(_PNG_MAGIC):
        return "image/png"
    if data.startswith(_JPEG_MAGIC):
        return "image/jpeg"
    raise ValueError(f"{what} must be PNG or JPEG bytes")


def _data_uri(data: bytes, what: str) -> str:
    return f"data:{_image_mime(data, what)};base64,{base64.b64encode(data).decode('ascii')}"


def _signed(value: float, digits: int) -> str:
    return f"{value:+.{digits}f}".replace("-", "−")


def _result_rows(a: Assessment) -> list[tuple[str, str]]:
    rows = [
        ("Sex", a.sex),
        ("Bone age", f"{a.bone_age_months:.1f} months ({format_months(a.bone_age_months)})"),
    ]
    if a.uncertainty_months is not None:
        rows.append(("Uncertainty", f"± {a.uncertainty_months:.1f} months"))
    if a.chronological_age_months is None:
        rows.append(("Chronological age", "not given"))
    else:
        rows.append(
            (
                "Chronological age",
                f"{a.chronological_age_months:.1f} months ({format_months(a.chronological_age_months)})",
            )
        )
    if a.difference_months is not None:
        rows.append(("Difference (bone − chronological)", f"{_signed(a.difference_months, 1)} months"))
    if a.sd_months is not None:
        rows.append(("Reference SD at this age", f"{a.sd_months:.2f} months"))
    if a.sd_score is not None:
        rows.append(("SD score (z)", _signed(a.sd_score, 2)))
    rows.append(("Flag", a.flag_text if a.flag_text is not None else "— (needs chronological age)"))
    return rows


def _model_rows(model_info: Mapping[str, Any] | None) -> list[tuple[str, str]]:
    """The model's identity and its headline accuracy, as its file states them (``Predictor.info``)."""
    if not model_info:
        return []
    info = dict(model_info)
    rows: list[tuple[str, str]] = []
    if info.get("model_version"):
        rows.append(("Model version", str(info["model_version"])))
    if info.get("backbone"):
        size = f", {info['input_size']} px input" if info.get("input_size") else ""
        rows.append(("Network", f"{info['backbone']}{size}"))
    headline = info.get("headline")
    if isinstance(headline, Mapping) and isinstance(headline.get("mae_months"), (int, float)):
        rows.append(
            (
                "Mean absolute error",
                f"{headline['mae_months']:.2f} months on {headline['images']} {headline['on']}",
            )
        )
    for key, label in (("trained_on", "Trained on"), ("licence", "Licence"), ("engine", "Engine")):
        if info.get(key):
            rows.append((label, str(info[key])))
    return rows


def _velocity(step: Any) -> str:
    if step is None:
        return "—"
    return f"{step.velocity_months_per_year:.1f} ± {step.velocity_uncertainty_months_per_year:.1f}"


def _growth_sections(workup: GrowthWorkup | None) -> dict[str, Any]:
    """Plain-text rows of the issue #45 sections (adult height, target height, follow-up, calibration);
    each section None when its input was not given."""
    out: dict[str, Any] = {"adult": None, "target": None, "follow": None, "calibration": None}
    if workup is None:
        return out
    if workup.calibration is not None:
        c = workup.calibration
        rows = [
            ("File", f"{c.file or '(unnamed)'} ({c.cases} cases, {c.sex_cases} of this sex)"),
            ("Bone age without calibration", f"{c.bone_age_uncalibrated_months:.1f} months"),
        ]
        rows.append(
            ("Correction", f"{c.intercept:+.2f} + {c.slope:.3f} × model bone age")
            if c.applied
            else ("Correction", "none for this sex (it did not help in cross-validation)")
        )
        out["calibration"] = {"rows": rows}
    if workup.adult_height is not None:
        a = workup.adult_height
        rows = [("Current height", f"{a.height_cm:.1f} cm")]
        if a.bayley_pinneau_column is not None:
            rows.append(("Table", f"{a.bayley_pinneau_column.value} ({', '.join(a.bayley_pinneau_tables)})"))
        if a.predicted_adult_height_cm is not None:
            rows.append(("Per cent of adult height reached", f"{a.percent_of_mature_height:.1f}%"))
            rows.append(("Predicted adult height", f"{a.predicted_adult_height_cm:.1f} cm"))
            if a.predicted_adult_height_range_cm is not None:
                lo, hi = a.predicted_adult_height_range_cm
                rows.append(
                    (
                        "Published error (SD, validating sample)",
                        f"{a.predicted_adult_height_error_sd_cm:.1f} cm; ± 2 SD: {lo:.1f}–{hi:.1f} cm",
                    )
                )
        out["adult"] = {
            "rows": rows,
            "reason": a.not_available,
            "notes": list(a.notes),
            "source": a.source,
            "limits": list(a.limits),
        }
    if workup.target_height is not None:
        t = workup.target_height
        lo, hi = t.target_height_range_cm
        out["target"] = {
            "rows": [
                ("Mother / father", f"{t.mother_height_cm:.1f} cm / {t.father_height_cm:.1f} cm"),
                ("Target height", f"{t.target_height_cm:.1f} cm (range {lo:.1f}–{hi:.1f} cm)"),
            ],
            "source": t.source,
            "limits": list(t.limits),
        }
    if workup.follow_up is not None:
        f = workup.follow_up
        steps: list[Any] = [None, *f.intervals] if f.intervals else [None] * len(f.visits)
        visits = []
        for v, step in zip(f.visits, steps, strict=True):
            visits.append(
                (
                    v.label + (" (this visit)" if v.current else ""),
                    f"{v.chronological_age_months:.1f}",
                    f"{v.bone_age_months:.1f} ± {v.uncertainty_months:.1f}",
                    _velocity(step),
                )
            )
        out["follow"] = {
            "visits": visits,
            "reason": f.not_available,
            "warnings": list(f.warnings),
            "method": f.method_text,
            "history": f.history,
        }
    return out


@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    # autoescape=True unconditionally (select_autoescape would not match the ``.j2`` suffix): every value
    # handed to the template is plain text, and file names / warnings / model info are user-controlled.
    return jinja2.Environment(
        loader=jinja2.PackageLoader("boneage", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )


def write_html_report(
    assessment: Assessment,
    radiograph_png: bytes,
    heatmap_png: bytes | None,
    out_dir: str | Path,
    name: str,
    *,
    model_info: dict | None = None,
    workup: GrowthWorkup | None = None,
    owner: str | None = None,
) -> Path:
    """Write ``out_dir/<safe name>.html``: one offline file a clinician can open, archive or forward.

    ``owner`` (the radiograph's absolute path) is recorded in the file; an existing report of another owner
    is never replaced (``owned_report_path``). The file is written whole or not at all."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    owner = owner or str(name)
    target = owned_report_path(out, safe_stem(name), owner)
    if target.resolve().parent != out.resolve():  # belt and braces: safe_stem already removed separators
        raise ValueError(f"report name {name!r} would leave {out}")

    figures = [{"alt": "radiograph", "src": _data_uri(radiograph_png, "radiograph"), "caption": "Radiograph"}]
    if heatmap_png is not None:
        figures.append(
            {
                "alt": "heatmap",
                "src": _data_uri(heatmap_png, "heatmap"),
                "caption": "Saliency heatmap (where the model looked)",
            }
        )
    figures.append(
        {
            "alt": "SD chart",
            "src": _data_uri(
                sd_chart_png(assessment, trajectory=workup.trajectory if workup else ()), "chart"
            ),
            "caption": "Bone age against the Greulich & Pyle ±2 SD band",
        }
    )

    document = (
        _environment()
        .get_template(_TEMPLATE)
        .render(
            name=str(name),
            bone_age_text=format_months(assessment.bone_age_months),
            bone_age_months=f"{assessment.bone_age_months:.1f}",
            flag_class=f"flag-{assessment.flag}" if assessment.flag else "flag-none",
            flag_text=assessment.flag_text or "not assessed",
            cautions=[str(w) for w in assessment.cautions],  # issue #43 item 5: they lead the report
            figures=figures,
            result_rows=_result_rows(assessment),
            warnings=[str(w) for w in assessment.warnings or ()],
            model_rows=_model_rows(model_info),
            growth=_growth_sections(workup),
            citation=REFERENCE_CITATION,
            disclaimer=DISCLAIMER,
            version=__version__,
            owner=owner,
        )
    )
    return atomic_write(target, document)


# ---- the page a PACS viewer shows: the DICOM node's Secondary Capture --------------------------------------
_SC_SIZE = (1024, 1024)  # width, height: one screen, readable in any viewer without zooming
_SC_BACKGROUND = (0, 0, 0)  # viewers are dark; a white page would glare in a reading room
_SC_TEXT = (235, 235, 235)
_SC_DIM = (170, 170, 170)
_SC_TITLE = (120, 200, 255)
_SC_REFUSED = (255, 170, 60)


@functools.lru_cache(maxsize=8)
def _font(size: int, bold: bool = False) -> Any:
    """DejaVu Sans from matplotlib's bundled fonts (present offline wherever boneage is installed); PIL's
    own scalable default font if that file is missing."""
    from matplotlib import get_data_path
    from PIL import ImageFont

    name = "DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf"
    try:
        return ImageFont.truetype(str(Path(get_data_path()) / "fonts" / "ttf" / name), size)
    except OSError:
        return ImageFont.load_default(size=size)


def _wrap(draw: Any, text: str, font: Any, width: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels (a word longer than a line is cut, never overflows)."""
    lines: list[str] = []
    current = ""
    for word in str(text).split():
        candidate = f"{current} {word}".strip()
        if draw.textlength(candidate, font=font) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        while draw.textlength(word, font=font) > width and len(word) > 1:
            cut = len(word) - 1
            while cut > 1 and draw.textlength(word[:cut], font=font) > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    if current:
        lines.append(current)
    return lines


def _paste_fit(page: Any, image: Any, box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """Paste ``image`` scaled to fit ``box`` (left, top, right, bottom), centred; returns where it went."""
    from PIL import Image

    left, top, right, bottom = box
    scale = min((right - left) / image.width, (bottom - top) / image.height)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    fitted = image.convert("RGB").resize(size, Image.Resampling.LANCZOS)
    x = left + (right - left - size[0]) // 2
    y = top + (bottom - top - size[1]) // 2
    page.paste(fitted, (x, y))
    return x, y, x + size[0], y + size[1]


def secondary_capture_pixels(
    assessment: Assessment | None,
    radiograph: np.ndarray | None,
    *,
    heatmap_png: bytes | None = None,
    reason: str | None = None,
    model_version: str = "",
    warnings: Sequence[str] = (),
) -> np.ndarray:
    """The result page a PACS viewer shows beside the radiograph: (1024, 1024, 3) uint8 RGB.

    With an ``assessment``: the hand, the heatmap, bone age, uncertainty, chronological age, difference and
    SD score. Without one (``reason`` given): the hand when it could be decoded, "NOT ASSESSED" and the
    reason, and no number derived from the model. Text is burned in because a secondary capture is meant to
    be read by people in any viewer; no patient name is drawn (the viewer shows the header's).
    ``radiograph`` is float in [0, 1] (bone bright), as :class:`boneage.io.Radiograph` holds it.
    """
    from PIL import Image, ImageDraw

    if assessment is None and not reason:
        raise ValueError("a secondary capture needs an assessment or the reason there is none")
    page = Image.new("RGB", _SC_SIZE, _SC_BACKGROUND)
    draw = ImageDraw.Draw(page)
    width, height = _SC_SIZE
    margin, column = 24, 560
    title = "BONE AGE (boneage)" if assessment is not None else "NOT ASSESSED (boneage)"
    draw.text((margin, 18), title, font=_font(34, True), fill=_SC_TITLE if assessment else _SC_REFUSED)

    if radiograph is not None:
        grey = np.clip(np.rint(np.asarray(radiograph, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)
        _paste_fit(page, Image.fromarray(grey, mode="L"), (margin, 80, column - margin // 2, height - 110))
    else:
        draw.text((margin, 120), "(image could not be decoded)", font=_font(22), fill=_SC_DIM)

    x, y = column + margin // 2, 80
    text_width = width - x - margin
    if assessment is not None and heatmap_png:
        heat = Image.open(io.BytesIO(heatmap_png))
        _, _, _, bottom = _paste_fit(page, heat, (x, y, width - margin, y + 330))
        draw.text((x, bottom + 4), "where the model looked (Grad-CAM)", font=_font(16), fill=_SC_DIM)
        y = bottom + 36

    def line(text: str, size: int = 24, bold: bool = False, fill: tuple[int, int, int] = _SC_TEXT) -> None:
        nonlocal y
        font = _font(size, bold)
        for part in _wrap(draw, text, font, text_width):
            if y + size > height - 100:
                return
            draw.text((x, y), part, font=font, fill=fill)
            y += int(size * 1.3)

    if assessment is not None:
        a = assessment
        for caution in a.cautions:  # issue #43 item 5: a doubt about the image comes before the numbers
            line(f"CAUTION: {caution}", 18, True, _SC_REFUSED)
        if a.cautions:
            y += 6
        line(f"Bone age {a.bone_age_months:.1f} months", 30, True)
        line(f"({format_months(a.bone_age_months)})", 24)
        if a.uncertainty_months is not None:
            line(f"uncertainty ± {a.uncertainty_months:.1f} months", 20, fill=_SC_DIM)
        y += 8
        line(f"Sex {a.sex}", 22)
        if a.chronological_age_months is None:
            line("Chronological age: not in the DICOM header (PatientBirthDate, StudyDate)", 20, fill=_SC_DIM)
        else:
            c = a.chronological_age_months
            line(f"Chronological age {c:.1f} months ({format_months(c)})", 22)
            if a.difference_months is not None:
                line(f"Difference {_signed(a.difference_months, 1)} months", 22)
            if a.sd_score is not None:
                line(f"SD score {_signed(a.sd_score, 2)} ({a.flag_text})", 22, True)
                line("reference: Greulich & Pyle (Brush Foundation)", 18, fill=_SC_DIM)
        notes = [*(w for w in a.warnings if w not in a.cautions), *warnings]
    else:
        line("No bone age was estimated for this image.", 24, True, _SC_REFUSED)
        y += 6
        line(f"Reason: {reason}", 20)
        notes = list(warnings)
    if notes:
        y += 8
        for note in notes:
            line(f"• {note}", 16, fill=_SC_REFUSED)

    footer = [
        f"boneage model {model_version}".strip() + " · trained on RSNA Pediatric Bone Age data",
        "RESEARCH USE ONLY — not a medical device; not for diagnosis.",
    ]
    draw.text((margin, height - 80), footer[0], font=_font(18), fill=_SC_DIM)
    draw.text((margin, height - 50), footer[1], font=_font(22, True), fill=_SC_REFUSED)
    return np.asarray(page, dtype=np.uint8)
