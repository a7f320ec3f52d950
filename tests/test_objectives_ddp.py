"""The paired task under torchrun (2 processes, gloo on CPU): queues fill with every rank's momentum
features and stay identical across ranks, as do the model and the momentum model."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vlmixer.storage.synthetic import paired_stores
from vlmixer.trainer.smoke import TINY_OVERRIDES

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent('''
    import sys
    sys.path.insert(0, {repo!r})
    import torch
    torch.set_num_threads(1)
    from vlmixer.trainer import distributed as td
    from vlmixer.trainer.loop import load_train_config, train

    td.setup("cpu")
    train(load_train_config({cfg!r}, {overrides!r}))
    td.teardown()
''')


@pytest.mark.slow
def test_paired_task_under_torchrun(tmp_path: Path) -> None:
    import torch

    from vlmixer.trainer.checkpoint import latest_checkpoint, load_checkpoint

    g, t = paired_stores(tmp_path / "s", n_images=16, captions_per_image=2, feature_dim=64)
    run = tmp_path / "run"
    overrides = [*TINY_OVERRIDES, f"data.gallery={g}", f"data.paired_text_stores=[{t}]", f"run.out_dir={run}",
                 "optim.total_steps=3", "run.ckpt_every=3", "objective.queue_size=64", "optim.batch_size=8",
                 "objective.aug_patch_drop=0.2", "objective.aug_feature_noise=0.1"]
    script = tmp_path / "ddp_paired.py"
    script.write_text(SCRIPT.format(repo=str(REPO),
                                    cfg=str(REPO / "configs" / "pretrain" / "tcl_paired.yaml"), overrides=overrides))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], cwd=tmp_path, env=dict(os.environ, OMP_NUM_THREADS="1"),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["task"] == "paired" for r in rows)
    state = load_checkpoint(latest_checkpoint(run))
    assert state["world_size"] == 2
    ex = state["objectives"]
    # 3 steps x 2 ranks x 4 pairs = 24 momentum features per queue, gathered from both ranks
    assert int(ex["paired.txt_queue.ptr"]) == 24 and int(ex["paired.img_queue.ptr"]) == 24
    q = ex["paired.txt_queue.feats"][:24]
    assert torch.allclose(q.norm(dim=1), torch.ones(24), atol=1e-4)
