"""Text encoder f_text (paper §4.2): any Hugging Face BERT/RoBERTa-type encoder, jointly tuned,
projected to the unified decoder's width."""
import logging
import os
from typing import Dict, List, Sequence

import torch
from detectron2.config import configurable
from torch import nn

from up2.modeling.build import TEXT_ENCODER_REGISTRY
from up2.utils.paths import resolve_path

__all__ = ["HFTextEncoder", "load_hf_tokenizer"]

logger = logging.getLogger(__name__)


def _offline_hint(name: str) -> str:
    return (f"'{name}' is neither a local directory nor in the Hugging Face cache, and the hub is "
            f"{'disabled (HF_HUB_OFFLINE=1)' if os.environ.get('HF_HUB_OFFLINE') == '1' else 'unreachable'}. "
            f"Pre-fetch it on a machine with internet: python -c \"from transformers import AutoModel, "
            f"AutoTokenizer; AutoTokenizer.from_pretrained('{name}').save_pretrained('DIR'); "
            f"AutoModel.from_pretrained('{name}').save_pretrained('DIR')\" and set "
            f"MODEL.UP2.TEXT_ENCODER.NAME to DIR (or copy the HF cache, ~/.cache/huggingface).")


def resolve_model_path(name: str) -> str:
    """Hugging Face name or directory -> what ``from_pretrained`` gets (``datasets://``, ``package://`` and
    repository-relative directories resolved by :func:`up2.utils.paths.resolve_path`)."""
    return resolve_path(name)


def load_hf_tokenizer(name: str):
    """``AutoTokenizer.from_pretrained(name)`` with an error that says how to get it offline."""
    from transformers import AutoTokenizer

    name = resolve_model_path(name)
    try:
        return AutoTokenizer.from_pretrained(name)
    except OSError as error:
        raise OSError(f"Cannot load the tokenizer: {_offline_hint(name)} ({error})") from error


def _load_hf_encoder(name: str, pretrained: bool) -> nn.Module:
    from transformers import AutoConfig, AutoModel

    name = resolve_model_path(name)

    def load(**kwargs):
        if pretrained:
            return AutoModel.from_pretrained(name, **kwargs)
        return AutoModel.from_config(AutoConfig.from_pretrained(name), **kwargs)

    try:
        try:
            # BERT/RoBERTa poolers are unused: dropping them keeps every parameter trained (DDP).
            return load(add_pooling_layer=False)
        except TypeError:  # architectures without a pooler option
            return load()
    except OSError as error:
        raise OSError(f"Cannot load the text encoder: {_offline_hint(name)} ({error})") from error


def _bert_layout(encoder: nn.Module, setting: str):
    """``(embeddings, encoder.layer)`` of a BERT-type encoder; ``setting`` ("KEY value") names the config
    entry that needs them in the error raised for any other layout."""
    layers = getattr(getattr(encoder, "encoder", None), "layer", None)
    embeddings = getattr(encoder, "embeddings", None)
    if layers is None or embeddings is None:
        raise ValueError(f"MODEL.UP2.TEXT_ENCODER.{setting}: {type(encoder).__name__} has no "
                         "'embeddings' and 'encoder.layer' (BERT/RoBERTa layout); use 0")
    return embeddings, layers


def keep_bottom_layers(encoder: nn.Module, num_layers: int) -> nn.Module:
    """Keeps the first ``num_layers`` transformer layers of a BERT-type encoder (0 keeps all); the upper
    ones are dropped, as when a smaller model is distilled from the bottom of a larger one.

    Raises:
        ValueError: ``num_layers`` outside [0, number of layers], or an encoder without the BERT layout.
    """
    if num_layers == 0:
        return encoder
    _, layers = _bert_layout(encoder, f"NUM_LAYERS {num_layers}")
    if not 0 < num_layers <= len(layers):
        raise ValueError(f"MODEL.UP2.TEXT_ENCODER.NUM_LAYERS must be in [0, {len(layers)}] for this "
                         f"{len(layers)}-layer encoder, got {num_layers}")
    encoder.encoder.layer = layers[:num_layers]
    encoder.config.num_hidden_layers = num_layers
    return encoder


def freeze_encoder_layers(encoder: nn.Module, freeze_at: int) -> List[nn.Parameter]:
    """Freezes the bottom of a Hugging Face encoder, as Detectron2's ``MODEL.BACKBONE.FREEZE_AT`` does for
    a ResNet: 0 freezes nothing, 1 the embeddings, k >= 2 the embeddings and the first k - 1 transformer
    layers. Frozen parts get no gradient, so the backward pass stops above them.

    Returns:
        the frozen parameters.

    Raises:
        ValueError: ``freeze_at`` outside [0, number of layers + 1], or an encoder without the
            ``embeddings`` / ``encoder.layer`` layout of BERT-type models.
    """
    if freeze_at == 0:
        return []
    embeddings, layers = _bert_layout(encoder, f"FREEZE_AT {freeze_at}")
    if not 0 <= freeze_at <= len(layers) + 1:
        raise ValueError(f"MODEL.UP2.TEXT_ENCODER.FREEZE_AT must be in [0, {len(layers) + 1}] for this "
                         f"{len(layers)}-layer encoder, got {freeze_at}")
    frozen = list(embeddings.parameters()) + [p for layer in layers[:freeze_at - 1] for p in layer.parameters()]
    for parameter in frozen:
        parameter.requires_grad_(False)
    return frozen


