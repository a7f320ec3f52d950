"""Two processes under torchrun (gloo on CPU): global CMCL negatives and a DDP training run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vlmixer.storage.synthetic import tiny_stores
from vlmixer.trainer.checkpoint import latest_checkpoint, load_checkpoint

REPO = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent('''
    import json, sys
    sys.path.insert(0, {repo!r})
    import torch
    torch.set_num_threads(1)
    import torch.distributed as dist
    import vlmixer.trainer.objectives.valp as valp
    from vlmixer.trainer import distributed as td
    from vlmixer.trainer.objectives.valp import cmcl_loss

    out = {out!r}
    info = td.setup("cpu")
    r, W, B = info.rank, info.world_size, 4
    res = {{"rank": r, "world": W}}

    # 1. the gathered CMCL equals the single-process loss over the global batch, gradients included
    g = torch.Generator().manual_seed(0)
    T = torch.randn(W * B, 8, generator=g, dtype=torch.float64)
    S = torch.randn(W * B, 8, generator=g, dtype=torch.float64)
    t = T[r * B:(r + 1) * B].clone().requires_grad_()
    s = S[r * B:(r + 1) * B].clone().requires_grad_()
    loss, n = cmcl_loss(t, s, 0.1, True)
    loss.backward()
    Tf, Sf = T.clone().requires_grad_(), S.clone().requires_grad_()
    ref, _ = cmcl_loss(Tf, Sf, 0.1, False)  # whole batch in one process, no gather
    ref.backward()
    mean = loss.detach().clone()
    dist.all_reduce(mean)
    res["candidates"] = n
    res["loss_ok"] = abs(float(mean) / W - float(ref)) < 1e-9
    # DDP averages gradients over the W processes
    res["grad_t_ok"] = torch.allclose(t.grad / W, Tf.grad[r * B:(r + 1) * B], atol=1e-10)
    res["grad_s_ok"] = torch.allclose(s.grad / W, Sf.grad[r * B:(r + 1) * B], atol=1e-10)

    # 2. a DDP training run: record what the first CMCL gather returned on this rank
    seen = {{}}
    real_gather = valp.all_gather_with_grad

    def spy(x):
        y = real_gather(x)
        if not seen:
            seen["local"], seen["all"] = x.detach().clone(), y.detach().clone()
        return y

    valp.all_gather_with_grad = spy
    from vlmixer.trainer.loop import load_train_config, train
    cfg = load_train_config({cfg!r}, {overrides!r})
    info2 = train(cfg)
    locals_ = [None] * W
    dist.all_gather_object(locals_, seen["local"])
    n_loc = seen["local"].shape[0]
    res["gathered_rows"] = seen["all"].shape[0]
    res["gather_has_every_rank"] = all(
        torch.equal(seen["all"][q * n_loc:(q + 1) * n_loc], locals_[q]) for q in range(W))
    res["other_rank_differs"] = not torch.equal(locals_[0], locals_[1])
    res["step"] = info2["step"]
    json.dump(res, open(f"{{out}}/rank{{r}}.json", "w"))
    td.teardown()
''')


@pytest.mark.slow
def test_torchrun_two_processes(tmp_path: Path) -> None:
    g, t = tiny_stores(tmp_path / "stores", n_images=24, n_sentences=96, feature_dim=32)
    run = tmp_path / "run"
    overrides = [f"data.gallery={g}", f"data.text_stores=[{t}]", f"run.out_dir={run}", "model.feature_dim=32",
                 "run.progress=false", "data.tavp_ratio=0.3", "optim.total_steps=4", "run.log_every=1",
                 "run.ckpt_every=2", "optim.batch_size=16"]
    script = tmp_path / "ddp_script.py"
    script.write_text(SCRIPT.format(repo=str(REPO), out=str(tmp_path),
                                    cfg=str(REPO / "configs" / "pretrain" / "tiny.yaml"), overrides=overrides))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for r in (0, 1):
        res = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert res["world"] == 2 and res["candidates"] == 8
        assert res["loss_ok"] and res["grad_t_ok"] and res["grad_s_ok"], res
        # CMCL negatives of each rank are the global micro-batch: 8 local + 8 from the other process
        assert res["gathered_rows"] == 16 and res["gather_has_every_rank"] and res["other_rank_differs"], res
        assert res["step"] == 4
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["cmcl_candidates"] == 16 for r in rows if r["task"] == "valp")
    state = load_checkpoint(latest_checkpoint(run))
    assert state["world_size"] == 2 and len(state["rng"]) == 2
