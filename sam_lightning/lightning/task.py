"""`SamTask`: the LightningModule that fine-tunes a `Sam` with simulated prompts.

One step (DESIGN.md): encode each image once, run all prompts of an image through the prompt
encoder and mask decoder together, SAM's loss with min-over-outputs, per-mask IoU/Dice.
Hyper-parameters are plain dicts so checkpoints load under weights-only unpickling.
"""

from __future__ import annotations

import math
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F

from sam_lightning.data.cache import attach_embedding_cache, cached_embeddings
from sam_lightning.data.order import PROMPT_SEED_KEY
from sam_lightning.errors import TrainingStopped, UserError
from sam_lightning.evaluation.aggregate import protocol_metrics
from sam_lightning.evaluation.protocol import InstanceScores, ProtocolConfig, evaluate_image
from sam_lightning.lightning.checkpoints import keep_trainable_only, restore_frozen
from sam_lightning.losses import SamLoss
from sam_lightning.metrics import mask_iou, mask_metrics
from sam_lightning.model.attention import configure_image_encoder, encoder_options
from sam_lightning.model.decoder import decode_prompts, resolve_chunk_size
from sam_lightning.model.strategies import instantiate_strategy
from sam_lightning.model.weights import build_sam, check_model_size, describe_checkpoint
from sam_lightning.prompts.interactive import InteractiveConfig, interactive_session
from sam_lightning.prompts.sampling import build_training_prompts

#: where SAM's loss compares masks: the decoder's low-res grid or the padded input frame (S x S)
LOSS_RESOLUTIONS = ("low_res", "input")


