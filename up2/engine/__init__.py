"""Training and inference engine: launcher, trainer, single-image predictor."""
from up2.engine.launch import launch  # noqa: F401
from up2.engine.trainer import UP2Trainer, create_ddp_model, write_eval_results  # noqa: F401
from up2.engine.predictor import UP2Predictor  # noqa: F401
