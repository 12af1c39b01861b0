"""The analyses behind the paired comparisons, the crop-geometry figures, the fit gap and the later
benchmarks (benchmarks/fit_paired.py, crop_geometry.py, fit_gap.py, ...): the numbers in the docs come from
these functions, so their arithmetic is checked on inputs whose answer is known."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    if str(BENCH) not in sys.path:  # fit_paired imports its sibling crop_geometry, as when run as a script
        sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paired_difference_and_its_link_to_padding() -> None:
    fit = _load("fit_paired")
    rng = np.random.default_rng(0)
    n = 300
    pad_share = np.linspace(0.0, 0.3, n)
    ids = [str(i) for i in range(n)]
    base = pd.Series(rng.uniform(2, 12, n), index=ids)
    # stretch is 1 month better where there is no padding and 1 month worse at 30% padding, for both seeds
    effect = -1 + pad_share / 0.3 * 2
    errs = {
        "pad": base,
        "pad-seed-7": base + 0.2,
        "stretch": base + effect,
        "stretch-seed-7": base + 0.2 + effect,
    }
    out = fit.paired(errs, pad_share)
    assert out["n"] == n
    assert out["diff_stretch_minus_pad"] == pytest.approx(effect.mean(), abs=1e-3)
    assert out["diff_per_10pct_padding"] == pytest.approx(2 / 3, abs=1e-3)  # 2 months per 30 points
    assert out["corr_diff_padding"] == pytest.approx(1.0, abs=1e-3)
    thirds = out["diff_by_padding_third"]
    assert [t["n"] for t in thirds] == [100, 100, 100]
    assert thirds[0]["diff"] < -0.5 < 0.5 < thirds[2]["diff"]
    assert out["mae_pad"] == pytest.approx(float(base.mean() + 0.1), abs=1e-3)


def test_crop_geometry_measures_a_known_box(tmp_path: Path) -> None:
    geo = _load("crop_geometry")
    img = np.zeros((299, 299), dtype=np.uint8)
    img[40:280, 90:210] = 200  # a bright 240 x 120 "hand"
    path = tmp_path / "1.jpg"
    Image.fromarray(img).save(path)
    ((h, w),) = geo.boxes([path])
    # hand_box adds a 4% margin on each side
    assert 240 <= h <= 240 + 2 * 0.04 * 299 + 2 and 120 <= w <= 120 + 2 * 0.04 * 299 + 2
    s = geo.summary(np.array([[240.0, 120.0], [200.0, 200.0]]))
    assert s["long_side_px"]["mean"] == 220.0
    assert s["padding_share"]["mean"] == 0.25  # 50% of the square for the first box, none for the second
    assert s["share_long_side_below_299"] == 1.0 and s["taller_than_wide"] == 0.5
    fp = _load("fit_paired")
    assert fp.padding_share(pd.Series([path]))[0] == pytest.approx(1 - w / h)


def test_fit_gap_summary_on_known_errors() -> None:
    """The fitted-vs-unseen figures of benchmarks/fit_gap.py: MAE, bias, the worst-5% share, age bands."""
    gap = _load("fit_gap")
    age = np.array([30.0] * 10 + [100.0] * 10 + [150.0] * 80 + [220.0] * 100)
    err = np.concatenate(
        [np.full(10, 4.0), np.full(10, -2.0), np.full(80, 1.0), np.full(90, -1.0), np.full(10, 20.0)]
    )
    preds = pd.DataFrame({"boneage": age, "predicted": age + err})
    out = gap.summary(preds)
    assert out["n"] == 200
    assert out["mae"] == pytest.approx(np.abs(err).mean())
    assert out["bias"] == pytest.approx(err.mean(), abs=1e-3)
    # the worst 5% (10 images) are the ten 20-month errors: 200 of 470 months of error
    assert out["share_of_error_in_worst_5pct"] == pytest.approx(200 / np.abs(err).sum(), abs=1e-3)
    bands = out["mae_by_age_band"]
    assert set(bands) == {"0-60m", "60-120m", "120-168m", "204-300m"}  # an empty band is left out
    assert bands["0-60m"] == {"n": 10, "mae": 4.0, "bias": 4.0}
    assert bands["60-120m"]["bias"] == -2.0
    assert bands["204-300m"]["mae"] == pytest.approx(2.9)  # 90 x 1 + 10 x 20 over 100


def test_paired_runs_difference_aligns_ids() -> None:
    """benchmarks/paired_runs.py pairs two runs' errors by id, whatever their order, before differencing."""
    pr = _load("paired_runs")
    a = pd.Series([1.0, 2.0, 3.0, 4.0], index=["a", "b", "c", "d"])
    b = pd.Series([3.5, 2.5, 1.5, 0.5, 9.0], index=["d", "c", "b", "a", "e"])  # "e" is not in a: left out
    out = pr.difference(a, b)
    assert out["n"] == 4
    assert out["mae_a"] == 2.5 and out["mae_b"] == 2.0
    assert out["diff_b_minus_a"] == -0.5  # every image 0.5 better in b
    assert out["diff_se"] == 0.0 and out["corr_abs_errors"] == 1.0


