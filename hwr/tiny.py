"""A tiny, untrained TrOCR-style model with a character tokenizer, for offline runs and tests.

It is saved with `save_pretrained` and loaded back like any hub checkpoint, so everything
downstream (training, export, evaluation) runs the same code as for the real TrOCR.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    PreTrainedTokenizerFast,
    TrOCRConfig,
    TrOCRProcessor,
    VisionEncoderDecoderConfig,
    VisionEncoderDecoderModel,
    ViTConfig,
    ViTImageProcessor,
)

# RoBERTa's special tokens at RoBERTa's ids, so token wiring is the same as TrOCR's.
SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
ALPHABET = (
    string.ascii_letters
    + string.digits
    + string.punctuation
    + " àâäæçéèêëîïôœùûüÿÀÂÄÆÇÉÈÊËÎÏÔŒÙÛÜŸ«»’“”–—…°€£"
)


def char_tokenizer(alphabet: str = ALPHABET) -> PreTrainedTokenizerFast:
    """One token per character, wrapped as a Hugging Face tokenizer (saves, loads, decodes)."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in dict.fromkeys(alphabet):
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def build_tiny(
    out_dir: str | Path,
    image_size: tuple[int, int] = (32, 256),
    patch_size: int = 8,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    seed: int = 0,
) -> Path:
    """Build the tiny model (same seed, same weights) and save model + processor to out_dir."""
    tokenizer = char_tokenizer()
    image_processor = ViTImageProcessor(
        size={"height": image_size[0], "width": image_size[1]},
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    encoder = ViTConfig(
        image_size=list(image_size),
        patch_size=patch_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
    )
    decoder = TrOCRConfig(
        vocab_size=len(tokenizer),
        d_model=hidden,
        decoder_layers=layers,
        decoder_attention_heads=heads,
        decoder_ffn_dim=4 * hidden,
        max_position_embeddings=256,
        layernorm_embedding=True,
        use_learned_position_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    model = VisionEncoderDecoderModel(config=config)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    TrOCRProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out_dir)
    return out_dir
