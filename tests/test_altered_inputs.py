"""Issue #43 item 5: altered radiographs (a negative, a MONOCHROME1 file whose pixels were not inverted, a
wrist-only crop, a hand shuffled in blocks, a transposed hand) are corrected, refused or warned, and under a
warning that the image may not be what the model expects no advanced/delayed flag is shown as a finding."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from boneage.clinical import FLAG_WITHHELD, assess
from boneage.data.preprocess import bright_objects
from boneage.errors import BoneAgeInputError
from boneage.ood.frame import (
    LARGEST_SHARE_LIMIT,
    cut_reasons,
    edge_contacts,
    frame_measures,
    frame_sideways,
    frame_upright,
)
from boneage.ood.polarity import (
    POLARITY_CORRECT_LOG_RATIO,
    POLARITY_DOUBT_LOG_RATIO,
    polarity_log_ratio,
    polarity_verdict,
)

CAUTION = "the hand looks rotated or upside down (most likely upside down; upright probability 0.10)"


# ---- the rules, without a network ---------------------------------------------------------------------
def test_polarity_verdict_corrects_only_strong_evidence_and_refuses_the_doubtful_band() -> None:
    """A radiograph scores far better than its negative (log ratio < 0): assessed as given; a clear negative
    (log ratio > 2) is inverted back; in between, refused."""
    as_given = polarity_log_ratio(1.0, 3.0, 0.7, 9.0)
    negative = polarity_log_ratio(3.0, 1.0, 9.0, 0.7)
    assert as_given == pytest.approx(-negative) and as_given < 0
    assert polarity_verdict(as_given) == "as given"
    assert polarity_verdict(negative) == "inverted"
    assert polarity_verdict((POLARITY_DOUBT_LOG_RATIO + POLARITY_CORRECT_LOG_RATIO) / 2) == "in doubt"
    assert polarity_verdict(POLARITY_DOUBT_LOG_RATIO) == "as given"
    assert polarity_verdict(None) == "as given"  # a model without densities: no rule
    assert polarity_log_ratio(2.0, 1.0, None, None) == pytest.approx(np.log(2.0))  # pooled density only


def test_frame_measures_tell_a_whole_hand_from_a_cut_off_or_shuffled_one() -> None:
    """A bright object inside the frame is whole; one that meets the top edge over half its width is cut
    off; nine separate blocks are pieces (and so fragmented that no doubt is needed to say so)."""
    whole = np.zeros((300, 240), np.float32)
    whole[60:300, 70:170] = 0.8  # the forearm leaves by the bottom edge, the fingers end inside
    cut = np.zeros((300, 240), np.float32)
    cut[0:200, 60:180] = 0.8
    pieces = np.zeros((300, 240), np.float32)
    for r in range(3):
        for c in range(3):
            pieces[20 + 95 * r : 80 + 95 * r, 15 + 80 * c : 60 + 80 * c] = 0.8
    assert frame_measures(whole) == (0.0, 1.0)
    top, _ = frame_measures(cut)
    assert 0.4 < top < 0.6
    assert frame_measures(pieces)[1] < 0.2
    assert cut_reasons(whole, 0.1) == []
    assert any("top edge" in r for r in cut_reasons(cut, 0.1))
    assert cut_reasons(cut, 0.99) == []  # a cut frame alone: the probe must doubt too
    assert any("pieces" in r for r in cut_reasons(pieces, 0.99))
    assert frame_measures(np.zeros((50, 50), np.float32)) is None


def test_a_film_border_is_no_piece_of_the_hand() -> None:
    """A whole hand inside a thick bright film border: the border holds 42% of the bright area, yet the
    frame is not "in pieces", since the share is also read without the edge bands."""
    ringed = np.zeros((300, 240), np.float32)
    ringed[60:270, 70:170] = 0.8
    ringed[:15], ringed[-15:], ringed[:, :15], ringed[:, -15:] = 0.8, 0.8, 0.8, 0.8
    objects, _ = bright_objects(ringed)
    labels, count = ndimage.label(objects)
    assert count == 2 and np.bincount(labels.ravel())[1:].max() / objects.sum() < LARGEST_SHARE_LIMIT
    assert frame_measures(ringed)[1] == 1.0
    assert cut_reasons(ringed, 0.1) == []


def _drawn_hand() -> np.ndarray:
    """A bright hand on a dark frame: forearm leaving by the bottom edge, palm, four fingers apart."""
    hand = np.zeros((300, 240), np.float32)
    hand[200:300, 90:150] = 0.8  # forearm
    hand[110:200, 60:180] = 0.8  # palm
    for left in (62, 92, 122, 152):
        hand[30:110, left : left + 14] = 0.8  # fingers
    return hand


def test_only_a_hand_leaving_by_the_bottom_edge_makes_a_frame_upright() -> None:
    """The veto on a turned-hand warning: a hand-shaped object leaves by the bottom edge alone. Turned any
    way it does not; a bright band across the bottom joined to the forearm is trimmed, not read as the exit;
    a hand that also meets a side edge, a convex film panel meeting the bottom edge, or a flat frame is not
    vouched for."""
    hand = _drawn_hand()
    contacts = edge_contacts(hand)
    assert contacts is not None and contacts["solidity"] < 0.8
    assert {k: contacts[k] for k in ("top", "bottom", "left", "right")} == pytest.approx(
        {"top": 0, "bottom": 60 / 240, "left": 0, "right": 0}, abs=0.01
    )
    assert frame_upright(hand)
    for turned in (np.rot90(hand, 1), np.rot90(hand, 3), np.rot90(hand, 2), hand[::-1]):
        assert not frame_upright(np.ascontiguousarray(turned))
    banded = hand.copy()
    banded[285:] = 1.0
    assert frame_measures(banded)[0] == 0.0 and frame_upright(banded)
    assert edge_contacts(banded)["bottom"] == pytest.approx(60 / 240, abs=0.02)
    touching = hand.copy()
    touching[130:190, 0:60] = 0.8  # the hand meets the left edge over 20% of it
    assert not frame_upright(touching)
    panel = np.zeros((300, 240), np.float32)
    panel[80:300, 50:190] = 0.8
    assert edge_contacts(panel)["solidity"] > 0.95 and not frame_upright(panel)
    assert not frame_upright(np.zeros((50, 50), np.float32))


def test_a_hand_leaving_by_a_side_edge_alone_shows_a_quarter_turn() -> None:
    """The confirmation of a doubted turn: a hand-shaped object leaves by the right edge alone (turned 90
    degrees, as np.rot90 turns) or the left (270). Upright, upside down or turned 180 degrees it does not; a
    convex film panel, a hand also meeting the top edge, or a flat frame shows no turn."""
    hand = _drawn_hand()
    assert frame_sideways(np.ascontiguousarray(np.rot90(hand, 1))) == "turned 90 degrees"
    assert frame_sideways(np.ascontiguousarray(np.rot90(hand, 3))) == "turned 270 degrees"
    for same in (hand, np.rot90(hand, 2), hand[::-1]):
        assert frame_sideways(np.ascontiguousarray(same)) is None
    touching = np.rot90(hand, 1).copy()
    touching[0:40, 100:140] = 0.8  # joined to the palm, meeting the top edge too
    touching[40:80, 110:130] = 0.8
    assert edge_contacts(touching)["top"] >= 0.1 and frame_sideways(touching) is None
    panel = np.zeros((240, 300), np.float32)
    panel[50:190, 80:300] = 0.8
    assert edge_contacts(panel)["solidity"] > 0.95 and frame_sideways(panel) is None
    assert frame_sideways(np.zeros((50, 50), np.float32)) is None


def test_a_caution_withholds_the_flag_but_keeps_the_sd_score_and_leads_the_warnings() -> None:
    """z = +2.5 would be "advanced"; under a caution the flag is None and says why, the SD score stays, and
    the caution comes first among the warnings, before informational notes."""
    plain = assess(150.0, "male", 120.0)
    assert plain.flag == "advanced" and plain.flag_withheld is None and plain.cautions == []
    doubted = assess(150.0, "male", 120.0, warnings=["right hand mirrored"], cautions=[CAUTION])
    assert doubted.flag is None and doubted.flag_withheld == FLAG_WITHHELD
    assert doubted.flag_text == FLAG_WITHHELD
    assert doubted.sd_score == pytest.approx(plain.sd_score)
    assert doubted.warnings == [CAUTION, "right hand mirrored"]
    data = json.loads(json.dumps(doubted.to_dict()))
    assert data["flag"] is None and data["flag_withheld"].startswith("not shown")
    assert data["cautions"] == [CAUTION] and data["warnings"][0] == CAUTION
    assert "flag_withheld" in plain.to_dict() and plain.to_dict()["cautions"] == []


def test_report_and_result_page_lead_with_the_caution(tmp_path: Path) -> None:
    """The HTML report puts the caution before the bone age and shows no advanced/delayed flag; the result
    page has the caution box before its headline and renders ``flag_withheld``; the DICOM result image
    draws the caution."""
    from importlib import resources

    from boneage.report import secondary_capture_pixels, write_html_report

    a = assess(150.0, "male", 120.0, cautions=[CAUTION])
    png = tmp_path / "r.png"
    Image.fromarray(np.full((64, 64), 128, np.uint8)).save(png)
    html = write_html_report(a, png.read_bytes(), None, tmp_path, "doubted").read_text(encoding="utf-8")
    assert html.index("upside down") < html.index("Predicted bone age")
    assert "not shown" in html and 'class="flag-advanced"' not in html and ">advanced<" not in html
    page = resources.files("boneage").joinpath("static", "index.html").read_text(encoding="utf-8")
    assert page.index('id="cautions"') < page.index('class="headline"')
    script = resources.files("boneage").joinpath("static", "app.js").read_text(encoding="utf-8")
    assert "flag_withheld" in script and "r.cautions" in script
    with_caution = secondary_capture_pixels(a, None)
    without = secondary_capture_pixels(assess(150.0, "male", 120.0), None)
    assert (with_caution != without).any()


# ---- the bundled model on real held-out hands ---------------------------------------------------------
@pytest.fixture(scope="module")
def plain_model():
    from boneage.predict import load_predictor

    return load_predictor(tta=False)  # the rules judge the plain view; the views' spread is another rule


@pytest.fixture(scope="module")
def hands(shared_sample: Path) -> dict[str, np.ndarray]:
    """Three held-out hands (never trained on) of the OOD battery's altered set."""
    return {
        i: np.asarray(Image.open(shared_sample / "images" / f"{i}.png").convert("L"))
        for i in ("1558", "5133", "9574")
    }


