"""Bottom-up attention checkpoints: MILVLG's `.pth` and airsplay's numpy `.pkl`, in their real key names."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch
from detector_tiny import BUTD, TINY_BUTD

from vlmixer.errors import VlmixerError
from vlmixer.pipeline.detector import Detector
from vlmixer.pipeline.detector.config import load_detector_config
from vlmixer.pipeline.detector.convert import convert_butd_checkpoint
from vlmixer.pipeline.detector.safe_pickle import load_numpy_pickle

ATTR = {"cls_embedding.weight": ("cls_embed.weight", "cls_embedding.weight"),
        "fc_attr.weight": ("attr_linear1.weight", "fc_attr.weight"), "fc_attr.bias": ("attr_linear1.bias", "fc_attr.bias"),
        "attr_score.weight": ("attr_linear2.weight", "attr_score.weight"),
        "attr_score.bias": ("attr_linear2.bias", "attr_score.bias")}


@pytest.fixture(scope="module")
def reference() -> Detector:
    return Detector.from_config(BUTD, overrides=TINY_BUTD)


def source_state(det: Detector, flavour: str) -> dict[str, torch.Tensor]:
    """The tiny model's weights as bottom-up-attention.pytorch ("milvlg": Caffe class order, two-logit RPN,
    BatchNorm with num_batches_tracked) or py-bottom-up-attention ("airsplay") would save them."""
    out: dict[str, torch.Tensor] = {}
    for k, v in det.model.state_dict().items():
        v = v.clone()
        if k.startswith("roi_heads.attribute_head."):
            rest = k[len("roi_heads.attribute_head."):]
            name = ATTR[rest][0 if flavour == "milvlg" else 1]
            if flavour == "milvlg" and rest == "cls_embedding.weight":
                v = torch.cat([v[-1:], v[:-1]])  # background first
            out[f"roi_heads.box_predictor.{name}"] = v
            continue
        if flavour == "milvlg":
            if k.startswith("roi_heads.box_predictor.cls_score."):
                v = torch.cat([v[-1:], v[:-1]])
            elif k.startswith("roi_heads.box_predictor.bbox_pred."):
                v = torch.cat([torch.zeros_like(v[:4]), v])
            elif k.startswith("proposal_generator.rpn_head.objectness_logits."):
                bg = torch.randn_like(v) * 0.1  # any split with fg - bg = the logit
                v = torch.cat([bg, v + bg])
            elif k.endswith(".norm.running_var") and k.startswith("backbone.res4."):
                out[k.replace("running_var", "num_batches_tracked")] = torch.tensor(0)
        out[k] = v
    return out


def test_milvlg_pth_converts_to_the_same_model(reference, tmp_path):
    cfg = load_detector_config(BUTD, TINY_BUTD)
    src = source_state(reference, "milvlg")
    assert src["proposal_generator.rpn_head.objectness_logits.weight"].shape[0] == 24  # 2 x 12 anchors
    assert src["roi_heads.box_predictor.cls_embed.weight"].shape == (81, 32)
    out = convert_butd_checkpoint({"model": src}, cfg, caffe_order=True)
    mine = reference.model.state_dict()
    assert set(out) == set(mine)
    for k in mine:
        torch.testing.assert_close(out[k], mine[k].float(), rtol=0, atol=1e-6, msg=k)
    # two-logit softmax foreground probability == sigmoid of the folded logit
    x = torch.randn(5, 32)
    w2 = src["proposal_generator.rpn_head.objectness_logits.weight"][:, :, 0, 0]
    b2 = src["proposal_generator.rpn_head.objectness_logits.bias"]
    two = (x @ w2.t() + b2).view(5, 2, 12).softmax(dim=1)[:, 1]
    w1 = out["proposal_generator.rpn_head.objectness_logits.weight"][:, :, 0, 0]
    one = torch.sigmoid(x @ w1.t() + out["proposal_generator.rpn_head.objectness_logits.bias"])
    torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-6)


def test_cli_converts_both_files_and_detects_the_same(reference, tmp_path):
    from vlmixer.cli import main

    vocab = tmp_path / "objects_vocab.txt"
    vocab.write_text("\n".join(f"object{i}" for i in range(80)) + "\n")
    attrs = tmp_path / "attributes_vocab.txt"
    attrs.write_text("\n".join(f"attr{i}" for i in range(20)) + "\n")
    pth = tmp_path / "bua-caffe-frcn-r101_with_attributes.pth"
    torch.save({"model": source_state(reference, "milvlg")}, pth)
    pkl = tmp_path / "faster_rcnn_from_caffe_attr.pkl"
    arrays = {k: v.numpy() for k, v in source_state(reference, "airsplay").items()}
    pkl.write_bytes(pickle.dumps({"model": arrays, "__author__": "airsplay"}, protocol=2))
    image = skimage.data.coffee()
    (want,) = reference([image])
    for src in (pth, pkl):
        out = tmp_path / f"{src.stem}-converted.pth"
        args = ["detector", "convert", "--from", "butd", str(src), "--config", str(BUTD),
                "--concept-vocab", str(vocab), "--attribute-vocab", str(attrs), "--out", str(out)]
        for o in TINY_BUTD:
            args += ["--override", o]
        assert main(args) == 0
        det = Detector.from_config(BUTD, weights=out, overrides=TINY_BUTD)
        assert det.concepts.names[5] == "object5"
        (got,) = det([image])
        np.testing.assert_array_equal(got.concepts, want.concepts)
        np.testing.assert_allclose(got.features, want.features, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got.boxes, want.boxes, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("edit,needle", [
    (lambda s: s.__setitem__("roi_heads.box_predictor.extra.weight", torch.zeros(3)), "roi_heads.box_predictor.extra.weight"),
    (lambda s: s.pop("backbone.res3.0.conv2.weight"), "backbone.res3.0.conv2.weight"),
    (lambda s: s.__setitem__("roi_heads.box_predictor.attr_linear2.weight", torch.zeros(30, 64)),
     r"attr_linear2.weight -> roi_heads.attribute_head.attr_score.weight: \(30, 64\)"),
])
def test_every_bad_key_is_named(reference, edit, needle):
    cfg = load_detector_config(BUTD, TINY_BUTD)
    src = source_state(reference, "milvlg")
    edit(src)
    with pytest.raises(VlmixerError, match=needle.replace(".w", r"\.w") if "(" not in needle else needle):
        convert_butd_checkpoint(src, cfg, caffe_order=True)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_pkl_with_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    bad = tmp_path / "evil.pkl"
    bad.write_bytes(pickle.dumps({"model": {"backbone.stem.conv1.weight": _Payload(marker)}}, protocol=2))
    with pytest.raises(VlmixerError, match=r"evil\.pkl: not a plain numpy checkpoint: refused global (posix|os)\.system"):
        load_numpy_pickle(bad)
    assert not marker.exists()
    from vlmixer.cli import main

    vocab = tmp_path / "objects_vocab.txt"
    vocab.write_text("\n".join(f"object{i}" for i in range(1600)) + "\n")
    assert main(["detector", "convert", "--from", "butd", str(bad), "--concept-vocab", str(vocab),
                 "--out", str(tmp_path / "x.pth")]) == 2
    assert not marker.exists()
    # an object array would unpickle Python objects element by element: refused too
    obj = tmp_path / "objects.pkl"
    obj.write_bytes(pickle.dumps({"model": {"a": np.array([1, "x"], dtype=object)}}, protocol=2))
    with pytest.raises(VlmixerError, match="object"):
        load_numpy_pickle(obj)
    junk = tmp_path / "junk.pkl"
    junk.write_bytes(b"\x80\x02not a pickle")
    with pytest.raises(VlmixerError, match="junk.pkl"):
        load_numpy_pickle(junk)
