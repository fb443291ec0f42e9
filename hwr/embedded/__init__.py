"""The embedded model: a small TrOCR-family reader pre-trained by this project and shipped
in the repository, so `model=embedded` reads handwriting with no network.

Shaped for text lines: the image processor squashes a line to 40x640, and the ViT cuts
it into 128 full-height 40x5 strips (one row of patches), so the encoder spends its
compute along the line; a TrOCR decoder writes one character per step.
`hwr.embedded.pretrain` trains it on lines rendered by `hwr.embedded.synth` and real ones;
`build_embedded` gives the untrained layout it starts from. `hwr.embedded.tiny` builds
TrOCR-layout models from configs (the tiny one, and TrOCR's own shape for tests).
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrOCRProcessor, VisionEncoderDecoderModel

from hwr.embedded.tiny import char_tokenizer, trocr_layout

WEIGHTS = Path(__file__).parents[1] / "weights" / "embedded"

IMAGE_SIZE = (40, 640)
ENCODER = {
    "image_size": list(IMAGE_SIZE),
    "patch_size": [40, 5],
    "hidden_size": 256,
    "num_hidden_layers": 8,
    "num_attention_heads": 4,
    "intermediate_size": 1024,
}
DECODER = {
    "d_model": 256,
    "decoder_layers": 4,
    "decoder_attention_heads": 4,
    "decoder_ffn_dim": 1024,
    "max_position_embeddings": 256,
    "cross_attention_hidden_size": 256,
}


def build_embedded(seed: int = 0) -> tuple[VisionEncoderDecoderModel, TrOCRProcessor]:
    """The embedded model's layout with fresh weights, and its processor."""
    return trocr_layout(char_tokenizer(), ENCODER, DECODER, IMAGE_SIZE, seed=seed)


def embedded_path() -> Path:
    """The shipped weights' folder (a `save_pretrained` folder, loaded like any other)."""
    if not (WEIGHTS / "config.json").is_file():
        raise FileNotFoundError(
            f"The embedded model's weights are missing from {WEIGHTS}. Reinstall hwr from its "
            "repository, or rebuild them with `python -m hwr.embedded.pretrain` (see its README)."
        )
    return WEIGHTS
