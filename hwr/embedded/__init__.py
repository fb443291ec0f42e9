"""The embedded model: a small TrOCR-family reader pre-trained by this project and shipped
in the repository, so `model=embedded` reads handwriting with no network.

Its layouts share a TrOCR decoder (4 layers, d_model 256) and a character tokenizer, and
differ in how they see a line: `strips40` (shipped before) squashes it to 40x640 and cuts
it into 128 full-height ViT strips; `strips64` (shipped, with a CTC head over its strips:
hwr.embedded.ctc) keeps the aspect at 64 px high;
`conv64` adds a convolutional stem and a CTC head (`hwr.embedded.encoder`); `swin64` is
stock transformers only (DonutSwin). The model card compares them at equal CPU minutes.
`python train.py experiment=pretrain` trains them on lines rendered by
`hwr.embedded.synth` and real ones (`hwr.embedded.stream`); `hwr.embedded.tiny` builds
TrOCR-layout models from configs (the tiny one, and
TrOCR's own shape for tests).
"""

from __future__ import annotations

from pathlib import Path

from transformers import (
    BaseImageProcessor,
    DonutImageProcessor,
    DonutSwinConfig,
    PretrainedConfig,
    TrOCRProcessor,
    VisionEncoderDecoderModel,
    ViTConfig,
)

from hwr.embedded.encoder import LineEncoderConfig
from hwr.embedded.tiny import char_tokenizer, encoder_decoder, squash_processor

WEIGHTS = Path(__file__).parents[1] / "weights" / "embedded"

DECODER = {
    "d_model": 256,
    "decoder_layers": 4,
    "decoder_attention_heads": 4,
    "decoder_ffn_dim": 1024,
    "max_position_embeddings": 256,
    "cross_attention_hidden_size": 256,
}


def _keep_aspect(height: int, width: int) -> DonutImageProcessor:
    """Scale a line to the height, keeping its aspect (longer lines shrink to the width),
    and pad to height x width: Donut's processor, with Donut's page turning switched off."""
    return DonutImageProcessor(
        size={"height": height, "width": width},
        do_thumbnail=True,
        do_align_long_axis=False,
        do_pad=True,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )


def _strips(
    size: tuple[int, int], image_processor: BaseImageProcessor
) -> tuple[PretrainedConfig, BaseImageProcessor]:
    """ViT cutting the line into 128 full-height strips (one row of patches)."""
    encoder = ViTConfig(
        image_size=list(size),
        patch_size=[size[0], size[1] // 128],
        hidden_size=256,
        num_hidden_layers=8,
        num_attention_heads=4,
        intermediate_size=1024,
    )
    return encoder, image_processor


def _swin64(tokenizer) -> tuple[PretrainedConfig, BaseImageProcessor]:
    """Stock transformers only: a DonutSwin encoder (as Donut pairs one with a decoder)."""
    encoder = DonutSwinConfig(
        image_size=[64, 1024],
        patch_size=4,
        embed_dim=64,
        depths=[2, 2, 4],
        num_heads=[2, 4, 8],
        window_size=4,
    )
    return encoder, _keep_aspect(64, 1024)


def _conv64(tokenizer) -> tuple[PretrainedConfig, BaseImageProcessor]:
    """Taller, aspect kept, a convolutional stem and a CTC head (hwr.embedded.encoder)."""
    encoder = LineEncoderConfig(
        image_size=[64, 1024],
        num_hidden_layers=6,
        ctc_vocab_size=len(tokenizer),
        ctc_blank_id=tokenizer.pad_token_id,
    )
    return encoder, _keep_aspect(64, 1024)


# The layouts compared at equal CPU minutes (model card); LAYOUT is the one shipped.
LAYOUTS = {
    # The first shipped layout: squashed to 40x640, strips of 40x5.
    "strips40": lambda tokenizer: _strips((40, 640), squash_processor((40, 640))),
    # Taller, aspect kept: 64x1024, strips of 64x8.
    "strips64": lambda tokenizer: _strips((64, 1024), _keep_aspect(64, 1024)),
    "swin64": _swin64,
    "conv64": _conv64,
}
LAYOUT = "strips64"


def build_embedded(
    seed: int = 0, layout: str = LAYOUT
) -> tuple[VisionEncoderDecoderModel, TrOCRProcessor]:
    """The embedded model's layout with fresh weights, and its processor."""
    tokenizer = char_tokenizer()
    encoder, image_processor = LAYOUTS[layout](tokenizer)
    return encoder_decoder(tokenizer, encoder, DECODER, image_processor, seed)


def embedded_path() -> Path:
    """The shipped weights' folder (a `save_pretrained` folder, loaded like any other)."""
    if not (WEIGHTS / "config.json").is_file():
        raise FileNotFoundError(
            f"The embedded model's weights are missing from {WEIGHTS}. Reinstall hwr from its "
            "repository, or rebuild them with `python train.py experiment=pretrain` (see its "
            "README)."
        )
    return WEIGHTS
