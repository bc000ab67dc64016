"""Modeling: image encoder (backbones, region proposer, global pooling), text encoder, unified decoder, tasks.

Importing this package registers every built-in part in its registry (see ``build.py``).
"""
from up2.modeling.image_encoder import ImageEncoder  # noqa: F401  (registers backbones, proposer, pooling)
from up2.modeling import text_encoder  # noqa: F401  (registers HFTextEncoder)
from up2.modeling.build import *  # noqa: F401,F403
from up2.modeling import decoder  # noqa: F401  (registers UnifiedDecoder)
from up2.modeling import tasks  # noqa: F401  (registers the task formulations)
from up2.modeling import meta_arch  # noqa: F401  (registers ProposalDetector)
