"""Batched augmentation against torchvision.transforms.v2 (its reference), fitting, normalising."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from facetag.data.transforms import (
    AugmentConfig,
    affine_batch,
    augment_batch,
    blur_batch,
    fit_image,
    lowres,
    normalize,
)
from facetag.errors import ConfigError

NOTHING = AugmentConfig(
    flip=0.0, degrees=0.0, translate=0.0, scale=(1.0, 1.0), brightness=0.0, contrast=0.0
)


def _images(shape: tuple[int, int, int, int], seed: int = 0) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [(3, 1, 12, 9), (2, 3, 7, 10), (1, 1, 5, 5)])
@pytest.mark.parametrize("fill", [0.0, 0.5])
def test_affine_batch_matches_torchvision(shape, fill):
    x = _images(shape)
    N = shape[0]
    angle = torch.tensor([12.0, -30.0, 4.0])[:N]
    tx = torch.tensor([1.5, -2.0, 0.25])[:N]
    ty = torch.tensor([-1.0, 0.5, 2.0])[:N]
    scale = torch.tensor([0.9, 1.1, 1.0])[:N]
    ours = affine_batch(x, angle, tx, ty, scale, fill=fill)
    expected = torch.stack(
        [
            TF.affine(
                x[i],
                angle=float(angle[i]),
                translate=[float(tx[i]), float(ty[i])],
                scale=float(scale[i]),
                shear=[0.0, 0.0],
                interpolation=v2.InterpolationMode.BILINEAR,
                fill=fill,
            )
            for i in range(N)
        ]
    )
    torch.testing.assert_close(ours, expected)


def test_affine_batch_identity_keeps_the_image():
    x = _images((2, 3, 6, 8))
    zeros, ones = torch.zeros(2), torch.ones(2)
    torch.testing.assert_close(affine_batch(x, zeros, zeros, zeros, ones, fill=0.3), x)


def test_augment_batch_brightness_and_contrast_match_torchvision():
    # Draw order inside augment_batch (flip and affine off): brightness, then contrast.
    x = _images((4, 3, 5, 6))
    cfg = dataclasses.replace(NOTHING, brightness=0.3, contrast=0.4)
    ours = augment_batch(x, cfg, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    b = torch.rand(4, generator=g) * 0.6 + 0.7
    c = torch.rand(4, generator=g) * 0.8 + 0.6
    expected = torch.stack(
        [TF.adjust_contrast(TF.adjust_brightness(x[i], float(b[i])), float(c[i])) for i in range(4)]
    )
    torch.testing.assert_close(ours, expected)


def test_augment_batch_grey_contrast_matches_torchvision():
    x = _images((3, 1, 4, 4))
    cfg = dataclasses.replace(NOTHING, contrast=0.5)
    ours = augment_batch(x, cfg, generator=torch.Generator().manual_seed(1))
    c = torch.rand(3, generator=torch.Generator().manual_seed(1)) * 1.0 + 0.5
    expected = torch.stack([TF.adjust_contrast(x[i], float(c[i])) for i in range(3)])
    torch.testing.assert_close(ours, expected)


def test_augment_batch_flip_probability_one_and_zero():
    x = _images((3, 1, 4, 5))
    always = dataclasses.replace(NOTHING, flip=1.0)
    torch.testing.assert_close(augment_batch(x, always), TF.horizontal_flip(x))
    assert torch.equal(augment_batch(x, NOTHING), x)
    assert augment_batch(x, AugmentConfig.off()) is x


def test_augment_batch_is_reproducible_and_stays_in_range():
    x = _images((6, 3, 16, 16))
    cfg = AugmentConfig(degrees=20.0, brightness=0.5, contrast=0.5)
    torch.manual_seed(0)
    a = augment_batch(x, cfg)
    torch.manual_seed(0)
    b = augment_batch(x, cfg)
    torch.manual_seed(1)
    c = augment_batch(x, cfg)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.min() >= 0
    assert a.max() <= 1
    # Parameters are drawn per image: two copies of one image come out different.
    same = x[:1].expand(8, -1, -1, -1)
    out = augment_batch(same, cfg, generator=torch.Generator().manual_seed(2))
    assert not torch.allclose(out[0], out[1])


def test_augment_batch_rejects_uint8_and_wrong_shapes():
    with pytest.raises(ValueError, match=r"augment_batch: expected a float tensor \(N, C, H, W\)"):
        augment_batch(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), AugmentConfig())
    with pytest.raises(ValueError, match="augment_batch: expected"):
        augment_batch(torch.zeros(1, 4, 4), AugmentConfig())


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"flip": 1.5}, r"augment.flip: expected a probability in \[0, 1\], got 1.5"),
        ({"degrees": -1.0}, "augment.degrees: expected an angle"),
        ({"brightness": 1.0}, "augment.brightness: expected a fraction"),
        ({"scale": (1.1, 0.9)}, r"augment.scale: expected \(low, high\) with 0 < low <= high"),
        ({"fill": 300}, "augment.fill: expected a grey level"),
        ({"grey": 2.0}, r"augment.grey: expected a probability in \[0, 1\], got 2.0"),
        ({"blur": -1.0}, r"augment.blur: expected a sigma in \[0, 10\] px"),
        ({"saturation": 1.5}, "augment.saturation: expected a fraction"),
        ({"lowres": -0.1}, "augment.lowres: expected a probability"),
    ],
)
def test_augment_config_rejects_bad_values(change, match):
    with pytest.raises(ConfigError, match=match):
        AugmentConfig(**change)


def test_fit_image_scales_then_crops_without_distortion():
    # 20 wide, 40 high: black top and bottom quarters, white middle half.
    arr = np.zeros((40, 20), dtype=np.uint8)
    arr[10:30] = 255
    out = fit_image(Image.fromarray(arr), size=(10, 10), channels=1)
    # Scaled by 1/2 to 10 x 20, the centre 10 rows are the white middle; only the outer
    # rows see a little of the black through the antialiasing filter. Stretching instead
    # would put 2-3 black rows at the top and bottom.
    assert out.shape == (1, 10, 10)
    assert out.dtype == torch.uint8
    assert int(out[:, 1:-1].min()) == 255
    assert int(out.min()) > 200
    wide = fit_image(Image.fromarray(arr.T.copy()), size=(10, 10), channels=1)
    assert int(wide[:, :, 1:-1].min()) == 255
    assert int(wide.min()) > 200


def test_fit_image_channels_and_exact_size():
    grey = Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4))
    same = fit_image(grey, size=(3, 4), channels=1)
    np.testing.assert_array_equal(same[0].numpy(), np.asarray(grey))
    rgb = fit_image(grey, size=(3, 4), channels=3)
    assert rgb.shape == (3, 3, 4)
    assert torch.equal(rgb[0], rgb[2])
    up = fit_image(Image.new("RGB", (5, 7), (1, 2, 3)), size=(14, 10), channels=3)
    assert up.shape == (3, 14, 10)
    assert up[:, 7, 5].tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="fit_image: expected channels 1 or 3, got 4"):
        fit_image(grey, size=(3, 4), channels=4)


def test_normalize_maps_pixels_to_minus_one_one():
    u8 = torch.tensor([0, 255, 128], dtype=torch.uint8)
    torch.testing.assert_close(normalize(u8), torch.tensor([-1.0, 1.0, 128 / 127.5 - 1]))
    torch.testing.assert_close(normalize(u8.float() / 255), normalize(u8))
    with pytest.raises(ValueError, match="normalize: expected a uint8 or float tensor"):
        normalize(torch.zeros(2, dtype=torch.int64))


def test_augment_batch_saturation_matches_torchvision():
    x = _images((4, 3, 5, 6))
    cfg = dataclasses.replace(NOTHING, saturation=0.6)
    ours = augment_batch(x, cfg, generator=torch.Generator().manual_seed(3))
    s = torch.rand(4, generator=torch.Generator().manual_seed(3)) * 1.2 + 0.4
    expected = torch.stack([TF.adjust_saturation(x[i], float(s[i])) for i in range(4)])
    torch.testing.assert_close(ours, expected)


def test_augment_batch_grey_probability_one_matches_torchvision_and_skips_grey_input():
    x = _images((3, 3, 4, 5))
    cfg = dataclasses.replace(NOTHING, grey=1.0)
    expected = TF.rgb_to_grayscale(x, num_output_channels=3)
    torch.testing.assert_close(augment_batch(x, cfg), expected)
    one = _images((2, 1, 4, 5))
    assert torch.equal(
        augment_batch(one, dataclasses.replace(NOTHING, grey=1.0, saturation=0.5)), one
    )


def test_blur_batch_matches_torchvision_per_image():
    x = _images((3, 3, 12, 10))
    sigma = torch.tensor([0.5, 1.0, 2.0])
    ours = blur_batch(x, sigma, 7)
    expected = torch.stack(
        [TF.gaussian_blur(x[i], [7, 7], [float(sigma[i])] * 2) for i in range(3)]
    )
    torch.testing.assert_close(ours, expected)
    # A tiny sigma leaves the image as it is.
    torch.testing.assert_close(blur_batch(x, torch.full((3,), 1e-4), 7), x)


def test_augment_batch_blur_draws_sigma_up_to_the_limit():
    x = _images((5, 3, 16, 16))
    cfg = dataclasses.replace(NOTHING, blur=1.5)
    ours = augment_batch(x, cfg, generator=torch.Generator().manual_seed(4))
    sigma = torch.rand(5, generator=torch.Generator().manual_seed(4)) * 1.5
    torch.testing.assert_close(ours, blur_batch(x, sigma, 2 * 5 + 1))


def test_lowres_keeps_size_and_loses_detail():
    # A one-pixel checkerboard has all its energy at the highest frequency: shrinking by
    # 2 and enlarging back flattens it to its mean; a smooth ramp survives.
    H = W = 16
    checker = ((torch.arange(H).view(H, 1) + torch.arange(W).view(1, W)) % 2).float()
    x = checker.expand(1, 3, H, W).contiguous()
    out = lowres(x, 2)
    assert out.shape == x.shape
    assert (out - 0.5).abs().max() < 0.05
    ramp = torch.linspace(0, 1, W).expand(1, 1, H, W).contiguous()
    assert (lowres(ramp, 2) - ramp)[..., 2:-2].abs().max() < 0.05


def test_augment_batch_lowres_probability_zero_and_one():
    x = _images((4, 3, 16, 16))
    assert torch.equal(augment_batch(x, dataclasses.replace(NOTHING, lowres=0.0)), x)
    out = augment_batch(
        x, dataclasses.replace(NOTHING, lowres=1.0), generator=torch.Generator().manual_seed(0)
    )
    assert out.shape == x.shape
    assert all(not torch.allclose(out[i], x[i]) for i in range(4))
    assert out.min() >= 0
    assert out.max() <= 1
