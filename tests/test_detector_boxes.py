"""Features at boxes the user gives (COCO, Visual Genome, jsonl), the reference decode mode, and images
left without boxes, through the real tiny detector and an in-process gallery build."""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from detector_tiny import TINY
from PIL import Image

from vlmixer.pipeline.detector import Detector
from vlmixer.pipeline.gallery.annotations import map_categories, read_annotations
from vlmixer.pipeline.gallery.images import DecodePolicy, decode_bytes
from vlmixer.pipeline.gallery.job import BuildOptions, build_gallery
from vlmixer.storage.gallery import GalleryReader
from vlmixer.storage.vocab import read_vocab_txt

# tiny.yaml has 80 classes: 0 "dog", 1 "person" (variant "man"), 2 "cat", the rest fillers
NAMES = ["dog", "person,man", "cat"] + [f"filler{i}" for i in range(77)]


@pytest.fixture(scope="module")
def det() -> Detector:
    return Detector.from_config(TINY)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("boxes")
    imgs = root / "images"
    imgs.mkdir()
    Image.fromarray(skimage.data.astronaut()).save(imgs / "1.png")  # 512x512
    Image.fromarray(skimage.data.chelsea()).save(imgs / "2.png")  # 451x300
    Image.fromarray(skimage.data.coffee()).save(imgs / "3.png")  # no annotation
    vocab = root / "objects_vocab.txt"
    vocab.write_text("\n".join(NAMES) + "\n")
    boxes1 = [[10, 20, 200, 300], [100, 50, 400, 500], [0, 0, 511, 511]]
    boxes2 = [[30, 40, 250, 280], [5, 5, 80, 60]]
    coco = {"images": [{"id": 1, "file_name": "1.png"}, {"id": 2, "file_name": "2.png"}],
            "categories": [{"id": 7, "name": "dog"}, {"id": 8, "name": "man"}, {"id": 9, "name": "puppy"},
                           {"id": 10, "name": "spaceship"}],
            "annotations": [{"image_id": 1, "bbox": [10, 20, 190, 280], "category_id": 7},
                            {"image_id": 1, "bbox": [100, 50, 300, 450], "category_id": 8},
                            {"image_id": 1, "bbox": [0, 0, 511, 511], "category_id": 10},
                            {"image_id": 2, "bbox": [30, 40, 220, 240], "category_id": 9},
                            {"image_id": 2, "bbox": [5, 5, 75, 55], "category_id": 7}]}
    (root / "coco.json").write_text(json.dumps(coco))
    vg = [{"image_id": 1, "objects": [{"x": 10, "y": 20, "w": 190, "h": 280, "names": ["dog"]},
                                      {"x": 100, "y": 50, "w": 300, "h": 450, "names": ["man"]},
                                      {"x": 0, "y": 0, "w": 511, "h": 511, "names": ["spaceship"]}]},
          {"image_id": 2, "objects": [{"x": 30, "y": 40, "w": 220, "h": 240, "names": ["puppy"]},
                                      {"x": 5, "y": 5, "w": 75, "h": 55, "names": ["dog"]}]}]
    (root / "vg_objects.json").write_text(json.dumps(vg))
    lines = [json.dumps({"image": "1.png", "boxes": boxes1, "labels": ["dog", "man", "spaceship"]}),
             json.dumps({"image": "2.png", "boxes": boxes2, "labels": ["puppy", "dog"]}),
             "{not json"]
    (root / "boxes.jsonl").write_text("\n".join(lines) + "\n")
    return {"root": root, "images": imgs, "vocab": vocab, "boxes1": boxes1, "boxes2": boxes2}


