"""End to end on the tiny config: loss goes down, resume is exact, NaN stops, configs are checked."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vlmixer.errors import ConfigError
from vlmixer.storage.synthetic import tiny_stores
from vlmixer.trainer.checkpoint import latest_checkpoint, load_checkpoint
from vlmixer.trainer.loop import TrainingDiverged, load_train_config, train

TINY = Path(__file__).resolve().parents[1] / "configs" / "pretrain" / "tiny.yaml"





@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return tiny_stores(tmp_path_factory.mktemp("loop"), n_images=40, n_sentences=160, feature_dim=64)


def cfg_for(stores: tuple[Path, Path], out: Path, *extra: str):  # noqa: ANN201
    g, t = stores
    return load_train_config(TINY, [f"data.gallery={g}", f"data.text_stores=[{t}]", f"run.out_dir={out}",
                                    "model.feature_dim=64", "run.progress=false", *extra])


def metrics(out: Path) -> dict[int, dict]:
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return {r["step"]: r for r in rows}


def test_valp_loss_goes_down_in_200_steps(stores: tuple[Path, Path], tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(cfg_for(stores, out, "data.tavp_ratio=0", "optim.total_steps=200", "run.log_every=1",
                  "run.ckpt_every=1000"))
    m = metrics(out)
    assert sorted(m) == list(range(1, 201)) and all(r["task"] == "valp" for r in m.values())
    first = sum(m[s]["loss"] for s in range(1, 11)) / 10
    last = sum(m[s]["loss"] for s in range(191, 201)) / 10
    assert last < first - 1.0, (first, last)
    assert sum(m[s]["cmcl"] for s in range(191, 201)) / 10 < sum(m[s]["cmcl"] for s in range(1, 11)) / 10
    assert all(r["cmcl_candidates"] == 16 for r in m.values())
    assert (out / "checkpoints" / "step_00000200.pt").exists() and any((out / "tb").iterdir())


def test_resume_after_kill_gives_the_same_losses(stores: tuple[Path, Path], tmp_path: Path) -> None:
    common = ("data.tavp_ratio=0.3", "optim.total_steps=24", "optim.grad_accum=2", "run.log_every=1",
              "run.ckpt_every=5")
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(cfg_for(stores, full, *common))
    # "killed" right after step 13: the last checkpoint is step 10, steps 11-13 are redone
    train(cfg_for(stores, cut, *common, "run.stop_at_step=13"))
    assert latest_checkpoint(cut).name == "step_00000010.pt"
    train(cfg_for(stores, cut, *common), resume=True)
    a, b = metrics(full), metrics(cut)
    assert sorted(b) == list(range(1, 25))
    tasks = {a[s]["task"] for s in range(11, 21)}
    assert tasks == {"valp", "tavp"}  # both tasks are exercised across the resume
    for s in range(11, 21):
        for k in ("loss", "grad_norm", "lr"):
            assert b[s][k] == pytest.approx(a[s][k], rel=1e-5, abs=1e-6), (s, k)
    sa = load_checkpoint(latest_checkpoint(full))
    sb = load_checkpoint(latest_checkpoint(cut))
    assert sa["step"] == sb["step"] == 24 and sa["consumed"] == sb["consumed"]
    for k, v in sa["model"].items():
        assert torch.allclose(v, sb["model"][k], atol=1e-5), k


def test_nan_guard_stops_with_a_message(stores: tuple[Path, Path], tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import vlmixer.trainer.objectives as objectives

    def bad(t, s, tau, global_negatives=True):  # noqa: ANN001, ANN202
        return (t.sum() + s.sum()) * float("nan"), t.shape[0]

    monkeypatch.setattr(objectives, "cmcl_loss", bad)
    with pytest.raises(TrainingDiverged, match="step 1: the valp loss is not finite"):
        train(cfg_for(stores, tmp_path / "nan", "data.tavp_ratio=0", "optim.total_steps=3"))


def test_config_is_checked_before_work(stores: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown config key optim.lrr"):
        cfg_for(stores, tmp_path, "optim.lrr=1")
    with pytest.raises(ConfigError, match="not divisible"):
        train(cfg_for(stores, tmp_path / "x", "optim.batch_size=10", "optim.grad_accum=3"))
    with pytest.raises(ConfigError, match="r_cmc"):
        train(cfg_for(stores, tmp_path / "x", "cmc.r_cmc=1.5"))
    out = tmp_path / "r"
    train(cfg_for(stores, out, "optim.total_steps=2", "run.ckpt_every=1"))
    with pytest.raises(ConfigError, match="cmc.r_ctx"):
        train(cfg_for(stores, out, "optim.total_steps=4", "cmc.r_ctx=0.9"), resume=True)
    with pytest.raises(Exception, match="no checkpoint"):
        train(cfg_for(stores, tmp_path / "empty", "optim.total_steps=2"), resume=True)


def test_cli_train_in_process(stores: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from vlmixer.cli import main

    g, t = stores
    out = tmp_path / "cli"
    rc = main(["train", "--config", str(TINY), f"data.gallery={g}", f"data.text_stores=[{t}]", f"run.out_dir={out}",
               "model.feature_dim=64", "run.progress=false", "optim.total_steps=3"])
    assert rc == 0 and (out / "checkpoints" / "step_00000003.pt").exists()
    assert main(["train", "--config", str(TINY), f"data.gallery={g}", "optim.bogus=1"]) == 2
    assert "unknown config key optim.bogus" in capsys.readouterr().err


@pytest.mark.slow
def test_sigkill_then_cli_resume(stores: tuple[Path, Path], tmp_path: Path) -> None:
    """A real `kill -9` of `vlmixer train` mid-run; `--resume` continues exactly from its last checkpoint."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from vlmixer.cli import main

    g, t = stores
    repo = Path(__file__).resolve().parents[1]
    common = [f"data.gallery={g}", f"data.text_stores=[{t}]", "model.feature_dim=64", "run.progress=false",
              "data.tavp_ratio=0.3", "optim.total_steps=400", "run.log_every=1", "run.ckpt_every=4"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "vlmixer", "train", "--config", str(TINY), *common,
                             f"run.out_dir={killed}"], cwd=repo, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            if (killed / "metrics.jsonl").exists() and len(metrics(killed)) >= 11:
                break
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    ck = latest_checkpoint(killed)
    assert ck is not None
    n = load_checkpoint(ck)["step"]
    assert n >= 8  # a kill may land mid-save: a stale temporary may remain until the next save
    assert main(["train", "--config", str(TINY), *common, f"run.out_dir={killed}", f"run.stop_at_step={n + 10}",
                 "--resume"]) == 0
    assert not list((killed / "checkpoints").glob(".*.tmp"))  # the next saves cleared any stale temporary
    ref = tmp_path / "ref"
    assert main(["train", "--config", str(TINY), *common, f"run.out_dir={ref}", f"run.stop_at_step={n + 10}"]) == 0
    a, b = metrics(ref), metrics(killed)
    for s in range(n + 1, n + 11):
        assert b[s]["task"] == a[s]["task"]
        assert b[s]["loss"] == pytest.approx(a[s]["loss"], rel=1e-5, abs=1e-6), s


def test_base_config_has_the_paper_defaults() -> None:
    cfg = load_train_config(TINY.parent / "vlmixer_base.yaml", [])
    assert (cfg.optim.lr, cfg.optim.batch_size, cfg.optim.total_steps) == (5e-5, 1024, 300_000)
    assert (cfg.cmc.r_cmc, cfg.cmc.r_ctx, cfg.cmc.k_shot, cfg.objective.tau) == (0.5, 0.5, 15, 0.1)
    assert cfg.model.pretrained == "bert-base-uncased" and cfg.model.bert["hidden_size"] == 768
    assert (cfg.data.max_len_valp, cfg.data.max_len_tavp) == (80, 100)
    assert cfg.objective.mlm_prob == 0.15 and cfg.objective.cmcl_global_negatives
