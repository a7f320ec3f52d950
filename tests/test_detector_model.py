"""The detector on real photos with the tiny config (random weights, CPU)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import skimage.data

from vlmixer.errors import ConfigError, VlmixerError
from vlmixer.pipeline.detector import Detections, Detector

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "detector"
TINY = CONFIGS / "tiny.yaml"


@pytest.fixture(scope="module")
def detector() -> Detector:
    return Detector.from_config(TINY)


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    return [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee()]


def check_well_formed(d: Detections, image: np.ndarray, det: Detector, lo: int = 10, hi: int = 100) -> None:
    h, w = image.shape[:2]
    n = len(d)
    assert d.image_size == (h, w)
    assert lo <= n <= hi
    assert d.boxes.shape == (n, 4) and d.boxes.dtype == np.float32
    assert np.all(d.boxes[:, 0] >= 0) and np.all(d.boxes[:, 1] >= 0)
    assert np.all(d.boxes[:, 2] <= w) and np.all(d.boxes[:, 3] <= h)
    assert np.all(d.boxes[:, 2] >= d.boxes[:, 0]) and np.all(d.boxes[:, 3] >= d.boxes[:, 1])
    assert d.features.shape == (n, det.feature_dim) and d.features.dtype == np.float32
    assert np.all(np.isfinite(d.features))
    assert d.concepts.dtype == np.int64 and np.all((d.concepts >= 0) & (d.concepts < det.num_classes))
    assert d.confidences.dtype == np.float32 and np.all(np.diff(d.confidences) <= 0)
    assert np.all(d.confidences > 0) and np.all(d.confidences <= 1)
    k = det.max_attributes
    assert d.attr_ids.shape == (n, k) and d.attr_ids.dtype == np.int64
    assert d.attr_scores.shape == (n, k) and d.attr_scores.dtype == np.float32
    assert np.all((d.attr_ids >= -1) & (d.attr_ids < det.num_attributes))
    assert np.all((d.attr_ids == -1) == (d.attr_scores == 0))
    assert np.all(d.attr_scores[d.attr_ids >= 0] >= 0.05)
    assert np.all(np.diff(d.attr_scores, axis=1) <= 0)


def test_real_photos_well_formed(detector, photos):
    assert detector.feature_dim == 256 and detector.num_classes == 80 and detector.num_attributes == 20
    assert detector.provenance["checkpoint_sha256"] == "random"
    assert detector.provenance["thresholds"]["score"] == 0.2
    results = detector(photos)
    assert len(results) == 3
    for d, img in zip(results, photos):
        check_well_formed(d, img, detector)


def test_no_box_above_threshold_still_gives_minimum(photos):
    det = Detector.from_config(TINY, overrides=["MODEL.ROI_HEADS.SCORE_THRESH_TEST=0.99"])
    (d,) = det(photos[:1])
    assert np.all(d.confidences < 0.99)
    assert len(d) == 10


def test_low_threshold_gives_up_to_maximum(photos):
    det = Detector.from_config(TINY, overrides=["MODEL.ROI_HEADS.SCORE_THRESH_TEST=0.0",
                                                "TEST.DETECTIONS_PER_IMAGE=30"])
    for d, img in zip(det(photos[:2]), photos[:2]):
        check_well_formed(d, img, det, lo=11, hi=30)


def test_batch_of_mixed_sizes_equals_one_at_a_time(detector, photos):
    rng = np.random.default_rng(0)
    images = photos + [rng.integers(0, 255, size=(150, 420, 3), dtype=np.uint8)]
    batch = detector.detect_preprocessed(
        [(*detector.preprocess(im), im.shape[:2]) for im in images])
    for im, got in zip(images, batch):
        (alone,) = detector([im])
        assert len(got) == len(alone)
        np.testing.assert_array_equal(got.concepts, alone.concepts)
        np.testing.assert_allclose(got.boxes, alone.boxes, rtol=1e-5, atol=1e-3)
        np.testing.assert_allclose(got.confidences, alone.confidences, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(got.features, alone.features, rtol=1e-4, atol=1e-4)
        np.testing.assert_array_equal(got.attr_ids, alone.attr_ids)


@pytest.mark.parametrize("shape", [(1, 900, 3), (8, 8, 3), (64, 48, 3)])
def test_degenerate_images(detector, shape):
    """Extreme aspect ratio, tiny and flat images: no crash, boxes inside, at most the maximum."""
    img = np.full(shape, 128, np.uint8)
    (d,) = detector([img])
    assert d.image_size == shape[:2] and len(d) <= 100
    if len(d):
        assert np.all(d.boxes[:, 2] <= shape[1]) and np.all(d.boxes[:, 3] <= shape[0])
        assert np.all(np.diff(d.confidences) <= 0)


def test_preprocess_sizes_and_bgr(detector, photos):
    t, scale = detector.preprocess(photos[1])  # chelsea 300x451: longer side capped at 320
    assert tuple(t.shape) == (3, 213, 320) and str(t.dtype) == "torch.uint8"
    assert scale == pytest.approx(213 / 300)
    small = np.zeros((224, 224, 3), np.uint8)
    small[..., 0] = 255  # red in RGB -> channel 2 in BGR
    t2, s2 = detector.preprocess(small)
    from vlmixer.pipeline.detector import preprocess_image

    t3, s3 = preprocess_image(photos[1], 224, 320)
    assert s3 == scale and bool((t3 == t).all())
    assert s2 == 1.0 and int(t2[2].min()) == 255 and int(t2[0].max()) == 0


@pytest.mark.parametrize("bad", [np.zeros((10, 10), np.uint8), np.zeros((10, 10, 4), np.uint8),
                                 np.zeros((10, 10, 3), np.float32), "not an image"])
def test_bad_inputs_are_user_errors(detector, bad):
    with pytest.raises(VlmixerError):
        detector([bad])


def test_unknown_config_key_is_an_error(tmp_path):
    text = TINY.read_text().replace("  MIN_SIZE_TEST: 224", "  MIN_SIZE_TEST: 224\n  MIN_SIZ_TEST: 1")
    p = tmp_path / "typo.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match="MIN_SIZ_TEST"):
        Detector.from_config(p)
    with pytest.raises(ConfigError):
        Detector.from_config(TINY, overrides=["VLMIXER.NO_SUCH_KEY=1"])


@pytest.mark.parametrize("name", ["vinvl_x152c4", "butd_r101c4"])
def test_reference_configs_build_shapes(name):
    from vlmixer.pipeline.detector.config import load_detector_config
    from vlmixer.pipeline.detector.convert import target_state_shapes

    cfg = load_detector_config(CONFIGS / f"{name}.yaml")
    shapes = target_state_shapes(cfg)
    n_cls = 1594 if name.startswith("vinvl") else 1600
    n_att = 524 if name.startswith("vinvl") else 400
    assert shapes["roi_heads.box_predictor.cls_score.weight"] == (n_cls + 1, 2048)
    assert shapes["roi_heads.attribute_head.cls_embedding.weight"] == (n_cls + 1, 256)
    assert shapes["roi_heads.attribute_head.fc_attr.weight"] == (512, 2048 + 256)
    assert shapes["roi_heads.attribute_head.attr_score.weight"] == (n_att + 1, 512)
    res4 = [k for k in shapes if k.startswith("backbone.res4.") and k.endswith("conv1.weight")]
    assert len(res4) == (36 if name.startswith("vinvl") else 23)
    if name.startswith("vinvl"):  # ResNeXt 32x8d: grouped 3x3 conv of res2 has 256 channels in 32 groups
        assert shapes["backbone.res2.0.conv2.weight"] == (256, 8, 3, 3)
        assert shapes["proposal_generator.rpn_head.anchor_deltas.weight"] == (60, 1024, 1, 1)


def test_legacy_anchors_are_detectron_anchors():
    from vlmixer.pipeline.detector.model import legacy_cell_anchors

    a = legacy_cell_anchors(16, [32, 64, 128, 256, 512], [0.5, 1.0, 2.0])
    assert a.shape == (15, 4)
    np.testing.assert_array_equal(a[2], [-84, -40, 99, 55])  # 128, ratio 0.5
    np.testing.assert_array_equal(a[7], [-56, -56, 71, 71])  # 128, ratio 1


def test_vocabularies_from_user_files(tmp_path):
    concepts = tmp_path / "objects.txt"
    concepts.write_text("\n".join(f"object{i},obj{i}" for i in range(80)) + "\n")
    attrs = tmp_path / "attributes.txt"
    attrs.write_text("\n".join(f"attr{i}" for i in range(20)) + "\n")
    det = Detector.from_config(TINY, overrides=[f"VLMIXER.CONCEPT_VOCAB={concepts}",
                                                f"VLMIXER.ATTRIBUTE_VOCAB={attrs}"])
    assert det.concepts.names[3] == "object3" and det.attributes.names[19] == "attr19"
    assert det.provenance["concept_vocab_sha256"] == det.concepts.sha256
    attrs.write_text("\n".join(f"attr{i}" for i in range(7)) + "\n")
    with pytest.raises(VlmixerError, match="7 entries"):
        Detector.from_config(TINY, overrides=[f"VLMIXER.ATTRIBUTE_VOCAB={attrs}"])
