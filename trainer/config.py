"""Every key of a `vlmixer train` config, declared and commented in one place.

A YAML file under `configs/pretrain/` is merged over these defaults by
`vlmixer.config.load_config` (unknown keys are errors), then `key=value`
overrides from the command line. `validate` checks cross-key constraints
before any store is opened, so a typo fails in the first second, not after
the model is built. Defaults are the paper's where it gives one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from vlmixer.config import from_dict
from vlmixer.errors import ConfigError


@dataclass
class DataConfig:
    # text stores (directories written by `vlmixer text tag`) feeding VALP; concatenated in order
    text_stores: list[str] = field(default_factory=list)
    # the patch gallery CMC draws patches from (and TAVP images, unless tavp_galleries is set)
    gallery: str = ""
    # galleries whose images are TAVP's image-only collection; empty: the CMC gallery
    tavp_galleries: list[str] = field(default_factory=list)
    # word-piece vocabulary (BERT vocab.txt); empty: the first text store's vocab.txt
    vocab_file: str = ""
    # fraction of optimiser steps that train TAVP; the rest train VALP (0 = VALP only, 1 = TAVP only)
    tavp_ratio: float = 0.0
    # maximum sequence length of a VALP sentence, [CLS] and [SEP] included (paper: 80)
    max_len_valp: int = 80
    # maximum sequence length of a TAVP input: tags + patches + 3 specials (paper: 100)
    max_len_tavp: int = 100
    # at most this many word-pieces of tags in a TAVP input; the rest of max_len_tavp is patches
    max_tag_tokens: int = 30
    # DataLoader worker processes per task loader and training process (VALP and TAVP each get
    # this many; 0: load in the training process)
    num_workers: int = 2
    # batches each worker prepares ahead (DataLoader prefetch_factor)
    prefetch_factor: int = 4
    # text-store shards each loader process keeps in memory (tokens + spans, ~4 bytes a token),
    # least recently used first out; 0 = all of them
    text_cache_shards: int = 0
    # text stores of captions paired with images of data.gallery by image key (`vlmixer text tag
    # --format coco`): the "paired" task's (image, caption) pairs; sentences whose key is not in
    # the gallery are skipped
    paired_text_stores: list[str] = field(default_factory=list)
    # fraction of optimiser steps that train the paired task (objective.paired); of the other steps
    # tavp_ratio train TAVP and the rest VALP. 0 = no paired task
    paired_ratio: float = 0.0
    # paired task: at most this many caption word-pieces (then [CLS]/[SEP]) and image patches per input
    max_caption_tokens: int = 40
    max_patches: int = 36


@dataclass
class CMCConfig:
    # probability that a grounded word is replaced by a patch (r_cmc, paper: 0.5)
    r_cmc: float = 0.5
    # weight of the contextual-concept term in p_i (r_ctx, paper: 0.5)
    r_ctx: float = 0.5
    # K of K-shot CMC: candidate pool size drawn uniformly without replacement; 0 = whole concept list
    k_shot: int = 15
    # when the K candidates are drawn (VLMixer leaves it open): "per_word" = a fresh pool for every replaced
    # word (over a run every patch of the concept is reachable, close to K = 0 on a large gallery);
    # "per_concept_epoch" = one pool per concept for a whole epoch, drawn from (run.seed, epoch, concept)
    # so a resume draws the same pools
    pool: str = "per_word"


@dataclass
class ModelConfig:
    # BERT weights: a hub name or a local directory (from_pretrained); empty: random init from `bert`
    pretrained: str = ""
    # BertConfig fields for a random init (ignored when `pretrained` is set); vocab_size 0 = vocab file size
    bert: dict[str, Any] = field(default_factory=lambda: {
        "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
        "intermediate_size": 3072, "max_position_embeddings": 512, "vocab_size": 0,
    })
    # dimension of the gallery's region features (the detector's pooled res5 output)
    feature_dim: int = 2048
    # output size of the CMCL projection of [CLS]
    proj_dim: int = 256
    # dropout after the patch embedding LayerNorm
    patch_dropout: float = 0.1
    # the 1-D position a patch token carries. VLMixer encodes a patch by its feature and box alone:
    # "shared" = every patch takes one position embedding (the last index, so text positions stop one
    # short of max_position_embeddings); "word" = its slot's position (the replaced word's, in TAVP the
    # patch's confidence rank, which leaks the ordering into the input)
    patch_position: str = "shared"


@dataclass
class ObjectiveConfig:
    # fraction of text (or tag) tokens selected for MLM (paper/BERT: 0.15)
    mlm_prob: float = 0.15
    # of the selected tokens: fraction replaced by [MASK]; then random token; the rest unchanged (80/10/10)
    mlm_mask_frac: float = 0.8
    mlm_random_frac: float = 0.1
    # CMCL temperature tau (paper: 0.1)
    tau: float = 0.1
    # gather CMCL negatives from every process (the global batch), as the paper. Under gradient
    # accumulation the negatives are the global *micro*-batch (optim.batch_size / optim.grad_accum rows),
    # not the optimiser's batch; the log's cmcl_negatives says how many a row had
    cmcl_global_negatives: bool = True
    # loss weights of the VALP terms
    mlm_weight: float = 1.0
    cmcl_weight: float = 1.0
    # loss weights of the TAVP terms: masked tag modelling, masked patch concept prediction
    tag_weight: float = 1.0
    patch_weight: float = 1.0
    # fraction of TAVP patches masked (feature zeroed) and predicted as their concept
    patch_mask_prob: float = 0.15
    # objectives of the related systems, trained on the paired task: name -> loss weight (0 = off).
    # ALBEF: itc (momentum ITC + distillation), itm (hard negatives), mlm (masked caption fused with
    # its image, objective.mlm_prob etc.); TCL: imc, lmi (with itc);
    # X-VLM: box (L1 + GIoU of a concept's patch box from its text), concept_itc, concept_itm
    paired: dict[str, float] = field(default_factory=dict)
    # the same objectives on unpaired text, with VALP's two CMC views as the pair (text view T^mask as the
    # "text", multi-modal view S^mask as the "image"), on VALP steps: name -> weight (0 = off).
    # itc: ALBEF's momentum ITC + distillation over the views (CMCL with momentum, queues, soft targets);
    # lmi: TCL's LMI between one view's [CLS] and the other view's tokens
    views: dict[str, float] = field(default_factory=dict)
    # ITC/IMC/LMI temperature (ALBEF: 0.07): the initial value when it is learnt
    itc_tau: float = 0.07
    # ALBEF, TCL and X-VLM learn the temperature: a parameter starting at itc_tau, trained with the model
    # and clamped into itc_tau_range before each forward (ALBEF: [0.001, 0.5]); false keeps it at itc_tau
    itc_tau_learnable: bool = True
    itc_tau_range: list[float] = field(default_factory=lambda: [0.001, 0.5])
    # EMA coefficient of the momentum model (ALBEF: 0.995)
    momentum: float = 0.995
    # momentum features kept per modality for ITC/IMC negatives (ALBEF: 65536; 0 = in-batch only)
    queue_size: int = 65536
    # momentum distillation: weight of the momentum model's soft targets against one-hot (ALBEF: 0.4)
    distill_alpha: float = 0.4
    # ALBEF ramps alpha up linearly from 0 over the first epoch (alpha * min(1, i / batches per epoch)),
    # since the momentum model's targets are still poor then: -1 = one epoch of the task's data (ALBEF),
    # 0 = full alpha from the first batch, n > 0 = over the first n batches
    distill_rampup: int = -1
    # X-VLM's box target is a patch of the fused image, so its box would be in the input for the head to
    # copy: "geometry" zeroes that patch's 6 box values in the box task's input, "geometry_and_feature"
    # its feature too, "none" leaves it (X-VLM's pixels carry no box to copy)
    box_hide: str = "geometry"
    # TCL's visual augmentation of the paired image: Gaussian feature noise (x each feature's std)
    # and the probability of dropping a patch; 0 = off (text views differ by dropout)
    aug_feature_noise: float = 0.0
    aug_patch_drop: float = 0.0


@dataclass
class OptimConfig:
    # AdamW peak learning rate (paper: 5e-5)
    lr: float = 5e-5
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    # global batch: sentences (or images) per optimiser step over all processes (paper: 1024)
    batch_size: int = 1024
    # micro-batches accumulated per optimiser step; batch_size must divide by world_size * grad_accum
    grad_accum: int = 1
    # optimiser steps in total (paper: 300k); the schedule decays to 0 here
    total_steps: int = 300_000
    # linear warmup steps, then linear decay to 0 at total_steps
    warmup_steps: int = 10_000
    # clip the global gradient norm to this (0 = no clipping)
    clip_grad_norm: float = 1.0


@dataclass
class RunConfig:
    # output directory: checkpoints/, tb/ (TensorBoard), metrics.jsonl, config.yaml
    out_dir: str = "runs/vlmixer"
    # master seed: CMC, masking, task schedule, init and dropout all derive from it
    seed: int = 0
    # "auto" (cuda when available), "cpu" or "cuda"
    device: str = "auto"
    # "bf16" autocast on GPU (ignored on CPU), or "fp32"
    precision: str = "bf16"
    # write a checkpoint every this many steps (and at the end)
    ckpt_every: int = 1000
    # keep this many step checkpoints (the newest); 0 keeps all
    keep_last: int = 3
    # log scalars every this many steps
    log_every: int = 10
    # show a progress bar on rank 0 (redrawn at most once a second)
    progress: bool = True
    # stop right after this step as if the job were killed (no final checkpoint); 0 = off.
    # For resume drills and tests.
    stop_at_step: int = 0


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    cmc: CMCConfig = field(default_factory=CMCConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)


def validate(cfg: TrainConfig, world_size: int = 1) -> None:
    """Cross-key checks; raises ConfigError naming the key."""
    d, c, o, op, r = cfg.data, cfg.cmc, cfg.objective, cfg.optim, cfg.run
    if not 0.0 <= d.tavp_ratio <= 1.0:
        raise ConfigError(f"data.tavp_ratio={d.tavp_ratio}: must be in [0, 1]")
    if d.tavp_ratio < 1.0 and d.paired_ratio < 1.0 and not d.text_stores:
        raise ConfigError("data.text_stores is empty but VALP is on (data.tavp_ratio < 1 and data.paired_ratio < 1)")
    if not d.gallery:
        raise ConfigError("data.gallery: a patch gallery is required (CMC draws patches from it)")
    if d.tavp_ratio > 0 and not d.vocab_file and not d.text_stores:
        raise ConfigError("TAVP needs a word-piece vocabulary: set data.vocab_file")
    for k in ("max_len_valp", "max_len_tavp"):
        if getattr(d, k) < 4:
            raise ConfigError(f"data.{k}={getattr(d, k)}: too short (>= 4)")
    if not 0 < d.max_tag_tokens < d.max_len_tavp - 3:
        raise ConfigError(f"data.max_tag_tokens={d.max_tag_tokens}: must be in (0, max_len_tavp - 3)")
    if d.num_workers < 0 or d.prefetch_factor < 1 or d.text_cache_shards < 0:
        raise ConfigError("data.num_workers and data.text_cache_shards must be >= 0, data.prefetch_factor >= 1")
    validate_cmc(c)
    if cfg.model.patch_position not in PATCH_POSITIONS:
        raise ConfigError(f"model.patch_position={cfg.model.patch_position!r}: one of {', '.join(PATCH_POSITIONS)}")
    if o.box_hide not in BOX_HIDE:
        raise ConfigError(f"objective.box_hide={o.box_hide!r}: one of {', '.join(BOX_HIDE)}")
    if not 0 < o.mlm_prob < 1:
        raise ConfigError(f"objective.mlm_prob={o.mlm_prob}: must be in (0, 1)")
    if o.mlm_mask_frac < 0 or o.mlm_random_frac < 0 or o.mlm_mask_frac + o.mlm_random_frac > 1:
        raise ConfigError("objective.mlm_mask_frac + mlm_random_frac must be within [0, 1]")
    if o.tau <= 0:
        raise ConfigError(f"objective.tau={o.tau}: must be > 0")
    if not 0 <= o.patch_mask_prob < 1:
        raise ConfigError(f"objective.patch_mask_prob={o.patch_mask_prob}: must be in [0, 1)")
    if op.lr <= 0 or op.total_steps < 1 or op.warmup_steps < 0 or op.grad_accum < 1:
        raise ConfigError("optim: lr > 0, total_steps >= 1, warmup_steps >= 0, grad_accum >= 1 required")
    if len(op.betas) != 2:
        raise ConfigError(f"optim.betas={op.betas}: two numbers")
    if op.batch_size % (world_size * op.grad_accum):
        raise ConfigError(f"optim.batch_size={op.batch_size} is not divisible by world_size ({world_size}) "
                          f"x optim.grad_accum ({op.grad_accum})")
    _validate_paired(cfg)
    if r.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"run.device={r.device!r}: auto, cpu or cuda")
    if r.precision not in ("bf16", "fp32"):
        raise ConfigError(f"run.precision={r.precision!r}: bf16 or fp32")
    if r.ckpt_every < 1 or r.log_every < 1 or r.keep_last < 0 or r.stop_at_step < 0:
        raise ConfigError("run: ckpt_every >= 1, log_every >= 1, keep_last >= 0, stop_at_step >= 0 required")


# keys whose default changed the method: a run saved before the key existed trained with these values
LEGACY = {("model", "patch_position"): "word", ("objective", "box_hide"): "none", ("cmc", "pool"): "per_word"}


def saved_config(saved: dict[str, Any]) -> TrainConfig:
    """The config a checkpoint was trained with, reading a key it predates as the value it trained with.

    Why: `patch_position` and `box_hide` default to the papers' reading now;
    a checkpoint saved before they existed used slot positions and a visible
    box, and evaluating it otherwise would feed it inputs it never saw.
    """
    d = {k: dict(v) if isinstance(v, dict) else v for k, v in saved.items()}
    for (section, key), value in LEGACY.items():
        d.setdefault(section, {}).setdefault(key, value)
    return from_dict(TrainConfig, d)


CMC_POOLS = ("per_word", "per_concept_epoch")
PATCH_POSITIONS = ("shared", "word")
BOX_HIDE = ("geometry", "geometry_and_feature", "none")


def validate_cmc(c: CMCConfig) -> None:
    """The CMC keys alone (`vlmixer mix` checks these without the rest of a training config)."""
    if not 0.0 <= c.r_cmc <= 1.0:
        raise ConfigError(f"cmc.r_cmc={c.r_cmc}: must be in [0, 1]")
    if c.r_ctx < 0:
        raise ConfigError(f"cmc.r_ctx={c.r_ctx}: must be >= 0")
    if c.k_shot < 0:
        raise ConfigError(f"cmc.k_shot={c.k_shot}: must be >= 0 (0 = whole concept list)")
    if c.pool not in CMC_POOLS:
        raise ConfigError(f"cmc.pool={c.pool!r}: one of {', '.join(CMC_POOLS)}")


PAIRED_OBJECTIVES = ("itc", "itm", "mlm", "imc", "lmi", "box", "concept_itc", "concept_itm")
VIEW_OBJECTIVES = ("itc", "lmi")  # on VALP's two views; ITM/box need an image, IMC a second text view


def _validate_paired(cfg: TrainConfig) -> None:
    d, o = cfg.data, cfg.objective
    if not 0.0 <= d.paired_ratio <= 1.0:
        raise ConfigError(f"data.paired_ratio={d.paired_ratio}: must be in [0, 1]")
    for name, w in o.paired.items():
        if name not in PAIRED_OBJECTIVES:
            raise ConfigError(f"objective.paired.{name}: unknown objective (known: {', '.join(PAIRED_OBJECTIVES)})")
        if w < 0:
            raise ConfigError(f"objective.paired.{name}={w}: a weight is >= 0")
    for name, w in o.views.items():
        if name not in VIEW_OBJECTIVES:
            raise ConfigError(f"objective.views.{name}: not an objective on CMC views (known: "
                              f"{', '.join(VIEW_OBJECTIVES)})")
        if w < 0:
            raise ConfigError(f"objective.views.{name}={w}: a weight is >= 0")
    if any(w > 0 for w in o.views.values()) and (d.tavp_ratio >= 1.0 or d.paired_ratio >= 1.0):
        raise ConfigError("objective.views trains on VALP steps, but VALP is off (data.tavp_ratio or "
                          "data.paired_ratio is 1)")
    on = [n for n, w in o.paired.items() if w > 0]
    if d.paired_ratio > 0 and not on:
        raise ConfigError("data.paired_ratio > 0 but no objective.paired weight is > 0")
    if on and d.paired_ratio == 0:
        raise ConfigError(f"objective.paired turns on {on} but data.paired_ratio=0 never trains them")
    if d.paired_ratio > 0 and not d.paired_text_stores:
        raise ConfigError("data.paired_ratio > 0 needs data.paired_text_stores (captions with image keys)")
    if d.max_caption_tokens < 1 or d.max_patches < 1:
        raise ConfigError("data.max_caption_tokens and data.max_patches must be >= 1")
    if o.itc_tau <= 0 or not 0 <= o.momentum < 1 or o.queue_size < 0 or not 0 <= o.distill_alpha <= 1:
        raise ConfigError("objective: itc_tau > 0, momentum in [0, 1), queue_size >= 0, distill_alpha in [0, 1]")
    if o.aug_feature_noise < 0 or not 0 <= o.aug_patch_drop < 1:
        raise ConfigError("objective.aug_feature_noise >= 0 and aug_patch_drop in [0, 1) required")
    if len(o.itc_tau_range) != 2 or not 0 < o.itc_tau_range[0] <= o.itc_tau <= o.itc_tau_range[1]:
        raise ConfigError(f"objective.itc_tau_range={o.itc_tau_range}: [low, high] with 0 < low <= itc_tau "
                          f"({o.itc_tau}) <= high")
    if o.distill_rampup < -1:
        raise ConfigError(f"objective.distill_rampup={o.distill_rampup}: -1 (one epoch), 0 (off) or a batch count")
