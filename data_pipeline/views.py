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


# uniforms one crop takes: area and log-aspect for each try, then the corner (y, x)
CROP_UNIFORMS = 2 * _CROP_ATTEMPTS + 2


def sample_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    gen: torch.Generator,
) -> torch.Tensor:
    """RandomResizedCrop boxes (n, 4) as (x0, y0, x1, y1) in pixels, drawn from `gen`."""
    return crop_boxes(torch.rand(n, CROP_UNIFORMS, generator=gen), height, width, scale, ratio)


def crop_boxes(
    u: torch.Tensor, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> torch.Tensor:
    """RandomResizedCrop boxes (n, 4) as (x0, y0, x1, y1) in pixels from uniforms u (n, CROP_UNIFORMS),
    torchvision's rule vectorised: 10 tries of (area fraction ~ U(scale), log aspect ~ U(log ratio));
    the first that fits wins, else a centre crop with the aspect clamped to `ratio`."""
    n, area = len(u), height * width
    target = area * (scale[0] + (scale[1] - scale[0]) * u[:, :_CROP_ATTEMPTS])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, _CROP_ATTEMPTS : 2 * _CROP_ATTEMPTS])
    w = torch.sqrt(target * aspect).round()
    h = torch.sqrt(target / aspect).round()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = torch.where(fits.any(1), fits.float().argmax(1), torch.full((n,), -1))
    rows = torch.arange(n)
    w, h = w[rows, first.clamp_min(0)], h[rows, first.clamp_min(0)]
    y0 = torch.floor(u[:, -2] * (height - h + 1))
    x0 = torch.floor(u[:, -1] * (width - w + 1))

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

    `draw(n, gen)` draws the random parameters of n views (`PARAMETERS` numbers each), `apply(views,
    parameters)` applies them. The data sources draw each sample's parameters on the CPU from that
    sample's own generator, so a sample's augmentation does not depend on its batch, its rank or the
    world size; the device only applies them. Branch-free: every parameter is applied to the whole
    batch with masks, so the stage has no data-dependent shapes and never reads a device value on
    the host. Input: (..., 3, H, W) uint8 or float in [0, 1]; output: float32 normalised with
    `mean`/`std`."""

    # jitter?, 4 uniforms giving the op order, brightness, contrast, saturation, hue, grayscale?,
    # blur?, blur sigma, solarize?
    PARAMETERS = 13

    def __init__(
        self,
        spec: PhotometricSpec | None = None,
        mean: tuple[float, ...] = IMAGENET_MEAN,
        std: tuple[float, ...] = IMAGENET_STD,
    ):
        self.spec = spec if spec is not None else PhotometricSpec()
        self.mean, self.std = mean, std

    def draw(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """(n, PARAMETERS) float32 random parameters for n views, on `gen`'s device."""
        return self.from_uniforms(torch.rand(n, self.PARAMETERS, device=gen.device, generator=gen))

    def from_uniforms(self, u: torch.Tensor) -> torch.Tensor:
        """The parameters of views from their uniforms u (n, PARAMETERS): probabilities become 0/1
        flags, ranges are scaled; the op-order uniforms stay as they are."""
        s = self.spec
        factors = (s.brightness, s.contrast, s.saturation)
        sigma = s.blur_sigma
        lo = u.new_tensor([0, 0, 0, 0, 0, *(1 - f for f in factors), -s.hue, 0, 0, sigma[0], 0])
        span = u.new_tensor(
            [1, 1, 1, 1, 1, *(2 * f for f in factors), 2 * s.hue, 1, 1, sigma[1] - sigma[0], 1]
        )
        out = lo + span * u
        for column, p in ((0, s.jitter_p), (9, s.grayscale_p), (10, s.blur_p), (12, s.solarize_p)):
            out[:, column] = (u[:, column] < p).float()
        return out

    def _jitter(self, x: torch.Tensor, jitter: torch.Tensor, order: torch.Tensor, factors: list[torch.Tensor],
                shift: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """Brightness, contrast, saturation and hue in a random order per sample, on the samples where
        `jitter` (B, 1, 1, 1) holds. Each op with factor 1 (hue: shift 0) leaves an image as it is, so
        every op runs on the whole batch with identity factors where it does not apply; the costly
        hue runs once, between the cheap ops its sample puts before it and those it puts after."""
        s = self.spec
        slot = order.argsort(1).argsort(1)  # slot of each op
        cheap = [
            (s.brightness, factors[0], lambda y, f: (y * f).clamp_(0, 1)),
            (s.contrast, factors[1], lambda y, f: _blend(y, _mean_gray(y), f)),
            (s.saturation, factors[2], lambda y, f: _blend(y, grayscale(y), f)),
        ]
        hue_slot = slot[:, 3].view(-1, 1, 1, 1)
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
    def apply(self, views: torch.Tensor, parameters: torch.Tensor) -> torch.Tensor:
        """`views` (..., 3, H, W) with their drawn `parameters` (..., PARAMETERS), on one device."""
        s = self.spec
        lead, (c, height, width) = views.shape[:-3], views.shape[-3:]
        x = views.reshape(-1, c, height, width)
        x = x.float().div_(255) if views.dtype == torch.uint8 else x.float().clone()
        p = parameters.reshape(-1, self.PARAMETERS).float()

        def column(i: int) -> torch.Tensor:
            return p[:, i].view(-1, 1, 1, 1)

        jitter, gray, blur, solarize = (column(i) > 0.5 for i in (0, 9, 10, 12))
        x = self._jitter(x, jitter, p[:, 1:5], [column(5), column(6), column(7)], column(8))
        x = torch.where(gray, grayscale(x).expand(-1, c, -1, -1), x)
        sigma = torch.where(blur.flatten(), p[:, 11], 0.0)
        x = gaussian_blur(x, gaussian_kernels(sigma, blur_kernel_size(height)))
        x = torch.where(solarize & (x >= s.solarize_threshold), 1 - x, x)
        return normalize(x, self.mean, self.std).reshape(*lead, c, height, width)

    def __call__(self, views: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Draw on `gen` (on the views' device) and apply: one batch's own stream of parameters."""
        return self.apply(views, self.draw(views[..., 0, 0, 0].numel(), gen).view(*views.shape[:-3], -1))


@dataclass
class ViewBatch:
    """What a data source hands the trainer: uint8 views per crop kind, view-major, each view's drawn
    photometric parameters, labels if any, and where the stream stands after it."""

    views: list[torch.Tensor]  # [(Vg, B, 3, S, S), (Vl, B, 3, s, s)]
    labels: torch.Tensor | None
    keys: list[str] | None = None  # sample keys, when the source has them
    corrupt: int = 0  # samples skipped as unreadable since the previous batch
    photometric: list[torch.Tensor] | None = None  # [(Vg, B, P), (Vl, B, P)]: `Photometric.draw`s
    position: dict | None = None  # the loader's state once the step this batch belongs to is done
    read_retries: int = 0  # remote shards read again (after a broken read) since the previous batch

    def pin_memory(self) -> ViewBatch:
        """Page-locked copies (the DataLoader's pin thread calls this; torch passes other objects
        through unpinned), so the copy to the GPU runs asynchronously. Contiguous first: a pinned
        broadcast view (grayscale expanded to 3 channels) would be materialised again, pageable."""
        views = [v.contiguous().pin_memory() for v in self.views]
        labels = None if self.labels is None else self.labels.pin_memory()
        photometric = None if self.photometric is None else [p.pin_memory() for p in self.photometric]
        return dataclasses.replace(self, views=views, labels=labels, photometric=photometric)

    @staticmethod
    def collate(items: list[tuple], corrupt: int = 0, position: dict | None = None) -> ViewBatch:
        """One batch from per-sample (views, photometric parameters, label, key): views per crop kind
        (count, 3, s, s) and parameters (count, P) stacked along the batch dimension."""
        views = [torch.stack([item[0][k] for item in items], 1) for k in range(len(items[0][0]))]
        params = [torch.stack([item[1][k] for item in items], 1) for k in range(len(items[0][1]))]
        labels = torch.tensor([item[2] for item in items])
        keys = [item[3] for item in items]
        return ViewBatch(views, labels, keys, corrupt, params, position)


def decode_sample(
    sample: dict, specs: list[CropSpec], flip_p: float, photometric: Photometric, gen: torch.Generator
) -> tuple[list[torch.Tensor], list[torch.Tensor], int, str] | None:
    """A shard sample (its `jpg` and `cls`) as (crops per spec, photometric parameters per spec,
    label (-1 without `cls`), key), all drawn from `gen`; None when it cannot be decoded."""
    if "jpg" not in sample:
        return None
    try:
        views = decode_crops(sample["jpg"], specs, flip_p, gen)
        label = int(sample["cls"]) if "cls" in sample else -1
    except Exception:  # any undecodable payload is counted by the caller, not fatal
        return None
    params = [photometric.draw(spec.count, gen) for spec in specs]
    return views, params, label, sample["__key__"]
