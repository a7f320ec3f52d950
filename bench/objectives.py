"""Train each related-system config 100 steps on tiny paired stores on CPU and report every loss term.

    python bench/objectives.py [--steps 100] [--images 64] [KEY=VALUE ...]

Each config under configs/pretrain/ (albef_paired, tcl_paired, xvlm_paired, vlmixer_plus_itc; and
xvlm_box_visible, X-VLM with the box target's own box left in the box task's input) is shrunk
by vlmixer.trainer.smoke.TINY_OVERRIDES (a 2-layer 64-wide BERT, batch 16), SMOKE below, then any KEY=VALUE,
and trained on `paired_stores` (+ `tiny_stores` for VALP/TAVP). Per task and term it prints the mean of
the first and the last fifth of the logged steps, so "losses decrease" is a table, not a claim.

Like the papers (ALBEF, TCL and X-VLM start from pretrained BERT and vision encoders), the runs start
from a pretrained tiny BERT: `--warmup-steps` VLMixer steps (VALP + TAVP) on the unpaired tiny stores,
exported as a BERT checkpoint for `model.pretrained`. Why: a random BERT's unimodal [CLS] carries no
input at all (without dropout every image's [CLS] is the same vector, cosine 1.000; with dropout the
spread is the dropout mask's, two passes of one image are further apart than two images), so the momentum
model's features, the queue and the distillation targets hold nothing to learn for as long as the EMA
(0.995: ~200 steps) takes to catch up; the only signal left is how stale a queue entry is, and the online
features collapse onto that one direction. `--warmup-steps 0` runs from the random init.
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

import torch

from vlmixer.storage.synthetic import paired_stores, tiny_stores
from vlmixer.trainer.loop import load_train_config, train
from vlmixer.trainer.smoke import TINY_OVERRIDES

CONFIGS = ("albef_paired", "tcl_paired", "xvlm_paired", "xvlm_box_visible", "vlmixer_plus_itc")
# runs of a config with a key changed: X-VLM's box task with the target's own box left in its input, to
# show what hiding it (objective.box_hide: geometry, the default) costs the box loss
VARIANTS = {"xvlm_box_visible": ("xvlm_paired", ["objective.box_hide=none"])}
# queues scaled to the tiny store (the configs' 65536 would be random vectors for all 100 steps);
# vlmixer_plus_itc also trains objective.views (ITC + LMI over the CMC views) on its VALP steps
SMOKE = {"albef_paired": ["objective.queue_size=64"], "tcl_paired": ["objective.queue_size=64"], "xvlm_paired": [],
         "vlmixer_plus_itc": ["objective.queue_size=64", "objective.views={itc: 1.0, lmi: 1.0}"]}
NOT_LOSSES = {"step", "task", "lr", "grad_norm", "samples_per_s", "data_frac", "pairs", "box_targets",
              "cmcl_candidates", "cmcl_negatives", "mlm_tokens", "tag_tokens", "patch_targets", "temp"}


def pretrained_tiny_bert(root: Path, gallery: Path, text: Path, steps: int) -> Path:
    """Train the tiny model `steps` VLMixer steps on unpaired stores and save its BERT for `model.pretrained`.

    The paired runs then start, as the papers do, from an encoder whose [CLS] depends on its input; the
    patch embedding, projection and heads start fresh (the papers' projection and heads do too).
    """
    from transformers import BertConfig, BertForPreTraining

    from vlmixer.trainer.checkpoint import latest_checkpoint, load_checkpoint

    cfg = load_train_config(Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "vlmixer_base.yaml",
                            [*TINY_OVERRIDES, f"data.gallery={gallery}", f"data.text_stores=[{text}]",
                             f"run.out_dir={root / 'run'}", f"optim.total_steps={steps}"])
    train(cfg)
    ck = latest_checkpoint(root / "run")
    assert ck is not None
    state = load_checkpoint(ck)["model"]
    fields = {**cfg.model.bert, "vocab_size": int(state["bert.embeddings.word_embeddings.weight"].shape[0])}
    bert = BertForPreTraining(BertConfig(**fields))
    # VLMixerModel keeps BertForPreTraining's `bert` as `bert` and `cls.predictions` as `mlm_head`
    sd = {k: v for k, v in state.items() if k.startswith("bert.")}
    sd.update({"cls.predictions." + k[len("mlm_head."):]: v for k, v in state.items() if k.startswith("mlm_head.")})
    missing = bert.load_state_dict(sd, strict=False).missing_keys
    assert all(k.startswith("cls.seq_relationship") for k in missing), missing  # NSP head: unused
    bert.save_pretrained(root / "bert")
    return root / "bert"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--images", type=int, default=64, help="paired images (3 captions each)")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS))
    ap.add_argument("--warmup-steps", type=int, default=100,
                    help="VLMixer steps that pretrain the tiny BERT the runs start from (0: random init)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    # `--configs a b KEY=VALUE` would take the override for a config name: sort them apart
    args.overrides = [*args.overrides, *(c for c in args.configs if "=" in c)]
    args.configs = [c for c in args.configs if "=" not in c]
    torch.set_num_threads(1)
    repo = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        g, t = paired_stores(root / "p", n_images=args.images, captions_per_image=3, feature_dim=64)
        ug, u = tiny_stores(root / "u", n_images=16, n_sentences=128, feature_dim=64)
        init = []
        if args.warmup_steps > 0:
            t0 = time.perf_counter()
            bert = pretrained_tiny_bert(root / "warmup", ug, u, args.warmup_steps)
            init = [f"model.pretrained={bert}"]
            print(f"## pretrained tiny BERT: {args.warmup_steps} VLMixer steps in {time.perf_counter() - t0:.1f} s\n")
        for name in args.configs:
            out = root / name
            base, changed = VARIANTS.get(name, (name, []))
            ov = [*TINY_OVERRIDES, f"data.gallery={g}", f"data.paired_text_stores=[{t}]", f"data.text_stores=[{u}]",
                  f"run.out_dir={out}", f"optim.total_steps={args.steps}", *init, *SMOKE.get(base, []), *changed,
                  *args.overrides]
            t0 = time.perf_counter()
            train(load_train_config(repo / "configs" / "pretrain" / f"{base}.yaml", ov))
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
