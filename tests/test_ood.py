"""The out-of-distribution check: a density of the network's own features refuses what is not a hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from boneage.errors import BoneAgeInputError
from boneage.ood import ORIENTATION_CLASSES, FeatureDensity, OrientationProbe, image_checks


def test_density_scores_the_training_cloud_near_one_and_outliers_far() -> None:
    rng = np.random.default_rng(0)
    basis = rng.normal(size=(8, 40))
    train = rng.normal(size=(500, 8)) @ basis + 0.05 * rng.normal(size=(500, 40))
    density = FeatureDensity.fit(train, components=8)
    scores = density.score(train)
    assert 0.5 < scores.mean() < 1.5
    inside = rng.normal(size=(200, 8)) @ basis + 0.05 * rng.normal(size=(200, 40))
    off_plane = inside + rng.normal(size=(200, 40))  # leaves the subspace the training features span
    far = inside * 6  # along it, but far out
    threshold = density.calibrate(inside, quantile=0.995, margin=1.25)
    assert (density.score(inside) > threshold).mean() <= 0.01
    assert (density.score(off_plane) > threshold).all()
    assert (density.score(far) > threshold).all()
    assert density.refuses(density.score(far)).all() and density.refuses(density.score(inside)).mean() <= 0.01
    assert bool(density.refuses(threshold * 1.001)) and not bool(density.refuses(threshold))  # strictly above
    again = FeatureDensity.from_tensors(density.to_tensors())
    assert again is not None
    np.testing.assert_allclose(again.score(far[:5]), density.score(far[:5]), rtol=1e-4)
    assert FeatureDensity.from_tensors({}) is None


def _orientation_features(
    rng: np.random.Generator, directions: np.ndarray, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Features where each orientation shifts a different direction: (N, D) upright, (4N, D) turned."""
    base = rng.normal(size=(n, directions.shape[1]))
    return base + directions[0], np.concatenate([base + d for d in directions[1:]])


def test_orientation_probe_tells_upright_from_turned_and_survives_the_bundle_round_trip() -> None:
    rng = np.random.default_rng(0)
    directions = rng.normal(size=(5, 30)) * 1.5
    up, turned_feats = _orientation_features(rng, directions, 300)
    probe = OrientationProbe.fit(up, turned_feats)
    test_up, test_turned = _orientation_features(rng, directions, 300)  # fresh images
    assert (probe.upright_probability(test_up) >= probe.limit).mean() > 0.97
    assert (probe.upright_probability(test_turned) < probe.limit).mean() > 0.97
    names = probe.likely_turn(test_turned[:300])  # the first block is the first turn
    assert max(set(names), key=names.count) == ORIENTATION_CLASSES[1]
    np.testing.assert_allclose(probe.probabilities(test_up).sum(1), 1.0)
    density = FeatureDensity.fit(up, components=8)
    density.orientation = probe
    again = FeatureDensity.from_tensors(density.to_tensors())
    assert again is not None and again.orientation is not None
    np.testing.assert_allclose(
        again.orientation.upright_probability(test_turned[:20]),
        probe.upright_probability(test_turned[:20]),
        atol=1e-4,
    )
    assert again.orientation.limit == pytest.approx(probe.limit)
    with pytest.raises(ValueError, match="four other orientations"):
        OrientationProbe.fit(up, turned_feats[:10])


def test_a_density_without_a_probe_still_loads() -> None:
    """Bundles made before the probe (v0.2) fall back to the ratio test."""
    rng = np.random.default_rng(2)
    density = FeatureDensity.fit(rng.normal(size=(100, 12)), components=4)
    tensors = {k: v for k, v in density.to_tensors().items() if "orientation" not in k}
    again = FeatureDensity.from_tensors(tensors)
    assert again is not None and again.orientation is None


def test_uniform_images_fail_the_image_check() -> None:
    assert image_checks(np.zeros((64, 64), np.uint8))
    assert not image_checks(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8))


