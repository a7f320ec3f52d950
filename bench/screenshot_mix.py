"""Render a `mix.html` in headless Chromium and save a screenshot, to see the patches as a reader would.

    python bench/screenshot_mix.py demo_out/mix.html --out demo_out/mix_screenshot.png

Needs Debian's chromium (`apt-get install chromium`); the page is opened from
disk with the flags that keep Chromium off the network. Prints the screenshot
path and how many of its pixels are not page background (a blank render
prints ~0%).
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars"]


def screenshot(html: Path, out: Path, width: int = 1200, height: int = 1600, chromium: str | None = None) -> Path:
    exe = chromium or shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        raise SystemExit("chromium not found: apt-get install chromium")
    with tempfile.TemporaryDirectory() as profile:
        cmd = [exe, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
               f"--screenshot={out.resolve()}", html.resolve().as_uri()]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("html", type=Path)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    out = a.out or a.html.with_name(a.html.stem + "_screenshot.png")
    screenshot(a.html, out)
    img = np.asarray(Image.open(out).convert("RGB")).astype(int)
    bg = np.median(img.reshape(-1, 3), axis=0)
    busy = (np.abs(img - bg).sum(-1) > 30).mean()
    print(f"{out}: {img.shape[1]}x{img.shape[0]}, {100 * busy:.1f}% non-background pixels")
    return 0


if __name__ == "__main__":
    sys.exit(main())