def test_paired_benchmarks_share_one_arithmetic() -> None:
    """fit_paired.mean_and_se is the mean and standard error every paired benchmark reports: the same
    figures from paired_runs.difference and readout_check.paired, each in its committed rounding."""
    fp, pr, ro = _load("fit_paired"), _load("paired_runs"), _load("readout_check")
    d = np.array([0.5, -1.0, 2.0, 0.25, -0.75])
    mean, se = fp.mean_and_se(d)
    assert mean == pytest.approx(0.2) and se == pytest.approx(np.std(d, ddof=1) / np.sqrt(5))
    a = pd.Series([3.0, 4.0, 1.0, 2.0, 5.0], index=list("abcde"))
    out = pr.difference(a, a + d)
    assert out["diff_b_minus_a"] == round(mean, 3) and out["diff_se"] == round(se, 3)
    ref = np.zeros(5)
    stats = ro.paired(a.to_numpy(), (a + d).to_numpy(), ref)  # all positive: |b| - |a| = d
    assert stats["median_minus_mean"] == round(mean, 4) and stats["standard_error"] == round(se, 4)


def test_paired_preds_pairs_two_prediction_files(tmp_path: Path) -> None:
    """benchmarks/paired_preds.py: two prediction CSVs paired by id; files of other images are refused."""
    pp = _load("paired_preds")
    a = tmp_path / "a.csv"
    b = tmp_path / "b.csv"
    pd.DataFrame({"id": ["1", "2", "3"], "boneage": [100, 120, 140], "predicted": [104, 118, 140]}).to_csv(
        a, index=False
    )
    pd.DataFrame({"id": ["3", "2", "1"], "boneage": [140, 120, 100], "predicted": [141, 121, 101]}).to_csv(
        b, index=False
    )
    out = pp.compare(a, b)
    assert out["n"] == 3 and out["mae_a"] == 2.0 and out["mae_b"] == 1.0
    assert out["diff_b_minus_a"] == -1.0  # errors 4, 2, 0 against 1, 1, 1
    c = tmp_path / "c.csv"
    pd.DataFrame({"id": ["1"], "boneage": [99], "predicted": [99]}).to_csv(c, index=False)
    with pytest.raises(SystemExit, match="disagree"):
        pp.compare(a, c)


def test_paired_preds_compares_two_columns_of_one_ensemble_file(tmp_path: Path) -> None:
    """A member against the mean in ensemble_check.py's per-split file; a missing column is named."""
    pp = _load("paired_preds")
    f = tmp_path / "preds_val_split.csv"
    pd.DataFrame(
        {
            "id": ["1", "2"],
            "boneage": [100, 120],
            "male": [True, False],
            "m1": [110, 120],
            "ensemble": [105, 119],
        }
    ).to_csv(f, index=False)
    out = pp.compare(f, f, "m1", "ensemble")  # |errors| 10, 0 against 5, 1
    assert out["a"].endswith(":m1") and out["b"].endswith(":ensemble")
    assert out["mae_a"] == 5.0 and out["mae_b"] == 3.0 and out["diff_b_minus_a"] == -2.0
    with pytest.raises(SystemExit, match="no m2 column"):
        pp.compare(f, f, "m2", "ensemble")


def test_median_readout_of_known_distributions() -> None:
    torch = pytest.importorskip("torch")
    readout = _load("readout_check")
    centres = torch.linspace(0, 240, 121)
    one = torch.full((1, 121), -1e9)
    one[0, 60] = 0  # all mass in the 120-month cell [119, 121]: the median is its middle
    two = torch.full((1, 121), -1e9)
    two[0, 60:62] = 0  # half in 120's cell, half in 122's: the median is their shared edge
    skewed = torch.full((1, 121), -1e9)
    skewed[0, 0] = np.log(0.6)  # 60% at 0 months, 40% at 100: mean 40, median inside the first cell
    skewed[0, 50] = np.log(0.4)
    got = readout.median_months(torch.cat([one, two, skewed]), centres)
    assert got.tolist() == pytest.approx([120.0, 121.0, -1 + 2 * 0.5 / 0.6], abs=1e-4)
    a, b, ref = np.array([1.0, 5.0]), np.array([2.0, 5.0]), np.array([0.0, 0.0])
    stats = readout.paired(a, b, ref)
    assert stats["median_minus_mean"] == pytest.approx(0.5) and stats["mae_mean_readout"] == 3.0