def _save(tmp_path: Path, name: str, img: np.ndarray) -> Path:
    path = tmp_path / f"{name}.png"
    Image.fromarray(np.ascontiguousarray(img)).save(path)
    return path


@pytest.mark.integration
def test_negatives_and_unconverted_monochrome1_files_are_inverted_back_or_refused(
    plain_model, hands: dict[str, np.ndarray], tmp_path: Path
) -> None:
    """A negative of a real hand, as a PNG or as a MONOCHROME1 DICOM holding the bone-bright pixels, is never
    assessed as it stands: inverted back (the radiograph's own bone age, a note, the flag kept) or refused
    with one line; the hand itself is assessed untouched."""
    from conftest import write_dicom

    corrected = 0
    for image_id, img in hands.items():
        original = plain_model.predict(_save(tmp_path, image_id, img), "female")
        assert not original.inverted and not original.cautions, original.warnings
        negative = _save(tmp_path, f"{image_id}-negative", 255 - img)
        dicom = write_dicom(tmp_path / f"{image_id}.dcm", img, photometric="MONOCHROME1", PatientSex="F")
        for path in (negative, dicom):
            try:
                pred = plain_model.predict(path, "female")
            except BoneAgeInputError as exc:
                assert "may be a negative" in str(exc) and "\n" not in str(exc)
                continue
            assert pred.inverted, (path.name, pred.warnings)
            assert any("assessed inverted back" in w for w in pred.warnings)
            assert abs(pred.bone_age_months - original.bone_age_months) < 3.0
            corrected += 1
    assert corrected >= 4  # most negatives are clear enough to correct, not only to refuse


