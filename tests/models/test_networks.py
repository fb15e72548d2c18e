"""Tests for lemmse_ray.models.networks: equivariance, exact locality, padding, reference, factory."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lemmse_ray.models.networks import NETWORKS, PatchMLP, ResNet, UNet2D, build_network, network_config, unet_kernels

SMALL = {
    "patchmlp": dict(patch_size=5, hidden=16, depth=3),
    "resnet": dict(width=8, depth=3),
    "unet": dict(width=4, levels=2),
}


def make(name: str, padding: str, in_channels: int = 2, out_channels: int = 2, seed: int = 0, **kw):
    torch.manual_seed(seed)
    params = {**SMALL[name], **kw}
    return build_network(
        name, in_channels=in_channels, out_channels=out_channels, padding=padding, **params
    ).double()


def chebyshev_distance(size: int, centre: tuple[int, int], wrap: bool) -> torch.Tensor:
    """(size, size) map of the Chebyshev distance to ``centre`` (on the torus if ``wrap``)."""
    idx = torch.arange(size)
    dy, dx = (idx - centre[0]).abs(), (idx - centre[1]).abs()
    if wrap:
        dy, dx = torch.minimum(dy, size - dy), torch.minimum(dx, size - dx)
    return torch.maximum(dy[:, None], dx[None, :])


def single_pixel_changes(net, x: torch.Tensor) -> torch.Tensor:
    """Bool (H, W, H, W) map: does perturbing input pixel (k, l) change output pixel (i, j)?

    All H*W perturbed copies and the unperturbed input are run in one batch.
    """
    _, _, height, width = x.shape
    batch = x.repeat(height * width + 1, 1, 1, 1)
    pixels = torch.arange(height * width)
    batch[1 + pixels, :, pixels // width, pixels % width] += 0.5
    with torch.no_grad():
        out = net(batch)
    changed = (out[1:] != out[:1]).any(dim=1)  # (input pixel, H, W)
    return changed.reshape(height, width, height, width).permute(2, 3, 0, 1)


# --------------------------------------------------------------------------- equivariance


@pytest.mark.parametrize("name", NETWORKS)
def test_circular_shift_equivariance(name):
    net = make(name, "circular")
    step = net.factor if name == "unet" else 1
    x = torch.rand(1, 2, 12, 16, dtype=torch.float64)
    with torch.no_grad():
        y = net(x)
        for a, b in [(1, 0), (0, 3), (5, -7), (15, 23), (-4, 10)]:
            shift = (a * step, b * step)
            shifted = net(torch.roll(x, shift, (2, 3)))
            torch.testing.assert_close(shifted, torch.roll(y, shift, (2, 3)), atol=1e-10, rtol=0)


def test_float32_equivariance():
    torch.manual_seed(1)
    net = ResNet(3, 3, width=8, depth=2, padding="circular")
    x = torch.rand(1, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(
            net(torch.roll(x, (3, -5), (2, 3))), torch.roll(net(x), (3, -5), (2, 3)), atol=1e-5, rtol=0
        )


# --------------------------------------------------------------------------- locality


@pytest.mark.parametrize("padding", ["zeros", "circular"])
@pytest.mark.parametrize("name", ["patchmlp", "resnet"])
def test_locality_is_exact_and_tight(name, padding):
    """The output depends on exactly the pixels within Chebyshev distance rf // 2."""
    net = make(name, padding)
    radius = net.receptive_field // 2
    x = torch.rand(1, 2, 12, 12, dtype=torch.float64)
    changed = single_pixel_changes(net, x)
    for centre in [(6, 5), (1, 10), (0, 0)]:
        window = chebyshev_distance(12, centre, wrap=padding == "circular") <= radius
        assert torch.equal(changed[centre], window)


