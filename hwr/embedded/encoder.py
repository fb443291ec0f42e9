"""The embedded model's line encoder: a small convolutional stem that turns a text line
into a left-to-right sequence of columns, then transformer layers over the columns.

A ViT cuts the picture into patches with one linear map; on a few thousand lines that
learns strokes slowly (HTR-VT, Li et al. 2024: a CNN stem in place of the patch
embedding is what lets a transformer learn handwriting from small data). Here four
3x3 convolutions (stride 2, 2, (2,1), 2) take a 64-pixel-high line to 4 rows of columns
8 pixels apart, the rows are stacked into one vector per column, and ViT's own layers
read the columns. A CTC head on the columns is trained with the decoder and kept in the
weights: its best path (`ctc_logits`, then `hwr.decoding.ctc_greedy`) is a one-pass
reading that cannot loop.

Not a stock transformers class: it is registered with AutoConfig/AutoModel when
`hwr.embedded` is imported (as hwr's own loading does), so
`VisionEncoderDecoderModel.from_pretrained` loads a saved model after `import hwr.embedded`.
Not on `import hwr` itself: that would load torch and transformers for every `hwr` command.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel, ViTConfig
from transformers.modeling_outputs import BaseModelOutput
from transformers.models.vit.modeling_vit import ViTLayer


class LineEncoderConfig(PretrainedConfig):
    model_type = "hwr_line_encoder"

    def __init__(
        self,
        image_size: tuple[int, int] | list[int] = (64, 1024),
        num_channels: int = 3,
        stem_channels: tuple[int, ...] | list[int] = (32, 64, 128, 128),
        hidden_size: int = 256,
        num_hidden_layers: int = 6,
        num_attention_heads: int = 4,
        intermediate_size: int = 1024,
        hidden_dropout_prob: float = 0.1,
        attention_probs_dropout_prob: float = 0.0,
        layer_norm_eps: float = 1e-6,
        ctc_vocab_size: int = 0,
        ctc_blank_id: int = 1,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        self.image_size = list(image_size)
        self.num_channels = num_channels
        self.stem_channels = list(stem_channels)
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.layer_norm_eps = layer_norm_eps
        self.ctc_vocab_size = ctc_vocab_size
        self.ctc_blank_id = ctc_blank_id

    def vit(self) -> ViTConfig:
        """The ViT layers' settings (their classes are reused as they are)."""
        return ViTConfig(
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            hidden_dropout_prob=self.hidden_dropout_prob,
            attention_probs_dropout_prob=self.attention_probs_dropout_prob,
            layer_norm_eps=self.layer_norm_eps,
            hidden_act="gelu",
        )


STRIDES = ((2, 2), (2, 2), (2, 1), (2, 2))


class LineEncoder(PreTrainedModel):
    config_class = LineEncoderConfig
    main_input_name = "pixel_values"
    base_model_prefix = "line_encoder"
    supports_gradient_checkpointing = True

    def __init__(self, config: LineEncoderConfig) -> None:
        super().__init__(config)
        layers, c_in = [], config.num_channels
        for c_out, stride in zip(config.stem_channels, STRIDES, strict=True):
            layers += [
                nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1),
                nn.GroupNorm(8, c_out),
                nn.GELU(),
            ]
            c_in = c_out
        self.stem = nn.Sequential(*layers)
        height, width = config.image_size
        rows, self.columns = height // 16, width // 8
        self.project = nn.Linear(c_in * rows, config.hidden_size)
        self.position = nn.Parameter(torch.zeros(1, self.columns, config.hidden_size))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        vit = config.vit()
        vit._attn_implementation = "sdpa"
        self.layers = nn.ModuleList(ViTLayer(vit) for _ in range(config.num_hidden_layers))
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.ctc_head = (
            nn.Linear(config.hidden_size, config.ctc_vocab_size) if config.ctc_vocab_size else None
        )
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Conv2d):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm | nn.GroupNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, LineEncoder):
            nn.init.trunc_normal_(module.position, std=0.02)

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutput:
        features = self.stem(pixel_values.to(self.project.weight.dtype))
        columns = features.flatten(1, 2).transpose(1, 2)  # (batch, width, channels x rows)
        hidden = self.dropout(self.project(columns) + self.position[:, : columns.shape[1]])
        for layer in self.layers:
            hidden = layer(hidden)
        return BaseModelOutput(last_hidden_state=self.layernorm(hidden))

    def ctc_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Per-column character scores (blank = config.ctc_blank_id) from encoder states."""
        if self.ctc_head is None:
            raise ValueError("This encoder was built without a CTC head (ctc_vocab_size=0).")
        return self.ctc_head(hidden)


AutoConfig.register(LineEncoderConfig.model_type, LineEncoderConfig)
AutoModel.register(LineEncoderConfig, LineEncoder)
