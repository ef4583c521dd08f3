"""The batched photometric stage against torchvision's v2 pipeline, parameter by parameter.

Each check isolates one transform on an image whose response reveals the drawn parameter
(brightness factor, contrast factor, saturation factor, hue shift, blur sigma) or whether it fired
(jitter, grayscale, blur, solarize probabilities), and compares the distribution from our batched
implementation with the one from torchvision v2 applied per image (two-sample Kolmogorov–Smirnov
test for continuous parameters, rates within 4 standard errors of the configured probability)."""

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp
from torchvision.transforms import v2

from data_pipeline.views import Photometric, PhotometricSpec, _rgb_to_hsv, blur_kernel_size

N = 1500
OFF = dict(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)
NO_JITTER = dict(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)


def ours(image: torch.Tensor, mean=(0, 0, 0), std=(1, 1, 1), **spec) -> torch.Tensor:
    batch = image.expand(N, -1, -1, -1).contiguous()
    stage = Photometric(PhotometricSpec(**{**OFF, **spec}), mean=mean, std=std)
    return stage(batch, torch.Generator().manual_seed(0))


def reference(image: torch.Tensor, transform) -> torch.Tensor:
    torch.manual_seed(0)
    return torch.stack([transform(image) for _ in range(N)])


def constant(rgb, size=8) -> torch.Tensor:
    return torch.tensor(rgb, dtype=torch.float32).view(3, 1, 1).expand(3, size, size).contiguous()


def assert_same_distribution(a: torch.Tensor, b: torch.Tensor, lo: float, hi: float):
    a, b = a.double().numpy(), b.double().numpy()
    assert ks_2samp(a, b).pvalue > 1e-3
    for x in (a, b):
        assert lo - 1e-4 <= x.min() and x.max() <= hi + 1e-4
        assert x.min() < lo + 0.05 * (hi - lo) and x.max() > hi - 0.05 * (hi - lo)  # covers the range


def assert_rate(fired: torch.Tensor, p: float):
    assert abs(fired.float().mean().item() - p) < 4 * np.sqrt(p * (1 - p) / N) + 1e-9


def test_brightness_factor():
    image = constant([0.5, 0.5, 0.5])
    mine = ours(image, jitter_p=1.0, **{**NO_JITTER, "brightness": 0.4})[:, 0, 0, 0] / 0.5
    theirs = reference(image, v2.ColorJitter(brightness=0.4))[:, 0, 0, 0] / 0.5
    assert_same_distribution(mine, theirs, 0.6, 1.4)


def test_contrast_factor():
    image = constant([0.3, 0.3, 0.3])
    image[:, :, 4:] = 0.7  # mean 0.5, spread 0.4

    def factor(out):
        return (out[:, 0, 0, 4] - out[:, 0, 0, 0]) / 0.4

    mine = factor(ours(image, jitter_p=1.0, **{**NO_JITTER, "contrast": 0.4}))
    theirs = factor(reference(image, v2.ColorJitter(contrast=0.4)))
    assert_same_distribution(mine, theirs, 0.6, 1.4)


def test_saturation_factor():
    image = constant([0.6, 0.4, 0.3])

    def factor(out):
        return (out[:, 0, 0, 0] - out[:, 1, 0, 0]) / 0.2

    mine = factor(ours(image, jitter_p=1.0, **{**NO_JITTER, "saturation": 0.2}))
    theirs = factor(reference(image, v2.ColorJitter(saturation=0.2)))
    assert_same_distribution(mine, theirs, 0.8, 1.2)


def test_hue_shift():
    image = constant([0.8, 0.3, 0.3])  # hue 0

    def shift(out):
        h, _, _ = _rgb_to_hsv(out[:, :, :1, :1])
        return (h.flatten() + 0.5) % 1.0 - 0.5

    mine = shift(ours(image, jitter_p=1.0, **{**NO_JITTER, "hue": 0.1}))
    theirs = shift(reference(image, v2.ColorJitter(hue=0.1)))
    assert_same_distribution(mine, theirs, -0.1, 0.1)


def test_jitter_probability():
    image = constant([0.5, 0.5, 0.5])
    mine = ours(image, jitter_p=0.8, **{**NO_JITTER, "brightness": 0.4})
    theirs = reference(image, v2.RandomApply([v2.ColorJitter(brightness=0.4)], p=0.8))
    for out in (mine, theirs):
        assert_rate((out[:, 0, 0, 0] - 0.5).abs() > 1e-6, 0.8)


def test_grayscale_probability():
    image = constant([0.8, 0.3, 0.1])
    mine = ours(image, grayscale_p=0.2)
    theirs = reference(image, v2.RandomGrayscale(p=0.2))
    for out in (mine, theirs):
        fired = (out[:, 0, 0, 0] - out[:, 2, 0, 0]).abs() < 1e-6
        assert_rate(fired, 0.2)
    torch.testing.assert_close(
        mine[:, 0, 0, 0].max(), theirs[:, 0, 0, 0].max(), atol=1e-3, rtol=0
    )  # same luma


@pytest.mark.parametrize("size", [15, 31])
def test_blur_probability_and_sigma(size):
    image = torch.zeros(3, size, size)
    image[:, size // 2, size // 2] = 1.0  # an impulse: its blurred centre value reveals sigma
    kernel = blur_kernel_size(size)
    mine = ours(image, blur_p=0.5)[:, 0, size // 2, size // 2]
    theirs = reference(image, v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5))
    theirs = theirs[:, 0, size // 2, size // 2]
    for centre in (mine, theirs):
        assert_rate(centre < 1 - 1e-6, 0.5)
    mine, theirs = mine[mine < 1 - 1e-6], theirs[theirs < 1 - 1e-6]
    assert ks_2samp(mine.numpy(), theirs.numpy()).pvalue > 1e-3


def test_solarize_probability():
    image = constant([0.9, 0.9, 0.9])
    mine = ours(image, solarize_p=0.2)
    theirs = reference(image, v2.RandomSolarize(threshold=128 / 255, p=0.2))
    for out in (mine, theirs):
        assert_rate((out[:, 0, 0, 0] - 0.1).abs() < 1e-5, 0.2)


def test_normalisation_matches_v2_normalize():
    image = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    spec = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    mine = ours(image, **{**OFF, **spec})[0]
    torch.testing.assert_close(mine, v2.Normalize(**spec)(image))
