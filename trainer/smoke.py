"""Overrides that shrink any bundled pre-training config to a CPU smoke run.

Tests, `bench/objectives.py` and the demo train on the tiny stores of
`vlmixer.storage.synthetic` (feature_dim 64) in seconds; these overrides give
the matching model and loop sizes.
"""
from __future__ import annotations

# overrides that shrink any configs/pretrain/*.yaml to a CPU smoke run on `tiny_stores`/`paired_stores`
# (feature_dim 64): a 2-layer 64-wide random BERT, batch 16, short inputs, a higher LR with a short
# warmup (contrastive terms of a random-init model sit on a plateau for tens of steps at 1e-3).
# Objective settings (queues, momentum) are the config's: scale queues to a tiny store yourself.
TINY_OVERRIDES = [
    "model.pretrained=", "model.bert={hidden_size: 64, num_hidden_layers: 2, num_attention_heads: 2, "
    "intermediate_size: 128, max_position_embeddings: 128, vocab_size: 0}",
    "model.feature_dim=64", "model.proj_dim=32", "optim.lr=3.0e-3", "optim.batch_size=16", "optim.warmup_steps=5",
    "run.device=cpu", "run.precision=fp32", "run.progress=false", "run.ckpt_every=1000", "run.log_every=1",
    "data.num_workers=0", "data.max_len_tavp=48", "data.max_tag_tokens=16", "data.max_caption_tokens=24",
    "data.max_patches=8", "cmc.k_shot=4",
]
