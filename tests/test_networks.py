"""Tests for lemmse_ray.networks: equivariance, exact locality, padding, reference, factory."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lemmse_ray.networks import (
    NETWORKS,
    PatchMLP,
    ResNet,
    UNet2D,
    build_network,
    network_config,
)

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


def test_unet_rejects_indivisible_size():
    net = UNet2D(1, 1, width=2, levels=3)
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.rand(1, 1, 16, 18))


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
        (dict(name="unet", patch_size=5), "patch_size"),
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