def test_label_grid_rounding_error() -> None:
    grid_mod = _load("label_grid")
    grid = np.array([0.0, 6.0, 12.0, 24.0])
    # an even 6-month grid: a seen age spread over +-3 months averages 1.5 from the label
    assert grid_mod.rounding_error(grid, np.array([6.0]))[0] == pytest.approx(1.5)
    # between gaps of 6 and 12 (cell -3..+6): (36 + 144) / (4 * 18) = 2.5
    assert grid_mod.rounding_error(grid, np.array([12.0]))[0] == pytest.approx(2.5)
    # the end cells mirror their inner gap
    assert grid_mod.rounding_error(grid, np.array([0.0, 24.0])).tolist() == pytest.approx([1.5, 3.0])


def test_duplicate_radiographs_finds_a_reencoded_copy_and_nothing_else(tmp_path: Path) -> None:
    """benchmarks/duplicate_radiographs.py: a film saved again (resized, JPEG) pairs with itself only."""
    dup = _load("duplicate_radiographs")
    rng = np.random.default_rng(0)
    paths = []
    for k in range(4):
        img = (rng.random((64, 64)) * 255).astype(np.uint8)
        img = np.kron(img[::8, ::8], np.ones((8, 8), np.uint8))  # blocky, so it survives 48 px thumbnails
        p = tmp_path / f"{k}.png"
        Image.fromarray(img).save(p)
        paths.append(p)
    copy = tmp_path / "copy.jpg"
    Image.open(paths[2]).resize((80, 80)).save(copy, quality=60)
    paths.append(copy)
    pairs, nearest = dup.scan(dup.thumbnails(paths), threshold=0.95, block=2)  # self-pairs excluded
    assert [(i, j) for i, j, _ in pairs] == [(2, 4)] and pairs[0][2] > 0.99
    assert nearest[[2, 4]].tolist() == pytest.approx([pairs[0][2]] * 2) and (nearest[[0, 1, 3]] < 0.95).all()


def test_shared_error_separates_a_shared_error_from_each_model_s_own(tmp_path: Path) -> None:
    """benchmarks/shared_error.py: errors +2/-2 that cancel in the mean, then one every model shares."""
    se = _load("shared_error")
    ids = ["1", "2", "3", "4"]
    ref = [100.0, 120.0, 140.0, 160.0]
    own = {"a": [2, -2, 2, -2], "b": [-2, 2, -2, 2]}
    files = []
    for name, e in own.items():
        f = tmp_path / f"{name}.csv"
        pd.DataFrame({"id": ids, "boneage": ref, "predicted": np.add(ref, e)}).to_csv(f, index=False)
        files.append(f)
    out = se.shared_error(files)
    assert (
        out["n_images"] == 4
        and out["mae_of_mean"] == 0.0
        and out["error_correlation_min_max"] == [-1.0, -1.0]
    )
    assert out["mean_spread_across_models_sd"] == pytest.approx(2.828, abs=1e-3)  # sd of {+2, -2}
    shared = tmp_path / "shared.csv"
    pd.DataFrame({"id": ids, "boneage": ref, "predicted": np.add(ref, 5.0)}).to_csv(shared, index=False)
    out = se.shared_error([shared, shared])
    assert out["mae_of_mean"] == 5.0 and out["mean_spread_across_models_sd"] == 0.0
    other = tmp_path / "other.csv"
    pd.DataFrame({"id": ids, "boneage": [0.0] * 4, "predicted": ref}).to_csv(other, index=False)
    with pytest.raises(SystemExit, match="disagree"):
        se.shared_error([shared, other])


def test_ensemble_table_means_members_on_shared_ids_and_refuses_other_images() -> None:
    ens = _load("ensemble_check")
    from boneage.errors import BoneAgeInputError

    a = pd.DataFrame(
        {"boneage": [100.0, 50.0, 20.0], "male": [True, False, True], "predicted": [104.0, 47.0, 20.0]},
        index=pd.Index(["3", "1", "2"], name="id"),
    )
    b = pd.DataFrame(  # answered id 1 and 3 only, in another order
        {"boneage": [50.0, 100.0], "male": [False, True], "predicted": [53.0, 98.0]},
        index=pd.Index(["1", "3"], name="id"),
    )
    table = ens.ensemble_table({"a": a, "b": b}, "val_split")
    assert table["id"].tolist() == ["1", "3"]
    assert table["boneage"].tolist() == [50.0, 100.0]
    assert table["male"].tolist() == [False, True]
    assert table["ensemble"].tolist() == [50.0, 101.0]
    b.loc["3", "boneage"] = 112.0  # same id, another image: averaging it would compare nothing
    with pytest.raises(BoneAgeInputError, match="disagree on the reference ages of 1 shared ids"):
        ens.ensemble_table({"a": a, "b": b}, "val_split")


