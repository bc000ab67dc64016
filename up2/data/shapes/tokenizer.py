"""A byte-level BPE tokenizer (RoBERTa-style special tokens) trained on the `shapes` text, saved as
a Hugging Face tokenizer directory (``AutoTokenizer.from_pretrained(DIR)``)."""
import json
import os
from typing import Iterable

__all__ = ["train_tokenizer", "SPECIAL_TOKENS"]

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def train_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int = 2000):
    """Trains byte-level BPE on ``texts`` and saves it to ``out_dir`` (deterministic)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from tokenizers import ByteLevelBPETokenizer
    from tokenizers.processors import RobertaProcessing
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer(add_prefix_space=True)
    bpe.train_from_iterator(list(texts), vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
                            show_progress=False)
    bpe._tokenizer.post_processor = RobertaProcessing(("</s>", bpe.token_to_id("</s>")), ("<s>", bpe.token_to_id("<s>")),
                                                      add_prefix_space=True)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", pad_token="<pad>", mask_token="<mask>", cls_token="<s>",
                                        sep_token="</s>", model_max_length=512)
    tokenizer.save_pretrained(out_dir)
    # Normalise the saved json files (stable key order) so the same input gives the same bytes.
    for name in os.listdir(out_dir):
        path = os.path.join(out_dir, name)
        if name.endswith(".json"):
            with open(path) as f:
                data = json.load(f)
            with open(path, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True, ensure_ascii=False)