class SamTask(L.LightningModule):
    """Fine-tune SAM.

    Each argument is a node of the composed config (`conf/train.yaml`, made plain), the one home
    of every default; `sam_lightning.pipelines.fit.build_task` passes them.

    Args:
        model: `conf/model/*` (`name`, `checkpoint`, attention and memory options).
        strategy: the strategy's config (`_target_` + arguments); `None` trains everything.
        loss: `conf/loss/*`: `resolution` and the `SamLoss` weights.
        prompt: `conf/prompt/*`, the prompt simulation; `None` for a task that only
            validates or tests (evaluation).
        optimizer: AdamW settings (`lr`, `weight_decay`, `betas`); `None` as for `prompt`.
        scheduler: linear warmup (`warmup_steps`) then cosine decay to `min_lr_ratio * lr`;
            `None` as for `prompt`.
        checkpoint: `trainable_only: true` saves only what trains (plus optimizer state); the
            frozen weights are read back from `model.checkpoint` when the run is loaded.
    """

    def __init__(
        self,
        model: dict[str, Any],
        loss: dict[str, Any],
        evaluation: dict[str, Any],
        strategy: dict[str, Any] | None = None,
        prompt: dict[str, Any] | None = None,
        optimizer: dict[str, Any] | None = None,
        scheduler: dict[str, Any] | None = None,
        checkpoint: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        # model.image_size: the input side; a checkpoint of another side is interpolated to it
        self.sam = build_sam(model["name"], model.get("checkpoint"), model.get("image_size"))
        self.strategy = instantiate_strategy(strategy)
        self.strategy.apply(self.sam)
        # model.attention, grad_checkpointing, compile, decoder_chunk_size (issue 6)
        configure_image_encoder(self.sam.image_encoder, **encoder_options(model))
        self.decoder_chunk_size = model.get("decoder_chunk_size", "auto")
        loss = dict(loss)
        self.loss_resolution = loss.pop("resolution")
        if self.loss_resolution not in LOSS_RESOLUTIONS:
            raise UserError(
                f"loss.resolution={self.loss_resolution!r}: expected one of "
                f"{', '.join(LOSS_RESOLUTIONS)}"
            )
        self.loss_fn = SamLoss(**loss)
        self.prompt_cfg = prompt
        self.optimizer_cfg = optimizer
        self.scheduler_cfg = scheduler
        self.eval_protocol = ProtocolConfig.from_dict(evaluation)
        self.protocol_metrics = torch.nn.ModuleDict(
            {
                "val": protocol_metrics(self.eval_protocol, "val/"),
                "test": protocol_metrics(self.eval_protocol, "test/", curve=True),
            }
        )
        self.checkpoint_cfg = {"trainable_only": False, **(checkpoint or {})}
        if self.checkpoint_cfg["trainable_only"] and not model.get("checkpoint"):
            raise UserError(
                "checkpoint.trainable_only=true needs model.checkpoint: the frozen weights are "
                "read back from it when the run is loaded; set model.checkpoint=<path> or "
                "checkpoint.trainable_only=false"
            )
        self.metrics = torch.nn.ModuleDict(
            {f"{stage}_metrics": mask_metrics(f"{stage}/") for stage in ("train", "val", "test")}
        )

    @property
    def image_size(self) -> int:
        return self.sam.image_encoder.img_size

    # ---- the model, as SamPredictor runs it -------------------------------------------------
    def preprocess(self, images: torch.Tensor, input_size: torch.Tensor) -> torch.Tensor:
        """Normalise uint8 [B, 3, S, S] images and zero the padding, exactly as `Sam.preprocess`."""
        x = (images.float() - self.sam.pixel_mean) / self.sam.pixel_std
        size = x.shape[-1]
        ar = torch.arange(size, device=x.device)
        rows = ar[None, :] < input_size[:, 0:1]  # [B, S]
        cols = ar[None, :] < input_size[:, 1:2]
        valid = rows[:, None, :, None] & cols[:, None, None, :]
        return x * valid

    def encode(self, images: torch.Tensor, input_size: torch.Tensor) -> torch.Tensor:
        """Image embeddings [B, C, h, w]."""
        return self.sam.image_encoder(self.preprocess(images, input_size))

    def decode(
        self,
        embedding: torch.Tensor,
        boxes: torch.Tensor | None = None,
        points: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        mask_logits: torch.Tensor | None = None,
        multimask: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All K prompts of one image through the prompt encoder and mask decoder.

        The image-side work is shared by the prompts where SAM's decoder allows it, then done
        for all prompts at once on a GPU and in chunks of `model.decoder_chunk_size` on a CPU,
        where that was measured faster (`sam_lightning.model.decoder`); the result is the same.

        Args:
            embedding: [1, C, h, w] embedding of the image.
            boxes: [K, 4] XYXY in the model's input frame.
            points, labels: [K, P, 2] and [K, P] (1 positive, 0 negative).
            mask_logits: [K, 1, 4h, 4w] low-res logits of a previous round.
            multimask: three ambiguity outputs (one point) instead of the single-mask token.

        Returns:
            Low-res logits [K, M, 4h, 4w] and predicted IoU [K, M], M = 3 or 1.
        """
        chunk = resolve_chunk_size(self.decoder_chunk_size, embedding)
        return decode_prompts(
            self.sam, embedding, boxes, points, labels, mask_logits, multimask, chunk
        )

    def upscale(self, low_res: torch.Tensor) -> torch.Tensor:
        """Low-res logits to the padded input frame S x S (the first step of `postprocess_masks`)."""
        return F.interpolate(
            low_res, (self.image_size, self.image_size), mode="bilinear", align_corners=False
        )

    def mask_loss(
        self, low_res: torch.Tensor, iou_pred: torch.Tensor, masks: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """SAM's loss of low-res logits [K, M, 4h, 4w] against [K, S, S] masks.

        `loss.resolution=low_res` area-averages the masks down to the logits' grid (soft
        targets): 16x fewer pixels, and no upscale to back-propagate through. `input` upscales
        the logits to the input frame first, as `postprocess_masks` does. `parts` also carries
        the compared `logits` (detached) and `targets`, for metrics in the same frame.
        """
        if self.loss_resolution == "input":
            logits, targets = self.upscale(low_res), masks
        else:
            logits = low_res
            targets = F.interpolate(masks[:, None].float(), size=low_res.shape[-2:], mode="area")
            targets = targets[:, 0]
        loss, parts = self.loss_fn(logits, iou_pred, targets)
        return loss, {**parts, "logits": logits.detach(), "targets": targets}

    def _metric_masks(
        self, parts: dict[str, torch.Tensor], masks: torch.Tensor, hw: tuple[int, int], stage: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted and true masks of the best outputs, cropped to the image, for the metrics.

        Training measures them where the loss compares masks (at low resolution that saves an
        upscale and two passes over K full-size masks per image); validation and test always
        in the input frame, where `val/iou` is defined.
        """
        rows = torch.arange(parts["best"].shape[0], device=masks.device)
        logits, targets = parts["logits"][rows, parts["best"]], parts["targets"]
        if stage != "train" and logits.shape[-1] != self.image_size:
            logits, targets = self.upscale(logits[:, None])[:, 0], masks
        scale = logits.shape[-1] / self.image_size
        h, w = math.ceil(hw[0] * scale), math.ceil(hw[1] * scale)
        return logits[:, :h, :w] > 0, targets[:, :h, :w] > 0.5

    # ---- SAM's interactive recipe and evaluation protocol (issue 5) -----------------------------
    def _interactive_session(
        self,
        embedding: torch.Tensor,
        masks: torch.Tensor,
        boxes: torch.Tensor,
        hw: tuple[int, int],
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`prompt.mode=interactive`: the simulated click session of `sam_lightning.interactive`."""
        result = interactive_session(
            self.decode,
            self.mask_loss,
            embedding,
            masks,
            boxes,
            hw,
            InteractiveConfig.from_dict(self.prompt_cfg),
            generator,
        )
        self.log(
            "train/iou_first_round", result.round_iou[0], on_step=False, on_epoch=True, batch_size=1
        )
        self.log(
            "train/iou_last_round", result.round_iou[-1], on_step=False, on_epoch=True, batch_size=1
        )
        return result.loss, result.pred

    # ---- one step for every stage ------------------------------------------------------------
    def _shared_step(
        self, batch: dict[str, Any], stage: str, images: list[dict[str, Any]] | None = None
    ) -> torch.Tensor:
        """The step of every stage: prompts and loss per image; validation and test also run
        the paper's protocols (`sam_lightning.evaluation`) on the same box predictions.

        With `images`, one record per image with instances is appended to it: the image and
        masks cropped to the image (no padding), the prompt boxes, and each instance's IoU, of
        the very predictions `val/iou` scores (what the overlay callbacks draw).
        """
        training = stage == "train"
        if training and self.prompt_cfg is None:
            raise UserError("this SamTask was built without prompt settings: it cannot train")
        embeddings = cached_embeddings(batch, self.sam.pixel_mean)  # data.cache_embeddings
        if embeddings is None:
            embeddings = self.encode(batch["images"], batch["input_size"])
        losses, scores = [], []
        metrics = self.metrics[f"{stage}_metrics"]
        for i, (masks, boxes) in enumerate(zip(batch["masks"], batch["boxes"], strict=True)):
            if masks.shape[0] == 0:
                continue
            h, w = (int(v) for v in batch["input_size"][i])
            embedding = embeddings[i : i + 1]
            prompts = {"boxes": boxes, "points": None, "labels": None, "multimask": False}
            generator = None
            if training:  # prompt=box|point|both|interactive (sam_lightning.prompts)
                generator = prompt_generator(batch, i)
                prompts = build_training_prompts(masks, boxes, (h, w), self.prompt_cfg, generator)
                masks, boxes = prompts.pop("masks"), prompts["boxes"]
                if masks.shape[0] == 0:  # every mask covered > 90% of the image
                    continue
            if training and self.prompt_cfg["mode"] == "interactive":
                loss, pred = self._interactive_session(embedding, masks, boxes, (h, w), generator)
                pred, truth = pred[:, :h, :w], masks[:, :h, :w]
            else:
                low_res, iou_pred = self.decode(embedding, **prompts)
                loss, parts = self.mask_loss(low_res, iou_pred, masks)
                with torch.no_grad():
                    pred, truth = self._metric_masks(parts, masks, (h, w), stage)
                if not training:  # the box protocol reuses this very prediction
                    scores.append(
                        evaluate_image(
                            self.decode,
                            embedding,
                            masks[:, :h, :w],
                            boxes,
                            self.image_size,
                            self.eval_protocol,
                            box_low_res=low_res,
                        )
                    )
            losses.append(loss)
            metrics.update(pred, truth)
            if images is not None:
                images.append(
                    {
                        "image": batch["images"][i, :, :h, :w],
                        "masks": pred,
                        "gt": truth,
                        "boxes": boxes,
                        "iou": mask_iou(pred, truth),
                        "image_id": batch["image_ids"][i],
                    }
                )
        batch_size = len(batch["masks"])
        if not training:
            collection = self.protocol_metrics[stage]
            collection.update(InstanceScores.cat(scores))
            self.log_dict(collection, on_step=False, on_epoch=True, batch_size=batch_size)
        if not losses:  # no instance in the whole batch: a zero loss that keeps the graph
            return sum(p.sum() * 0 for p in self.parameters() if p.requires_grad)
        # the mean over the batch's images (one without instances counts zero): with the same
        # number of images per process, DDP's average of the processes' gradients is the
        # gradient of the one-process batch of all their images (tests/test_resume.py)
        loss = torch.stack(losses).sum() / batch_size
        self.log(
            f"{stage}/loss",
            loss,
            prog_bar=training,
            batch_size=batch_size,
            on_step=training,
            on_epoch=True,
            sync_dist=True,  # under DDP the logged loss is the global batch's
        )
        self.log_dict(
            metrics, on_step=False, on_epoch=True, prog_bar=stage == "val", batch_size=batch_size
        )
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self._shared_step(batch, "train")
        if not torch.isfinite(loss):
            raise TrainingStopped(
                f"non-finite loss ({loss.item()}) at global step {self.global_step} "
                f"on images {', '.join(batch['image_ids'])}; the last good checkpoint is kept. "
                "Lower optimizer.lr or check these images."
            )
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        """Returns `{"images": [...]}` (see `_shared_step`) for callbacks' `on_validation_batch_end`."""
        images: list[dict[str, Any]] = []
        self._shared_step(batch, "val", images)
        return {"images": images}

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def setup(self, stage: str) -> None:
        # data.cache_embeddings=true: fill the cache before any loader exists (issue 6)
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None:
            attach_embedding_cache(self.sam, self.encode, datamodule, self.trainer)

    # ---- checkpoints (issue 4) ---------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.checkpoint_cfg["trainable_only"]:
            keep_trainable_only(checkpoint, self.sam)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        _, info = describe_checkpoint(checkpoint)
        check_model_size(info.model, self.hparams["model"]["name"], "checkpoint")
        restore_frozen(checkpoint, self.state_dict())

    # ---- optimisation ------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        if self.optimizer_cfg is None or self.scheduler_cfg is None:
            raise UserError(
                "this SamTask was built without optimizer and scheduler settings: it cannot train"
            )
        cfg = self.optimizer_cfg
        groups = self.strategy.param_groups(self.sam, cfg["lr"])
        optimizer = torch.optim.AdamW(
            groups, lr=cfg["lr"], weight_decay=cfg["weight_decay"], betas=tuple(cfg["betas"])
        )
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = min(int(self.scheduler_cfg["warmup_steps"]), total // 2)
        schedule = warmup_cosine(warmup, total, float(self.scheduler_cfg["min_lr_ratio"]))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }


def prompt_generator(batch: dict[str, Any], i: int) -> torch.Generator | None:
    """The random source of image i's training prompts: seeded from the sample's own seed
    (`sam_lightning.data.order`, the same whatever the process or resume), or None (torch's
    global generator) for a batch from a loader without per-sample seeds."""
    seeds = batch.get(PROMPT_SEED_KEY)
    if seeds is None:
        return None
    return torch.Generator().manual_seed(int(seeds[i]))


def warmup_cosine(warmup: int, total: int, min_ratio: float):
    """Learning-rate factor: linear warmup over `warmup` steps, then cosine to `min_ratio`."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
