"""Metrics in months on hand-computed numbers, the two plots, and evaluate() over a labelled folder."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import make_tiny_predictor
from PIL import Image

from boneage.data.labels import read_labels
from boneage.errors import BoneAgeInputError
from boneage.evaluation import (
    EvaluationReport,
    age_band,
    align_predictions,
    evaluate,
    metrics,
    plot_predictions,
)

PRED = np.array([10.0, 36.0, 95.0, 210.0, 120.0])
REF = np.array([12.0, 30.0, 100.0, 200.0, 120.0])  # errors: -2, +6, -5, +10, 0
MALE = np.array([True, False, True, False, False])


def test_metrics_by_hand() -> None:
    m = metrics(PRED, REF, MALE)
    assert m["n"] == 5
    assert m["mae_months"] == pytest.approx((2 + 6 + 5 + 10 + 0) / 5)
    assert m["rmse_months"] == pytest.approx(math.sqrt((4 + 36 + 25 + 100 + 0) / 5))
    assert m["median_ae_months"] == pytest.approx(5.0)
    assert m["bias_months"] == pytest.approx((-2 + 6 - 5 + 10 + 0) / 5)
    assert m["mae_baseline_mean_months"] == pytest.approx(np.mean(np.abs(REF - REF.mean())))
    assert m["mae_by_sex"] == {
        "female": {"n": 3, "mae_months": pytest.approx((6 + 10 + 0) / 3)},
        "male": {"n": 2, "mae_months": pytest.approx((2 + 5) / 2)},
    }
    # 2-year bands of the reference age: 12 → 0-2y, 30 → 2-4y, 100 → 8-10y, 120 → 10-12y, 200 → 16-18y
    assert list(m["mae_by_age_band"]) == ["0-2y", "2-4y", "8-10y", "10-12y", "16-18y"]  # ordered by age
    assert m["mae_by_age_band"]["2-4y"] == {"n": 1, "mae_months": pytest.approx(6.0)}
    assert m["mae_by_age_band"]["16-18y"] == {"n": 1, "mae_months": pytest.approx(10.0)}
    assert sum(b["n"] for b in m["mae_by_age_band"].values()) == 5


def test_metrics_groups_share_a_band() -> None:
    m = metrics([30, 40, 50], [24, 47, 40])  # all in 2-4y
    assert m["mae_by_age_band"] == {"2-4y": {"n": 3, "mae_months": pytest.approx((6 + 7 + 10) / 3)}}
    assert "mae_by_sex" not in m


def test_perfect_and_empty() -> None:
    m = metrics(REF, REF, MALE)
    assert m["mae_months"] == 0 and m["rmse_months"] == 0 and m["bias_months"] == 0
    empty = metrics(np.array([]), np.array([]))
    assert empty["n"] == 0 and math.isnan(empty["mae_months"]) and empty["mae_by_age_band"] == {}


def test_age_band_edges() -> None:
    assert list(age_band(np.array([0, 23.9, 24, 47.99, 48, 239]))) == [
        "0-2y",
        "0-2y",
        "2-4y",
        "2-4y",
        "4-6y",
        "18-20y",
    ]
    assert list(age_band(np.array([35.0]), width_years=3)) == ["0-3y"]


def test_report_table() -> None:
    report = EvaluationReport(pd.DataFrame(), metrics(PRED, REF, MALE))
    table = report.table()
    assert list(table.columns) == ["group", "value", "n", "mae_months"]
    assert table.iloc[0].tolist() == ["all", "all", 5, pytest.approx(4.6)]
    assert set(table["group"]) == {"all", "sex", "age band"}
    assert len(table) == 1 + 2 + 5


def _is_png(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        return im.size


def test_plots_are_valid_pngs(tmp_path: Path) -> None:
    preds = pd.DataFrame({"boneage": REF, "predicted": PRED, "male": MALE})
    paths = plot_predictions(preds, tmp_path / "plots", title="tiny")
    assert [p.name for p in paths] == ["pred_vs_ref.png", "bland_altman.png"]
    for path in paths:
        assert path.is_file()
        width, height = _is_png(path)
        assert width > 200 and height > 200


def test_plots_of_one_point(tmp_path: Path) -> None:
    preds = pd.DataFrame({"boneage": [100.0], "predicted": [90.0], "male": [True]})
    for path in plot_predictions(preds, tmp_path):
        _is_png(path)


def test_prediction_tables_pair_on_shared_ids_and_refuse_other_images() -> None:
    """The one check behind the paired ship rule and the pairing benchmarks: ids both tables hold, in the
    first table's order; a shared id with another reference age means other images, so nothing is paired."""
    a = pd.DataFrame({"boneage": [100.0, 120.0, 140.0], "predicted": [101, 118, 150]}, index=["1", "2", "3"])
    b = pd.DataFrame({"boneage": [140, 120, 160], "predicted": [141.0, 121.0, 159.0]}, index=["3", "2", "4"])
    ref, preds = align_predictions([("a.csv", a), ("b.csv", b)])
    assert ref.index.tolist() == ["2", "3"] and ref.tolist() == [120.0, 140.0]
    assert preds[0].tolist() == [118, 150] and preds[1].tolist() == [121.0, 141.0]
    with pytest.raises(BoneAgeInputError, match=r"b.csv: its ids differ from a.csv's \(3 vs 3\)"):
        align_predictions([("a.csv", a), ("b.csv", b)], same_ids=True)
    relabelled = b.assign(boneage=[140, 132, 160])  # id 2 carries another age: another image
    with pytest.raises(BoneAgeInputError, match="c.csv and a.csv disagree on the reference ages of 1 shared"):
        align_predictions([("a.csv", a), ("c.csv", relabelled)])
    with pytest.raises(BoneAgeInputError, match="twice.csv: id 2 appears more than once"):
        align_predictions([("a.csv", a), ("twice.csv", pd.concat([b, b.loc[["2"]]]))])
    same, both = align_predictions([("a.csv", a), ("a.csv", a)], same_ids=True)  # a file with itself
    assert len(same) == 3 and (both[0] == both[1]).all()