@pytest.mark.integration
def test_an_upright_hand_taken_for_turned_is_not_warned_but_its_turns_are(
    plain_model, shared_sample: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Held-out 6538 is an upright hand that the probe and the density of its turned image take for a
    turned one (v0.12.0 warned it). Its forearm leaves by the bottom edge, so no turn is warned; without
    that veto it is. Turned by 90 degrees or upside down it is still warned, or refused."""
    img = np.asarray(Image.open(shared_sample / "images" / "6538.png").convert("L"))
    path = _save(tmp_path, "6538", img)
    assert plain_model.predict(path, "female").cautions == []
    with monkeypatch.context() as m:
        m.setattr("boneage.predict.predictor.frame_upright", lambda frame: False)
        vetoless = plain_model.predict(path, "female")
    assert any("rotated or upside down" in c for c in vetoless.cautions), vetoless.warnings
    for name, turned in {"rot90": np.rot90(img), "upside-down": img[::-1]}.items():
        try:
            pred = plain_model.predict(_save(tmp_path, f"6538-{name}", turned), "female")
        except BoneAgeInputError as exc:
            assert "\n" not in str(exc)
            continue
        assert any("rotated or upside down" in c for c in pred.cautions), (name, pred.warnings)


@pytest.mark.integration
def test_a_quarter_turned_hand_the_density_does_not_confirm_is_warned_from_its_frame(
    plain_model, shared_sample: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Held-out 11838 turned by 90 degrees: the probe doubts it (upright 0.03) but the density scores it
    better as given than turned back, so v0.12.0 gave a bone age with no caution. Its forearm leaves by the
    right edge, which confirms the turn; without that confirmation it passes. Upright, it is not warned."""
    img = np.asarray(Image.open(shared_sample / "images" / "11838.png").convert("L"))
    turned = _save(tmp_path, "11838-rot90", np.ascontiguousarray(np.rot90(img)))
    pred = plain_model.predict(turned, "female")
    side = "the hand looks rotated or upside down (the forearm leaves by a side edge: most likely turned 90"
    assert pred.cautions and pred.cautions[0].startswith(side), pred.warnings
    assert "\n" not in pred.cautions[0]
    assert plain_model.predict(_save(tmp_path, "11838", img), "female").cautions == []
    with monkeypatch.context() as m:
        m.setattr("boneage.predict.predictor.frame_sideways", lambda frame: None)
        assert plain_model.predict(turned, "female").cautions == []


@pytest.mark.integration
def test_cut_shuffled_and_transposed_hands_are_refused_or_warned_and_lose_the_flag(
    plain_model, hands: dict[str, np.ndarray], tmp_path: Path
) -> None:
    """A wrist-only crop, a hand shuffled in 128 px blocks and a transposed hand read as a young or old child
    (issue #43: 32.3 months "delayed", 38.3 "delayed", 106.9 "advanced"): each is refused, or assessed with a
    caution, and then no advanced/delayed flag is shown."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from ood_battery import block_shuffle, wrist_crop

    from boneage.assessment import assess_image

    rng = np.random.default_rng(0)
    warned, missed = 0, set()
    for image_id, img in hands.items():
        for kind, altered in (
            ("wrist", wrist_crop(img)),
            ("shuffled", block_shuffle(img, rng)),
            ("transposed", img.T),
        ):
            path = _save(tmp_path, f"{image_id}-{kind}", altered)
            try:
                result = assess_image(plain_model, path, "female", "12y", heatmap=False)
            except BoneAgeInputError as exc:
                assert "does not look like" in str(exc) and "\n" not in str(exc)
                continue
            a = result.assessment
            if not a.cautions:
                missed.add((image_id, kind))
                continue
            assert a.flag is None and a.flag_withheld == FLAG_WITHHELD and a.sd_score is not None
            assert result.to_dict()["flag"] is None
            warned += 1
    assert warned >= 3  # the warning path itself is exercised, not only refusals
    # still open: this 3 x 3 shuffle of a small film on a grey ground joins into one bright object and the
    # probe doubts it only mildly (0.36), so no check sees it; it reads 21.8 months. A fix flips this.
    assert missed <= {("5133", "shuffled")}, missed


@pytest.mark.integration
def test_batch_csv_and_cli_text_show_the_withheld_flag(hands: dict[str, np.ndarray], tmp_path: Path) -> None:
    """The batch CSV's flag column and the CLI's text say "not shown" for a cut-off hand, and the caution is
    printed before the result line."""
    import sys

    from typer.testing import CliRunner

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from ood_battery import wrist_crop

    from boneage.cli.main import app

    path = _save(tmp_path, "wrist", wrist_crop(hands["1558"]))
    out = tmp_path / "out.csv"
    args = ["predict", str(path), "--sex", "female", "--age", "12y", "--no-tta", "--no-heatmap"]
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    row = next(csv.DictReader(out.open()))
    assert row["flag"].startswith("not shown"), row
    shown = CliRunner().invoke(app, args)
    assert shown.exit_code == 0, shown.output
    assert "caution:" in shown.output and "not shown" in shown.output
    assert shown.output.index("caution:") < shown.output.index(": bone age")