def test_given_boxes_give_the_features_the_head_computes(det):
    image = skimage.data.astronaut()
    (found,) = det([image])
    item = (*det.preprocess(image), image.shape[:2])
    (given,) = det.detect_at_boxes([item], [found.boxes], [found.concepts])
    np.testing.assert_array_equal(given.boxes, found.boxes)
    np.testing.assert_array_equal(given.concepts, found.concepts)
    assert np.all(given.confidences == 1.0)
    np.testing.assert_allclose(given.features, found.features, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(given.attr_ids, found.attr_ids)
    # in a batch with another image, the same
    other = skimage.data.chelsea()
    both = det.detect_at_boxes([(*det.preprocess(other), other.shape[:2]), item],
                               [np.array([[0, 0, 100, 100]], np.float32), found.boxes],
                               [np.array([3]), found.concepts])
    np.testing.assert_allclose(both[1].features, found.features, rtol=1e-4, atol=1e-4)


@pytest.mark.slow  # loads WordNet (about half a minute the first time)
@pytest.mark.parametrize("name,fmt", [("coco.json", "coco"), ("vg_objects.json", "visual_genome"),
                                      ("boxes.jsonl", "jsonl")])
def test_annotation_formats_and_category_mapping(world, name, fmt):
    ann = read_annotations(world["root"] / name)
    assert ann.format == fmt
    one = ann.lookup("1", str(world["images"] / "1.png"))
    assert one is not None and one.names == ["dog", "man", "spaceship"]
    np.testing.assert_allclose(one.boxes, world["boxes1"])
    assert ann.lookup("3", str(world["images"] / "3.png")) is None
    assert len(ann.problems) == (1 if fmt == "jsonl" else 0)
    cmap = map_categories(ann.category_counts(), read_vocab_txt(world["vocab"]))
    assert cmap.to_concept == {"dog": 0, "man": 1, "puppy": 0}  # name, variant, WordNet synonym
    assert cmap.how["puppy"].startswith("wordnet:") and cmap.how["man"] == "variant"
    assert cmap.unmapped == {"spaceship": 1}
    assert "spaceship (1)" in cmap.summary()
    off = map_categories(ann.category_counts(), read_vocab_txt(world["vocab"]), synonyms=False)
    assert off.unmapped == {"spaceship": 1, "puppy": 1}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["coco.json", "vg_objects.json", "boxes.jsonl"])
def test_gallery_of_annotated_boxes(world, det, name, tmp_path):
    out = tmp_path / "g"
    report = build_gallery(BuildOptions(images=str(world["images"]), detector=str(TINY), out=str(out),
                                        vocab=str(world["vocab"]), boxes=str(world["root"] / name),
                                        ray_address="none", device="cpu", threads=1, progress=False))
    assert any("spaceship (1)" in n for n in report.notes)
    assert [f["reason"] for f in report.failed] == ["no boxes for this image in the annotations"]
    r = GalleryReader(out)
    prov = r.header["provenance"]["boxes"]
    assert prov["from"] == "annotations" and prov["categories_unmapped"] == {"spaceship": 1}
    assert prov["categories_mapped"] == {"dog": "dog", "man": "person", "puppy": "dog"}
    assert len(r) == 4  # 2 + 2 mapped boxes; the spaceship is left out
    by_image: dict[str, list] = {}
    for pid in range(len(r)):
        p = r.patch(pid)
        by_image.setdefault(r.image(p.image).key, []).append(p)
    want = {"1.png": (world["boxes1"][:2], [0, 1]), "2.png": (world["boxes2"], [0, 0])}
    for key, (boxes, concepts) in want.items():
        patches = by_image[key]
        assert [p.concept for p in patches] == concepts and all(p.confidence == 1.0 for p in patches)
        np.testing.assert_allclose([list(p.box) for p in patches], boxes)
        image = np.asarray(Image.open(world["images"] / key).convert("RGB"))
        (direct,) = det.detect_at_boxes([(*det.preprocess(image), image.shape[:2])],
                                        [np.asarray(boxes, np.float32)], [np.asarray(concepts)])
        stored = np.stack([np.asarray(p.feature, np.float32) for p in patches])
        np.testing.assert_allclose(stored, direct.features, rtol=2e-3, atol=2e-3)  # stored as fp16


