import pytest
import torch

from data_pipeline.views import (
    CropSpec,
    MultiCrop,
    Photometric,
    PhotometricSpec,
    blur_kernel_size,
    crop_resize,
    sample_crop_boxes,
)

SPECS = [CropSpec(2, 32, (0.3, 1.0)), CropSpec(6, 16, (0.05, 0.3))]


def images(n=8, size=40):
    return (torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)


def test_default_shapes_and_dtypes():
    global_views, local_views = MultiCrop(SPECS)(images(), torch.Generator().manual_seed(0))
    assert global_views.shape == (2, 8, 3, 32, 32) and local_views.shape == (6, 8, 3, 16, 16)
    assert global_views.dtype == torch.uint8
    out = Photometric()(local_views, torch.Generator().manual_seed(0))
    assert out.shape == local_views.shape and out.dtype == torch.float32


def test_reproducible_from_seed():
    def run(seed):
        views = MultiCrop(SPECS)(images(), torch.Generator().manual_seed(seed))
        gen = torch.Generator().manual_seed(seed)
        return [Photometric()(v, gen) for v in views]

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[0], c[0])


@pytest.mark.parametrize("scale", [(0.3, 1.0), (0.05, 0.3)])
def test_crop_boxes_follow_scale_and_stay_inside(scale):
    boxes = sample_crop_boxes(4000, 60, 80, scale, (3 / 4, 4 / 3), torch.Generator().manual_seed(0))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 80).all() and (boxes[:, 3] <= 60).all()
    area = w * h / (60 * 80)
    assert area.min() >= scale[0] * 0.9 and area.max() <= scale[1] * 1.1
    assert ((w / h) >= 3 / 4 * 0.9).all() and ((w / h) <= 4 / 3 * 1.1).all()


def test_crop_of_the_whole_image_is_the_image():
    x = images(2, 16)
    out = crop_resize(x, torch.tensor([[0.0, 0.0, 16.0, 16.0]] * 2), 16)
    assert torch.equal(out, x)


def test_photometric_identity_when_every_probability_is_zero():
    spec = PhotometricSpec(jitter_p=0, grayscale_p=0, blur_p=0, solarize_p=0)
    x = images(4, 16)
    out = Photometric(spec, mean=(0, 0, 0), std=(1, 1, 1))(x, torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x.float() / 255)


def test_grayscale_and_solarize_always():
    spec = PhotometricSpec(jitter_p=0, grayscale_p=1, blur_p=0, solarize_p=1)
    out = Photometric(spec, mean=(0, 0, 0), std=(1, 1, 1))(images(4, 16), torch.Generator().manual_seed(0))
    assert torch.allclose(out[:, 0], out[:, 1]) and torch.allclose(out[:, 1], out[:, 2])
    assert out.max() < 128 / 255 + 1e-6  # every bright pixel was inverted


def test_blur_kernel_sizes():
    assert blur_kernel_size(224) == 23 and blur_kernel_size(96) == 9 and blur_kernel_size(16) == 3
