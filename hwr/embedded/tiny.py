"""TrOCR-layout models built from configs, untrained: the tiny offline model (character
tokenizer), and TrOCR's own layout at any size for tests and benchmarks (BPE tokenizer).

They are saved with `save_pretrained` and loaded back like any hub checkpoint, so
everything downstream (training, export, evaluation) runs the same code as for TrOCR;
`save_hub_layout` rewrites one in the older files the real checkpoint has on the hub.
"""

from __future__ import annotations

import json
import string
import tempfile
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load_file
from tokenizers import (
    ByteLevelBPETokenizer,
    Regex,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
)
from transformers import (
    PretrainedConfig,
    PreTrainedTokenizerFast,
    RobertaTokenizer,
    TrOCRConfig,
    TrOCRProcessor,
    VisionEncoderDecoderConfig,
    VisionEncoderDecoderModel,
    ViTConfig,
    ViTImageProcessor,
)

from hwr.errors import UserError
from hwr.report import write_json

# RoBERTa's special tokens at RoBERTa's ids, so token wiring is the same as TrOCR's.
SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
ALPHABET = (
    string.ascii_letters
    + string.digits
    + string.punctuation
    + " àâäæçéèêëîïôœùûüÿÀÂÄÆÇÉÈÊËÎÏÔŒÙÛÜŸ«»’“”–—…°€£"
    + "‘½¼¾×§"  # added last: a model of the alphabet before keeps its token ids
)
# The languages the decoder can be told to write: a token each after the start token, as
# multilingual speech models do (labels: hwr.data.label_ids), after the alphabet.
LANGUAGES = ("en", "fr")


def language_token(language: str) -> str:
    """The token that stands for a language in the vocabulary: `<en>`, `<fr>`."""
    return f"<{language}>"


def known_languages(tokenizer) -> list[str]:
    """The languages a tokenizer has tokens for (none: TrOCR's, or an older embedded model)."""
    vocab = tokenizer.get_vocab()
    return [x for x in LANGUAGES if language_token(x) in vocab]


def language_id(tokenizer, language: str | None, setting: str = "model.language") -> int | None:
    """The token that tells the decoder which language to write; None for language None.
    A language the tokenizer has no token for is the user's error, named by `setting`."""
    if language is None:
        return None
    known = known_languages(tokenizer)
    if language not in known:
        has = (
            f"it knows {', '.join(known)}"
            if known
            else "it has no language tokens (a model pre-trained before hwr knew languages)"
        )
        raise UserError(f"{setting}={language}: the model cannot be told that language; {has}")
    return tokenizer.convert_tokens_to_ids(language_token(language))


def char_tokenizer(alphabet: str = ALPHABET) -> PreTrainedTokenizerFast:
    """One token per character, wrapped as a Hugging Face tokenizer (saves, loads, decodes)."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in dict.fromkeys(alphabet):
        vocab.setdefault(ch, len(vocab))
    languages = [language_token(x) for x in LANGUAGES]
    for token in languages:
        vocab[token] = len(vocab)
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
        extra_special_tokens=languages,
    )


# microsoft/trocr-base-handwritten's sizes (334M parameters).
TROCR_BASE = {
    "encoder": {
        "image_size": 384,
        "patch_size": 16,
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "qkv_bias": False,
    },
    "decoder": {
        "vocab_size": 50265,
        "d_model": 1024,
        "decoder_layers": 12,
        "decoder_attention_heads": 16,
        "decoder_ffn_dim": 4096,
        "max_position_embeddings": 512,
        "cross_attention_hidden_size": 768,
    },
}


def bpe_tokenizer(texts: Iterable[str], vocab_size: int = 400) -> RobertaTokenizer:
    """A RoBERTa-style byte-level BPE tokenizer (<s>=0, <pad>=1, </s>=2) trained on texts."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        texts,
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
    )
    with tempfile.TemporaryDirectory() as tmp:
        bpe.save_model(tmp)
        return RobertaTokenizer(vocab=f"{tmp}/vocab.json", merges=f"{tmp}/merges.txt")