def test_native_geometry_halves_split_by_id_parity() -> None:
    geo = _load("native_geometry")
    a, b = geo.halves(pd.Index(["1377", "1378", "2000", "15611"]))
    assert sorted(a) == ["1378", "2000"] and sorted(b) == ["1377", "15611"]
    assert geo.arm_name((512, 352)) == "squash512_in352"


def test_native_geometry_rule_chooses_on_even_ids_and_confirms_on_odd_ones() -> None:
    geo = _load("native_geometry")
    rng = np.random.default_rng(0)
    ids = pd.Index([str(i) for i in range(1000, 1400)])
    even = np.array([int(i) % 2 == 0 for i in ids])
    base = pd.Series(rng.uniform(2, 12, len(ids)), index=ids)
    errors = {arm: {"native": base + 0.5} for arm in geo.CANDIDATES}
    errors[geo.INCUMBENT] = {"native": base, "val_split": base.iloc[:100]}
    best = (384, 352)  # better by 1 month on the even ids, by 0.5 on the odd ones
    errors[best]["native"] = base - np.where(even, 1.0, 0.5)
    wobble = np.tile([0.3, -0.3], 50)  # level with the incumbent on the split, with some noise
    errors[best]["val_split"] = base.iloc[:100] + wobble
    result = geo.decide(errors)
    assert result["chosen_on_half_a"] == "squash384_in352"
    assert result["n"]["half_a"] == result["n"]["half_b"] == 200
    assert result["half_b_confirms"] and result["val_split_not_worse_by_1se"]
    assert result["decision"] == "ship squash384_in352 as v0.12.1"
    errors[best]["val_split"] = base.iloc[:100] + 1.0 + wobble  # a month worse on small files
    assert not geo.decide(errors)["val_split_not_worse_by_1se"]
    assert geo.decide(errors)["decision"] == "v0.12.0 stays as it is"
    errors[best]["val_split"] = base.iloc[:100] + wobble
    errors[best]["native"] = base - np.where(even, 1.0, -0.2)  # chosen on half A, worse on half B
    result = geo.decide(errors)
    assert result["chosen_on_half_a"] == "squash384_in352" and not result["half_b_confirms"]
    assert result["decision"] == "v0.12.0 stays as it is"


def test_label_noise_floor_recovers_a_known_noise_and_model_error() -> None:
    floor = _load("label_noise_floor")
    n, m, k = 5.0, 3.0, 6  # a reading's error, a model's error against the truth, readers in the reference
    single, reference = float(np.hypot(m, n)), float(np.hypot(m, n / np.sqrt(k)))
    assert floor.label_noise(single, reference, k) == pytest.approx(n)
    assert floor.label_noise(float(np.hypot(m, n)), m, 0) == pytest.approx(n)  # an exact reference
    est = floor.estimate(single, reference, k, ours=single, target=6.0, others={"same": reference})
    assert est["single_report_noise"] == pytest.approx(n, abs=0.005)
    assert est["winner_error_vs_truth"] == pytest.approx(m, abs=0.005)
    assert est["ours_implied_error_vs_truth"] == pytest.approx(m, abs=0.005)
    assert est["error_vs_truth_needed_for_target"] == pytest.approx(np.sqrt(36 - 25), abs=0.005)
    assert est["other_models"]["same"]["expected_mad_vs_single_reports"] == pytest.approx(single, abs=0.005)
    assert floor.truth_error(4.0, n) != floor.truth_error(4.0, n)  # NaN: the labels' noise exceeds the MAE
    with pytest.raises(ValueError):
        floor.label_noise(4.0, 5.0, k)
    with pytest.raises(ValueError):
        floor.label_noise(6.0, 5.0, 1)


def test_silhouette_share_measures_a_known_hand_and_a_dim_one(tmp_path: Path) -> None:
    """A soft-tissue palm with brighter bones fills a known share of its crop; a bright marker beside a dim
    hand sets the contrast stretch's top and leaves the hand's 95th percentile low: the 'dim hands' count."""
    sil = _load("silhouette_share")
    img = np.full((299, 299), 10, dtype=np.uint8)
    img[60:290, 100:200] = 90  # palm and forearm: soft tissue
    img[80:280, 140:160] = 200  # a bone
    Image.fromarray(img).save(tmp_path / "hand.jpg")
    dim = img // 2
    dim[62:82, 102:125] = 255  # a lead marker on the film beside the fingers, inside the crop box
    Image.fromarray(dim).save(tmp_path / "dim.jpg")
    (share, p95), (_, p95_dim) = sil.shares([tmp_path / "hand.jpg", tmp_path / "dim.jpg"])
    assert 0.6 < share < 0.95  # the box's 4% margins are background, the grown mask takes back a little
    assert p95 > 0.9 and p95_dim < 0.6
