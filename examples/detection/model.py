"""A small Faster R-CNN: ResNet-18 + FPN backbone with trainable ``nn.BatchNorm2d`` everywhere, no pretrained weights.

torchvision's detection zoo freezes BatchNorm (``FrozenBatchNorm2d``) because per-GPU detection batches of 1 or 2
images give useless batch statistics. Here the BatchNorm layers train, and syncnorm's conversion decides what they
compute: batch statistics synchronised over all ranks (``--norm sync``), Batch Renormalization, and so on.
"""

from __future__ import annotations

import torch.nn as nn
from torchvision.models import resnet18, resnet34
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

__all__ = ["build_detector"]

_RESNETS = {"resnet18": resnet18, "resnet34": resnet34}


def build_detector(num_classes: int, image_size: int, backbone: str = "resnet18", fpn_channels: int = 64,
                   head_size: int = 256) -> FasterRCNN:
    """Faster R-CNN for ``image_size`` x ``image_size`` inputs, ``num_classes`` classes including the background.

    The backbone is a randomly initialised torchvision ResNet (``weights=None``) with ``nn.BatchNorm2d`` in every block
    and every layer trainable; an FPN of ``fpn_channels`` channels reads ``layer2..layer4`` (strides 8, 16, 32) plus a
    max-pooled level (stride 64). Anchors scale with the image (1/8 of its side on the finest level, doubling per
    level) so the same model fits tiny test images and larger demo images. The transform keeps the image size (no
    resize to 800 px), and the proposal counts are cut down for small images.
    """
    if backbone not in _RESNETS:
        raise ValueError(f"build_detector: backbone must be one of {sorted(_RESNETS)}, got {backbone!r}")
    trunk = _RESNETS[backbone](weights=None, norm_layer=nn.BatchNorm2d)
    widths = [trunk.layer2[-1].conv1.in_channels * 2 ** i for i in range(3)]  # 128, 256, 512 for resnet18/34
    fpn = BackboneWithFPN(trunk, {"layer2": "0", "layer3": "1", "layer4": "2"}, widths, fpn_channels,
                          extra_blocks=LastLevelMaxPool())
    base = max(8, image_size // 8)
    anchors = AnchorGenerator(tuple((base * 2 ** i,) for i in range(4)), ((0.5, 1.0, 2.0),) * 4)
    return FasterRCNN(
        fpn,
        num_classes=None,
        min_size=image_size,
        max_size=image_size,
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=600,
        rpn_post_nms_top_n_train=300,
        rpn_pre_nms_top_n_test=300,
        rpn_post_nms_top_n_test=100,
        box_batch_size_per_image=128,
        box_detections_per_img=20,
        box_head=TwoMLPHead(fpn_channels * 7 * 7, head_size),
        box_predictor=FastRCNNPredictor(head_size, num_classes),
    )
