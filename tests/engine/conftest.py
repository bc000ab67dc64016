"""Fixtures of the engine tests that train the tiny UniPerceiverV2 (``tiny_up2_cfg`` of tests/conftest.py)
on a tiny generated ``shapes`` dataset."""
import pytest

from up2.data.datasets import register_all_shapes
from up2.data.shapes import generate_shapes

SHAPES_PREFIX = "engshapes"

# task name -> (TYPE, shapes dataset kind, per-GPU batch size, sampling ratio)
TASKS = {
    "detection": ("detection", "det", 1, 0.4),
    "classification": ("classification", "cls", 2, 0.2),
    "retrieval": ("retrieval", "caption", 2, 0.2),
    "mlm": ("mlm", "text", 3, 0.2),
}


@pytest.fixture(scope="session")
def engine_shapes(tmp_path_factory):
    """Generates a 20-image ``shapes`` dataset (64 x 64 images) and registers it as ``engshapes_*``;
    returns ``(root, prefix)``."""
    root = tmp_path_factory.mktemp("engine_shapes") / "shapes"
    generate_shapes(str(root), seed=0, num_train=20, num_val=10, image_size=64, vocab_size=300, workers=1)
    register_all_shapes(str(root), prefix=SHAPES_PREFIX)
    return str(root), SHAPES_PREFIX


@pytest.fixture
def tiny_multitask_cfg(engine_shapes, tiny_text_dirs, up2_cfg_factory):
    """``make(output_dir, tasks=..., max_iter=6)``: a fresh config of the tiny UniPerceiverV2 (see
    :func:`configure_tiny_multitask`)."""
    return lambda output_dir, **kwargs: configure_tiny_multitask(up2_cfg_factory(*tiny_text_dirs), engine_shapes[1],
                                                                 output_dir, **kwargs)


def configure_tiny_multitask(cfg, prefix: str, output_dir: str, tasks=("detection", "classification", "mlm"),
                             max_iter: int = 6):
    """Turns ``tiny_up2_cfg`` into a multi-task run of ``tasks`` on the tiny shapes dataset, with dropout
    and drop-path on (so the runs draw random numbers), a warm-up and an LR step across the middle of
    the run, aspect-ratio grouping, NUM_WORKERS 0."""
    cfg.MODEL.MASK_ON = True
    cfg.MODEL.PIXEL_MEAN, cfg.MODEL.PIXEL_STD = [123.675, 116.280, 103.530], [58.395, 57.120, 57.375]
    cfg.MODEL.UP2.DECODER.DROPOUT, cfg.MODEL.UP2.DECODER.DROP_PATH = 0.1, 0.1
    cfg.INPUT.FORMAT, cfg.INPUT.MASK_FORMAT = "RGB", "polygon"
    cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING, cfg.INPUT.MAX_SIZE_TRAIN = (72, 80, 96), "choice", 128
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 80, 128
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (), ()
    cfg.DATASETS.UP2.IMAGE_SIZE = 48
    cfg.DATASETS.UP2.TASKS = [
        {"NAME": name, "TYPE": TASKS[name][0], "TRAIN_DATASETS": [f"{prefix}_{TASKS[name][1]}_train"],
         "BATCH_SIZE": TASKS[name][2], "SAMPLING_RATIO": TASKS[name][3]} for name in tasks]
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.DATALOADER.ASPECT_RATIO_GROUPING = True
    cfg.SOLVER.MAX_ITER = max_iter
    cfg.SOLVER.BASE_LR, cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.STEPS = 1e-3, max_iter // 2 + 1, (max_iter - 1,)
    cfg.SOLVER.CHECKPOINT_PERIOD = 100000
    cfg.TEST.EVAL_PERIOD = 0
    cfg.SEED = 1
    cfg.OUTPUT_DIR = str(output_dir)
    return cfg
