"""hwr: teach a handwriting recognizer to read one person's handwriting."""

# The embedded model's line encoder is not a stock transformers class: importing hwr
# registers it, so `VisionEncoderDecoderModel.from_pretrained` loads models that use it.
from hwr.embedded import encoder as _line_encoder  # noqa: F401
