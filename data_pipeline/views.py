"""LeJEPA's multi-crop views, split where the cost is.

Geometry (random resized crops + flips) cuts uint8 views: cheap, close to the data. Photometry
(colour jitter, grayscale, blur, solarize, normalise) runs batched on the training device, with
per-sample random parameters, under no_grad. Both take an explicit torch.Generator, so a seed
reproduces every view.
"""

from __future__ import annotations

import dataclasses
import io
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.ops import roi_align

GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale
_CROP_ATTEMPTS = 10


@dataclass(frozen=True)
class CropSpec:
    """How many crops of one kind, their output side and their area fraction range."""

    count: int
    size: int
    scale: tuple[float, float]
    ratio: tuple[float, float] = (3 / 4, 4 / 3)


def sample_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    gen: torch.Generator,
) -> torch.Tensor:
    """RandomResizedCrop boxes (n, 4) as (x0, y0, x1, y1) in pixels, torchvision's rule vectorised:
    10 tries of (area fraction ~ U(scale), log aspect ~ U(log ratio)); the first that fits wins,
    else a centre crop with the aspect clamped to `ratio`."""
    area = height * width
    target = area * torch.empty(n, _CROP_ATTEMPTS).uniform_(*scale, generator=gen)
    aspect = torch.exp(
        torch.empty(n, _CROP_ATTEMPTS).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen)
    )
    w = torch.sqrt(target * aspect).round()
    h = torch.sqrt(target / aspect).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.full((n,), -1))
    rows = torch.arange(n)
    w, h = w[rows, first.clamp_min(0)], h[rows, first.clamp_min(0)]
    y0 = torch.floor(torch.rand(n, generator=gen) * (height - h + 1))
    x0 = torch.floor(torch.rand(n, generator=gen) * (width - w + 1))

    # no try fits: a centre crop with the aspect clamped to `ratio` (branch-free: no host read)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        fw, fh = round(height * ratio[1]), height
    else:
        fw, fh = width, height
    fallback = first < 0
    w, h = torch.where(fallback, float(fw), w), torch.where(fallback, float(fh), h)
    x0 = torch.where(fallback, float((width - fw) // 2), x0)
    y0 = torch.where(fallback, float((height - fh) // 2), y0)
    return torch.stack([x0, y0, x0 + w, y0 + h], 1)


def crop_resize(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Cut box i out of image i and resize it to size² (bilinear, averaging when shrinking).

    images: (B, C, H, W) uint8 or float; returns the same dtype."""
    src = images.float()
    index = torch.arange(len(boxes), dtype=src.dtype, device=boxes.device)
    rois = torch.cat([index.unsqueeze(1), boxes.to(src.dtype)], 1)  # boxes live where the images do
    out = roi_align(src, rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    if images.dtype == torch.uint8:
        return out.round_().clamp_(0, 255).to(torch.uint8)
    return out


class MultiCrop:
    """Random resized crops with horizontal flips for a batch: (B, C, H, W) -> one (V, B, C, s, s)
    tensor per CropSpec (global views first, then local views)."""

    def __init__(self, specs: list[CropSpec], flip_p: float = 0.5):
        self.specs = specs
        self.flip_p = flip_p

    def __call__(self, images: torch.Tensor, gen: torch.Generator) -> list[torch.Tensor]:
        b, _, height, width = images.shape
        out = []
        for spec in self.specs:
            boxes = sample_crop_boxes(spec.count * b, height, width, spec.scale, spec.ratio, gen)
            flip = torch.rand(spec.count * b, generator=gen) < self.flip_p
            views = crop_resize(images.repeat(spec.count, 1, 1, 1), boxes, spec.size)
            views = torch.where(flip.view(-1, 1, 1, 1), views.flip(-1), views)
            out.append(views.unflatten(0, (spec.count, b)))
        return out


def decode_crops(
    jpeg: bytes, specs: list[CropSpec], flip_p: float, gen: torch.Generator
) -> list[torch.Tensor]:
    """Decode one image and cut its crops: one uint8 (count, 3, size, size) tensor per CropSpec.

    When every crop is at least twice its output size, the JPEG is decoded at 1/2, 1/4 or 1/8 scale
    (PIL draft mode), which makes large images several times cheaper without changing the crops."""
    image = Image.open(io.BytesIO(jpeg))
    width, height = image.size
    boxes = [sample_crop_boxes(s.count, height, width, s.scale, s.ratio, gen) for s in specs]
    flips = [torch.rand(s.count, generator=gen) < flip_p for s in specs]
    shrink = min(
        min(float((b[:, 2] - b[:, 0]).min()), float((b[:, 3] - b[:, 1]).min())) / s.size
        for b, s in zip(boxes, specs, strict=True)
    )
    if shrink >= 2 and image.format == "JPEG":
        factor = 2 ** min(3, int(math.log2(shrink)))
        image.draft("RGB", (math.ceil(width / factor), math.ceil(height / factor)))
    image = image.convert("RGB")
    scale_x, scale_y = image.width / width, image.height / height
    out = []
    for spec, spec_boxes, spec_flips in zip(specs, boxes, flips, strict=True):
        views = np.empty((spec.count, spec.size, spec.size, 3), dtype=np.uint8)
        for i, (x0, y0, x1, y1) in enumerate(spec_boxes.tolist()):
            view = image.resize(
                (spec.size, spec.size),
                Image.BILINEAR,
                box=(x0 * scale_x, y0 * scale_y, x1 * scale_x, y1 * scale_y),
                reducing_gap=None,
            )
            if spec_flips[i]:
                view = view.transpose(Image.FLIP_LEFT_RIGHT)
            views[i] = np.asarray(view)
        out.append(torch.from_numpy(views).permute(0, 3, 1, 2))
    return out


@dataclass
class PhotometricSpec:
    """LeJEPA's colour stack (the reference README's values). Also the `views.photometric` section
    of the training config, so each parameter is declared once."""

    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.2
    solarize_threshold: float = 128 / 255


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 images, or floats in [0, 1], shaped (..., C, H, W) -> float32 (x - mean) / std per channel."""
    x = images.float().div(255) if images.dtype == torch.uint8 else images.float()
    # per-channel Python scalars: no constant tensor to copy to the device (a host sync on a GPU)
    return torch.stack([(channel - m) / s for channel, m, s in zip(x.unbind(-3), mean, std, strict=True)], -3)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(-3)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).unsqueeze(-3)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's blend; factor 1 returns x exactly."""
    return (factor * x + (1 - factor) * other).clamp_(0, 1)


def _mean_gray(x: torch.Tensor) -> torch.Tensor:
    """The mean of each image's grayscale (B, 1, 1, 1), from channel means (one pass over x)."""
    r, g, b = x.mean((-2, -1)).unbind(-1)
    return (GRAY_WEIGHTS[0] * r + GRAY_WEIGHTS[1] * g + GRAY_WEIGHTS[2] * b).view(-1, 1, 1, 1)


def _rgb_to_hsv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r, g, b = x.unbind(-3)
    v, _ = x.max(-3)
    c = v - x.min(-3).values
    s = c / v.clamp_min(1e-12)
    cd = c.clamp_min(1e-12)
    h = torch.where(v == r, (g - b) / cd, torch.where(v == g, 2 + (b - r) / cd, 4 + (r - g) / cd))
    h = torch.where(c > 0, (h / 6) % 1.0, torch.zeros_like(h))
    return h, s, v


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    k = torch.arange(5.0, 0.0, -2.0, device=h.device, dtype=h.dtype).view(3, 1, 1)  # 5, 3, 1
    k = (k + h.unsqueeze(-3) * 6) % 6
    return v.unsqueeze(-3) - v.unsqueeze(-3) * s.unsqueeze(-3) * (torch.minimum(k, 4 - k).clamp(0, 1))


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate hue by `shift` (fraction of a turn, per sample) in HSV, as torchvision's adjust_hue."""
    h, s, v = _rgb_to_hsv(x)
    return _hsv_to_rgb((h + shift.view(-1, 1, 1)) % 1.0, s, v)


def gaussian_blur(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Separable blur of each sample with its own 1-D kernel (B, k), reflect padding (torchvision's
    border rule)."""
    b, c, height, width = x.shape
    kernel_size = kernels.shape[1]
    radius = kernel_size // 2
    kernel = kernels.repeat_interleave(c, 0)  # (B*C, k)
    y = F.pad(x.reshape(1, b * c, height, width), (radius,) * 4, mode="reflect")
    y = F.conv2d(y, kernel.view(b * c, 1, 1, kernel_size), groups=b * c)
    y = F.conv2d(y, kernel.view(b * c, 1, kernel_size, 1), groups=b * c)
    return y.view(b, c, height, width)


def blur_kernel_size(size: int) -> int:
    """About 10% of the view side, odd, at least 3 (23 for 224 px, 9 for 96 px)."""
    k = int(0.1 * size)
    return max(3, k if k % 2 else k + 1)


def gaussian_kernels(sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """(B, kernel_size) normalised 1-D Gaussian kernels; sigma 0 gives the identity (a delta)."""
    offsets = torch.arange(kernel_size, device=sigma.device, dtype=sigma.dtype) - kernel_size // 2
    kernel = torch.exp(-offsets.square() / (2 * sigma.view(-1, 1).square().clamp_min(1e-12)))
    return kernel / kernel.sum(1, keepdim=True)


class Photometric:
    """Per-sample colour jitter (brightness, contrast, saturation, hue, in a random order per sample
    as torchvision's ColorJitter), grayscale, Gaussian blur, solarize and normalisation of a batch of
    views on its own device.

    Branch-free: every parameter is drawn for the whole batch and applied with masks, so the stage
    has no data-dependent shapes and never reads a device value on the host (the CPU can run ahead of
    the GPU). Input: (..., 3, H, W) uint8 or float in [0, 1]; output: float32 normalised with
    `mean`/`std`."""

    def __init__(
        self,
        spec: PhotometricSpec | None = None,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ):
        self.spec = spec if spec is not None else PhotometricSpec()
        self.mean, self.std = mean, std

    def _jitter(self, x: torch.Tensor, jitter: torch.Tensor, draw, gen: torch.Generator) -> torch.Tensor:
        """Brightness, contrast, saturation and hue in a random order per sample, on the samples where
        `jitter` (B, 1, 1, 1) holds. Each op with factor 1 (hue: shift 0) leaves an image as it is, so
        every op runs on the whole batch with identity factors where it does not apply; the costly
        hue runs once, between the cheap ops its sample puts before it and those it puts after."""
        s = self.spec
        n = x.shape[0]
        slot = torch.rand(n, 4, device=x.device, generator=gen).argsort(1).argsort(1)  # slot of each op
        cheap = [
            (s.brightness, draw(1 - s.brightness, 1 + s.brightness), lambda y, f: (y * f).clamp_(0, 1)),
            (s.contrast, draw(1 - s.contrast, 1 + s.contrast), lambda y, f: _blend(y, _mean_gray(y), f)),
            (s.saturation, draw(1 - s.saturation, 1 + s.saturation), lambda y, f: _blend(y, grayscale(y), f)),
        ]
        hue_slot, shift = slot[:, 3].view(-1, 1, 1, 1), draw(-s.hue, s.hue)
        for before_hue in (True, False):
            for k in (0, 1, 2) if before_hue else (1, 2, 3):  # hue takes slot >= 1 when ops precede it
                side = hue_slot > k if before_hue else hue_slot < k
                for op, (strength, factor, apply) in enumerate(cheap):
                    if strength > 0:  # a setting, not data: an op that is off costs nothing
                        here = jitter & side & (slot[:, op].view(-1, 1, 1, 1) == k)
                        x = apply(x, torch.where(here, factor, 1.0))
            if before_hue and s.hue > 0:
                x = adjust_hue(x, torch.where(jitter, shift, 0.0).flatten())
        return x

    @torch.no_grad()
    def __call__(self, views: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        s = self.spec
        lead, (c, height, width) = views.shape[:-3], views.shape[-3:]
        x = views.reshape(-1, c, height, width)
        x = x.float().div_(255) if views.dtype == torch.uint8 else x.float().clone()
        n, dev = x.shape[0], x.device

        def draw(lo: float, hi: float) -> torch.Tensor:
            return torch.empty(n, device=dev).uniform_(lo, hi, generator=gen).view(-1, 1, 1, 1)

        def chance(p: float) -> torch.Tensor:
            return (torch.rand(n, device=dev, generator=gen) < p).view(-1, 1, 1, 1)

        x = self._jitter(x, chance(s.jitter_p), draw, gen)
        x = torch.where(chance(s.grayscale_p), grayscale(x).expand(-1, c, -1, -1), x)
        sigma = torch.where(chance(s.blur_p).flatten(), draw(*s.blur_sigma).flatten(), 0.0)
        x = gaussian_blur(x, gaussian_kernels(sigma, blur_kernel_size(height)))
        x = torch.where(chance(s.solarize_p) & (x >= s.solarize_threshold), 1 - x, x)
        return normalize(x, self.mean, self.std).reshape(*lead, c, height, width)


@dataclass
class ViewBatch:
    """What a data source hands the trainer: uint8 views per crop kind, view-major, and labels if any."""

    views: list[torch.Tensor]  # [(Vg, B, 3, S, S), (Vl, B, 3, s, s)]
    labels: torch.Tensor | None
    keys: list[str] | None = None  # sample keys, when the source has them
    corrupt: int = 0  # samples skipped as unreadable since the previous batch

    def pin_memory(self) -> ViewBatch:
        """Page-locked copies (the DataLoader's pin thread calls this; torch passes other objects
        through unpinned), so the copy to the GPU runs asynchronously. Contiguous first: a pinned
        broadcast view (grayscale expanded to 3 channels) would be materialised again, pageable."""
        views = [v.contiguous().pin_memory() for v in self.views]
        labels = None if self.labels is None else self.labels.pin_memory()
        return dataclasses.replace(self, views=views, labels=labels)