def _exif_rotated_rgba() -> bytes:
    img = Image.new("RGBA", (64, 32), (255, 0, 0, 0))  # fully transparent red
    img.paste((0, 0, 255, 255), (0, 0, 16, 32))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    buf = io.BytesIO()
    img.save(buf, format="PNG", exif=exif.tobytes())
    return buf.getvalue()


def test_reference_decode_is_open_and_convert():
    data = _exif_rotated_rgba()
    std = decode_bytes(data, DecodePolicy(strict_modes=False))
    ref = decode_bytes(data, DecodePolicy(strict_modes=False, mode="reference"))
    assert std.array.shape == (64, 32, 3) and ref.array.shape == (32, 64, 3)  # no EXIF rotation
    assert tuple(std.array[-1, -1]) == (255, 255, 255)  # transparent: white
    assert tuple(ref.array[0, -1]) == (255, 0, 0)  # transparent: its colour, as convert("RGB")
    want = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    np.testing.assert_array_equal(ref.array, want)
    with pytest.raises(ValueError):
        DecodePolicy(mode="exif")


def test_decode_mode_in_provenance_and_flat_image_recorded(world, tmp_path):
    from vlmixer.cli import main

    imgs = tmp_path / "imgs"
    imgs.mkdir()
    Image.fromarray(skimage.data.chelsea()).save(imgs / "cat.png")
    flat = np.random.default_rng(0).integers(0, 255, size=(20, 10000, 3), dtype=np.uint8)
    Image.fromarray(flat).save(imgs / "flat.png")
    out = tmp_path / "g"
    rc = main(["gallery", "build", "--images", str(imgs), "--detector", str(TINY), "--vocab", str(world["vocab"]),
               "--out", str(out), "--ray-address", "none", "--device", "cpu", "--no-progress",
               "--decode", "reference"])
    assert rc == 3  # some images failed
    r = GalleryReader(out)
    assert r.header["provenance"]["build"]["decode"] == "reference"
    assert r.header["provenance"]["boxes"] == {"from": "detector"}
    (fail,) = r.failures()
    assert fail["key"] == "flat.png" and "minimum box size of 1 px" in fail["reason"]
    heights = [r.patch(i).box[3] - r.patch(i).box[1] for i in range(len(r))]
    assert len(heights) >= 10 and min(heights) >= 1
    # resuming with the other decode mode, or with annotated boxes, would mix two kinds of patches
    base = ["gallery", "build", "--images", str(imgs), "--detector", str(TINY), "--vocab", str(world["vocab"]),
            "--out", str(out), "--ray-address", "none", "--device", "cpu", "--no-progress"]
    assert main(base) == 2
    assert main(base + ["--decode", "reference", "--boxes", str(world["root"] / "boxes.jsonl")]) == 2


def test_bad_annotation_files_are_one_line_errors(tmp_path):
    from vlmixer.errors import VlmixerError

    bad = tmp_path / "a.json"
    bad.write_text("{not json")
    with pytest.raises(VlmixerError, match=r"a\.json: not json"):
        read_annotations(bad)
    other = tmp_path / "b.json"
    other.write_text(json.dumps({"something": []}))
    with pytest.raises(VlmixerError, match="expected COCO instances"):
        read_annotations(other)
    with pytest.raises(VlmixerError, match="cannot read box annotations"):
        read_annotations(tmp_path / "missing.json")
    coco = tmp_path / "c.json"
    coco.write_text(json.dumps({"images": [], "categories": [{"id": 1, "name": "dog"}],
                                "annotations": [{"image_id": 1, "bbox": [0, 0, 5], "category_id": 1},
                                                {"image_id": 1, "bbox": [0, 0, 5, 5], "category_id": 2}]}))
    ann = read_annotations(coco)
    assert ann.images == {} and len(ann.problems) == 2  # recorded, not raised
    assert "4 numbers" in ann.problems[0] and "category_id 2" in ann.problems[1]
