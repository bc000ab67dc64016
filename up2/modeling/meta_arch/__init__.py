"""Meta-architectures in Detectron2's META_ARCH_REGISTRY."""
from up2.modeling.meta_arch.proposal_detector import ProposalDetector  # noqa: F401
from up2.modeling.meta_arch.uni_perceiver_v2 import UniPerceiverV2  # noqa: F401

__all__ = ["ProposalDetector", "UniPerceiverV2"]
