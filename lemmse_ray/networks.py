"""Local, translation-equivariant CNN baselines to compare with LE-MMSE estimators.

Every network maps an estimator input ``z`` of shape ``(B, in_channels, H, W)``
to an image ``(B, out_channels, H, W)`` and follows the same boundary rule as
the estimator it is compared with:

* ``padding="zeros"``: the image is extended by zeros outside its support;
* ``padding="circular"``: the image is extended periodically (wrapped).

The extension is applied **once** to the input, by the network's receptive
radius ``receptive_field // 2``; everything after it only sees the extended
image.  Hence every output pixel is a function of the ``receptive_field`` x
``receptive_field`` window of the extended input centred on it -- exactly the
information an LE-MMSE estimator with that patch size sees, at every pixel
including the border.  No normalisation layer is used (batch statistics would
couple pixels and samples).

Each network stores its constructor arguments, plus ``"name"``, in a JSON-able
``config`` dict, so that ``build_network(**network_config(net))`` rebuilds it.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

NETWORKS = ("patchmlp", "resnet", "unet")
PADDINGS = ("zeros", "circular")

__all__ = [
    "NETWORKS",
    "PADDINGS",
    "PatchMLP",
    "ResNet",
    "UNet2D",
    "build_network",
    "network_config",
]


def _check_int(name: str, value: Any, minimum: int = 1) -> int:
    """Return ``value`` if it is an int ``>= minimum``, else raise ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_padding(padding: Any) -> str:
    if padding not in PADDINGS:
        raise ValueError(f"padding must be one of {PADDINGS}, got {padding!r}")
    return padding


def _check_patch_size(patch_size: Any, minimum: int = 1) -> int:
    _check_int("patch_size", patch_size, minimum)
    if patch_size % 2 == 0:
        raise ValueError(f"patch_size must be odd, got {patch_size}")
    return patch_size


def _extend(x: torch.Tensor, pad: int, padding: str) -> torch.Tensor:
    """Extend ``x`` (B, C, H, W) by ``pad`` pixels on every side with the boundary rule.

    Circular extension works for any ``pad``, also ``pad > H`` (the image is tiled).
    """
    if pad == 0:
        return x
    if padding == "zeros":
        return F.pad(x, (pad, pad, pad, pad))
    rows = torch.arange(-pad, x.shape[-2] + pad, device=x.device) % x.shape[-2]
    cols = torch.arange(-pad, x.shape[-1] + pad, device=x.device) % x.shape[-1]
    return x.index_select(-2, rows).index_select(-1, cols)


