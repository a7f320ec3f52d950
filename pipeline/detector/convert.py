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
    missing = sorted(set(target) - set(out))
    if unmapped or missing or misshaped:
        parts = []
        if unmapped:
            parts.append(f"{len(unmapped)} unmapped key(s): " + "; ".join(unmapped[:20]))
        if missing:
            parts.append(f"{len(missing)} missing key(s): " + "; ".join(missing[:20]))
        if misshaped:
            parts.append(f"{len(misshaped)} mis-shaped key(s): " + "; ".join(misshaped[:20]))
        raise VlmixerError(f"VinVL checkpoint does not fit config {cfg.VLMIXER.NAME}: " + " | ".join(parts))
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
    from vlmixer.pipeline.detector.config import config_sha256, load_detector_config
    from vlmixer.storage.vocab import load_vocabulary, read_labelmap_json, read_vocab_txt

    cfg = load_detector_config(config_path, overrides)
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
    ckpt = load_checkpoint(ckpt_path)
    state = ckpt.get("model", ckpt)
    if not isinstance(state, Mapping):
        raise VlmixerError(f"{ckpt_path}: no state dict under 'model'")
    if not looks_like_vinvl(state):
        raise VlmixerError(f"{ckpt_path}: not a VinVL/maskrcnn-benchmark checkpoint (no backbone.body.* keys)")
    converted = convert_vinvl_checkpoint(state, cfg)
    meta = {
        "format": "vlmixer-detector/1",
        "source": "vinvl",
        "source_path": str(ckpt_path),
        "source_sha256": sha256_file(Path(ckpt_path)),
        "config_name": cfg.VLMIXER.NAME,
        "config_sha256": config_sha256(cfg),
        "config_text": cfg.dump(),
        "num_classes": n_cls,
        "num_attributes": n_att,
        "labelmap_sha256": sha256_file(Path(labelmap)) if labelmap else None,
        "concepts": concepts.to_json() if concepts is not None else None,
        "attributes": attributes.to_json() if attributes is not None else None,
        "concept_vocab_sha256": concepts.sha256 if concepts is not None else None,
        "attribute_vocab_sha256": attributes.sha256 if attributes is not None else None,
    }
    save_converted(out_path, converted, meta)
    return meta
