"""VinVL checkpoint conversion: exact maskrcnn-benchmark names of a small-depth variant."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch

from vlmixer.errors import VlmixerError
from vlmixer.pipeline.detector.config import load_detector_config
from vlmixer.pipeline.detector.convert import convert_vinvl_checkpoint

TINY = Path(__file__).resolve().parents[1] / "configs" / "detector" / "tiny.yaml"


def vinvl_state_dict(blocks=(1, 1, 1, 1), stem=16, res2_out=32, width=8, groups=1, n_cls=81, n_att=21,
                     embed=32, hidden=64, seed=0) -> dict[str, torch.Tensor]:
    """A state dict with the key names and shapes of scene_graph_benchmark's AttrRCNN (R-C4 ResNet,
    FrozenBatchNorm2d, RPNHead, FastRCNNPredictor, AttributeRCNNPredictor, shared attribute
    feature extractor), filled with sane random values."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def conv(name, cout, cin, k, grp=1):
        sd[name] = torch.randn((cout, cin // grp, k, k), generator=g) * (2.0 / (cin // grp * k * k)) ** 0.5

    def bn(name, c):
        sd[f"{name}.weight"] = 1 + 0.1 * torch.randn(c, generator=g)
        sd[f"{name}.bias"] = 0.1 * torch.randn(c, generator=g)
        sd[f"{name}.running_mean"] = 0.1 * torch.randn(c, generator=g)
        sd[f"{name}.running_var"] = 1 + torch.rand(c, generator=g)

    conv("backbone.body.stem.conv1.weight", stem, 3, 7)
    bn("backbone.body.stem.bn1", stem)
    cin, out, bneck = stem, res2_out, groups * width
    for i in range(4):
        prefix = f"backbone.body.layer{i + 1}" if i < 3 else "roi_heads.box.feature_extractor.head.layer4"
        for b in range(blocks[i]):
            p = f"{prefix}.{b}"
            if b == 0:
                conv(f"{p}.downsample.0.weight", out, cin, 1)
                bn(f"{p}.downsample.1", out)
            conv(f"{p}.conv1.weight", bneck, cin if b == 0 else out, 1)
            bn(f"{p}.bn1", bneck)
            conv(f"{p}.conv2.weight", bneck, bneck, 3, groups)
            bn(f"{p}.bn2", bneck)
            conv(f"{p}.conv3.weight", out, bneck, 1)
            bn(f"{p}.bn3", out)
        cin, out, bneck = out, out * 2, bneck * 2
    c4 = res2_out * 4
    feat = res2_out * 8
    conv("rpn.head.conv.weight", c4, c4, 3)
    sd["rpn.head.conv.bias"] = torch.zeros(c4)
    sd["rpn.head.cls_logits.weight"] = 0.01 * torch.randn((15, c4, 1, 1), generator=g)
    sd["rpn.head.cls_logits.bias"] = torch.zeros(15)
    sd["rpn.head.bbox_pred.weight"] = 0.001 * torch.randn((60, c4, 1, 1), generator=g)
    sd["rpn.head.bbox_pred.bias"] = torch.zeros(60)
    from vlmixer.pipeline.detector.model import legacy_cell_anchors

    sd["rpn.anchor_generator.cell_anchors.0"] = torch.from_numpy(
        legacy_cell_anchors(16, [32, 64, 128, 256, 512], [0.5, 1.0, 2.0])).float()
    sd["roi_heads.box.predictor.cls_score.weight"] = 0.1 * torch.randn((n_cls, feat), generator=g)
    sd["roi_heads.box.predictor.cls_score.bias"] = 0.1 * torch.randn(n_cls, generator=g)
    sd["roi_heads.box.predictor.bbox_pred.weight"] = 0.001 * torch.randn((n_cls * 4, feat), generator=g)
    sd["roi_heads.box.predictor.bbox_pred.bias"] = torch.zeros(n_cls * 4)
    for k in [k for k in sd if k.startswith("roi_heads.box.feature_extractor.")]:
        sd[k.replace("roi_heads.box.feature_extractor.", "attribute.feature_extractor.")] = sd[k].clone()
    sd["attribute.predictor.cls_embedding.weight"] = 0.1 * torch.randn((n_cls, embed), generator=g)
    sd["attribute.predictor.fc_attr.weight"] = 0.05 * torch.randn((hidden, feat + embed), generator=g)
    sd["attribute.predictor.fc_attr.bias"] = torch.zeros(hidden)
    sd["attribute.predictor.attr_score.weight"] = 0.5 * torch.randn((n_att, hidden), generator=g)
    sd["attribute.predictor.attr_score.bias"] = torch.zeros(n_att)
    return sd


@pytest.fixture(scope="module")
def cfg():
    return load_detector_config(TINY)


def test_converts_and_loads_strict(cfg):
    from detectron2.modeling import build_model

    src = vinvl_state_dict()
    out = convert_vinvl_checkpoint({"model": src, "iteration": torch.tensor(1)}, cfg)
    c = cfg.clone()
    c.defrost()
    c.MODEL.DEVICE = "cpu"
    model = build_model(c)
    model.load_state_dict(out, strict=True)
    # background row 0 -> last; 4 background regression rows dropped; layerN -> res(N+1); bnK -> convK.norm
    cls_w = out["roi_heads.box_predictor.cls_score.weight"]
    assert torch.equal(cls_w[-1], src["roi_heads.box.predictor.cls_score.weight"][0])
    assert torch.equal(cls_w[0], src["roi_heads.box.predictor.cls_score.weight"][1])
    assert torch.equal(out["roi_heads.attribute_head.cls_embedding.weight"][-1],
                      src["attribute.predictor.cls_embedding.weight"][0])
    assert torch.equal(out["roi_heads.box_predictor.bbox_pred.weight"],
                      src["roi_heads.box.predictor.bbox_pred.weight"][4:])
    assert torch.equal(out["backbone.res4.0.conv2.norm.running_var"], src["backbone.body.layer3.0.bn2.running_var"])
    assert torch.equal(out["roi_heads.res5.0.shortcut.weight"],
                      src["roi_heads.box.feature_extractor.head.layer4.0.downsample.0.weight"])
    assert torch.equal(out["proposal_generator.rpn_head.objectness_logits.weight"], src["rpn.head.cls_logits.weight"])


def test_module_prefix_is_accepted(cfg):
    src = {f"module.{k}": v for k, v in vinvl_state_dict().items()}
    assert len(convert_vinvl_checkpoint(src, cfg)) > 0


def test_renamed_key_fails_naming_it(cfg):
    src = vinvl_state_dict()
    src["backbone.body.layer2.0.bn_2.weight"] = src.pop("backbone.body.layer2.0.bn2.weight")
    with pytest.raises(VlmixerError) as e:
        convert_vinvl_checkpoint(src, cfg)
    assert "backbone.body.layer2.0.bn_2.weight" in str(e.value)  # unmapped
    assert "backbone.res3.0.conv2.norm.weight" in str(e.value)  # missing


def test_misshaped_key_fails_naming_it(cfg):
    src = vinvl_state_dict()
    src["attribute.predictor.attr_score.weight"] = torch.zeros(30, 64)
    with pytest.raises(VlmixerError, match=r"attribute\.predictor\.attr_score\.weight.*\(30, 64\)"):
        convert_vinvl_checkpoint(src, cfg)


def test_unshared_attribute_extractor_fails(cfg):
    src = vinvl_state_dict()
    key = "attribute.feature_extractor.head.layer4.0.conv1.weight"
    src[key] = src[key] + 1
    with pytest.raises(VlmixerError, match=key.replace(".", r"\.")):
        convert_vinvl_checkpoint(src, cfg)


def test_wrong_class_count_and_anchors_fail(cfg):
    src = vinvl_state_dict(n_cls=91)
    with pytest.raises(VlmixerError, match="cls_score"):
        convert_vinvl_checkpoint(src, cfg)
    src = vinvl_state_dict()
    src["rpn.anchor_generator.cell_anchors.0"] = src["rpn.anchor_generator.cell_anchors.0"] + 0.5
    with pytest.raises(VlmixerError, match="anchors"):
        convert_vinvl_checkpoint(src, cfg)


def test_cli_convert_then_detect(tmp_path):
    from vlmixer.cli import main
    from vlmixer.pipeline.detector import Detector

    ckpt = tmp_path / "vinvl_tiny.pth"
    torch.save({"model": vinvl_state_dict(), "iteration": 5}, ckpt)
    labelmap = tmp_path / "labelmap.json"
    labelmap.write_text(json.dumps({
        "label_to_idx": {f"thing{i}": i for i in range(1, 81)},
        "attribute_to_idx": {f"attr{i}": i for i in range(1, 21)},
    }))
    out = tmp_path / "converted.pth"
    rc = main(["detector", "convert", "--from", "vinvl", str(ckpt), "--config", str(TINY),
               "--labelmap", str(labelmap), "--out", str(out)])
    assert rc == 0 and out.is_file()
    payload = torch.load(out, map_location="cpu", weights_only=True)
    assert payload["vlmixer"]["concepts"][0] == ["thing1"] and len(payload["vlmixer"]["attributes"]) == 20
    det = Detector.from_config(TINY, weights=out)
    assert det.provenance["checkpoint_sha256"] != "random" and det.concepts.names[79] == "thing80"
    (d,) = det([skimage.data.coffee()])
    assert 10 <= len(d) <= 100 and np.all(np.isfinite(d.features))
    # the raw VinVL checkpoint loads too (converted on the fly), with the same result
    (d2,) = Detector.from_config(TINY, weights=ckpt)([skimage.data.coffee()])
    np.testing.assert_allclose(d.features, d2.features)
    # a bad checkpoint is a user error, not a traceback
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    assert main(["detector", "convert", str(bad), "--config", str(TINY), "--labelmap", str(labelmap),
                 "--out", str(tmp_path / "x.pth")]) == 2