class PatchMLP(nn.Module):
    """MLP applied to every ``P x P`` patch, predicting the patch's centre pixel.

    ``depth`` counts the linear layers: the first acts on the flattened patch
    (``in_channels * P * P`` inputs, ordered channel, row, column) and is
    implemented as a ``P x P`` convolution, the others are ``1 x 1``
    convolutions with ``hidden`` channels; a GELU separates consecutive layers.
    The input is extended once by ``P // 2`` pixels, then all convolutions are
    unpadded.

    Receptive field: ``P`` (``patch_size``).
    """

    def __init__(
        self,
        patch_size: int,
        in_channels: int,
        out_channels: int,
        hidden: int = 256,
        depth: int = 3,
        padding: str = "zeros",
    ) -> None:
        super().__init__()
        _check_patch_size(patch_size)
        _check_int("in_channels", in_channels)
        _check_int("out_channels", out_channels)
        _check_int("hidden", hidden)
        _check_int("depth", depth)
        self.padding = _check_padding(padding)
        self.patch_size = patch_size
        self.config = {
            "name": "patchmlp",
            "patch_size": patch_size,
            "in_channels": in_channels,
            "out_channels": out_channels,
            "hidden": hidden,
            "depth": depth,
            "padding": padding,
        }
        widths = [hidden] * (depth - 1) + [out_channels]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], patch_size)]
        for width_in, width_out in zip(widths[:-1], widths[1:]):
            layers += [nn.GELU(), nn.Conv2d(width_in, width_out, 1)]
        self.body = nn.Sequential(*layers)

    @property
    def receptive_field(self) -> int:
        return self.patch_size

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(_extend(z, self.patch_size // 2, self.padding))


class _ResidualBlock(nn.Module):
    """``h -> crop(h) + conv1x1(gelu(conv3x3(gelu(h))))`` with an unpadded 3x3 conv."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv3 = nn.Conv2d(width, width, 3)
        self.conv1 = nn.Conv2d(width, width, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h[..., 1:-1, 1:-1] + self.conv1(F.gelu(self.conv3(F.gelu(h))))


class ResNet(nn.Module):
    """Residual CNN of 3x3 convolutions without down-sampling.

    ``depth`` is the total number of 3x3 convolutions: a 3x3 stem
    (``in_channels -> width``), then ``depth - 1`` residual blocks each made of
    one 3x3 and one 1x1 convolution, then a 1x1 head (``width -> out_channels``).
    The input is extended once by ``depth`` pixels and every 3x3 convolution is
    unpadded (skip connections are cropped accordingly).

    With ``residual`` the network predicts a correction added to the input's
    first ``out_channels`` channels (needs ``in_channels >= out_channels``);
    ``None`` enables it exactly when the channels allow it.

    Receptive field: ``2 * depth + 1``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        width: int = 64,
        depth: int = 4,
        padding: str = "zeros",
        residual: bool | None = None,
    ) -> None:
        super().__init__()
        _check_int("in_channels", in_channels)
        _check_int("out_channels", out_channels)
        _check_int("width", width)
        _check_int("depth", depth)
        self.padding = _check_padding(padding)
        if residual is None:
            residual = in_channels >= out_channels
        elif not isinstance(residual, bool):
            raise ValueError(f"residual must be a bool or None, got {residual!r}")
        elif residual and in_channels < out_channels:
            raise ValueError(
                f"residual needs in_channels >= out_channels, got {in_channels} < {out_channels}"
            )
        self.depth = depth
        self.residual = residual
        self.out_channels = out_channels
        self.config = {
            "name": "resnet",
            "in_channels": in_channels,
            "out_channels": out_channels,
            "width": width,
            "depth": depth,
            "padding": padding,
            "residual": residual,
        }
        self.stem = nn.Conv2d(in_channels, width, 3)
        self.blocks = nn.Sequential(*(_ResidualBlock(width) for _ in range(depth - 1)))
        self.head = nn.Conv2d(width, out_channels, 1)

    @property
    def receptive_field(self) -> int:
        return 2 * self.depth + 1

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem(_extend(z, self.depth, self.padding)))
        out = self.head(F.gelu(h))
        return out + z[:, : self.out_channels] if self.residual else out