def _chest_like(rng: np.random.Generator, h: int = 1000, w: int = 800) -> np.ndarray:
    """A synthetic chest-like drawing (bright body, two dark lungs, a spine, ribs), as the OOD battery
    (benchmarks/ood_battery.py) draws it."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.full((h, w), 0.75) + rng.normal(0, 0.02, (h, w))
    for cx in (0.28, 0.52):
        img[((xx - cx) / 0.15) ** 2 + ((yy - 0.5) / 0.32) ** 2 < 1] = 0.25
    img[np.abs(xx - 0.4) < 0.025] = 0.95
    for r in range(8):
        rib = np.abs(yy - 0.25 - r * 0.065 - 0.03 * np.sin(xx * 6)) < 0.008
        img[rib & (np.abs(xx - 0.4) < 0.3)] = 0.7
    img[(xx < 0.05) | (xx > 0.75)] = 0.05
    img = (img - img.min()) / (img.max() - img.min())
    return (img * 255).astype(np.uint8)


@pytest.mark.integration
def test_bundled_model_refuses_non_hands_warns_on_turned_hands_and_accepts_real_hands(
    shared_sample: Path, tmp_path: Path
) -> None:
    """Noise, a stripe pattern and a chest-like drawing are refused with one line; a real hand turned upside
    down or by 180 degrees gets a bone age only with the orientation warning; real held-out hands pass
    silently."""
    from boneage.data.labels import read_labels
    from boneage.predict import load_predictor

    predictor = load_predictor()
    assert predictor.ood is not None, "the bundled model ships its OOD density"
    assert np.isfinite(predictor.ood.rotation_ratio)
    assert predictor.ood.orientation is not None, "the bundled model ships its orientation probe"
    rng = np.random.default_rng(1)
    labels = read_labels(shared_sample / "labels.csv", shared_sample / "images")
    stripes = ((np.arange(900)[:, None] // 12 % 2) * 255 * np.ones((1, 700))).astype(np.uint8)
    bad = {
        "noise.png": rng.integers(0, 256, (900, 700), dtype=np.uint8),
        "stripes.png": stripes,
        "chest-like.png": _chest_like(rng),  # inside the pooled cloud (v0.3); the texture density's case
    }
    assert predictor.ood.texture is not None, "the bundled model ships its texture density"
    for name, img in bad.items():
        path = tmp_path / name
        Image.fromarray(img).save(path)
        with pytest.raises(BoneAgeInputError, match="does not look like a PA left-hand radiograph") as info:
            predictor.predict(path, "female")
        assert str(path) in str(info.value) and "\n" not in str(info.value)
    hand = np.asarray(Image.open(labels["path"].iloc[3]).convert("L"))
    upright = predictor.predict(labels["path"].iloc[3], "female")
    assert not any("rotated" in w for w in upright.warnings), upright.warnings
    for name, img in {"upside-down.png": hand[::-1], "rot180.png": np.rot90(hand, 2)}.items():
        path = tmp_path / name
        Image.fromarray(np.ascontiguousarray(img)).save(path)
        try:
            pred = predictor.predict(path, "female")
        except BoneAgeInputError:
            continue  # refused outright is fine too
        assert any("rotated or upside down" in w for w in pred.warnings), (name, pred.warnings)
    plain = load_predictor(tta=False)
    real = labels.iloc[::50]
    images = np.stack([plain.prepare(p)[1] for p in real["path"]])
    scores = plain.ood_scores(images, real["male"].to_numpy(bool))
    assert (scores <= plain.ood.threshold).mean() >= 0.95, scores


def test_texture_density_and_its_copy_recipe_survive_the_bundle_round_trip() -> None:
    """The second (texture) density ships inside the first one's tensors; bundles without it still load."""
    rng = np.random.default_rng(3)
    density = FeatureDensity.fit(rng.normal(size=(200, 12)), components=4)
    plain = FeatureDensity.from_tensors(density.to_tensors())
    assert plain is not None and plain.texture is None
    texture = FeatureDensity.fit(rng.normal(size=(200, 20)), components=6)
    texture.calibrate(rng.normal(size=(100, 20)))
    density.texture, density.copy_recipe = texture, (299, 60)
    tensors = density.to_tensors()
    assert any(k.startswith("ood.texture.") for k in tensors)
    again = FeatureDensity.from_tensors(tensors)
    assert again is not None and again.texture is not None and again.copy_recipe == (299, 60)
    assert again.texture.threshold == pytest.approx(texture.threshold, rel=1e-5)
    probe = rng.normal(size=(5, 20)) * 3
    np.testing.assert_allclose(again.texture.score(probe), texture.score(probe), rtol=1e-4)
    assert again.texture.texture is None and again.texture.orientation is None


