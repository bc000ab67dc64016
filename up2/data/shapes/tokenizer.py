"""A byte-level BPE tokenizer with RoBERTa's conventions, trained on the `shapes` text and saved as
a Hugging Face tokenizer directory (``AutoTokenizer.from_pretrained(DIR)`` loads it offline).

Conventions (those of ``roberta-base``): special tokens ``<s>`` 0, ``<pad>`` 1, ``</s>`` 2, ``<unk>``
3, ``<mask>`` 4; ``tokenizer(text)`` gives ``<s> ... </s>``; no space is added in front of the text,
so ``decode(encode(text), skip_special_tokens=True) == text`` exactly, and a word at the start of
a text is tokenized without the leading-space marker ``Ġ`` that the same word gets inside a
sentence (prepend a space to get the in-sentence tokens, e.g. for class names).
"""
import json
import os
from typing import Iterable

__all__ = ["train_tokenizer", "SPECIAL_TOKENS"]

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")


def train_tokenizer(texts: Iterable[str], out_dir: str, vocab_size: int = 2000) -> int:
    """Trains byte-level BPE on ``texts`` and saves it with ``save_pretrained(out_dir)``.

    The training input is sorted and de-duplicated, and the saved JSON files are rewritten with
    sorted keys, so the same texts give byte-identical files (training itself is deterministic:
    checked across processes). ``tokenizer_class`` is set to ``PreTrainedTokenizerFast``, which
    ``AutoTokenizer`` resolves in transformers 4 and 5.

    Returns:
        the size of the learned vocabulary (at most ``vocab_size``: a small corpus may have fewer
        merges to learn).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(sorted(set(texts)), trainer=trainer)
    for index, token in enumerate(SPECIAL_TOKENS):
        assert bpe.token_to_id(token) == index, (token, bpe.token_to_id(token))
    bpe.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0), add_prefix_space=False,
                                                      trim_offsets=True)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="<pad>", mask_token="<mask>", cls_token="<s>", sep_token="</s>",
                                        model_max_length=512, clean_up_tokenization_spaces=False)
    tokenizer.save_pretrained(out_dir)
    for name in sorted(os.listdir(out_dir)):
        if name.endswith(".json"):
            path = os.path.join(out_dir, name)
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            if name == "tokenizer_config.json":
                # transformers 5 writes its own class name ("TokenizersBackend"); this one loads in 4.x too
                data["tokenizer_class"] = "PreTrainedTokenizerFast"
            with open(path, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1, sort_keys=True, ensure_ascii=False)
                f.write("\n")
    return bpe.get_vocab_size()
