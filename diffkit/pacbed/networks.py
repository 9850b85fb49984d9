"""Compact CNNs of the PACBED cascade (seed paper: size/centre/rotation, thickness, tilt).

* :class:`AlignNet` regresses the residual misalignment of a pattern in the canonical
  frame: disk-centre offset (dy, dx in px), log scale, and rotation as (sin 4phi, cos 4phi)
  (the [001] zone is four-fold symmetric, so rotation is defined modulo 90 degrees).
* :class:`MeasureNet` predicts probability distributions over thickness bins (nm) and
  signed tilt bins along x and y (mrad); means, standard deviations and the top
  alternatives come from the distributions (soft-argmax), and a temperature per head
  calibrates them.

Both are sized for CPU inference (~8 M multiply-adds per 96x96 pattern).
"""
from __future__ import annotations

import torch
from torch import nn


def _block(cin, cout, k, stride):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False),
                         nn.BatchNorm2d(cout), nn.GELU())


class Backbone(nn.Module):
    """Four strided conv blocks, 96 px -> 6 px, then a dense feature layer."""

    def __init__(self, n_px: int = 96, widths=(16, 32, 64, 96), features: int = 192, dropout: float = 0.1):
        super().__init__()
        w = widths
        self.conv = nn.Sequential(_block(1, w[0], 5, 2), _block(w[0], w[1], 3, 2), _block(w[1], w[2], 3, 2),
                                  _block(w[2], w[3], 3, 2))
        side = n_px // 16
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(w[3] * side * side, features), nn.GELU(), nn.Dropout(dropout))
        self.features = features

    def forward(self, x):
        return self.fc(self.conv(x[:, None] if x.ndim == 3 else x))

    def fuse_for_inference(self) -> "Backbone":
        """Fold each BatchNorm into its convolution (eval statistics; same outputs, fewer
        passes over memory). For loaded inference models only: the fused module no longer
        trains and its state dict has other keys."""
        from torch.nn.utils.fusion import fuse_conv_bn_eval

        self.eval()
        for blk in self.conv:
            if isinstance(blk[1], nn.BatchNorm2d):
                blk[0] = fuse_conv_bn_eval(blk[0], blk[1])
                blk[1] = nn.Identity()
        return self

    def first_layer_activations(self, x):
        """Activation maps of the first conv block (B, C, H/2, W/2)."""
        return self.conv[0](x[:, None] if x.ndim == 3 else x)


class AlignNet(nn.Module):
    """Residual geometry in the canonical frame: (dy, dx) px, log scale, sin 4phi, cos 4phi."""

    def __init__(self, n_px: int = 96):
        super().__init__()
        self.backbone = Backbone(n_px, widths=(16, 24, 48, 64), features=128, dropout=0.0)
        self.head = nn.Linear(128, 5)

    def forward(self, x):
        return self.head(self.backbone(x))


class MeasureNet(nn.Module):
    """Thickness and signed tilt distributions.

    Parameters
    ----------
    thickness_bins : tensor (Nt,)
        Bin centres in nm.
    tilt_bins : tensor (Na,)
        Bin centres in mrad (symmetric about 0).
    """

    def __init__(self, thickness_bins, tilt_bins, n_px: int = 96):
        super().__init__()
        self.register_buffer("thickness_bins", torch.as_tensor(thickness_bins, dtype=torch.float32))
        self.register_buffer("tilt_bins", torch.as_tensor(tilt_bins, dtype=torch.float32))
        # temperatures (thickness, tilt) set by calibration after training
        self.register_buffer("temperature", torch.ones(2))
        self.backbone = Backbone(n_px)
        f = self.backbone.features
        self.thickness_head = nn.Linear(f, len(thickness_bins))
        self.tilt_x_head = nn.Linear(f, len(tilt_bins))
        self.tilt_y_head = nn.Linear(f, len(tilt_bins))

    @classmethod
    def from_state_dict(cls, sd: dict, prefix: str = "", n_px: int = 96) -> "MeasureNet":
        """The network stored under ``prefix`` (e.g. ``"measure."``) in a packaged state dict."""
        net = cls(sd[prefix + "thickness_bins"], sd[prefix + "tilt_bins"], n_px=n_px)
        net.load_state_dict({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)})
        return net

    def forward(self, x, return_features: bool = False):
        h = self.backbone(x)
        out = {
            "thickness": self.thickness_head(h) / self.temperature[0],
            "tilt_x": self.tilt_x_head(h) / self.temperature[1],
            "tilt_y": self.tilt_y_head(h) / self.temperature[1],
        }
        if return_features:
            out["features"] = h
        return out


def distribution_stats(logits: torch.Tensor, bins: torch.Tensor):
    """Mean and standard deviation of the softmax distribution over ``bins``."""
    p = torch.softmax(logits, dim=-1)
    mean = (p * bins).sum(-1)
    std = ((p * (bins - mean[..., None]) ** 2).sum(-1)).clamp_min(0).sqrt()
    return p, mean, std


def soft_targets(values: torch.Tensor, bins: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian soft labels over bins (label smoothing on the ordinal axis)."""
    w = torch.exp(-0.5 * ((bins[None] - values[:, None]) / sigma) ** 2)
    return w / w.sum(-1, keepdim=True)