@pytest.mark.parametrize("padding", ["zeros", "circular"])
@pytest.mark.parametrize("levels, size", [(1, 8), (2, 20)])
def test_unet_locality_upper_bound(levels, size, padding):
    net = make("unet", padding, in_channels=1, out_channels=1, width=2, levels=levels)
    radius = net.receptive_field // 2
    x = torch.rand(1, 1, size, size, dtype=torch.float64)
    changed = single_pixel_changes(net, x)
    reached = 0
    for centre in [(size // 2 - 1, size // 2), (0, size - 1), (size - 1, 1)]:
        distance = chebyshev_distance(size, centre, wrap=padding == "circular")
        assert not changed[centre][distance > radius].any()
        reached = max(reached, int(distance[changed[centre]].max()))
    # the formula is attained for some pixel position modulo the pooling factor
    assert reached == radius


@pytest.mark.parametrize("levels, rf", [(1, 5), (2, 19), (3, 47)])
def test_unet_receptive_field_formula(levels, rf):
    assert UNet2D(1, 1, width=2, levels=levels).receptive_field == rf


# --------------------------------------------------------------------------- padding


@pytest.mark.parametrize("name", NETWORKS)
def test_zero_and_circular_agree_in_interior_only(name):
    zeros, circular = make(name, "zeros"), make(name, "circular")
    circular.load_state_dict(zeros.state_dict())
    radius = zeros.receptive_field // 2
    size = 2 * radius + 8
    x = torch.rand(2, 2, size, size, dtype=torch.float64) + 0.5
    with torch.no_grad():
        y_zeros, y_circular = zeros(x), circular(x)
    interior = (slice(None), slice(None), slice(radius, size - radius), slice(radius, size - radius))
    torch.testing.assert_close(y_zeros[interior], y_circular[interior], atol=1e-12, rtol=0)
    differs = (y_zeros != y_circular).all(dim=1).all(dim=0)
    idx = torch.arange(size)
    to_border = torch.minimum(idx, size - 1 - idx)
    ring = torch.minimum(to_border[:, None], to_border[None, :])
    # the UNet's reach depends on the pixel's position modulo the pooling factor
    rings = 1 if name == "unet" else radius
    assert differs[ring < rings].all()


# --------------------------------------------------------------------------- PatchMLP reference


@pytest.mark.parametrize("padding", ["zeros", "circular"])
def test_patchmlp_matches_explicit_reference(padding):
    torch.manual_seed(3)
    size, P, C = 6, 3, 2
    net = PatchMLP(P, C, 3, hidden=5, depth=3, padding=padding).double()
    x = torch.rand(1, C, size, size, dtype=torch.float64)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    weights = [(c.weight.detach().reshape(c.out_channels, -1), c.bias.detach()) for c in convs]
    expected = torch.empty(1, 3, size, size, dtype=torch.float64)
    for i in range(size):
        for j in range(size):
            patch = torch.zeros(C, P, P, dtype=torch.float64)
            for di in range(P):
                for dj in range(P):
                    u, v = i + di - P // 2, j + dj - P // 2
                    if padding == "circular":
                        patch[:, di, dj] = x[0, :, u % size, v % size]
                    elif 0 <= u < size and 0 <= v < size:
                        patch[:, di, dj] = x[0, :, u, v]
            h = patch.reshape(-1)
            for k, (w, b) in enumerate(weights):
                h = w @ h + b
                if k < len(weights) - 1:
                    h = F.gelu(h)
            expected[0, :, i, j] = h
    with torch.no_grad():
        torch.testing.assert_close(net(x), expected, atol=1e-12, rtol=0)


def test_resnet_residual_and_depth_one():
    torch.manual_seed(0)
    net = ResNet(3, 2, width=4, depth=1)
    assert net.residual and net.receptive_field == 3
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        correction = net.head(F.gelu(net.stem(F.pad(x, (1, 1, 1, 1)))))
        torch.testing.assert_close(net(x), x[:, :2] + correction)
    assert ResNet(1, 3).residual is False


# --------------------------------------------------------------------------- factory / config


@pytest.mark.parametrize("name", NETWORKS)
def test_config_round_trip(name):
    net = make(name, "circular", in_channels=4, out_channels=3)
    config = json.loads(json.dumps(network_config(net)))
    assert config["name"] == name
    rebuilt = build_network(**config).double()
    assert network_config(rebuilt) == config
    rebuilt.load_state_dict(net.state_dict())
    x = torch.rand(1, 4, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), net(x))


def test_factory_classes_and_resnet_patch_size():
    assert isinstance(build_network("patchmlp", in_channels=1, out_channels=1, patch_size=3), PatchMLP)
    assert isinstance(build_network("unet", in_channels=1, out_channels=1), UNet2D)
    net = build_network("resnet", in_channels=1, out_channels=1, patch_size=7)
    assert isinstance(net, ResNet) and net.receptive_field == 7


@pytest.mark.parametrize(
    "kwargs, parameter",
    [
        (dict(name="patchmlp", patch_size=4), "patch_size"),
        (dict(name="patchmlp", patch_size=0), "patch_size"),
        (dict(name="patchmlp", patch_size=-3), "patch_size"),
        (dict(name="patchmlp", patch_size=3.0), "patch_size"),
        (dict(name="patchmlp"), "patch_size"),
        (dict(name="patchmlp", patch_size=3, padding="reflect"), "padding"),
        (dict(name="resnet", padding="same"), "padding"),
        (dict(name="unet", padding=None), "padding"),
        (dict(name="transformer"), "name"),
        (dict(name="patchmlp", patch_size=3, hidden=0), "hidden"),
        (dict(name="patchmlp", patch_size=3, depth=0), "depth"),
        (dict(name="resnet", depth=0), "depth"),
        (dict(name="resnet", width=True), "width"),
        (dict(name="resnet", patch_size=1), "patch_size"),
        (dict(name="resnet", patch_size=6), "patch_size"),
        (dict(name="resnet", patch_size=5, depth=3), "depth"),
        (dict(name="resnet", residual="yes"), "residual"),
        (dict(name="resnet", in_channels=1, out_channels=3, residual=True), "residual"),
        (dict(name="unet", levels=0), "levels"),
        (dict(name="unet", patch_size=1), "patch_size"),
        (dict(name="unet", patch_size=4), "patch_size"),
        (dict(name="unet", patch_size=9, levels=1), "levels"),
        (dict(name="unet", patch_size=5, levels=3), "levels"),
        (dict(name="unet", depth=3), "depth"),
        (dict(name="patchmlp", patch_size=3, in_channels=0), "in_channels"),
        (dict(name="unet", out_channels=0), "out_channels"),
    ],
)
def test_bad_arguments_raise_value_error(kwargs, parameter):
    kwargs = {"in_channels": 1, "out_channels": 1, **kwargs}
    with pytest.raises(ValueError, match=parameter):
        build_network(**kwargs)


def test_network_config_requires_network():
    with pytest.raises(ValueError, match="config"):
        network_config(torch.nn.Linear(2, 2))


# --------------------------------------------------------------------------- receptive field = patch size

PRESET_PATCH_SIZES = (3, 5, 7, 9, 11, 13, 15)  # every P the study presets use (3..11 quick, 5 and 9 full), and more


def at_patch_size(name: str, patch_size: int, padding: str, width: int = 2) -> torch.nn.Module:
    """A small float64 network ``name`` built with receptive field ``patch_size``."""
    torch.manual_seed(0)
    extra = {"hidden": 8} if name == "patchmlp" else {"width": width}
    return build_network(name, in_channels=1, out_channels=1, patch_size=patch_size, padding=padding,
                         **extra).double()


def influence(net, x: torch.Tensor, pixels: list[tuple[int, int]]) -> dict[tuple[int, int], torch.Tensor]:
    """{output pixel: (H, W) bool map of the input pixels its gradient is non-zero at} (summed over
    channels).  Gradients, not finite perturbations: far corners of a deep ResNet contribute ~1e-17, which a
    perturbation of the output loses to rounding but the gradient keeps."""
    x = x.clone().requires_grad_(True)
    out = net(x)
    maps = {}
    for i, j in pixels:
        (grad,) = torch.autograd.grad(out[0, :, i, j].sum(), x, retain_graph=True)
        maps[i, j] = (grad[0] != 0).any(dim=0)
    return maps


def window(size: int, centre: tuple[int, int], patch_size: int, wrap: bool) -> torch.Tensor:
    """(size, size) bool map of the centred ``patch_size`` x ``patch_size`` window (clipped, or on the torus)."""
    return chebyshev_distance(size, centre, wrap) <= patch_size // 2


@pytest.mark.parametrize("padding", ["zeros", "circular"])
@pytest.mark.parametrize("patch_size", PRESET_PATCH_SIZES)
@pytest.mark.parametrize("name", NETWORKS)
def test_receptive_field_equals_patch_size_by_probing(name, patch_size, padding):
    """Perturb every input pixel and record which output pixels change (the network's own
    ``receptive_field`` is not used).  PatchMLP and ResNet: every output pixel depends on exactly its
    centred P x P window (clipped by zero padding, wrapped by circular padding).  U-Net: every output pixel
    depends only on pixels of its centred window, and the union over the pooling phases is the window."""
    net = at_patch_size(name, patch_size, padding)
    size = 2 * patch_size + 4
    wrap = padding == "circular"
    interior = size // 2 - (size // 2) % 4
    phases = [(interior + a, interior + b) for a in range(4) for b in range(4)]
    border = [(0, 0), (1, size - 1), (size - 1, size // 2)]
    changed = influence(net, torch.rand(1, 1, size, size, dtype=torch.float64), phases + border)
    for centre in phases + border:
        expected = window(size, centre, patch_size, wrap)
        if name == "unet":
            assert not changed[centre][~expected].any(), centre
        else:
            assert torch.equal(changed[centre], expected), centre
    # union over pooling phases of the offsets reached from interior pixels = the centred window
    p = patch_size // 2
    union = torch.zeros(2 * p + 1, 2 * p + 1, dtype=torch.bool)
    for i, j in phases:
        union |= changed[i, j][i - p: i + p + 1, j - p: j + p + 1]
    assert union.all()


def test_unet_pixel_sees_an_even_window():
    """Two levels: each interior output pixel depends on a (P-1) x (P-1) block of its P x P window (the
    side it misses depends on its position modulo 2) -- no pixel sees the whole window."""
    for patch_size in (3, 5, 9):
        net = at_patch_size("unet", patch_size, "circular")
        size = 2 * patch_size + 4
        c = size // 2 - (size // 2) % 2
        changed = influence(net, torch.rand(1, 1, size, size, dtype=torch.float64),
                            [(c + a, c + b) for a in range(2) for b in range(2)])
        for a in range(2):
            for b in range(2):
                rows, cols = changed[c + a, c + b].nonzero().unbind(1)
                assert int(changed[c + a, c + b].sum()) == (patch_size - 1) ** 2
                assert int(rows.max() - rows.min()) == int(cols.max() - cols.min()) == patch_size - 2


@pytest.mark.parametrize("name", NETWORKS)
def test_receptive_field_attribute(name):
    for patch_size in PRESET_PATCH_SIZES:
        net = build_network(name, in_channels=1, out_channels=1, patch_size=patch_size)
        assert net.receptive_field == patch_size


def test_unet_architecture_rule():
    # levels: 2 up to P = 19 (every conv 3x3 at 19, the classic two-level U-Net), 3 from 21 to 47
    assert unet_kernels(3) == (2, ((1, 1, 1, 1), (1, 1)))
    assert unet_kernels(5) == (2, ((3, 1, 1, 1), (1, 1)))
    assert unet_kernels(11) == (2, ((1, 1, 1, 1), (3, 3)))
    assert unet_kernels(19) == (2, ((3, 3, 3, 3), (3, 3))) == unet_kernels(None)
    assert unet_kernels(21)[0] == 3 and unet_kernels(47) == unet_kernels(None, 3)
    assert unet_kernels(49)[0] == 4
    for patch_size in range(3, 100, 2):
        assert UNet2D(1, 1, width=1, patch_size=patch_size).receptive_field == patch_size
    # an explicit number of levels works over its whole range
    for patch_size in range(7, 48, 2):
        assert UNet2D(1, 1, width=1, levels=3, patch_size=patch_size).receptive_field == patch_size


def test_unet_old_config_rebuilds_classic_net():
    """A checkpoint config written before ``patch_size`` existed still builds the all-3x3 U-Net."""
    old = {"name": "unet", "in_channels": 1, "out_channels": 1, "width": 2, "levels": 2, "padding": "zeros"}
    net = build_network(**old)
    assert net.receptive_field == 19 and net.kernels == unet_kernels(None)[1]


@pytest.mark.parametrize("padding", ["zeros", "circular"])
def test_unet_any_image_size(padding):
    """Sizes not divisible by the pooling factor (e.g. 25x25 faces): the output keeps the size and every
    pixel still depends only on its centred window."""
    net = at_patch_size("unet", 7, padding)
    for height, width in [(13, 13), (9, 14)]:
        x = torch.rand(1, 1, height, width, dtype=torch.float64)
        assert net(x).shape == x.shape
    centres = [(6, 6), (0, 12), (12, 1), (5, 2)]
    changed = influence(net, torch.rand(1, 1, 13, 13, dtype=torch.float64), centres)
    for centre in centres:
        assert not changed[centre][~window(13, centre, 7, padding == "circular")].any()


# --------------------------------------------------------------------------- shift equivariance by one pixel


@pytest.mark.parametrize("patch_size", (3, 5, 7))
@pytest.mark.parametrize("name", NETWORKS)
def test_shift_by_one_pixel(name, patch_size):
    """Circular padding: PatchMLP and ResNet commute with a 1-pixel shift exactly; the U-Net commutes with
    shifts by its pooling factor and not with a 1-pixel shift."""
    net = at_patch_size(name, patch_size, "circular", width=4)
    x = torch.rand(2, 1, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        y = net(x)
        for shift in [(1, 0), (0, 1), (1, 1)]:
            shifted = net(torch.roll(x, shift, (2, 3)))
            if name == "unet":
                assert (shifted - torch.roll(y, shift, (2, 3))).abs().max() > 1e-8  # rounding: < 1e-14
            else:
                torch.testing.assert_close(shifted, torch.roll(y, shift, (2, 3)), atol=1e-12, rtol=0)
        if name == "unet":
            step = net.factor
            torch.testing.assert_close(net(torch.roll(x, (step, -step), (2, 3))),
                                       torch.roll(y, (step, -step), (2, 3)), atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", NETWORKS)
def test_make_network_uses_patch_size(name):
    """Training builds every network, the U-Net included, with the LE-MMSE's receptive field."""
    from lemmse_ray.runs.config import Config
    from lemmse_ray.core.problems import Denoising
    from lemmse_ray.runs.training import make_network

    for patch_size in (3, 9):
        cfg = Config(patch_size=patch_size, width=2, hidden=4, padding="circular")
        net = make_network(cfg, name, 1, Denoising())
        assert net.receptive_field == patch_size and net.config["padding"] == "circular"
