"""Neural networks for Bragg-disk detection (pure torch, no third-party model code).

:class:`AnchorFreeDiskNet` (after seed 002, NDPD): a small fully convolutional network
with an encoder-decoder neck that predicts, on a grid of cells (stride 4 px), an
objectness logit, the offset of the disk centre from the cell's anchor point as a
*distribution over sub-pixel bins* in x and in y (decoded by soft-argmax, i.e. the
expectation, trained with the distribution focal loss), and the disk radius.

:class:`SubImageDiskNet` (after seed 001): a small CNN that regresses the centre of the
single disk in a 24 x 24 px sub-image; used to refine the anchor-free centres, or on its
own at positions predicted by a known lattice.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F


def _cbr(cin, cout, k=3, s=1, d=1):
    pad = d * (k // 2) if k % 2 else (k - s) // 2
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, padding=pad, dilation=d, bias=False),
                         nn.BatchNorm2d(cout), nn.SiLU(inplace=True))


class _Res(nn.Module):
    def __init__(self, c, d=1):
        super().__init__()
        self.a = _cbr(c, c, d=d)
        self.b = nn.Sequential(nn.Conv2d(c, c, 3, 1, d, dilation=d, bias=False), nn.BatchNorm2d(c))

    def forward(self, x):
        return F.silu(x + self.b(self.a(x)))


def normalise_pattern(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Dose-independent input transform ``log1p(I / (0.01 <I>))`` of patterns (B, 1, H, W) (no gain needed)."""
    m = x.mean(dim=(-2, -1), keepdim=True).clamp_min(eps)
    return torch.log1p(x.clamp_min(0) / (0.01 * m))


@dataclasses.dataclass
class AnchorFreeConfig:
    """Architecture of :class:`AnchorFreeDiskNet`.

    The input is first summed over ``pool`` x ``pool`` px blocks; a cell is one pooled pixel
    (stride ``pool`` px). Offsets of the disk centre from a cell's anchor point are
    predicted in ``[-offset_range, offset_range]`` px as ``n_bins`` equally spaced bins.
    """

    pool: int = 4
    n_bins: int = 21
    offset_range: float = 5.0
    width: int = 16


class AnchorFreeDiskNet(nn.Module):
    """Anchor-free disk detector: (B, 1, H, W) counts -> per-cell objectness, offset bins, radius.

    ``H`` and ``W`` must be multiples of ``2 * pool`` (:func:`diffkit.strain.detect_disks` pads).
    The anchor of cell (i, j) is the pixel position ``(x, y) = (pool j + (pool - 1)/2, pool i + (pool - 1)/2)``.
    """

    def __init__(self, config: AnchorFreeConfig | None = None):
        super().__init__()
        self.config = c = config or AnchorFreeConfig()
        w = c.width
        self.stem = nn.Sequential(_cbr(1, w), _Res(w))
        self.down = _cbr(w, 2 * w, 3, 2)
        self.low = nn.Sequential(_Res(2 * w), _Res(2 * w, d=2))
        self.fuse = _cbr(3 * w, w, 1)
        self.neck = _cbr(w, w)
        self.head = nn.Conv2d(w, 1 + 2 * c.n_bins + 1, 1)
        self.register_buffer("bins", torch.linspace(-c.offset_range, c.offset_range, c.n_bins))

    @property
    def stride(self) -> int:
        return self.config.pool

    def forward(self, x):
        """Returns ``(obj (B, h, w) logits, off (B, 2, n_bins, h, w) logits, log_radius (B, h, w))``."""
        p = self.config.pool
        if p > 1:
            x = F.avg_pool2d(x, p) * (p * p)
        x = normalise_pattern(x)
        a = self.stem(x)
        b = self.low(self.down(a))
        b = F.interpolate(b, size=a.shape[-2:], mode="nearest")
        y = self.neck(self.fuse(torch.cat([a, b], 1)))
        out = self.head(y)
        nb = self.config.n_bins
        obj = out[:, 0]
        off = out[:, 1:1 + 2 * nb].reshape(out.shape[0], 2, nb, *out.shape[-2:])
        logr = out[:, 1 + 2 * nb] + 1.7  # radius ~ 5.5 px at init
        return obj, off, logr

    def soft_argmax(self, off_logits):
        """Expected offset (B, 2, h, w) in px (x, y) from the bin logits: sum_k p_k b_k."""
        p = off_logits.softmax(dim=2)
        return (p * self.bins[None, None, :, None, None]).sum(2)


@dataclasses.dataclass
class SubImageConfig:
    """Architecture of :class:`SubImageDiskNet` (``size`` px sub-images, ``width`` channels)."""

    size: int = 24
    width: int = 16


class SubImageDiskNet(nn.Module):
    """Regress the centre (dx, dy) px of the one disk in a sub-image relative to its centre.

    Input (B, 1, S, S) counts; output the offset of the disk centre from the sub-image
    centre ``((S - 1)/2, (S - 1)/2)`` in px, see :func:`diffkit.strain.detect.crop_subimages`.
    """

    def __init__(self, config: SubImageConfig | None = None):
        super().__init__()
        self.config = c = config or SubImageConfig()
        w = c.width
        self.features = nn.Sequential(
            _cbr(1, w, k=4, s=2, d=1),  # S/2
            _cbr(w, 2 * w, s=2),  # S/4
            _cbr(2 * w, 2 * w),
        )
        n = c.size // 4
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(2 * w * n * n, 64), nn.SiLU(inplace=True), nn.Linear(64, 2))

    @staticmethod
    def normalise(x: torch.Tensor) -> torch.Tensor:
        """Scale each sub-image so its brightest 10 % of pixels average ~1 (dose and gain free)."""
        flat = x.flatten(1).clamp_min(0)
        k = max(1, flat.shape[1] // 10)
        top = flat.topk(k, dim=1).values.mean(1).clamp_min(1e-6)
        return x.clamp_min(0) / top[:, None, None, None]

    def forward(self, x):
        return self.fc(self.features(self.normalise(x)))


def fuse_batchnorm(model: nn.Module) -> nn.Module:
    """Fold every ``Conv2d -> BatchNorm2d`` pair into the convolution (inference only, in place)."""
    for name, mod in list(model.named_children()):
        if isinstance(mod, nn.Sequential):
            mods = list(mod.children())
            i = 0
            while i < len(mods) - 1:
                if isinstance(mods[i], nn.Conv2d) and isinstance(mods[i + 1], nn.BatchNorm2d):
                    conv, bn = mods[i], mods[i + 1]
                    w = conv.weight
                    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                      conv.padding, conv.dilation, conv.groups, bias=True)
                    with torch.no_grad():
                        fused.weight.copy_(w * scale[:, None, None, None])
                        b = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
                        fused.bias.copy_((b - bn.running_mean) * scale + bn.bias)
                    mods[i] = fused
                    mods[i + 1] = nn.Identity()
                i += 1
            setattr(model, name, nn.Sequential(*mods))
        fuse_batchnorm(getattr(model, name))
    return model


def count_parameters(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())