def trocr_layout(
    tokenizer, encoder: dict, decoder: dict, image_size: tuple[int, int], seed: int = 0
) -> tuple[VisionEncoderDecoderModel, TrOCRProcessor]:
    """A fresh VisionEncoderDecoder (ViT encoder, TrOCR decoder) and its processor."""
    processor = squash_processor(image_size)
    return encoder_decoder(tokenizer, ViTConfig(**encoder), decoder, processor, seed)


def squash_processor(image_size: tuple[int, int]) -> ViTImageProcessor:
    """Every image resized to image_size whatever its aspect, as TrOCR's processor does."""
    return ViTImageProcessor(
        size={"height": image_size[0], "width": image_size[1]},
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )


def encoder_decoder(
    tokenizer, encoder: PretrainedConfig, decoder: dict, image_processor, seed: int = 0
) -> tuple[VisionEncoderDecoderModel, TrOCRProcessor]:
    """A fresh VisionEncoderDecoder: any encoder, a TrOCR decoder wired to the tokenizer."""
    decoder = {
        "vocab_size": len(tokenizer),
        "activation_function": "gelu",
        "layernorm_embedding": True,
        "scale_embedding": False,
        "use_learned_position_embeddings": True,
        **decoder,
        "bos_token_id": tokenizer.bos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "decoder_start_token_id": tokenizer.eos_token_id,
    }
    torch.manual_seed(seed)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(
        encoder, TrOCRConfig(**decoder)
    )
    model = VisionEncoderDecoderModel(config=config)
    return model, TrOCRProcessor(image_processor=image_processor, tokenizer=tokenizer)


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
    model, processor = trocr_layout(
        char_tokenizer(),
        encoder={
            "image_size": list(image_size),
            "patch_size": patch_size,
            "hidden_size": hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "intermediate_size": 4 * hidden,
        },
        decoder={
            "d_model": hidden,
            "decoder_layers": layers,
            "decoder_attention_heads": heads,
            "decoder_ffn_dim": 4 * hidden,
            "max_position_embeddings": 256,
        },
        image_size=image_size,
        seed=seed,
    )
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def save_hub_layout(saved: str | Path, out: str | Path) -> Path:
    """A saved BPE model (ViT + TrOCR) rewritten in the files microsoft/trocr-base-handwritten
    has on the hub, which today's save_pretrained no longer writes.

    vocab.json + merges.txt and no tokenizer.json; an old ViTFeatureExtractor
    preprocessor_config.json with an int size; a v4 config.json whose decoder says
    "use_cache": false, no generation_config.json; pytorch_model.bin holding the output
    projection beside the embeddings it is tied to, and no encoder pooler.
    """
    saved, out = Path(saved), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = TrOCRProcessor.from_pretrained(saved).tokenizer
    tokenizer.backend_tokenizer.model.save(str(out))  # vocab.json, merges.txt
    specials = {
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "sep_token": "</s>",
        "pad_token": "<pad>",
        "cls_token": "<s>",
        "mask_token": "<mask>",
    }
    write_json(out / "tokenizer_config.json", {"tokenizer_class": "RobertaTokenizer", **specials})
    write_json(out / "special_tokens_map.json", specials)
    image = json.loads((saved / "processor_config.json").read_text())["image_processor"]
    write_json(
        out / "preprocessor_config.json",
        {
            "do_normalize": True,
            "do_resize": True,
            "feature_extractor_type": "ViTFeatureExtractor",
            "image_mean": image["image_mean"],
            "image_std": image["image_std"],
            "resample": 2,
            "size": image["size"]["height"],
        },
    )
    config = json.loads((saved / "config.json").read_text())
    config["transformers_version"] = "4.12.0.dev0"
    config["decoder"]["use_cache"] = False
    write_json(out / "config.json", config)
    weights = load_file(saved / "model.safetensors")
    weights = {k: v for k, v in weights.items() if ".pooler." not in k}
    weights["decoder.output_projection.weight"] = weights[
        "decoder.model.decoder.embed_tokens.weight"
    ]
    torch.save(weights, out / "pytorch_model.bin")
    return out
