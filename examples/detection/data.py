"""A synthetic detection dataset rendered on the fly: coloured shapes on a textured background, with boxes and classes.

Nothing is downloaded. Image ``i`` is a pure function of ``(seed, i)``, so every rank, every epoch and every run sees
the same pixels for the same index (the validation mAP of two runs is comparable).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

__all__ = ["CLASSES", "SyntheticShapes", "collate"]

# Index 0 is the background class of torchvision detectors; a label is the index of its shape here.
CLASSES = ("background", "rectangle", "ellipse", "triangle")


def _iou(a: tuple, b: tuple) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


class SyntheticShapes(Dataset):
    """``num_images`` RGB images of ``image_size`` x ``image_size`` pixels with 1 to ``max_objects`` shapes each.

    A shape is a rectangle, an ellipse or a triangle (labels 1, 2, 3; see :data:`CLASSES`) whose width and height are
    each 18% to 45% of the image side, in a random colour that always contrasts with the background, placed so that two shapes overlap by at most 0.2
    IoU. ``__getitem__`` returns ``(image, target)`` in the torchvision detection format: ``image`` a float tensor
    ``(3, H, W)`` in ``[0, 1]``, ``target`` a dict with ``boxes`` (float ``(K, 4)``, ``x1, y1, x2, y2``, the tight box
    of the drawn shape), ``labels`` (int64 ``(K,)``) and ``image_id``.
    """

    def __init__(self, num_images: int, image_size: int = 128, max_objects: int = 3, seed: int = 0) -> None:
        if num_images < 1:
            raise ValueError(f"SyntheticShapes: num_images must be >= 1, got {num_images}")
        if image_size < 32:
            raise ValueError(f"SyntheticShapes: image_size must be >= 32, got {image_size}")
        if max_objects < 1:
            raise ValueError(f"SyntheticShapes: max_objects must be >= 1, got {max_objects}")
        self.num_images = num_images
        self.image_size = image_size
        self.max_objects = max_objects
        self.seed = seed

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int):
        if not 0 <= index < self.num_images:
            raise IndexError(f"SyntheticShapes: index {index} out of range [0, {self.num_images})")
        rng = np.random.default_rng([self.seed, index])
        s = self.image_size
        background = rng.uniform(0.0, 0.35, size=3)
        pixels = background + rng.normal(0.0, 0.04, size=(s, s, 3))  # mild texture so that flat colour is not a cue
        image = Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        boxes: list[tuple] = []
        labels: list[int] = []
        for _ in range(int(rng.integers(1, self.max_objects + 1))):
            for _attempt in range(20):
                label = int(rng.integers(1, len(CLASSES)))
                w, h = rng.uniform(0.18, 0.45, size=2) * s
                x1, y1 = rng.uniform(0, s - w), rng.uniform(0, s - h)
                box = (float(x1), float(y1), float(x1 + w), float(y1 + h))
                if all(_iou(box, other) <= 0.2 for other in boxes):
                    break
            else:
                continue
            colour = tuple(int(c) for c in rng.uniform(0.55, 1.0, size=3) * 255)
            if label == 1:
                draw.rectangle(box, fill=colour)
            elif label == 2:
                draw.ellipse(box, fill=colour)
            else:
                # isosceles triangle with its apex up: its box is exactly the drawn box
                draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) / 2, box[1])], fill=colour)
            boxes.append(box)
            labels.append(label)
        tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1).contiguous()
        target = {
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "image_id": index,
        }
        return tensor, target


def collate(batch):
    """Detection batches are lists: images of a batch may differ in size and hold different numbers of boxes."""
    images, targets = zip(*batch)
    return list(images), list(targets)

