"""Convert VinVL (maskrcnn-benchmark / scene_graph_benchmark) checkpoints to the product's model.

Name mapping (source -> detectron2 model):

* `backbone.body.stem.conv1` / `.bn1`        -> `backbone.stem.conv1` / `.conv1.norm`
* `backbone.body.layerN.M.convK` / `.bnK`   -> `backbone.res{N+1}.M.convK` / `.convK.norm`
* `...downsample.0` / `.downsample.1`       -> `...shortcut` / `...shortcut.norm`
* `roi_heads.box.feature_extractor.head.layer4.M.*` -> `roi_heads.res5.M.*`
* `rpn.head.conv|cls_logits|bbox_pred`      -> `proposal_generator.rpn_head.conv|objectness_logits|anchor_deltas`
* `roi_heads.box.predictor.cls_score`       -> `roi_heads.box_predictor.cls_score`, background
  row 0 moved last (detectron2's order)
* `roi_heads.box.predictor.bbox_pred`       -> `roi_heads.box_predictor.bbox_pred`, the 4
  background rows dropped
* `attribute.predictor.cls_embedding`       -> `roi_heads.attribute_head.cls_embedding`, background
  row 0 moved last (it is indexed by the class id)
* `attribute.predictor.fc_attr|attr_score`  -> `roi_heads.attribute_head.fc_attr|attr_score`
* `attribute.feature_extractor.*`: the attribute head shares the box head's res5
  (SHARE_BOX_FEATURE_EXTRACTOR), so these are copies; they must equal the box head's
  tensors and are dropped
* `rpn.anchor_generator.cell_anchors.0`: must equal the config's anchors; dropped

Anything else, anything missing, or any shape that does not fit the model
of the config is a VlmixerError listing every offending key: a silently
half-loaded detector would produce plausible-looking garbage features.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlmixer.errors import VlmixerError
from vlmixer.files import sha256_file
from vlmixer.pipeline.detector._compat import ensure_detectron2

_BN_SUFFIXES = ("weight", "bias", "running_mean", "running_var")


def looks_like_vinvl(state: Mapping[str, Any]) -> bool:
    """True when the keys are maskrcnn-benchmark names (backbone.body.*)."""
    return any(_strip(k).startswith("backbone.body.") for k in state)


def _strip(key: str) -> str:
    return key[len("module."):] if key.startswith("module.") else key


def _resnet_block_name(rest: str) -> str | None:
    """`M.convK.weight` / `M.bnK.x` / `M.downsample.0.weight` / `M.downsample.1.x` -> detectron2 name."""
    m = re.fullmatch(r"(\d+)\.conv([123])\.weight", rest)
    if m:
        return f"{m[1]}.conv{m[2]}.weight"
    m = re.fullmatch(r"(\d+)\.bn([123])\.(\w+)", rest)
    if m and m[3] in _BN_SUFFIXES:
        return f"{m[1]}.conv{m[2]}.norm.{m[3]}"
    m = re.fullmatch(r"(\d+)\.downsample\.0\.weight", rest)
    if m:
        return f"{m[1]}.shortcut.weight"
    m = re.fullmatch(r"(\d+)\.downsample\.1\.(\w+)", rest)
    if m and m[2] in _BN_SUFFIXES:
        return f"{m[1]}.shortcut.norm.{m[2]}"
    return None


def map_vinvl_key(key: str) -> str | None:
    """Target name of one VinVL key, or None when it has no counterpart (unmapped)."""
    k = _strip(key)
    m = re.fullmatch(r"backbone\.body\.stem\.(conv1\.weight|bn1\.(\w+))", k)
    if m:
        if m[1] == "conv1.weight":
            return "backbone.stem.conv1.weight"
        return f"backbone.stem.conv1.norm.{m[2]}" if m[2] in _BN_SUFFIXES else None
    m = re.fullmatch(r"backbone\.body\.layer([123])\.(.+)", k)
    if m:
        rest = _resnet_block_name(m[2])
        return f"backbone.res{int(m[1]) + 1}.{rest}" if rest else None
    m = re.fullmatch(r"roi_heads\.box\.feature_extractor\.head\.layer4\.(.+)", k)
    if m:
        rest = _resnet_block_name(m[1])
        return f"roi_heads.res5.{rest}" if rest else None
    m = re.fullmatch(r"rpn\.head\.(conv|cls_logits|bbox_pred)\.(weight|bias)", k)
    if m:
        name = {"conv": "conv", "cls_logits": "objectness_logits", "bbox_pred": "anchor_deltas"}[m[1]]
        return f"proposal_generator.rpn_head.{name}.{m[2]}"
    m = re.fullmatch(r"roi_heads\.box\.predictor\.(cls_score|bbox_pred)\.(weight|bias)", k)
    if m:
        return f"roi_heads.box_predictor.{m[1]}.{m[2]}"
    m = re.fullmatch(r"attribute\.predictor\.(cls_embedding\.weight|fc_attr\.(weight|bias)|attr_score\.(weight|bias))", k)
    if m:
        return f"roi_heads.attribute_head.{m[1]}"
    return None


def target_state_shapes(cfg: Any) -> dict[str, torch.Size]:
    """Names and shapes of the model of `cfg`, built on the meta device (no memory, instant)."""
    ensure_detectron2()
    from detectron2.modeling import build_model

    import vlmixer.pipeline.detector.model  # noqa: F401  (registers the product's parts)

    c = cfg.clone()
    c.defrost()
    c.MODEL.DEVICE = "meta"
    model = build_model(c)
    return {k: v.shape for k, v in model.state_dict().items()}


def convert_vinvl_checkpoint(src_state_dict: Mapping[str, Any], cfg: Any) -> dict[str, torch.Tensor]:
    """Map a VinVL state dict (a top-level "model" key is unwrapped) onto the model of `cfg`.

    Raises VlmixerError naming every unmapped, missing or mis-shaped key.
    """
    src: Mapping[str, Any] = src_state_dict
    if "model" in src and isinstance(src["model"], Mapping):
        src = src["model"]
    target = target_state_shapes(cfg)
    out: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    misshaped: list[str] = []
    duplicates: dict[str, torch.Tensor] = {}
    anchors: torch.Tensor | None = None
    for key, value in src.items():
        k = _strip(key)
        if not isinstance(value, torch.Tensor):
            unmapped.append(f"{key} (not a tensor)")
            continue
        if k == "rpn.anchor_generator.cell_anchors.0":
            anchors = value
            continue
        if k.startswith("attribute.feature_extractor."):
            duplicates[k] = value
            continue
        name = map_vinvl_key(k)
        if name is None or name not in target:
            unmapped.append(key if name is None else f"{key} -> {name} (not in the model of this config)")
            continue
        t = value.detach().to("cpu", copy=True)
        if name in ("roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.cls_score.bias",
                    "roi_heads.attribute_head.cls_embedding.weight"):
            t = torch.cat([t[1:], t[:1]], dim=0)  # background: row 0 -> last
        elif name.startswith("roi_heads.box_predictor.bbox_pred."):
            t = t[4:]  # drop the 4 background regression rows
        if tuple(t.shape) != tuple(target[name]):
            misshaped.append(f"{key} -> {name}: {tuple(t.shape)} (after conversion) vs model {tuple(target[name])}")
            continue
        out[name] = t
    for k, v in duplicates.items():
        box_key = k.replace("attribute.feature_extractor.", "roi_heads.box.feature_extractor.", 1)
        other = src.get(box_key, src.get("module." + box_key))
        if not isinstance(other, torch.Tensor) or other.shape != v.shape or not torch.equal(other, v):
            unmapped.append(f"{k} (attribute head with its own feature extractor: not supported, "
                            f"expected a copy of {box_key})")
    if anchors is not None:
        import vlmixer.pipeline.detector.model as m

        mine = torch.from_numpy(m.legacy_cell_anchors(
            16, cfg.MODEL.ANCHOR_GENERATOR.SIZES[0], cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS[0])).float()
        if tuple(anchors.shape) != tuple(mine.shape) or not torch.allclose(anchors.float().cpu(), mine):
            misshaped.append("rpn.anchor_generator.cell_anchors.0: the checkpoint's anchors differ from "
                             "the config's (MODEL.ANCHOR_GENERATOR)")
    _raise_unless_complete("VinVL", cfg, target, out, unmapped, misshaped)
    return out


def save_converted(out_path: str | Path, state: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Path:
    """Write `{"model": state, "vlmixer": meta}` atomically (temporary file, then os.replace).

    Only tensors, strings, numbers, lists and dicts: loads with weights_only=True.
    """
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        torch.save({"model": dict(state), "vlmixer": dict(meta)}, tmp)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    return out


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """torch.load with weights_only=True (no pickle code); errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise VlmixerError(f"{p}: checkpoint file does not exist")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds (UnpicklingError, RuntimeError, EOFError)
        raise VlmixerError(f"{p}: cannot load checkpoint with weights_only=True ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise VlmixerError(f"{p}: checkpoint must hold a dict, got {type(obj).__name__}")
    return obj


def convert_vinvl_file(ckpt_path: str | Path, config_path: str | Path, out_path: str | Path, *,
                       labelmap: str | Path | None = None, concept_vocab: str | Path | None = None,
                       attribute_vocab: str | Path | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The `vlmixer detector convert --from vinvl` job: load, convert, check, save. Returns the metadata."""
    from vlmixer.pipeline.detector.config import load_detector_config

    cfg = load_detector_config(config_path, overrides)
    concepts, attributes = _user_vocabularies(cfg, labelmap, concept_vocab, attribute_vocab)
    ckpt = load_checkpoint(ckpt_path)
    state = ckpt.get("model", ckpt)
    if not isinstance(state, Mapping):
        raise VlmixerError(f"{ckpt_path}: no state dict under 'model'")
    if not looks_like_vinvl(state):
        raise VlmixerError(f"{ckpt_path}: not a VinVL/maskrcnn-benchmark checkpoint (no backbone.body.* keys)")
    converted = convert_vinvl_checkpoint(state, cfg)
    meta = _metadata("vinvl", cfg, ckpt_path, labelmap, concepts, attributes)
    save_converted(out_path, converted, meta)
    return meta


# --------------------------------------------------------------------------- bottom-up attention
# bottom-up-attention.pytorch (MILVLG, `.pth`) names its detectron2 model as
# detectron2 does except the predictor (Caffe order: background is class 0, a
# two-logit softmax RPN, `cls_embed`, `attr_linear1/2`); airsplay's
# py-bottom-up-attention `.pkl` uses detectron2's order and names throughout
# (`cls_embedding`, `fc_attr`, `attr_score`, one objectness logit).
_BUTD_PREDICTOR = {
    "roi_heads.box_predictor.cls_embed.weight": "roi_heads.attribute_head.cls_embedding.weight",
    "roi_heads.box_predictor.cls_embedding.weight": "roi_heads.attribute_head.cls_embedding.weight",
    "roi_heads.box_predictor.attr_linear1.weight": "roi_heads.attribute_head.fc_attr.weight",
    "roi_heads.box_predictor.attr_linear1.bias": "roi_heads.attribute_head.fc_attr.bias",
    "roi_heads.box_predictor.fc_attr.weight": "roi_heads.attribute_head.fc_attr.weight",
    "roi_heads.box_predictor.fc_attr.bias": "roi_heads.attribute_head.fc_attr.bias",
    "roi_heads.box_predictor.attr_linear2.weight": "roi_heads.attribute_head.attr_score.weight",
    "roi_heads.box_predictor.attr_linear2.bias": "roi_heads.attribute_head.attr_score.bias",
    "roi_heads.box_predictor.attr_score.weight": "roi_heads.attribute_head.attr_score.weight",
    "roi_heads.box_predictor.attr_score.bias": "roi_heads.attribute_head.attr_score.bias",
}
_SAME_NAME = re.compile(
    r"(backbone\.(stem|res[234])\.|roi_heads\.res5\.|proposal_generator\.rpn_head\.(conv|anchor_deltas)\.|"
    r"proposal_generator\.rpn_head\.objectness_logits\.|roi_heads\.box_predictor\.(cls_score|bbox_pred)\.).+")


def map_butd_key(key: str) -> str | None:
    """Target name of one bottom-up attention key (either port), or None when it has no counterpart."""
    k = _strip(key)
    if k in _BUTD_PREDICTOR:
        return _BUTD_PREDICTOR[k]
    return k if _SAME_NAME.fullmatch(k) else None


def convert_butd_checkpoint(src_state_dict: Mapping[str, Any], cfg: Any, *, caffe_order: bool) -> dict[str, torch.Tensor]:
    """Map a bottom-up attention state dict (tensors or numpy arrays) onto the model of `cfg`.

    `caffe_order`: background is row 0 of the class scores, of the box
    regression (4 rows) and of the class embedding (bottom-up-attention.pytorch);
    otherwise background is last (detectron2, airsplay's port). A two-logit
    RPN objectness (2A channels: A background, then A foreground) is folded into
    one logit per anchor, foreground minus background: softmax picks the same
    proposals, ranked by that logit. `num_batches_tracked` of BatchNorm is
    dropped. Raises VlmixerError naming every unmapped, missing or mis-shaped key.
    """
    src: Mapping[str, Any] = src_state_dict
    if "model" in src and isinstance(src["model"], Mapping):
        src = src["model"]
    target = target_state_shapes(cfg)
    out: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    misshaped: list[str] = []
    for key, value in src.items():
        k = _strip(str(key))
        if k.endswith(".num_batches_tracked") or k.startswith("__"):  # BN counter; "__author__"-style notes
            continue
        if isinstance(value, np.ndarray) and value.dtype.kind in "fiu":
            value = torch.from_numpy(np.ascontiguousarray(value))
        if not isinstance(value, torch.Tensor):
            unmapped.append(f"{key} (not an array)")
            continue
        name = map_butd_key(k)
        if name is None or name not in target:
            unmapped.append(key if name is None else f"{key} -> {name} (not in the model of this config)")
            continue
        t = value.detach().to("cpu", copy=True).float()
        want = tuple(target[name])
        if name.startswith("proposal_generator.rpn_head.objectness_logits.") and t.shape[0] == 2 * want[0]:
            a = want[0]
            t = t[a:] - t[:a]  # softmax([bg, fg])[fg] = sigmoid(fg - bg)
        if caffe_order:
            if name in ("roi_heads.box_predictor.cls_score.weight", "roi_heads.box_predictor.cls_score.bias",
                        "roi_heads.attribute_head.cls_embedding.weight"):
                t = torch.cat([t[1:], t[:1]], dim=0)
            elif name.startswith("roi_heads.box_predictor.bbox_pred."):
                t = t[4:]
        if tuple(t.shape) != want:
            misshaped.append(f"{key} -> {name}: {tuple(t.shape)} (after conversion) vs model {want}")
            continue
        if name in out:
            unmapped.append(f"{key} (a second source for {name})")
            continue
        out[name] = t
    _raise_unless_complete("bottom-up attention", cfg, target, out, unmapped, misshaped)
    return out


def _raise_unless_complete(what: str, cfg: Any, target: Mapping[str, Any], out: Mapping[str, Any],
                           unmapped: list[str], misshaped: list[str]) -> None:
    missing = sorted(set(target) - set(out))
    if unmapped or missing or misshaped:
        parts = []
        if unmapped:
            parts.append(f"{len(unmapped)} unmapped key(s): " + "; ".join(unmapped[:20]))
        if missing:
            parts.append(f"{len(missing)} missing key(s): " + "; ".join(missing[:20]))
        if misshaped:
            parts.append(f"{len(misshaped)} mis-shaped key(s): " + "; ".join(misshaped[:20]))
        raise VlmixerError(f"{what} checkpoint does not fit config {cfg.VLMIXER.NAME}: " + " | ".join(parts))


def load_butd_state(path: str | Path) -> tuple[Mapping[str, Any], bool]:
    """The state dict of a bottom-up attention checkpoint and whether it is in Caffe class order.

    `.pkl` (airsplay's detectron2 port, detectron2 order): numpy arrays read by
    the restricted unpickler; anything else (MILVLG's `.pth`, Caffe order):
    torch.load with weights_only=True.
    """
    from vlmixer.pipeline.detector.safe_pickle import load_numpy_pickle

    p = Path(path)
    if not p.is_file():
        raise VlmixerError(f"{p}: checkpoint file does not exist")
    if p.suffix == ".pkl":
        obj = load_numpy_pickle(p)
        caffe = False
    else:
        obj = load_checkpoint(p)
        caffe = True
    state = obj.get("model", obj) if isinstance(obj, Mapping) else None
    if not isinstance(state, Mapping) or not any(_strip(str(k)).startswith("backbone.") for k in state):
        raise VlmixerError(f"{p}: not a bottom-up attention checkpoint (no backbone.* keys)")
    return state, caffe


def convert_file(source: str, ckpt_path: str | Path, config_path: str | Path, out_path: str | Path, *,
                 labelmap: str | Path | None = None, concept_vocab: str | Path | None = None,
                 attribute_vocab: str | Path | None = None, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """`vlmixer detector convert --from vinvl|butd`: load, convert, check, save. Returns the metadata."""
    if source == "vinvl":
        return convert_vinvl_file(ckpt_path, config_path, out_path, labelmap=labelmap, concept_vocab=concept_vocab,
                                  attribute_vocab=attribute_vocab, overrides=overrides)
    if source != "butd":
        raise VlmixerError(f"--from {source}: expected vinvl or butd")
    from vlmixer.pipeline.detector.config import load_detector_config

    cfg = load_detector_config(config_path, overrides)
    concepts, attributes = _user_vocabularies(cfg, labelmap, concept_vocab, attribute_vocab)
    state, caffe = load_butd_state(ckpt_path)
    converted = convert_butd_checkpoint(state, cfg, caffe_order=caffe)
    meta = _metadata("butd-caffe-order" if caffe else "butd-detectron2", cfg, ckpt_path, labelmap, concepts, attributes)
    save_converted(out_path, converted, meta)
    return meta


def _user_vocabularies(cfg: Any, labelmap: str | Path | None, concept_vocab: str | Path | None,
                       attribute_vocab: str | Path | None) -> tuple[Any, Any]:
    from vlmixer.storage.vocab import load_vocabulary, read_labelmap_json, read_vocab_txt

    concepts = attributes = None
    if labelmap:
        concepts, attributes = read_labelmap_json(labelmap)
    if concept_vocab:
        concepts = load_vocabulary(concept_vocab)
    if attribute_vocab:
        attributes = read_vocab_txt(attribute_vocab)
    n_cls, n_att = int(cfg.MODEL.ROI_HEADS.NUM_CLASSES), int(cfg.VLMIXER.ATTRIBUTE.NUM_ATTRIBUTES)
    if concepts is not None and len(concepts) != n_cls:
        raise VlmixerError(f"label map has {len(concepts)} classes, config {cfg.VLMIXER.NAME} {n_cls}")
    if attributes is not None and len(attributes) != n_att:
        raise VlmixerError(f"label map has {len(attributes)} attributes, config {cfg.VLMIXER.NAME} {n_att}")
    return concepts, attributes


def _metadata(source: str, cfg: Any, ckpt_path: str | Path, labelmap: str | Path | None,
              concepts: Any, attributes: Any) -> dict[str, Any]:
    from vlmixer.pipeline.detector.config import config_sha256

    return {
        "format": "vlmixer-detector/1",
        "source": source,
        "source_path": str(ckpt_path),
        "source_sha256": sha256_file(Path(ckpt_path)),
        "config_name": cfg.VLMIXER.NAME,
        "config_sha256": config_sha256(cfg),
        "config_text": cfg.dump(),
        "num_classes": int(cfg.MODEL.ROI_HEADS.NUM_CLASSES),
        "num_attributes": int(cfg.VLMIXER.ATTRIBUTE.NUM_ATTRIBUTES),
        "labelmap_sha256": sha256_file(Path(labelmap)) if labelmap else None,
        "concepts": concepts.to_json() if concepts is not None else None,
        "attributes": attributes.to_json() if attributes is not None else None,
        "concept_vocab_sha256": concepts.sha256 if concepts is not None else None,
        "attribute_vocab_sha256": attributes.sha256 if attributes is not None else None,
    }