def test_texture_density_refuses_in_predict(tiny_bundle: Path, tmp_path: Path) -> None:
    """An input whose texture statistics are far from the texture density's training cloud is refused with
    one line naming the texture; the same input passes when the density's limit is loose."""
    from boneage.ood import TEXTURE_STAGE
    from boneage.predict import load_predictor

    predictor = load_predictor(tiny_bundle, engine="torch")
    rng = np.random.default_rng(4)
    train = rng.integers(0, 256, (40, 64, 64), dtype=np.uint8)
    stats = predictor.texture_statistics(train)
    assert stats is not None and stats.shape[0] == 40
    assert predictor.engine.model.supports_texture(TEXTURE_STAGE)
    texture = FeatureDensity.fit(stats, components=8)
    texture.threshold = 0.0  # every input is "unusual"
    feats = predictor.predict_arrays(train[:20], np.zeros(20, bool), features=True)[3]
    predictor.ood = FeatureDensity.fit(feats, components=4)  # threshold inf: it never refuses here
    predictor.ood.texture = texture
    path = tmp_path / "x.png"
    Image.fromarray(rng.integers(0, 256, (120, 90), dtype=np.uint8)).save(path)
    with pytest.raises(BoneAgeInputError, match="fine image texture") as info:
        predictor.predict(path, "female")
    assert "\n" not in str(info.value)
    texture.threshold = float("inf")
    assert np.isfinite(predictor.predict(path, "female").bone_age_months)


def test_onnx_graph_gives_the_same_texture_statistics_as_torch(tiny_bundle: Path) -> None:
    """The exported graph taps the texture stage in the same pass (output ``texture``); its statistics are
    the torch network's partial pass, so a density fitted with one engine scores with the other."""
    from boneage.predict import load_predictor

    onnx, torch_engine = (
        load_predictor(tiny_bundle, engine="onnx"),
        load_predictor(tiny_bundle, engine="torch"),
    )
    images = np.random.default_rng(5).integers(0, 256, (3, 64, 64), dtype=np.uint8)
    a, b = onnx.texture_statistics(images), torch_engine.texture_statistics(images)
    assert a is not None and b is not None and a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)


def test_a_model_file_taps_the_texture_stage_its_density_was_fitted_on(
    tiny_bundle: Path, tmp_path: Path
) -> None:
    """v0.12.0's texture density was fitted on stage 2; new fits tap ``TEXTURE_STAGE``. A file keeps its own
    stage (``facts.ood.texture_stage``) in both engines, so an older bundle's density still gets statistics
    of the width it was fitted on; a file that states none (a checkpoint) taps today's stage."""
    import torch

    from boneage.modelfile import ModelFile, OodFacts
    from boneage.modelfile.format import write_model_file
    from boneage.ood import TEXTURE_STAGE
    from boneage.predict import load_predictor

    source = ModelFile.read(tiny_bundle)
    torch_side = load_predictor(tiny_bundle, engine="torch")
    net = torch_side.engine.model
    assert net.texture_stage == TEXTURE_STAGE
    other = next(s for s in (2, 1) if s != TEXTURE_STAGE and net.supports_texture(s))
    facts = source.facts.model_copy(update={"ood": OodFacts(texture_stage=other)})
    older = write_model_file(tmp_path / "older.safetensors", source.spec, facts, dict(net.state_dict()))
    images = np.random.default_rng(8).integers(0, 256, (2, 64, 64), dtype=np.uint8)
    with torch.no_grad():
        want = net.texture_statistics(torch.from_numpy(images[:, None] / 255.0).float(), other).numpy()
    assert want.shape[1] != torch_side.texture_statistics(images).shape[1]  # the stages differ in width
    for engine in ("torch", "onnx"):
        got = load_predictor(older, engine=engine).texture_statistics(images)
        assert got is not None and got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)


