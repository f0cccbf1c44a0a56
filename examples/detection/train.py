"""Lightning training of a Faster R-CNN (ResNet-18 + FPN, trainable BatchNorm) on synthetic shapes, with syncnorm.

Two images per rank is the regime where per-rank BatchNorm statistics break down; ``--norm sync`` (the default)
converts every BatchNorm to :class:`syncnorm.SyncBatchNorm` through the :class:`syncnorm.callbacks.NormConversion`
callback, so the statistics are those of the global batch.

Run it (2 ranks on CPU, or one per GPU; accelerator auto):

    python -m syncnorm.launch examples/detection/train.py                  # torchrun with syncnorm's defaults
    python -m syncnorm.launch --nproc-per-node 2 examples/detection/train.py --norm renorm --steps 200
    python examples/detection/train.py --devices 2                          # Lightning starts the processes

It evaluates COCO mAP (torchmetrics ``MeanAveragePrecision``) on held-out images before training (the untrained
baseline) and during it, and writes under ``--output`` (default ``runs/detection/<norm>/``): ``metrics.csv``
(losses, learning rate, mAP), ``predictions_untrained.png`` and ``predictions.png`` (validation images with the ground
truth in green and the predictions with score >= ``--score-threshold`` in red), and ``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # data.py and model.py next to this file

import pytorch_lightning as pl  # noqa: E402
from pytorch_lightning.loggers import CSVLogger  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torchmetrics.detection import MeanAveragePrecision  # noqa: E402
from torchvision.utils import draw_bounding_boxes, make_grid, save_image  # noqa: E402

from data import CLASSES, SyntheticShapes, collate  # noqa: E402
from model import build_detector  # noqa: E402
from syncnorm import launch  # noqa: E402

NORMS = ("sync", "batch", "renorm", "cross_iteration", "cross_minibatch", "group", "frozen")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--norm", choices=NORMS, default="sync",
                   help="what the BatchNorm layers become (batch: plain per-rank nn.BatchNorm2d)")
    p.add_argument("--devices", type=int, default=None,
                   help="processes per node (default: torchrun's when launched by it, else the GPU count or 2)")
    p.add_argument("--num-nodes", type=int, default=None, help="nodes (default: torchrun's, else 1)")
    p.add_argument("--accelerator", default="auto", help="Lightning accelerator (auto, cpu, gpu)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps (Trainer max_steps)")
    p.add_argument("--image-size", type=int, default=128, help="side of the square images, in pixels")
    p.add_argument("--batch-size", type=int, default=2, help="images per rank and step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (one-cycle schedule)")
    p.add_argument("--val-images", type=int, default=32, help="held-out images for mAP (split over the ranks)")
    p.add_argument("--val-every", type=int, default=None, help="steps between evaluations (default: steps/4)")
    p.add_argument("--backbone", choices=("resnet18", "resnet34"), default="resnet18")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers per rank")
    p.add_argument("--score-threshold", type=float, default=0.5, help="score of the boxes drawn in the PNGs")
    p.add_argument("--log-every", type=int, default=5, help="steps between logged training losses")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="output directory (default: runs/detection/<norm>)")
    args = p.parse_args(argv)
    for name in ("steps", "image_size", "batch_size", "val_images", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.image_size < 32:
        p.error(f"--image-size must be >= 32, got {args.image_size}")
    if args.val_every is None:
        args.val_every = max(1, args.steps // 4)
    if args.output is None:
        args.output = os.path.join("runs", "detection", args.norm)
    return args


def norm_callbacks(norm: str, steps: int) -> list:
    """The syncnorm callbacks for ``--norm``: a conversion (except for plain BatchNorm) and, for BRN, its schedule."""
    if norm == "batch":
        return []
    from syncnorm.callbacks import NormConversion

    if norm == "renorm":
        from syncnorm.callbacks import RenormScheduler
        from syncnorm.schedules import paper_renorm_schedule

        # Ioffe's ramp compressed to this run: plain BN for the first 10%, r_max -> 3 and d_max -> 5 by 60% / 40%
        schedule = paper_renorm_schedule(steps // 10, max(steps // 10, 6 * steps // 10), max(steps // 10, 4 * steps // 10))
        return [NormConversion("renorm"), RenormScheduler(schedule)]
    return [NormConversion(norm)]


class Detection(pl.LightningModule):
    """Faster R-CNN training and COCO-mAP evaluation; draws predictions of the first validation images on rank 0."""

    def __init__(self, image_size: int, lr: float, steps: int, backbone: str, score_threshold: float,
                 output: str, num_drawn: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.detector = build_detector(len(CLASSES), image_size, backbone=backbone)
        self.val_map = MeanAveragePrecision(box_format="xyxy", iou_type="bbox")
        self.untrained: dict = {}
        self.history: list = []
        self._drawn: list = []

    def training_step(self, batch, batch_idx):
        images, targets = batch
        losses = self.detector(images, targets)
        loss = sum(losses.values())
        self.log("train/loss", loss, prog_bar=True, batch_size=len(images))
        self.log_dict({f"train/{k}": v for k, v in losses.items()}, batch_size=len(images))
        return loss

    def validation_step(self, batch, batch_idx):
        images, targets = batch
        predictions = self.detector(images)
        self.val_map.update(predictions, targets)
        if len(self._drawn) < self.hparams.num_drawn:
            for image, target, pred in zip(images, targets, predictions):
                self._drawn.append((image.cpu(), target["boxes"].cpu(), pred))

    def on_validation_epoch_end(self):
        result = self.val_map.compute()  # gathers every rank's detections: the same numbers on all ranks
        self.val_map.reset()
        m = {"map": float(result["map"]), "map_50": float(result["map_50"])}
        if self.trainer.sanity_checking:
            # the sanity check runs the whole validation set on the untrained model: that is the baseline
            self.untrained = m
            self._save_png("predictions_untrained.png")
            self._print(f"untrained model: mAP {m['map']:.4f}, mAP@50 {m['map_50']:.4f}")
        else:
            # identical on every rank already; sync_dist only keeps Lightning from warning about epoch-level logging
            self.log_dict({"val/map": m["map"], "val/map_50": m["map_50"]}, sync_dist=True)
            self.history.append({"step": int(self.global_step), **m})
            self._save_png("predictions.png")
            self._print(f"step {self.global_step}: mAP {m['map']:.4f}, mAP@50 {m['map_50']:.4f}")
        self._drawn = []

    def _print(self, text: str) -> None:
        if self.trainer.is_global_zero:
            print(f"\n[detection] {text}", flush=True)

    def _save_png(self, name: str) -> None:
        if not self.trainer.is_global_zero or not self._drawn:
            return
        tiles = []
        scale = max(1, 256 // self.hparams.image_size)  # small images are enlarged so that the labels stay legible
        for image, gt_boxes, pred in self._drawn[: self.hparams.num_drawn]:
            keep = pred["scores"] >= self.hparams.score_threshold
            image = torch.nn.functional.interpolate(image[None], scale_factor=scale, mode="nearest")[0]
            pixels = (image * 255).to(torch.uint8)
            pixels = draw_bounding_boxes(pixels, gt_boxes * scale, colors="lime", width=1)
            labels = [f"{CLASSES[int(c)]} {float(s):.2f}" for c, s in zip(pred["labels"][keep], pred["scores"][keep])]
            pixels = draw_bounding_boxes(pixels, pred["boxes"][keep].detach().cpu() * scale, labels=labels or None,
                                         colors="red", width=2)
            tiles.append(pixels.float() / 255)
        path = Path(self.hparams.output) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        save_image(make_grid(tiles, nrow=4, padding=4, pad_value=1.0), str(path))

    def configure_optimizers(self):
        params = [p for p in self.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]  # norm affine parameters and biases
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 1e-4},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=self.hparams.lr)
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=self.hparams.lr,
                                                       total_steps=self.hparams.steps, pct_start=0.1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def norm_layer_counts(model: torch.nn.Module) -> dict:
    """``{class name: count}`` of the normalisation layers, to show what the conversion produced."""
    counts: dict = {}
    for m in model.modules():
        name = type(m).__name__
        if "norm" in name.lower() and next(m.children(), None) is None:  # leaves, not e.g. Conv2dNormActivation
            counts[name] = counts.get(name, 0) + 1
    return counts


def resolve_layout(args) -> tuple[int, int]:
    """``(devices, num_nodes)``: torchrun's layout when launched by it (checked against explicit flags)."""
    if launch.launched_by_torchrun():
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"]))
        devices = args.devices or local
        num_nodes = args.num_nodes or max(1, int(os.environ["WORLD_SIZE"]) // local)
        launch.check_world_size(devices, num_nodes)
        return devices, num_nodes
    gpus = torch.cuda.device_count() if args.accelerator in ("auto", "gpu", "cuda") else 0
    return args.devices or (gpus if gpus > 0 else 2), args.num_nodes or 1


def main(argv=None) -> dict:
    args = parse_args(argv)
    devices, num_nodes = resolve_layout(args)
    world = devices * num_nodes
    pl.seed_everything(args.seed, workers=True, verbose=False)
    torch.set_float32_matmul_precision("high")

    train_set = SyntheticShapes(args.steps * args.batch_size * world, args.image_size, seed=args.seed + 1)
    val_set = SyntheticShapes(args.val_images, args.image_size, seed=args.seed + 10_000)
    loader = dict(collate_fn=collate, num_workers=args.num_workers, persistent_workers=args.num_workers > 0)
    train_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True, **loader)
    val_loader = DataLoader(val_set, batch_size=args.batch_size, shuffle=False, **loader)

    model = Detection(args.image_size, args.lr, args.steps, args.backbone, args.score_threshold, args.output)
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy="ddp" if world > 1 else "auto",
        max_steps=args.steps,
        val_check_interval=min(args.val_every, args.steps),
        check_val_every_n_epoch=None,
        num_sanity_val_steps=-1,  # the whole validation set, untrained: the baseline mAP
        callbacks=norm_callbacks(args.norm, args.steps),
        logger=CSVLogger(os.path.dirname(args.output) or ".", name="", version=os.path.basename(args.output)),
        log_every_n_steps=args.log_every,
        enable_checkpointing=False,
        enable_model_summary=False,
        deterministic=False,
    )
    start = time.perf_counter()
    trainer.fit(model, train_loader, val_loader)
    if not model.history or model.history[-1]["step"] != trainer.global_step:
        trainer.validate(model, val_loader, verbose=False)  # the final evaluation, when steps % val_every != 0
    summary = {
        "norm": args.norm,
        "world_size": trainer.world_size,
        "steps": int(trainer.global_step),
        "images_per_rank": args.batch_size,
        "image_size": args.image_size,
        "untrained": model.untrained,
        "evaluations": model.history,
        "final": model.history[-1] if model.history else {},
        "norm_layers": norm_layer_counts(model),
        "train_seconds": round(time.perf_counter() - start, 1),
        "metrics_csv": os.path.join(trainer.logger.log_dir, "metrics.csv"),
        "predictions_png": os.path.join(args.output, "predictions.png"),
        "untrained_png": os.path.join(args.output, "predictions_untrained.png"),
    }
    if trainer.is_global_zero:
        with open(os.path.join(args.output, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        final = summary["final"]
        print(
            f"\n[detection] {args.norm}: {summary['steps']} steps on {trainer.world_size} rank(s) x "
            f"{args.batch_size} images in {summary['train_seconds']} s\n"
            f"[detection] mAP: untrained {model.untrained.get('map', float('nan')):.4f} -> "
            f"trained {final.get('map', float('nan')):.4f} "
            f"(mAP@50 {model.untrained.get('map_50', float('nan')):.4f} -> {final.get('map_50', float('nan')):.4f})\n"
            f"[detection] outputs in {os.path.abspath(args.output)}:\n"
            f"    metrics   {summary['metrics_csv']}\n"
            f"    pictures  {summary['untrained_png']} (untrained), {summary['predictions_png']} (trained)\n"
            f"    summary   {os.path.join(args.output, 'summary.json')}",
            flush=True,
        )
    return summary


if __name__ == "__main__":
    main()
