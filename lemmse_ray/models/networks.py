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

Shift equivariance (with circular padding): PatchMLP and ResNet have no
down-sampling and commute with every shift, so each is one function ``g`` of
the patch around a pixel, the function class of the LE-MMSE estimator of
patch size ``receptive_field``.  The U-Net pools: it commutes only with shifts
by multiples of ``2**(levels - 1)``, and its output at a pixel is a function of
the same patch that may depend on the pixel's position modulo that factor --
a larger class (see ``docs/theory.md``).

Each network stores its constructor arguments, plus ``"name"``, in a JSON-able
``config`` dict, so that ``build_network(**network_config(net))`` rebuilds it.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..core.validation import PADDINGS, check_choice

__all__ = [
    "NETWORKS",
    "REGISTRY",
    "PatchMLP",
    "ResNet",
    "UNet2D",
    "build_network",
    "network_config",
    "unet_kernels",
    "unet_radius_range",
]


def _check_int(name: str, value: Any, minimum: int = 1) -> int:
    """Return ``value`` if it is an int ``>= minimum``, else raise ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_patch_size(patch_size: Any) -> int:
    _check_int("patch_size", patch_size)
    if patch_size % 2 == 0:
        raise ValueError(f"patch_size must be odd, got {patch_size}")
    return patch_size


def _extend(x: torch.Tensor, pad: int, padding: str, extra: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """Extend ``x`` (B, C, H, W) by ``pad`` pixels on every side with the boundary rule, plus
    ``extra = (rows, columns)`` more at the bottom and the right.

    Circular extension works for any width, also wider than the image (the image is tiled).
    """
    bottom, right = pad + extra[0], pad + extra[1]
    if pad == bottom == right == 0:
        return x
    if padding == "zeros":
        return F.pad(x, (pad, right, pad, bottom))
    rows = torch.arange(-pad, x.shape[-2] + bottom, device=x.device) % x.shape[-2]
    cols = torch.arange(-pad, x.shape[-1] + right, device=x.device) % x.shape[-1]
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

    name = "patchmlp"

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
        self.padding = check_choice(padding, PADDINGS, "padding")
        self.patch_size = patch_size
        self.config = {
            "name": self.name,
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

    @classmethod
    def from_patch_size(cls, in_channels: int, out_channels: int, patch_size: int | None, padding: str = "zeros",
                        **kwargs: Any) -> PatchMLP:
        """The PatchMLP of receptive field ``patch_size``: the patch it reads, so ``patch_size`` is required."""
        if patch_size is None:
            raise ValueError(f"patch_size is required for network {cls.name!r}")
        return cls(in_channels=in_channels, out_channels=out_channels, padding=padding, patch_size=patch_size,
                   **kwargs)

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

    name = "resnet"

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
        self.padding = check_choice(padding, PADDINGS, "padding")
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
            "name": self.name,
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

    @classmethod
    def from_patch_size(cls, in_channels: int, out_channels: int, patch_size: int | None, padding: str = "zeros",
                        **kwargs: Any) -> ResNet:
        """The ResNet of receptive field ``patch_size = 2 depth + 1``: ``depth = P // 2`` (odd ``P >= 3``, the
        stem being a 3x3 convolution).  ``patch_size=None``: the receptive field is set by ``depth``."""
        if patch_size is not None:
            _check_patch_size(patch_size)
            if patch_size < 3:
                raise ValueError(f"network {cls.name!r} cannot have receptive field patch_size={patch_size} "
                                 "(its stem is a 3x3 convolution: at least 3)")
            depth = patch_size // 2
            if kwargs.setdefault("depth", depth) != depth:
                raise ValueError(
                    f"depth={kwargs['depth']} conflicts with patch_size={patch_size} "
                    f"({cls.name} receptive field 2*depth+1)"
                )
        return cls(in_channels=in_channels, out_channels=out_channels, padding=padding, **kwargs)

    @property
    def receptive_field(self) -> int:
        return 2 * self.depth + 1

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.stem(_extend(z, self.depth, self.padding)))
        out = self.head(F.gelu(h))
        return out + z[:, : self.out_channels] if self.residual else out


class _DoubleConv(nn.Sequential):
    """Two size-preserving convolutions of odd kernel sizes ``kernels``, each followed by a GELU."""

    def __init__(self, in_channels: int, out_channels: int, kernels: tuple[int, int] = (3, 3)) -> None:
        first, second = kernels
        super().__init__(
            nn.Conv2d(in_channels, out_channels, first, padding=first // 2),
            nn.GELU(),
            nn.Conv2d(out_channels, out_channels, second, padding=second // 2),
            nn.GELU(),
        )


def unet_radius_range(levels: int) -> tuple[int, int]:
    """Smallest and largest receptive radius of a :class:`UNet2D` with ``levels`` levels.

    With every convolution ``1 x 1`` the radius is ``2**(levels-1) - 1`` (the pooling alone); with every
    convolution ``3 x 3`` it is ``7 * 2**(levels-1) - 5`` (receptive field ``7 * 2**levels - 9``).
    """
    return 2 ** (levels - 1) - 1, 7 * 2 ** (levels - 1) - 5


def unet_kernels(patch_size: int | None, levels: int | None = None) -> tuple[int, tuple[tuple[int, ...], ...]]:
    r"""``(levels, kernel sizes)`` of the :class:`UNet2D` whose receptive field is ``patch_size``.

    Level :math:`l` (resolution :math:`2^{-l}`) has two encoder convolutions and, except the coarsest
    level :math:`L-1`, two decoder convolutions; each is ``1 x 1`` or ``3 x 3``.  A ``3 x 3`` conv at
    level :math:`l` adds :math:`2^l` to the receptive radius, and every pooling step adds
    :math:`2^l` as well (a pixel and its pooling partner), so the radius is

    .. math:: r = \sum_{l=0}^{L-2} 2^l\,(e_l + d_l + 1) + 2^{L-1} e_{L-1},

    with :math:`e_l, d_l` the numbers of ``3 x 3`` encoder and decoder convs of level :math:`l`.
    Rule: ``levels`` (when None) is the smallest :math:`L \ge 2` whose all-``3 x 3`` radius
    :math:`7 \cdot 2^{L-1} - 5` reaches :math:`p = P // 2` (``L = 2`` for ``P <= 19``, ``L = 3`` for
    ``P <= 47``); the convolutions are then visited from the coarsest level to the finest (encoder
    before decoder) and each becomes ``3 x 3`` while its weight :math:`2^l` fits in what is left of
    :math:`p - (2^{L-1} - 1)`.  Powers of two with these multiplicities make this greedy choice exact.

    Returns ``levels`` and, per level from the finest, the kernel sizes ``(enc, enc, dec, dec)`` (the
    coarsest level: ``(enc, enc)``).  ``patch_size=None`` gives every convolution ``3 x 3`` (``levels``
    defaults to 2).  Raises ValueError naming ``patch_size`` (and ``levels``) when no U-Net matches.
    """
    if levels is not None:
        _check_int("levels", levels)
    if patch_size is None:
        levels = 2 if levels is None else levels
        return levels, tuple((3, 3) if level == levels - 1 else (3, 3, 3, 3) for level in range(levels))
    _check_patch_size(patch_size)
    radius = patch_size // 2
    if levels is None:
        if radius < unet_radius_range(2)[0]:
            raise ValueError(f"network 'unet' cannot have receptive field patch_size={patch_size}: "
                             f"two levels (one pooling step) already reach {2 * unet_radius_range(2)[0] + 1}")
        levels = next(level for level in range(2, 64) if unet_radius_range(level)[1] >= radius)
    low, high = unet_radius_range(levels)
    if not low <= radius <= high:
        raise ValueError(f"network 'unet' cannot have receptive field patch_size={patch_size} with "
                         f"levels={levels} (possible: {2 * low + 1} to {2 * high + 1})")
    left = radius - low
    kernels = [[1, 1] if level == levels - 1 else [1, 1, 1, 1] for level in range(levels)]
    for level in reversed(range(levels)):
        for index in range(len(kernels[level])):
            if 2**level <= left:
                kernels[level][index] = 3
                left -= 2**level
    assert left == 0, "greedy kernel choice is exact for powers of two"
    return levels, tuple(tuple(k) for k in kernels)


class UNet2D(nn.Module):
    """Small U-Net: ``levels`` resolutions, 2x average-pool down, nearest 2x up.

    Level ``l`` works at resolution ``1 / 2**l`` with ``width * 2**l`` channels:
    the encoder applies a double conv at each level (average-pooling between
    levels); the decoder, from level ``levels - 2`` up to 0, upsamples,
    concatenates the encoder features of that level and applies a double conv;
    a 1x1 head gives ``out_channels``.  Every conv is ``3 x 3`` unless
    ``patch_size`` is given: then ``levels`` (when None) and the kernel sizes
    (``1 x 1`` or ``3 x 3``) are chosen by :func:`unet_kernels` so that the
    receptive field is exactly ``patch_size``.

    The input is extended once by ``margin`` (the receptive radius rounded up
    to a multiple of ``factor = 2**(levels - 1)``), plus up to ``factor - 1``
    rows / columns at the bottom / right so that the pooling grid divides it;
    the U-Net runs on the extended image and the original pixels are cropped
    out, so the internal conv padding never reaches the returned pixels.

    Receptive field: ``2 r + 1`` with ``r`` the radius of :func:`unet_kernels`
    (``7 * 2**levels - 9`` with every conv ``3 x 3``).  It is the smallest
    centred window that contains the input pixels every output pixel depends
    on.  No single output pixel sees all of it: a pixel depends on a window of
    even width ``2 r`` shifted towards its pooling partner, so which side it
    misses depends on its position modulo ``factor``.  Hence the output at
    pixel ``k`` is ``g_{k mod factor}(patch of size P around k)``: local, but
    equivariant (with circular padding and ``H, W`` multiples of ``factor``)
    only to shifts by multiples of ``factor``.
    """

    name = "unet"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        width: int = 32,
        levels: int | None = None,
        padding: str = "zeros",
        patch_size: int | None = None,
    ) -> None:
        super().__init__()
        _check_int("in_channels", in_channels)
        _check_int("out_channels", out_channels)
        _check_int("width", width)
        self.padding = check_choice(padding, PADDINGS, "padding")
        levels, self.kernels = unet_kernels(patch_size, levels)
        self.levels = levels
        self.config = {
            "name": self.name,
            "in_channels": in_channels,
            "out_channels": out_channels,
            "width": width,
            "levels": levels,
            "padding": padding,
            "patch_size": patch_size,
        }
        widths = [width * 2**level for level in range(levels)]
        self.encoders = nn.ModuleList(
            _DoubleConv(c_in, c_out, self.kernels[level][:2])
            for level, (c_in, c_out) in enumerate(zip([in_channels] + widths[:-1], widths))
        )
        self.decoders = nn.ModuleList(
            _DoubleConv(widths[level + 1] + widths[level], widths[level], self.kernels[level][2:])
            for level in range(levels - 1)
        )
        self.head = nn.Conv2d(width, out_channels, 1)

    @classmethod
    def from_patch_size(cls, in_channels: int, out_channels: int, patch_size: int | None, padding: str = "zeros",
                        **kwargs: Any) -> UNet2D:
        """The U-Net of receptive field ``patch_size``: ``levels`` (unless given) and the kernel sizes by
        :func:`unet_kernels`.  ``patch_size=None``: every convolution ``3 x 3``."""
        return cls(in_channels=in_channels, out_channels=out_channels, padding=padding, patch_size=patch_size,
                   **kwargs)

    @property
    def factor(self) -> int:
        """Total down-sampling factor ``2**(levels - 1)``."""
        return 2 ** (self.levels - 1)

    @property
    def receptive_field(self) -> int:
        low = unet_radius_range(self.levels)[0]
        spatial = sum(2**level * (k // 2) for level, ks in enumerate(self.kernels) for k in ks)
        return 2 * (low + spatial) + 1

    @property
    def margin(self) -> int:
        """Extension width: the receptive radius rounded up to a multiple of ``factor``."""
        radius = self.receptive_field // 2
        return -(-radius // self.factor) * self.factor

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        height, width = z.shape[-2:]
        m = self.margin
        h = _extend(z, m, self.padding, extra=((-height) % self.factor, (-width) % self.factor))
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


#: every network by name; each class builds itself with a given receptive field (``from_patch_size``)
REGISTRY: dict[str, type[PatchMLP | ResNet | UNet2D]] = {cls.name: cls for cls in (PatchMLP, ResNet, UNet2D)}
NETWORKS = tuple(REGISTRY)


def build_network(
    name: str,
    *,
    in_channels: int,
    out_channels: int,
    patch_size: int | None = None,
    padding: str = "zeros",
    **kwargs: Any,
) -> nn.Module:
    """Build a network by name (one of :data:`NETWORKS`) with receptive field ``patch_size``, by its class's
    ``from_patch_size`` (:data:`REGISTRY`).

    ``patch_size`` (odd) is required for ``"patchmlp"`` (any odd ``P >= 1``).  For ``"resnet"`` it is
    optional and, when given (``P >= 3``), sets ``depth = P // 2``.  For ``"unet"`` it is optional and,
    when given (``P >= 3``), chooses ``levels`` (unless given) and the kernel sizes by
    :func:`unet_kernels`.  In both cases the receptive field is then exactly ``P``; without it it is
    fixed by ``depth`` / ``levels``.  Remaining keyword arguments go to the network's constructor.
    Unknown names, unknown arguments, invalid values and a ``P`` the network cannot match raise
    ValueError naming the offending parameter (for a ``P`` it cannot match: the network and ``P``).

    ``build_network(**network_config(net))`` rebuilds ``net``'s architecture.
    """
    if name not in REGISTRY:
        raise ValueError(f"name must be one of {NETWORKS}, got {name!r}")
    cls = REGISTRY[name]
    allowed = set(inspect.signature(cls).parameters) - {
        "in_channels", "out_channels", "padding", "patch_size"
    }
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for network {name!r}")
    return cls.from_patch_size(in_channels, out_channels, patch_size, padding, **kwargs)


def network_config(module: nn.Module) -> dict[str, Any]:
    """Return a copy of ``module.config``: a JSON-able dict accepted by ``build_network(**config)``."""
    config = getattr(module, "config", None)
    if not isinstance(config, dict) or config.get("name") not in REGISTRY:
        raise ValueError(f"module {type(module).__name__} carries no network config")
    return dict(config)