@TEXT_ENCODER_REGISTRY.register()
class HFTextEncoder(nn.Module):
    """Tokenises strings and encodes them with a Hugging Face encoder, then projects to ``output_dim``.

    Args:
        name: Hugging Face model name or local directory (``AutoModel``).
        tokenizer_name: tokenizer name or directory; empty means ``name``.
        pretrained: load the weights of ``name`` (True) or only its architecture, randomly initialised.
        max_length: longest token sequence kept (special tokens included); longer texts are truncated.
        output_dim: width of the projected features (the unified decoder's width).
        num_layers: transformer layers kept from the bottom (0: all), see :func:`keep_bottom_layers`.
        freeze_at: frozen bottom, see :func:`freeze_encoder_layers` (counted in the kept layers).
    """

    @configurable
    def __init__(self, *, name: str, tokenizer_name: str, pretrained: bool, max_length: int, output_dim: int,
                 num_layers: int = 0, freeze_at: int = 0):
        super().__init__()
        self.tokenizer = load_hf_tokenizer(tokenizer_name or name)
        # Parameters live under "encoder." so that SOLVER.UP2.ENCODER_PARAM_PREFIXES finds them.
        self.encoder = keep_bottom_layers(_load_hf_encoder(name, pretrained), num_layers)
        self.max_length = max_length
        hidden = self.encoder.config.hidden_size
        self.projection = nn.Linear(hidden, output_dim)
        self.frozen = freeze_encoder_layers(self.encoder, freeze_at)
        logger.info("Text encoder %s (%s weights, %d layers, hidden %d -> %d, vocabulary %d, %d parameters frozen)",
                    name, "pretrained" if pretrained else "random", self.encoder.config.num_hidden_layers, hidden,
                    output_dim, len(self.tokenizer),
                    sum(p.numel() for p in self.frozen))

    @classmethod
    def from_config(cls, cfg):
        text = cfg.MODEL.UP2.TEXT_ENCODER
        return {"name": text.NAME, "tokenizer_name": text.TOKENIZER, "pretrained": text.PRETRAINED,
                "max_length": text.MAX_LENGTH, "output_dim": cfg.MODEL.UP2.DECODER.HIDDEN_DIM,
                "num_layers": text.NUM_LAYERS, "freeze_at": text.FREEZE_AT}

    @property
    def device(self) -> torch.device:
        return self.projection.weight.device

    @property
    def bos_token_id(self) -> int:
        """Id that starts a sequence: ``<s>`` (RoBERTa) or ``[CLS]`` (BERT)."""
        tok = self.tokenizer
        return tok.bos_token_id if tok.bos_token_id is not None else tok.cls_token_id

    @property
    def eos_token_id(self) -> int:
        """Id that ends a sequence: ``</s>`` (RoBERTa) or ``[SEP]`` (BERT)."""
        tok = self.tokenizer
        return tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id

    def tokenize(self, texts: Sequence[str], word_ids: bool = False) -> Dict[str, torch.Tensor]:
        """Token ids and attention mask, padded to the longest text: (B, T) each.

        Args:
            word_ids: also return ``word_ids``: B lists of T word indices (None at special tokens and
                padding), for whole-word masking.

        Raises:
            ValueError: an empty (or whitespace-only) text, naming its position.
        """
        empty = [i for i, text in enumerate(texts) if not isinstance(text, str) or not text.strip()]
        if empty:
            raise ValueError(f"Empty text at position(s) {empty} of the batch; every text needs at least one word")
        batch = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt")
        out = {"input_ids": batch["input_ids"].to(self.device),
               "attention_mask": batch["attention_mask"].to(self.device)}
        if word_ids:
            out["word_ids"] = [batch.word_ids(i) for i in range(len(texts))]
        return out

    def encode_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, causal: bool = False) -> torch.Tensor:
        """Encoder hidden states before projection: (B, T, hidden).

        Args:
            input_ids, attention_mask: (B, T) (mask 1 = token).
            causal: token t sees tokens <= t only (captioning words: no look-ahead through the encoder).
        """
        if causal:
            length = input_ids.shape[1]
            tril = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
            eye = torch.eye(length, dtype=torch.bool, device=input_ids.device)
            attention_mask = ((tril & attention_mask.bool()[:, None, :]) | eye)[:, None]  # (B, 1, T, T)
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def forward(self, texts: List[str]) -> Dict[str, torch.Tensor]:
        """
        Args:
            texts: B strings.

        Returns:
            dict with ``features`` (B, T, output_dim), ``attention_mask`` (B, T) (1 = token) and
            ``input_ids`` (B, T).
        """
        batch = self.tokenize(texts)
        features = self.projection(self.encode_ids(batch["input_ids"], batch["attention_mask"]))
        return {"features": features, **batch}
