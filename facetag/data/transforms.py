"""From a decoded photo to the model's input: fit to (H, W), augment, normalise.

Images are kept as uint8 tensors (C, H, W) at the model's input size, so a dataset decodes
each file once. Augmentation runs on whole float batches, drawing from torch's global RNG
(so torch.manual_seed fixes it); each of its steps matches torchvision.transforms.v2 for
the same parameters, which the tests check.
"""

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from facetag.errors import ConfigError


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation; each piece is off when its amount is 0."""

    enabled: bool = True  # False: no augmentation at all (evaluation, debugging)
    flip: float = 0.5  # probability of a horizontal flip; faces are nearly symmetric
    degrees: float = 8.0  # rotation drawn from [-degrees, degrees]
    translate: float = 0.05  # shift drawn from [-translate, translate] * (W, H)
    scale: tuple[float, float] = (0.95, 1.05)  # zoom range; (1.0, 1.0) is no zoom
    brightness: float = 0.2  # brightness factor drawn from [1 - b, 1 + b]
    contrast: float = 0.2  # contrast factor drawn from [1 - c, 1 + c]
    saturation: float = 0.0  # saturation factor drawn from [1 - s, 1 + s] (colour only)
    grey: float = 0.0  # probability of turning a colour image grey (still 3 channels)
    lowres: float = 0.0  # probability of shrinking to 1/2 .. 1/4 and back (a small face)
    blur: float = 0.0  # Gaussian blur, sigma drawn from [0, blur] px (focus, motion)
    fill: int = 128  # grey for the corners an affine transform uncovers (0 after normalise)

    def __post_init__(self) -> None:
        checks = [
            ("flip", 0.0 <= self.flip <= 1.0, "a probability in [0, 1]"),
            ("degrees", 0.0 <= self.degrees <= 180.0, "an angle in [0, 180]"),
            ("translate", 0.0 <= self.translate < 1.0, "a fraction in [0, 1)"),
            ("brightness", 0.0 <= self.brightness < 1.0, "a fraction in [0, 1)"),
            ("contrast", 0.0 <= self.contrast < 1.0, "a fraction in [0, 1)"),
            ("saturation", 0.0 <= self.saturation <= 1.0, "a fraction in [0, 1]"),
            ("grey", 0.0 <= self.grey <= 1.0, "a probability in [0, 1]"),
            ("lowres", 0.0 <= self.lowres <= 1.0, "a probability in [0, 1]"),
            ("blur", 0.0 <= self.blur <= 10.0, "a sigma in [0, 10] px"),
            ("fill", 0 <= self.fill <= 255, "a grey level in [0, 255]"),
        ]
        for name, ok, what in checks:
            if not ok:
                raise ConfigError(
                    f"augment.{name}: expected {what}, got {getattr(self, name)!r}; "
                    "fix it in the config"
                )
        lo, hi = self.scale
        if not 0.0 < lo <= hi:
            raise ConfigError(
                f"augment.scale: expected (low, high) with 0 < low <= high, got "
                f"{self.scale!r}; e.g. (0.95, 1.05)"
            )

    @classmethod
    def off(cls) -> "AugmentConfig":
        """No augmentation (for test sets and evaluation)."""
        return cls(enabled=False)


def augment_batch(
    x: Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None
) -> Tensor:
    """Random flip, affine, colour, resolution and blur, drawn per image, for a whole batch.

    x float (N, C, H, W) in [0, 1] -> float (N, C, H, W) in [0, 1]; C is 1 or 3.
    Per image, in this order, each step only when its amount is > 0:
      flip        horizontal, with probability cfg.flip
      affine      rotation U(-degrees, degrees), shift U(-translate, translate) * (W, H),
                  zoom U(*scale), about the centre (bilinear, corners filled with cfg.fill)
      brightness  x * b, b ~ U(1 - brightness, 1 + brightness)
      contrast    c * x + (1 - c) * mean(grey(x)), c ~ U(1 - contrast, 1 + contrast)
      saturation  s * x + (1 - s) * grey(x), s ~ U(1 - saturation, 1 + saturation)
      grey        x -> grey(x) in every channel, with probability cfg.grey
      lowres      with probability cfg.lowres, shrink by k ~ {2, 3, 4} (antialiased)
                  and enlarge back (bilinear): the detail a k-times smaller face has
      blur        Gaussian, sigma ~ U(0, blur), kernel 2 * ceil(3 * blur) + 1, reflect
    each clamped to [0, 1]. flip, affine, brightness, contrast, saturation, grey and blur
    equal torchvision.transforms.v2.functional's hflip / affine / adjust_brightness /
    adjust_contrast / adjust_saturation / rgb_to_grayscale / gaussian_blur for the same
    parameters (tests/data check this), but run once per batch instead of once per image
    (per-image v2 calls cost about 1 ms each on our 2 cores). Random numbers come from
    `generator`, or torch's global RNG when None.
    """
    if x.ndim != 4 or not x.is_floating_point() or x.shape[1] not in (1, 3):
        raise ValueError(
            f"augment_batch: expected a float tensor (N, C, H, W) with C 1 or 3, got "
            f"{x.dtype} of shape {tuple(x.shape)}"
        )
    if not cfg.enabled:
        return x
    N = x.shape[0]

    def uniform(low: float, high: float) -> Tensor:
        return torch.rand(N, generator=generator, dtype=x.dtype) * (high - low) + low  # (N,)

    if cfg.flip > 0:
        flip = torch.rand(N, generator=generator) < cfg.flip  # (N,)
        x = torch.where(flip.view(N, 1, 1, 1), x.flip(-1), x)  # (N, C, H, W)
    if cfg.degrees > 0 or cfg.translate > 0 or cfg.scale != (1.0, 1.0):
        H, W = x.shape[-2:]
        angle = uniform(-cfg.degrees, cfg.degrees)
        tx = uniform(-cfg.translate, cfg.translate) * W
        ty = uniform(-cfg.translate, cfg.translate) * H
        scale = uniform(*cfg.scale)
        x = affine_batch(x, angle, tx, ty, scale, fill=cfg.fill / 255.0)
    if cfg.brightness > 0:
        b = uniform(1.0 - cfg.brightness, 1.0 + cfg.brightness).view(N, 1, 1, 1)
        x = (x * b).clamp_(0.0, 1.0)
    if cfg.contrast > 0:
        c = uniform(1.0 - cfg.contrast, 1.0 + cfg.contrast).view(N, 1, 1, 1)
        mean = _grey(x).mean(dim=(1, 2, 3), keepdim=True)  # (N, 1, 1, 1)
        x = (c * x + (1.0 - c) * mean).clamp_(0.0, 1.0)
    colour = x.shape[1] == 3
    if cfg.saturation > 0 and colour:
        s = uniform(1.0 - cfg.saturation, 1.0 + cfg.saturation).view(N, 1, 1, 1)
        x = (s * x + (1.0 - s) * _grey(x)).clamp_(0.0, 1.0)
    if cfg.grey > 0 and colour:
        grey = (torch.rand(N, generator=generator) < cfg.grey).view(N, 1, 1, 1)
        x = torch.where(grey, _grey(x).expand_as(x), x)
    if cfg.lowres > 0:
        small = torch.rand(N, generator=generator) < cfg.lowres  # (N,)
        k = torch.randint(2, 5, (N,), generator=generator)  # shrink factor 2, 3 or 4
        x = x.clone() if bool(small.any()) else x
        for i in small.nonzero().flatten().tolist():
            x[i : i + 1] = lowres(x[i : i + 1], int(k[i]))
    if cfg.blur > 0:
        sigma = uniform(0.0, cfg.blur)
        x = blur_batch(x, sigma, 2 * math.ceil(3 * cfg.blur) + 1)
    return x


def lowres(x: Tensor, k: int) -> Tensor:
    """(N, C, H, W) -> the same size with the detail of an image k times smaller."""
    H, W = x.shape[-2:]
    small = F.interpolate(
        x,
        size=(max(1, H // k), max(1, W // k)),
        mode="bilinear",
        antialias=True,
        align_corners=False,
    )
    return F.interpolate(small, size=(H, W), mode="bilinear", align_corners=False).clamp_(0, 1)


def blur_batch(x: Tensor, sigma: Tensor, size: int) -> Tensor:
    """Gaussian blur with a sigma per image: x (N, C, H, W), sigma (N,) px, odd kernel size.

    Equal to torchvision's gaussian_blur(x[i], [size, size], [sigma[i], sigma[i]]) for
    each i: a separable kernel exp(-t^2 / (2 sigma^2)) / sum over t in [-size//2,
    size//2], reflect padding. One grouped convolution per direction does the batch,
    each (image, channel) plane with its own kernel. sigma ~ 0 leaves an image as it is.
    """
    N, C, H, W = x.shape
    r = size // 2
    if r >= min(H, W):
        raise ValueError(f"blur_batch: kernel {size} too large for images {H}x{W}")
    t = torch.arange(-r, r + 1, dtype=x.dtype)  # (size,)
    s = sigma.to(x.dtype).clamp(min=1e-3).view(N, 1)  # (N, 1)
    k = torch.exp(-(t * t) / (2 * s * s))
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(C, dim=0)  # (N*C, size)
    planes = x.reshape(1, N * C, H, W)
    planes = F.pad(planes, (r, r, r, r), mode="reflect")
    planes = F.conv2d(planes, k.view(N * C, 1, 1, size), groups=N * C)  # along W
    planes = F.conv2d(planes, k.view(N * C, 1, size, 1), groups=N * C)  # along H
    return planes.view(N, C, H, W)


def affine_batch(
    x: Tensor, angle: Tensor, tx: Tensor, ty: Tensor, scale: Tensor, fill: float = 0.0
) -> Tensor:
    """Rotate by angle (degrees), zoom by scale and shift by (tx, ty) pixels, per image.

    x float (N, C, H, W); angle, tx, ty, scale (N,) -> float (N, C, H, W). Same result as
    torchvision.transforms.v2.functional.affine(x[i], angle[i], [tx[i], ty[i]], scale[i],
    shear=[0, 0], interpolation=BILINEAR, fill=fill) for each i.

    grid_sample needs, for each output pixel, where to read in the input. In pixel
    coordinates centred on the image the forward map is p_out = s R(a) p_in + t, so
    p_in = L (p_out - t) with L = R(-a) / s = [[cos, sin], [-sin, cos]] / s (y points
    down, as in torchvision). grid_sample works in coordinates normalised by (W/2, H/2),
    so theta = D^-1 [L | -L t] with D = diag(W/2, H/2) (and L conjugated by D).
    """
    N, C, H, W = x.shape
    rad = torch.deg2rad(angle.to(x.dtype))
    cos, sin = torch.cos(rad) / scale, torch.sin(rad) / scale  # (N,)
    off_x = -(cos * tx + sin * ty)  # -(L t), in pixels
    off_y = -(-sin * tx + cos * ty)
    rows = (
        (cos, sin * (H / W), off_x / (W / 2)),
        (-sin * (W / H), cos, off_y / (H / 2)),
    )
    # The grid F.affine_grid(theta, align_corners=False) would build, written straight into
    # place: output pixel centres sit at (2i + 1) / W - 1, and each grid coordinate is
    # theta_row . (u, v, 1). Sums of (N, 1, W) and (N, H, 1) pieces measured 3-9x faster
    # than affine_grid's batched matmul with K = 3 (32 x 112 x 112, 1 thread).
    u = ((torch.arange(W, dtype=x.dtype) * 2 + 1) / W - 1).view(1, 1, W)
    v = ((torch.arange(H, dtype=x.dtype) * 2 + 1) / H - 1).view(1, H, 1)
    grid = torch.empty((N, H, W, 2), dtype=x.dtype)  # (N, H, W, 2): (x, y) to read from
    for k, (a, b, c) in enumerate(rows):
        torch.add(a.view(N, 1, 1) * u, b.view(N, 1, 1) * v + c.view(N, 1, 1), out=grid[..., k])
    # torchvision blends the corners into `fill` with mask = a ones channel sampled like
    # the image (the bilinear weight that fell inside the input). NOTE: computing that
    # weight in closed form from the grid measured ~1.5x slower than sampling the channel.
    ones = torch.ones((N, 1, H, W), dtype=x.dtype)
    out = F.grid_sample(torch.cat([x, ones], dim=1), grid, align_corners=False)  # (N, C+1, H, W)
    img, mask = out[:, :C], out[:, C:]
    return (img - fill).mul_(mask).add_(fill)


def _grey(x: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, 1, H, W) luma with torchvision's weights (ITU-R 601)."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(dim=1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def fit_image(img: Image.Image, size: tuple[int, int], channels: int) -> Tensor:
    """A PIL image -> uint8 tensor (C, H, W) of exactly `size` = (H, W), faces undistorted.

    The image is scaled (keeping its aspect ratio) until it covers (H, W), then the
    centre is cropped: a 92x112 ORL face fitted to 112x112 is scaled to 112x136 and loses
    12 rows top and bottom, rather than being stretched. channels=1 converts colour to
    grey (ITU-R 601 luma); channels=3 replicates a grey image into R, G and B.
    """
    H, W = size
    if H < 1 or W < 1:
        raise ValueError(f"fit_image: expected size (H, W) >= 1, got {size}")
    if channels == 1:
        img = img.convert("L")
    elif channels == 3:
        img = img.convert("RGB")
    else:
        raise ValueError(f"fit_image: expected channels 1 or 3, got {channels}")
    w, h = img.size
    if (w, h) != (W, H):
        scale = max(H / h, W / w)
        nw, nh = max(W, round(w * scale)), max(H, round(h * scale))
        if (nw, nh) != (w, h):
            # Pillow's bilinear widens its kernel when shrinking, so it antialiases.
            img = img.resize((nw, nh), Image.Resampling.BILINEAR)
        left, top = (nw - W) // 2, (nh - H) // 2
        img = img.crop((left, top, left + W, top + H))
    arr = np.asarray(img, dtype=np.uint8)  # (H, W) or (H, W, C)
    x = torch.from_numpy(arr.copy())
    if x.ndim == 2:
        return x.unsqueeze(0)  # (1, H, W)
    return x.permute(2, 0, 1).contiguous()  # (C, H, W)


def normalize(x: Tensor) -> Tensor:
    """Pixels -> the model's input range [-1, 1].

    uint8 (..., C, H, W) in [0, 255] -> float32 x / 127.5 - 1; a float tensor is taken to
    be in [0, 1] (as augment_batch uses) -> 2x - 1, the same mapping.
    """
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(127.5).sub_(1.0)
    if x.is_floating_point():
        return x * 2.0 - 1.0
    raise ValueError(f"normalize: expected a uint8 or float tensor, got {x.dtype}")
