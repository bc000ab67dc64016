"""Open-vocabulary detection on `shapes` (UPv2 paper, Appendix C): a seen/novel category split of the
detection data, and zero-shot evaluation of the novel categories by name next to a chance baseline."""
from open_vocab.split import NOVEL_CLASSES_DEFAULT, register_open_vocab_split, write_open_vocab_split
from open_vocab.evaluate import evaluate_classes_by_name, evaluate_novel_classes

__all__ = ["NOVEL_CLASSES_DEFAULT", "register_open_vocab_split", "write_open_vocab_split",
           "evaluate_classes_by_name", "evaluate_novel_classes"]