@pytest.mark.integration
def test_evaluate_folder_with_and_without_cache(shared_sample: Path, tmp_path: Path) -> None:
    labels = (
        read_labels(shared_sample / "labels.csv", shared_sample / "images").iloc[:6].reset_index(drop=True)
    )
    predictor = make_tiny_predictor(size=32)
    direct = evaluate(predictor, labels, progress=False)
    cached = evaluate(predictor, labels, cache_dir=tmp_path, progress=False)
    assert list(direct.predictions.columns) == ["id", "boneage", "male", "predicted", "uncertainty", "error"]
    assert direct.predictions["id"].tolist() == labels["id"].astype(str).tolist()
    np.testing.assert_allclose(direct.predictions["predicted"], cached.predictions["predicted"], atol=1e-3)
    assert direct.metrics["n"] == 6
    errors = direct.predictions["predicted"] - direct.predictions["boneage"]
    np.testing.assert_allclose(direct.predictions["error"], errors)
    assert direct.metrics["mae_months"] == pytest.approx(np.abs(errors).mean(), abs=1e-2)
    assert (direct.predictions["uncertainty"] >= 0).all()


def test_the_one_paired_difference_aligns_ids() -> None:
    """Two models' absolute errors paired by id, whatever their order, before differencing; its mean and
    standard error are ``mean_and_se``'s, the arithmetic every ship rule uses."""
    from boneage.evaluation import mean_and_se, paired_difference

    a = pd.Series([1.0, 2.0, 3.0, 4.0], index=["a", "b", "c", "d"])
    b = pd.Series([3.5, 2.5, 1.5, 0.5, 9.0], index=["d", "c", "b", "a", "e"])  # "e" is not in a: left out
    out = paired_difference(a, b)
    assert out["n"] == 4 and out["mae_a"] == 2.5 and out["mae_b"] == 2.0
    assert out["diff_b_minus_a"] == -0.5 and out["diff_se"] == 0.0 and out["corr_abs_errors"] == 1.0
    d = np.array([0.5, -1.0, 2.0, 0.25, -0.75])
    mean, se = mean_and_se(d)
    assert mean == pytest.approx(0.2) and se == pytest.approx(np.std(d, ddof=1) / np.sqrt(5))
    x = pd.Series([3.0, 4.0, 1.0, 2.0, 5.0], index=list("abcde"))
    out = paired_difference(x, x + d)
    assert out["diff_b_minus_a"] == round(mean, 3) and out["diff_se"] == round(se, 3)


def test_compare_prediction_files_pairs_by_id_and_refuses_other_images(tmp_path: Path) -> None:
    from boneage.evaluation import compare_prediction_files

    a, b, c = tmp_path / "a.csv", tmp_path / "b.csv", tmp_path / "c.csv"
    pd.DataFrame({"id": ["1", "2", "3"], "boneage": [100, 120, 140], "predicted": [104, 118, 140]}).to_csv(
        a, index=False
    )
    pd.DataFrame({"id": ["3", "2", "1"], "boneage": [140, 120, 100], "predicted": [141, 121, 101]}).to_csv(
        b, index=False
    )
    out = compare_prediction_files(a, b)
    assert out["n"] == 3 and out["mae_a"] == 2.0 and out["mae_b"] == 1.0
    assert out["diff_b_minus_a"] == -1.0  # errors 4, 2, 0 against 1, 1, 1
    pd.DataFrame({"id": ["1"], "boneage": [99], "predicted": [99]}).to_csv(c, index=False)
    with pytest.raises(BoneAgeInputError, match="disagree"):
        compare_prediction_files(a, c)
    with pytest.raises(BoneAgeInputError, match="no m2 column"):
        compare_prediction_files(a, b, "m2")