class _DoubleConv(nn.Sequential):
    """Two size-preserving 3x3 convolutions, each followed by a GELU."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
            nn.GELU(),
        )


class UNet2D(nn.Module):
    """Small U-Net: ``levels`` resolutions, 2x average-pool down, nearest 2x up.

    Level ``l`` works at resolution ``1 / 2**l`` with ``width * 2**l`` channels:
    the encoder applies a double 3x3 conv at each level (average-pooling
    between levels); the decoder, from level ``levels - 2`` up to 0,
    upsamples, concatenates the encoder features of that level and applies a
    double 3x3 conv; a 1x1 head gives ``out_channels``.  ``H`` and ``W`` must be
    divisible by ``f = 2**(levels - 1)``.  The input is extended once by
    ``margin`` (the receptive radius rounded up to a multiple of ``f``), the
    U-Net runs on the extended image and the centre is cropped out, so the
    internal conv padding never reaches the returned pixels.  With circular
    padding the network is equivariant to shifts that are multiples of ``f``.

    Receptive field: ``7 * 2**levels - 9``.  The radius ``7 * 2**(levels-1) - 5``
    sums the encoder convs ``2 * (2**levels - 1)``, the decoder convs
    ``2 * (2**(levels-1) - 1)`` and the worst position of a pixel inside its
    coarsest cell ``2**(levels-1) - 1`` (the bound is attained for some pixel
    positions modulo ``f``, smaller for others).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        width: int = 32,
        levels: int = 2,
        padding: str = "zeros",
    ) -> None:
        super().__init__()
        _check_int("in_channels", in_channels)
        _check_int("out_channels", out_channels)
        _check_int("width", width)
        _check_int("levels", levels)
        self.padding = _check_padding(padding)
        self.levels = levels
        self.config = {
            "name": "unet",
            "in_channels": in_channels,
            "out_channels": out_channels,
            "width": width,
            "levels": levels,
            "padding": padding,
        }
        widths = [width * 2**level for level in range(levels)]
        self.encoders = nn.ModuleList(
            _DoubleConv(c_in, c_out) for c_in, c_out in zip([in_channels] + widths[:-1], widths)
        )
        self.decoders = nn.ModuleList(
            _DoubleConv(widths[level + 1] + widths[level], widths[level])
            for level in range(levels - 1)
        )
        self.head = nn.Conv2d(width, out_channels, 1)

    @property
    def factor(self) -> int:
        """Total down-sampling factor ``2**(levels - 1)``; H and W must be multiples of it."""
        return 2 ** (self.levels - 1)

    @property
    def receptive_field(self) -> int:
        return 7 * 2**self.levels - 9

    @property
    def margin(self) -> int:
        """Extension width: the receptive radius rounded up to a multiple of ``factor``."""
        radius = self.receptive_field // 2
        return -(-radius // self.factor) * self.factor

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        height, width = z.shape[-2:]
        if height % self.factor or width % self.factor:
            raise ValueError(
                f"UNet2D with levels={self.levels} needs H and W divisible by {self.factor}, "
                f"got {height}x{width}"
            )
        m = self.margin
        h = _extend(z, m, self.padding)
        skips = []
        for level, encoder in enumerate(self.encoders):
            if level:
                h = F.avg_pool2d(h, 2)
            h = encoder(h)
            skips.append(h)
        for level in reversed(range(self.levels - 1)):
            h = F.interpolate(h, scale_factor=2, mode="nearest")
            h = self.decoders[level](torch.cat([h, skips[level]], dim=1))
        return self.head(h)[..., m : m + height, m : m + width]


_CLASSES: dict[str, type[nn.Module]] = {"patchmlp": PatchMLP, "resnet": ResNet, "unet": UNet2D}


def build_network(
    name: str,
    *,
    in_channels: int,
    out_channels: int,
    patch_size: int | None = None,
    padding: str = "zeros",
    **kwargs: Any,
) -> nn.Module:
    """Build a network by name (one of ``NETWORKS``).

    ``patch_size`` is required for ``"patchmlp"``.  For ``"resnet"`` it is
    optional and, when given (odd, >= 3), sets ``depth = patch_size // 2`` so
    that the receptive field equals ``patch_size``.  ``"unet"`` rejects it (its
    receptive field is fixed by ``levels``).  Remaining keyword arguments go to
    the network's constructor.  Unknown names, unknown arguments and invalid
    values raise ValueError naming the offending parameter.

    ``build_network(**network_config(net))`` rebuilds ``net``'s architecture.
    """
    if name not in _CLASSES:
        raise ValueError(f"name must be one of {NETWORKS}, got {name!r}")
    cls = _CLASSES[name]
    allowed = set(inspect.signature(cls).parameters) - {
        "in_channels", "out_channels", "padding", "patch_size"
    }
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for network {name!r}")
    if name == "patchmlp":
        if patch_size is None:
            raise ValueError("patch_size is required for network 'patchmlp'")
        kwargs["patch_size"] = patch_size
    elif name == "resnet" and patch_size is not None:
        depth = _check_patch_size(patch_size, minimum=3) // 2
        if kwargs.setdefault("depth", depth) != depth:
            raise ValueError(
                f"depth={kwargs['depth']} conflicts with patch_size={patch_size} "
                f"(resnet receptive field 2*depth+1)"
            )
    elif name == "unet" and patch_size is not None:
        raise ValueError("patch_size is not a parameter of network 'unet' (set levels instead)")
    return cls(in_channels=in_channels, out_channels=out_channels, padding=padding, **kwargs)


def network_config(module: nn.Module) -> dict[str, Any]:
    """Return a copy of ``module.config``: a JSON-able dict accepted by ``build_network(**config)``."""
    config = getattr(module, "config", None)
    if not isinstance(config, dict) or config.get("name") not in _CLASSES:
        raise ValueError(f"module {type(module).__name__} carries no network config")
    return dict(config)
