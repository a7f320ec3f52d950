"""Train each related-system config 100 steps on tiny paired stores on CPU and report every loss term.

    python bench/objectives.py [--steps 100] [--images 64] [KEY=VALUE ...]

Each config under configs/pretrain/ (albef_paired, tcl_paired, xvlm_paired, vlmixer_plus_itc) is shrunk
by trainer.synthetic.TINY_OVERRIDES (a 2-layer 64-wide random BERT, batch 16), SMOKE below, then any KEY=VALUE,
and trained on `paired_stores` (+ `tiny_stores` for VALP/TAVP). Per task and term it prints the mean of
the first and the last fifth of the logged steps, so "losses decrease" is a table, not a claim.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from trainer.loop import load_train_config, train  # noqa: E402
from trainer.synthetic import TINY_OVERRIDES, paired_stores, tiny_stores  # noqa: E402

CONFIGS = ("albef_paired", "tcl_paired", "xvlm_paired", "vlmixer_plus_itc")
# queues scaled to the tiny store (the configs' 65536 would be random vectors for all 100 steps);
# vlmixer_plus_itc also trains objective.views (ITC + LMI over the CMC views) on its VALP steps
SMOKE = {"albef_paired": ["objective.queue_size=64"], "tcl_paired": ["objective.queue_size=64"], "xvlm_paired": [],
         "vlmixer_plus_itc": ["objective.queue_size=64", "objective.views={itc: 1.0, lmi: 1.0}"]}
NOT_LOSSES = {"step", "task", "lr", "grad_norm", "samples_per_s", "data_frac", "pairs", "box_targets",
              "cmcl_candidates", "mlm_tokens", "tag_tokens", "patch_targets"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--images", type=int, default=64, help="paired images (3 captions each)")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS))
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    torch.set_num_threads(1)
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        g, t = paired_stores(root / "p", n_images=args.images, captions_per_image=3, feature_dim=64)
        _, u = tiny_stores(root / "u", n_images=16, n_sentences=128, feature_dim=64)
        for name in args.configs:
            out = root / name
            ov = [*TINY_OVERRIDES, f"data.gallery={g}", f"data.paired_text_stores=[{t}]", f"data.text_stores=[{u}]",
                  f"run.out_dir={out}", f"optim.total_steps={args.steps}", *SMOKE.get(name, []), *args.overrides]
            t0 = time.perf_counter()
            train(load_train_config(repo / "configs" / "pretrain" / f"{name}.yaml", ov))
            dt = time.perf_counter() - t0
            rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
            print(f"## {name}: {args.steps} steps in {dt:.1f} s ({1000 * dt / args.steps:.0f} ms/step)")
            print("| task | term | first fifth | last fifth | |\n| --- | --- | --- | --- | --- |")
            for task in sorted({r["task"] for r in rows}):
                rs = [r for r in rows if r["task"] == task]
                k = max(1, len(rs) // 5)
                for key in sorted({kk for r in rs for kk in r} - NOT_LOSSES):
                    a = sum(r[key] for r in rs[:k]) / k
                    b = sum(r[key] for r in rs[-k:]) / k
                    print(f"| {task} ({len(rs)} steps) | {key} | {a:.3f} | {b:.3f} | {'down' if b < a else 'NOT down'} |")
            print(flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
