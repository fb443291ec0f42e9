"""The LightningModule both engines train: fine-tuning (train.py) and pre-training
(train.py experiment=pretrain) step, validate and read through it."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from peft import PeftConfig, PeftModel, get_peft_model
from transformers import SchedulerType, VisionEncoderDecoderModel, get_scheduler
from transformers.modeling_outputs import BaseModelOutput

from hwr.decoding import check_reading, read_batch
from hwr.embedded.ctc import ctc_loss, ctc_reader
from hwr.errors import UserError
from hwr.images import open_rgb
from hwr.lm import load_lm
from hwr.metrics import TextMetrics
from hwr.model import build_layout, load_pretrained, set_language

log = logging.getLogger(__name__)

# The CTC head's share of the loss when training a model that has one.
CTC_LOSS = 0.5


class TrOCRModule(L.LightningModule):
    """Trains a VisionEncoderDecoder; validation reads every line with `generate`.

    `layout` trains a fresh model of one of the embedded layouts, warm-started from
    `name_or_path` (None: from scratch) as pre-training does; `label_smoothing` and a
    `schedule` of transformers' (linear, cosine, ...) are pre-training's settings too.
    `language` tells a model with language tokens which one it writes (None: the one it
    was saved with; train.py: the training lines', `hwr.data.LineDataModule`).

    Reading uses the language model saved with the model (`lm`), if any. After each
    validation epoch, `predictions` maps a line's index in the evaluated
    lines to (predicted text, line CER); `base_result` carries the base model's score
    through checkpoints so a resumed run still reports it.
    """

    def __init__(
        self,
        name_or_path: str | None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        warmup_ratio: float = 0.1,
        schedule: str = "linear",
        label_smoothing: float = 0.0,
        layout: str | None = None,
        language: str | None = None,
        num_beams: int = 1,
        ctc_weight: float | None = None,
        lm_weight: float | None = None,
        max_new_tokens: int = 128,
        log_examples: int = 4,
        compile_encoder: bool = False,
        freeze: Sequence[str] = (),
        adapter: PeftConfig | None = None,
        gradient_checkpointing: bool = False,
        step_in_backward: bool = False,
    ) -> None:
        super().__init__()
        check_reading(num_beams, max_new_tokens, ctc_weight, lm_weight)
        if schedule not in {s.value for s in SchedulerType}:
            names = ", ".join(s.value for s in SchedulerType)
            raise UserError(f"model.schedule={schedule}: choose one of {names}")
        if not 0.0 <= label_smoothing < 1.0:
            raise UserError(f"model.label_smoothing={label_smoothing}: must be in [0, 1)")
        if not 0.0 <= warmup_ratio < 1.0:
            raise UserError(f"model.warmup_ratio={warmup_ratio}: must be in [0, 1)")
        lr = getattr(optimizer, "keywords", {}).get("lr")
        if lr is not None and not lr > 0:
            raise UserError(f"optim.lr={lr}: must be above 0 (e.g. 1e-5)")
        if adapter is not None and not isinstance(adapter, PeftConfig):
            raise UserError(f"model.adapter={adapter}: choose adapters with model/adapter=lora")
        # Checkpoints are loaded with weights_only: hyperparameters must be plain types, not
        # Hydra's ListConfig.
        freeze = list(freeze)
        self.save_hyperparameters(ignore=["optimizer", "adapter"])
        if layout is not None:
            self.model, self.processor = build_layout(layout, name_or_path, max_new_tokens)
        elif name_or_path is None:
            raise UserError("model.name_or_path=null: name a model, or a fresh model.layout")
        else:
            self.model, self.processor = load_pretrained(name_or_path, max_new_tokens)
        if language is not None:
            set_language(self.model, self.processor.tokenizer, language)
        # The language model saved with the model, if any, at its weight (train.py builds one).
        self.lm = None if layout is not None else load_lm(name_or_path, lm_weight)
        if self.lm is not None and lm_weight is None and self.lm.beams != num_beams:
            log.info(
                "The language model's weight %g was chosen for model.num_beams=%d; reading "
                "with %d (model.lm_weight=W sets another)",
                self.lm.weight,
                self.lm.beams,
                num_beams,
            )
        if adapter is not None:
            # Only the adapters train; they are merged into the weights for export.
            self.model = get_peft_model(self.model, adapter)
        for name in freeze:  # after the adapters, so a frozen part's adapters stay too
            try:
                part = self.plain_model.get_submodule(name)
            except AttributeError:
                raise UserError(
                    f"model.freeze: the model has no part '{name}' (e.g. encoder, decoder)"
                ) from None
            part.requires_grad_(False)
        # from_pretrained returns eval mode, which Lightning keeps: dropout would stay off.
        self.model.train()
        # The encoder's pooler never feeds the decoder; left trainable, DDP would stop on
        # parameters without gradients.
        if getattr(self.model.encoder, "pooler", None) is not None:
            self.model.encoder.pooler.requires_grad_(False)
        if gradient_checkpointing:
            # Keeps each layer's input and recomputes the rest during backward (a third more
            # compute); the random state is replayed, so training is the same.
            self.plain_model.activation_checkpointing_enable()
        # Stepping in backward, Lightning must not step (or clip, or accumulate) itself.
        self.automatic_optimization = not step_in_backward
        self._step_hooks: list = []
        if compile_encoder:
            # In place, so state_dict keys (checkpoints, export) stay as they are. The
            # encoder sees one image size; the decoder's growing cache would recompile.
            self.model.encoder.compile()
        self.optimizer = optimizer
        self.metrics = TextMetrics()
        self.predictions: dict[int, tuple[str, float]] = {}
        self.validated_at: int | None = None  # the step of the last validation in this process
        self.base_result: dict | None = None

    @property
    def plain_model(self) -> VisionEncoderDecoderModel:
        """The VisionEncoderDecoder inside, adapters (if any) in place but not merged."""
        return self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model

    def merged_model(self) -> VisionEncoderDecoderModel:
        """The model to export: a plain VisionEncoderDecoder, adapters merged into the weights.

        Merging is for the end of a run: the module trains no adapters after it.
        """
        if isinstance(self.model, PeftModel):
            self.model = self.model.merge_and_unload()
        return self.model

    def setup(self, stage: str) -> None:
        encoder = self.plain_model.config.encoder
        patch = encoder.patch_size if encoder.model_type == "vit" else None
        strips = isinstance(patch, list) and patch[0] == encoder.image_size[0]
        if stage == "fit" and strips and self.trainer.strategy.root_device.type == "cpu":
            # On CPU, SDPA's flash-attention backward over the embedded model's 128 strips
            # (full-height patches) is slow: plain attention trained 45 lines/s against
            # 38. Measured there only; other encoders keep SDPA.
            self.plain_model.encoder.set_attn_implementation("eager")

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The decoder's loss (label-smoothed, if set), plus CTC_LOSS x its CTC head's if it
        has one (so the head keeps up with the encoder, for joint decoding)."""
        # No key/value cache: one pass over the whole line needs none, and it would hold
        # every layer's keys and values until the step ends.
        out = self.model(pixel_values=pixel_values, labels=labels, use_cache=False)
        loss = out.loss
        if self.hparams.label_smoothing:
            loss = F.cross_entropy(
                out.logits.flatten(0, 1).float(),
                labels.flatten(),
                ignore_index=-100,
                label_smoothing=self.hparams.label_smoothing,
            )
        head = ctc_reader(self.plain_model)
        if head is None:
            return loss
        tok = self.processor.tokenizer
        return loss + CTC_LOSS * ctc_loss(head, out.encoder_last_hidden_state, labels, tok)

    def read(
        self, pixel_values: torch.Tensor | None, encoder_outputs: BaseModelOutput | None = None
    ) -> list[str]:
        """Greedy (or beam) decoding of a batch of processed line images."""
        texts, _ = read_batch(
            self.model,
            self.processor,
            pixel_values,
            self.hparams.num_beams,
            self.hparams.max_new_tokens,
            confidence=False,
            encoder_outputs=encoder_outputs,
            ctc_weight=self.hparams.ctc_weight,
            lm=self.lm,
        )
        return texts

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self(batch["pixel_values"], batch["labels"])
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["text"]))
        if not self.automatic_optimization:
            self.manual_backward(loss)  # every parameter steps as its gradient completes
            self.optimizers().step()  # no gradient is left to apply: counts the step
            self.lr_schedulers().step()
        return loss

    def check_trainer(self, trainer: L.Trainer) -> None:
        """Settings that cannot go with stepping in backward, named as hwr's configs name them
        (Lightning would stop at fit with its own names); under DDP, Lightning's own steps.
        Call it before fit: Lightning checks the settings before any module hook runs."""
        if self.automatic_optimization:
            return
        if trainer.world_size > 1:
            # DDP averages each gradient over the processes after backward: a step inside
            # backward would use this process's gradient alone.
            log.warning(
                "model.step_in_backward is off for this run: under DDP (%d processes) "
                "gradients are averaged only after backward.",
                trainer.world_size,
            )
            self.automatic_optimization = True
            return
        clashes = {
            "trainer.gradient_clip_val": trainer.gradient_clip_val,
            "trainer.accumulate_grad_batches": trainer.accumulate_grad_batches != 1
            and trainer.accumulate_grad_batches,
        }
        for name, value in clashes.items():
            if value:
                raise UserError(
                    f"{name}={value} needs every gradient at once, but model.step_in_backward "
                    f"frees each one as soon as it is used (to save memory): set "
                    f"model.step_in_backward=false, or leave out {name}."
                )
        if str(trainer.precision) == "16-mixed":
            raise UserError(
                "trainer.precision=16-mixed scales the loss, which model.step_in_backward "
                "cannot undo: use bf16-mixed, or model.step_in_backward=false."
            )

    def on_validation_epoch_start(self) -> None:
        self.metrics.reset()
        self.predictions = {}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        size = len(batch["text"])
        # The encoder reads the images once, for the loss and for decoding.
        encoded = self.plain_model.encoder(pixel_values=batch["pixel_values"])
        loss = self.model(encoder_outputs=encoded, labels=batch["labels"], use_cache=False).loss
        self.log("val/loss", loss, batch_size=size, sync_dist=True)
        preds = self.read(None, encoded)
        per_line = self.metrics.update(preds, batch["text"])
        for i, pred, cer in zip(batch["index"].tolist(), preds, per_line.tolist(), strict=True):
            self.predictions[i] = (pred, cer)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.world_size > 1:  # each process read a shard; every one gets them all
            shards = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(shards, self.predictions)
            self.predictions = {i: p for shard in shards for i, p in shard.items()}
        self.validated_at = self.global_step
        scores = self.metrics.compute()  # torchmetrics sum over processes
        for name, value in scores.items():
            self.log(f"val/{name}", float(value), prog_bar=name == "cer")
        self._log_examples()

    def _log_examples(self) -> None:
        """Show a few lines with what the model reads now, as text and images."""
        dm = getattr(self.trainer, "datamodule", None)
        if (
            not isinstance(self.logger, TensorBoardLogger)
            or dm is None
            or self.trainer.sanity_checking
        ):
            return
        writer, step = self.logger.experiment, self.global_step
        rows = ["| line | reference | read |", "|---|---|---|"]
        for i, line in enumerate(dm.eval_lines[: self.hparams.log_examples]):
            pred = self.predictions.get(i, ("", 0.0))[0]
            rows.append(f"| {line.file_name} | {line.text} | {pred} |")
            if step == 0:
                pixels = np.asarray(open_rgb(line.image).convert("L"))
                writer.add_image(f"examples/{i}", pixels, step, dataformats="HW")
        writer.add_text("examples", "\n".join(rows), step)

    def configure_optimizers(self) -> dict:
        if self.optimizer is None:
            raise ValueError("TrOCRModule needs an optimizer to train (the optim config group).")
        if not self.automatic_optimization and self.trainer.world_size > 1:
            self.check_trainer(self.trainer)  # under DDP, Lightning steps (train.py did this)
        params = [p for p in self.parameters() if p.requires_grad]
        optimizer = self.optimizer(params=params)
        for hook in self._step_hooks:
            hook.remove()
        if not self.automatic_optimization:
            # Each parameter steps as soon as its gradient is complete, and the gradient is
            # freed: a model's worth of gradients is never held at once (for TrOCR-base,
            # 1.3 GB). At that moment it is the only parameter with a gradient, so the one
            # optimizer steps it alone, and its state and schedule stay as they would be.
            def step(param: torch.nn.Parameter) -> None:
                optimizer.step()
                param.grad = None

            self._step_hooks = [p.register_post_accumulate_grad_hook(step) for p in params]
        total = self.trainer.estimated_stepping_batches
        scheduler = get_scheduler(
            self.hparams.schedule, optimizer, int(self.hparams.warmup_ratio * total), total
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["hwr_base_result"] = self.base_result

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.base_result = checkpoint.get("hwr_base_result")
