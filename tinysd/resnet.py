"""The convolutional building blocks shared by the U-Net and the VAE (diffusers' `resnet.py`).

Each has `backward(saved, grad)` beside its forward for training (see `tinysd.nn`).
"""
from __future__ import annotations

import numpy as np

from tinysd.nn import Conv2d, GroupNorm, Linear, Module


class ResnetBlock2D(Module):
    """Two 3×3 convs with a skip: out = shortcut(x) + conv2(SiLU(GN(conv1(SiLU(GN(x))) + t_proj)))

    The U-Net adds the timestep embedding (projected to the channels) between the convs; the VAE
    has none (`temb_channels=None`). A 1×1 `conv_shortcut` matches channels when they change.
    """

    def __init__(self, in_channels, out_channels, temb_channels=None, groups=32, eps=1e-5):
        self.norm1 = GroupNorm(groups, in_channels, eps)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        if temb_channels is not None:
            self.time_emb_proj = Linear(temb_channels, out_channels)
        self.norm2 = GroupNorm(groups, out_channels, eps)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.conv_shortcut = Conv2d(in_channels, out_channels, 1)

    def __call__(self, x, temb=None, saved=None):
        h = self.conv1(self.norm1(x, silu=True))
        if temb is not None:
            h = h + self.time_emb_proj(self.ops.silu(temb)).reshape(*temb.shape[:1], -1, 1, 1)
        if saved is not None:
            saved.update(x=x, h=h, temb=temb)         # the norms' SiLU outputs are recomputed
        out = self.conv2(self.norm2(h, silu=True))
        if hasattr(self, "conv_shortcut"):
            x = self.conv_shortcut(x)
        return x + out

    def backward(self, saved, grad):
        """∂L/∂out -> (∂L/∂x, ∂L/∂temb or None), through

            out = shortcut(x) + conv2(SiLU(GN2(h))),   h = conv1(SiLU(GN1(x))) + proj(SiLU(temb))

        from the output back: the sum passes ∂L/∂out to both branches; the projection was
        broadcast over H, W, so its gradient is ∂L/∂h summed over them.
        """
        x, h, temb = saved["x"], saved["h"], saved["temb"]
        dx = self.conv_shortcut.backward(x, grad) if hasattr(self, "conv_shortcut") else grad
        dh = self.norm2.backward(h, self.conv2.backward(self.norm2(h, silu=True), grad), silu=True)
        dtemb = None
        if temb is not None:
            dproj = dh.sum(axis=(2, 3))                                   # (B, C_out)
            dtemb = self.ops.silu_backward(self.time_emb_proj.backward(self.ops.silu(temb), dproj), temb)
        da = self.conv1.backward(self.norm1(x, silu=True), dh)
        return dx + self.norm1.backward(x, da, silu=True), dtemb


class Downsample2D(Module):
    """Halve H and W with a stride-2 3×3 conv.

    The U-Net pads 1 on every side; the VAE encoder pads only right and bottom (`padding=0`
    in the config, then (0, 1, 0, 1) as in the original LDM code).
    """

    def __init__(self, channels, padding=1):
        pad = padding if padding else (0, 1, 0, 1)  # (top, bottom, left, right)
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=pad)

    def __call__(self, x, saved=None):
        if saved is not None:
            saved["x"] = x
        return self.conv(x)

    def backward(self, saved, grad):
        return self.conv.backward(saved["x"], grad)


class Upsample2D(Module):
    """Double H and W by nearest-neighbour copying, then a 3×3 conv.

    `size` (H, W) crops to the skip connection's size when the down path met an odd size.
    Torch's nearest with an explicit size picks source row ⌊i·in/out⌋, which for out = 2·in − 1
    is the same row as 2× copying then cropping.
    """

    def __init__(self, channels):
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def __call__(self, x, size=None, saved=None):
        if saved is not None:
            saved.update(x=x, size=size)              # the up-sampled copy is recomputed
        return self.conv(self._upsample(x, size))

    def _upsample(self, x, size):
        x = self.ops.upsample_nearest2x(x)
        if size is not None and tuple(size) != tuple(x.shape[2:]):
            x = x[:, :, :size[0], :size[1]]
        return x

    def backward(self, saved, grad):
        """The conv's backward, the crop's (zeros where rows/columns were cut), then each input
        pixel collects the gradients of its 2×2 copies."""
        x, size = saved["x"], saved["size"]
        du = self.conv.backward(self._upsample(x, size), grad)
        H2, W2 = 2 * x.shape[2], 2 * x.shape[3]
        if du.shape[2:] != (H2, W2):
            du = np.pad(du, ((0, 0), (0, 0), (0, H2 - du.shape[2]), (0, W2 - du.shape[3])))
        return self.ops.upsample_nearest2x_backward(du, x)