def test_features_and_texture_come_from_one_pass_equal_to_the_separate_ones(tiny_bundle: Path) -> None:
    """``features_with_texture`` walks the blocks once; its answer is the network's pooled features and the
    partial pass's texture statistics, and both engines' plain run gives the same pair from one run."""
    import torch

    from boneage.ood import TEXTURE_STAGE
    from boneage.predict import load_predictor

    torch_engine = load_predictor(tiny_bundle, engine="torch")
    net = torch_engine.engine.model
    x = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        feats, texture = net.features_with_texture(x, TEXTURE_STAGE)
        torch.testing.assert_close(feats, net.features(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(texture, net.texture_statistics(x, TEXTURE_STAGE), rtol=1e-5, atol=1e-5)
    images = np.random.default_rng(6).integers(0, 256, (3, 64, 64), dtype=np.uint8)
    onnx = load_predictor(tiny_bundle, engine="onnx")
    runs: list[int] = []
    onnx.engine.session = _CountingSession(onnx.engine.session, runs)
    f_torch, t_torch = torch_engine.plain_outputs(images)
    f_onnx, t_onnx = onnx.plain_outputs(images)
    assert len(runs) == 1  # features and texture from one run of the graph
    assert t_torch is not None and t_onnx is not None
    np.testing.assert_allclose(f_onnx, f_torch, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(t_onnx, t_torch, rtol=1e-3, atol=1e-3)


class _CountingSession:
    """An onnxruntime session that records each run (sessions' methods cannot be patched)."""

    def __init__(self, session: object, runs: list[int]) -> None:
        self.session, self.runs = session, runs

    def get_outputs(self) -> list:
        return self.session.get_outputs()

    def run(self, names: object, feeds: dict) -> list:
        self.runs.append(1)
        return self.session.run(names, feeds)


def test_refusal_judges_the_input_remade_as_a_training_copy(tiny_bundle: Path, tmp_path: Path) -> None:
    """With a copy recipe the pooled score that refuses (and that a prediction reports) is that of the
    radiograph squashed and JPEG-compressed like the training copies; without one it is the input's own."""
    from boneage.data.preprocess import training_copy
    from boneage.predict import load_predictor, oriented_pixels

    predictor = load_predictor(tiny_bundle, engine="torch")
    rng = np.random.default_rng(7)
    train = rng.integers(0, 256, (40, 64, 64), dtype=np.uint8)
    feats, stats = predictor.plain_outputs(train)
    predictor.ood = FeatureDensity.fit(feats, components=4)
    predictor.ood.texture = FeatureDensity.fit(stats, components=8)
    path = tmp_path / "big.png"
    Image.fromarray(rng.integers(0, 256, (700, 520), dtype=np.uint8)).save(path)
    rad = predictor.prepare(path)[0]
    pixels = oriented_pixels(rad)

    predictor.ood.copy_recipe = (299, 60)
    copy = predictor.preprocess(training_copy(pixels, 299, 60))[None]
    copy_feats, copy_stats = predictor.plain_outputs(copy)
    pooled, texture = predictor.refusal_scores(pixels, input_score=123.0)
    assert pooled == pytest.approx(float(predictor.ood.score(copy_feats)[0]), rel=1e-6)
    assert texture == pytest.approx(float(predictor.ood.texture.score(copy_stats)[0]), rel=1e-6)
    pred = predictor.predict(path, "male")
    assert pred.ood_score == pytest.approx(pooled, rel=1e-5)
    predictor.ood.threshold = pooled * 0.99  # just under the copy's score: refused, naming the score
    with pytest.raises(BoneAgeInputError, match=f"unusualness {pooled:.1f}"):
        predictor.predict(path, "male")

    predictor.ood.threshold = float("inf")
    predictor.ood.copy_recipe = (0, 0)  # a model not trained on such copies: its own input is judged
    assert predictor.refusal_scores(pixels, input_score=123.0)[0] == 123.0
    own = predictor.preprocess(pixels)[None]
    assert predictor.refusal_scores(pixels)[0] == pytest.approx(
        float(predictor.ood.score(predictor.plain_outputs(own)[0])[0]), rel=1e-6
    )


@pytest.mark.integration
def test_bundled_model_judges_a_native_file_like_its_training_copy(
    shared_sample: Path, shared_299: Path
) -> None:
    """The pooled density was fitted on the 299 px JPEG copies. A clinic's native PNG, remade as such a copy
    before scoring, lands nearer its own shared copy's score than the PNG does as the model's input."""
    from boneage.data.labels import read_labels
    from boneage.predict import load_predictor, oriented_pixels

    plain = load_predictor(tta=False)
    assert plain.ood is not None and plain.ood.copy_recipe == (299, 60)
    labels = read_labels(shared_sample / "labels.csv", shared_sample / "images").iloc[::80]
    copy_route, input_route = [], []
    for sample_id, path in zip(labels["id"], labels["path"], strict=True):
        rad, prepared, _ = plain.prepare(path)
        copy_file = plain.prepare(shared_299 / "images" / f"{sample_id}.jpg")[1]
        reference = plain.ood_scores(copy_file[None], np.array([False]))[0]
        copy_route.append(abs(plain.refusal_scores(oriented_pixels(rad))[0] - reference))
        input_route.append(abs(plain.ood_scores(prepared[None], np.array([False]))[0] - reference))
    assert len(copy_route) >= 12
    assert np.mean(copy_route) < np.mean(input_route), (np.mean(copy_route), np.mean(input_route))
