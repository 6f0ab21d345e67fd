"""SigLIP's pixel values, split in two halves: resize (per image, on CPU) and normalise (batched).

The Hugging Face image processor works image by image: resize, then rescale and normalise each as
its own float array, with checks in between. For the tiny preset's 32x32 images that costs more
than the vision tower itself (docs/PERFORMANCE.md, "Pixels"). Here each image is only resized (by
PIL, with the processor's own resample filter, as the processor does) to uint8 pixels, and rescale
+ normalise run once on the stacked batch.

The split is also where a pipeline cuts: the resized uint8 pixels are what a CPU decode stage
hands to the encoder actors (a quarter of the float32 bytes), and the actor, on a GPU, only
normalises and runs the tower. The result equals the processor's to float rounding (tested in
tests/test_model.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # imported where normalise runs: a CPU decode stage only resizes and never loads torch
    import torch


def supports(processor, images) -> bool:
    """True when the direct resize is exact: a plain resize to height x width, no crop or padding,
    and RGB images (the processor composites other modes onto white first)."""
    size = processor.size
    plain = (
        processor.do_resize
        and size.height and size.width
        and not getattr(processor, "do_center_crop", None)
        and not getattr(processor, "do_pad", None)
    )
    return bool(plain) and all(isinstance(im, Image.Image) and im.mode == "RGB" for im in images)


def resize(processor, images) -> np.ndarray:
    """PIL images -> (B, H, W, 3) uint8: the processor's geometry, before rescale and normalise."""
    images = list(images)
    if not supports(processor, images):  # the processor's own path, stopped before the float steps
        out = processor(images=images, do_rescale=False, do_normalize=False, return_tensors="np")["pixel_values"]
        return np.ascontiguousarray(np.rint(out).astype(np.uint8).transpose(0, 2, 3, 1))
    return np.stack([_resized(processor, im) for im in images])


def resize_one(processor, image) -> np.ndarray:
    """One PIL image -> (H, W, 3) uint8, as ``resize(processor, [image])[0]`` (no stacking copy)."""
    return _resized(processor, image) if supports(processor, [image]) else resize(processor, [image])[0]


def _resized(processor, image) -> np.ndarray:
    target = (processor.size.width, processor.size.height)
    # PIL returns a copy for a same-size resize, so skipping it changes nothing.
    return np.asarray(image if image.size == target else image.resize(target, processor.resample))


def normalize(processor, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 pixel values, as the processor rescales and
    normalises; on the tensor's device (send uint8 to a GPU first: a quarter of the bytes)."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(pixels)) if isinstance(pixels, np.ndarray) else pixels
    x = x.permute(0, 3, 1, 2).float()
    if processor.do_rescale:
        x = x * processor.rescale_factor
    if processor.do_normalize:
        mean = torch.tensor(processor.image_mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(processor.image_std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
        x = (x - mean) / std
    return x.contiguous()


def pixel_values(processor, images) -> torch.Tensor:
    """PIL images -> (B, 3, height, width) float32, as ``processor(images)["pixel_values"]``."""
    return normalize(processor, resize(processor, images))
