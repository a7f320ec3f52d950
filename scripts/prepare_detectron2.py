"""Fetch detectron2 v0.6's source from the package registry and make it pure Python.

The registry holds it as `pb1-detectron2==0.6`, a source tree identical to
detectron2 v0.6 but without the C++ sources, so its extension build fails;
its metadata also names a direct-URL extra that pip refuses to download. We
fetch the sdist by its pinned sha256 from the index pip uses, unpack it, and
drop from setup.py the torch imports, the torch-version assert and the
`ext_modules=`/`cmdclass=` arguments. The C4 detector path needs none of the
compiled ops: NMS and RoIAlign come from torchvision.

usage: prepare_detectron2.py DEST_DIR   -> prints the unpacked source directory
"""
from __future__ import annotations

import hashlib
import os
import re
import sys
import tarfile
import urllib.request
from pathlib import Path

NAME = "pb1-detectron2"
FILE = "pb1-detectron2-0.6.tar.gz"
SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"


def index_url() -> str:
    url = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    return f"{url}/{NAME}/"


def fetch(dest: Path) -> Path:
    target = dest / FILE
    if target.exists() and hashlib.sha256(target.read_bytes()).hexdigest() == SHA256:
        return target
    page = urllib.request.urlopen(index_url(), timeout=120).read().decode("utf-8")
    links = re.findall(r'href="([^"]+)"', page)
    link = next((u for u in links if FILE in u), None)
    if link is None:
        sys.exit(f"{FILE} not listed at {index_url()}")
    if link.startswith("/"):
        base = re.match(r"^(https?://[^/]+)", index_url())
        link = (base.group(1) if base else "") + link
    data = urllib.request.urlopen(link.split("#")[0], timeout=300).read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != SHA256:
        sys.exit(f"{FILE}: sha256 {digest} does not match the pinned {SHA256}")
    target.write_bytes(data)
    return target


def patch_setup(path: Path) -> None:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        top_level_torch = line.startswith(("import torch", "from torch", "torch_ver =", "assert torch_ver"))
        setup_ext_arg = line.strip().startswith(("ext_modules=", "cmdclass="))
        if not (top_level_torch or setup_ext_arg):
            out.append(line)
    text = "\n".join(out) + "\n"
    if re.search(r"^\s*(ext_modules|cmdclass)=", text, re.M) or re.search(r"^import torch", text, re.M):
        sys.exit(f"{path}: could not make setup.py pure Python")
    path.write_text(text, encoding="utf-8")


def main() -> None:
    dest = Path(sys.argv[1])
    dest.mkdir(parents=True, exist_ok=True)
    tgz = fetch(dest)
    with tarfile.open(tgz) as tf:
        tf.extractall(dest, filter="data")
    src = dest / "pb1-detectron2-0.6"
    patch_setup(src / "setup.py")
    print(src)


if __name__ == "__main__":
    main()
