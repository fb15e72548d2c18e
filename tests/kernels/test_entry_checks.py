"""The compiled kernels' entry points check their arguments before the C call (issue 16, item 8), and the
default kernel falls back above the sliding kernel's channel limit (item 9).

Every bad call below, made before these checks, ran the C code on the wrong buffers: it read past them (NaN or
garbage in the result) or wrote through a pointer of another type.  Each must now raise a ValueError naming
the argument, before the C call.
"""
from __future__ import annotations

import dataclasses
import re

import pytest
import torch

import lemmse_ray as lm
from lemmse_ray.core.classes import plan_classes
from lemmse_ray.core.patches import PatchGeometry
from lemmse_ray.kernels import epilogue, sliding
from lemmse_ray.kernels.resolver import KernelUnavailable, image_class, resolve
from lemmse_ray.kernels.torch_kernels import matmul_partials, mixture_partials

F32 = torch.float32


@pytest.fixture(scope="module", autouse=True)
def private_cache(tmp_path_factory):
    """Libraries built by this module go to a private cache, not the shared default one."""
    patch = pytest.MonkeyPatch()
    patch.setenv("LEMMSE_RAY_CACHE", str(tmp_path_factory.mktemp("cache")))
    yield
    patch.undo()


def images(n, channels=1, size=8, seed=0):
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- the sliding kernel ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def rows(private_cache) -> sliding.SlidingRows:
    if sliding.load() is None:
        pytest.skip("no compiled sliding kernel here (no C compiler)")
    bank = lm.PatchBank(images(6), lm.Denoising(), patch_size=3)
    assert bank.sliding is not None
    return bank.sliding


def test_valid_sliding_call(rows):
    part = sliding.sliding_partials(rows, images(2, seed=1), 0.2, ("variance",), threads=1, max_floats=64)
    assert part.o.shape == (2 * 36, 1) and bool(torch.isfinite(part.o).all())


def _with(rows, **changes):
    return dataclasses.replace(rows, **changes)


BAD_SLIDING = {
    "z with 30 channels against a 1-channel bank": (lambda r: (r, images(1, 30)), {}, "z"),
    "z not (B, C, H, W)": (lambda r: (r, images(1)[0]), {}, "z"),
    "z not a tensor": (lambda r: (r, images(1).numpy()), {}, "z"),
    "z on another device": (lambda r: (r, torch.empty(1, 1, 8, 8, device="meta")), {}, "z"),
    "z smaller than a patch": (lambda r: (r, images(1, size=2)), {}, "z"),
    "keys in float64": (lambda r: (_with(r, keys=r.keys.double()), images(1)), {}, "rows.keys"),
    "keys not contiguous": (lambda r: (_with(r, keys=r.keys.transpose(2, 3)), images(1)), {}, "rows.keys"),
    "keys not 5-D": (lambda r: (_with(r, keys=r.keys[0]), images(1)), {}, "rows.keys"),
    "values of another shape": (lambda r: (_with(r, values=r.values[:, :, 1:].contiguous()), images(1)), {},
                                "rows.values"),
    "values in float64": (lambda r: (_with(r, values=r.values.double()), images(1)), {}, "rows.values"),
    "more images than the lanes hold": (lambda r: (_with(r, n_images=r.keys.shape[0] * r.keys.shape[-1] + 1),
                                                   images(1)), {}, "rows.n_images"),
    "a patch larger than the images": (lambda r: (_with(r, patch_size=11), images(1)), {}, "rows.patch_size"),
    "31 channels": (lambda r: (_with(r, keys=r.keys.repeat(1, 31, 1, 1, 1), values=r.values.repeat(1, 31, 1, 1, 1)),
                               images(1, 31)), {}, "rows.keys has 31 channels: the sliding kernel handles at most 30"),
    "sigma zero": (lambda r: (r, images(1)), {"sigma": 0.0}, "sigma"),
    "negative threads": (lambda r: (r, images(1)), {"threads": -1}, "threads"),
    "no room for one image": (lambda r: (r, images(1)), {"max_floats": 0}, "max_floats"),
}


@pytest.mark.parametrize("case", list(BAD_SLIDING))
def test_bad_sliding_call_is_refused(rows, case):
    make, kwargs, name = BAD_SLIDING[case]
    bank_rows, z = make(rows)
    with pytest.raises(ValueError, match="^" + re.escape(name)):
        sliding.sliding_partials(bank_rows, z, kwargs.pop("sigma", 0.2), **kwargs)


# --- the epilogue ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lib(private_cache):
    library = epilogue.load()
    if library is None:
        pytest.skip("no compiled epilogue here (no C compiler)")
    return library


def epilogue_args(rows=4, cols=64, channels=3):
    g = torch.Generator().manual_seed(2)
    return {"s": torch.randn(rows, cols, generator=g), "values_t": torch.rand(channels, cols, generator=g),
            "m": torch.full((rows,), float("-inf")), "acc": torch.zeros(rows, 2 * channels + 1),
            "want_var": True, "l2": torch.zeros(rows), "ls": torch.zeros(rows)}


def test_valid_epilogue_call_on_views(lib):
    """Row-strided views (a block of a wider logits or values matrix) are valid and give the numbers of their
    contiguous copies."""
    args = epilogue_args()
    wide_s, wide_v = torch.randn(4, 100), torch.rand(3, 100)
    wide_s[:, :64], wide_v[:, :64] = args["s"], args["values_t"]
    epilogue.epilogue(lib, **args)
    views = {**epilogue_args(), "s": wide_s[:, :64], "values_t": wide_v[:, :64]}
    epilogue.epilogue(lib, **views)
    for name in ("m", "acc", "l2", "ls"):
        assert torch.equal(args[name], views[name]), name
    assert bool(torch.isfinite(args["acc"]).all())


BAD_EPILOGUE = {
    "fewer value columns than logit columns": ({"values_t": lambda a: a["values_t"][:, :16]}, "values_t"),
    "float64 logits": ({"s": lambda a: a["s"].double()}, "s"),
    "float64 values": ({"values_t": lambda a: a["values_t"].double()}, "values_t"),
    "float64 running max": ({"m": lambda a: a["m"].double()}, "m"),
    "float64 sums": ({"acc": lambda a: a["acc"].double()}, "acc"),
    "float64 ls": ({"ls": lambda a: a["ls"].double()}, "ls"),
    "logits without unit stride": ({"s": lambda a: a["s"].T.contiguous().T}, "s"),
    "values without unit stride": ({"values_t": lambda a: a["values_t"].T.contiguous().T}, "values_t"),
    "sums not contiguous": ({"acc": lambda a: a["acc"].T.contiguous().T}, "acc"),
    "sums too narrow for the variance": ({"acc": lambda a: a["acc"][:, :4].contiguous()}, "acc"),
    "running max too short": ({"m": lambda a: a["m"][:2]}, "m"),
    "l2 too short": ({"l2": lambda a: a["l2"][:2]}, "l2"),
    "logits not 2-D": ({"s": lambda a: a["s"][None]}, "s"),
    "logits on another device": ({"s": lambda a: torch.empty(4, 64, device="meta")}, "s"),
    "values not a tensor": ({"values_t": lambda a: a["values_t"].numpy()}, "values_t"),
}


@pytest.mark.parametrize("case", list(BAD_EPILOGUE))
def test_bad_epilogue_call_is_refused(lib, case):
    changes, name = BAD_EPILOGUE[case]
    args = epilogue_args()
    untouched = {k: v.clone() for k, v in args.items() if isinstance(v, torch.Tensor)}
    args.update({key: change(args) for key, change in changes.items()})
    with pytest.raises(ValueError, match=rf"^{re.escape(name)}\b"):
        epilogue.epilogue(lib, **args)
    for key in ("m", "acc"):  # refused before the C call: nothing was written
        if key not in changes:
            assert torch.equal(args[key], untouched[key]), key


# --- the torch kernels' entry points, whose blocks reach the compiled epilogue ---------------------------------

def matmul_args(rows=4096, features=3, channels=1, queries=2):
    g = torch.Generator().manual_seed(4)
    return {"q_feat": torch.randn(queries, features, generator=g), "k_feat": torch.randn(rows, features, generator=g),
            "values": torch.rand(rows, channels, generator=g), "shift": torch.zeros(queries)}


BAD_MATMUL = {
    "fewer value rows than key rows": ({"values": lambda a: a["values"][:16]}, "values"),
    "float64 queries with float32 keys": ({"q_feat": lambda a: a["q_feat"].double()}, "k_feat"),
    "float64 values": ({"values": lambda a: a["values"].double()}, "values"),
    "keys of another width": ({"k_feat": lambda a: a["k_feat"][:, :2]}, "k_feat"),
    "one shift too few": ({"shift": lambda a: a["shift"][:1]}, "shift"),
    "row ids of another length": ({"row_ids": lambda a: torch.arange(7)}, "row_ids"),
    "integer queries": ({"q_feat": lambda a: torch.ones(2, 3, dtype=torch.int64),
                         "k_feat": lambda a: torch.ones(4096, 3, dtype=torch.int64),
                         "values": lambda a: torch.ones(4096, 1, dtype=torch.int64),
                         "shift": lambda a: torch.ones(2, dtype=torch.int64)}, "q_feat"),
}


@pytest.mark.parametrize("case", list(BAD_MATMUL))
def test_bad_matmul_call_is_refused(case):
    """The matrix product's entry point with operands that do not agree (before these checks, fewer value rows
    than key rows made the compiled epilogue read past the values)."""
    changes, name = BAD_MATMUL[case]
    args = matmul_args()
    args.update({key: change(args) for key, change in changes.items()})
    with pytest.raises(ValueError, match=rf"^{re.escape(name)}\b"):
        matmul_partials(**args)


def test_bad_mixture_call_is_refused():
    g = torch.Generator().manual_seed(5)
    q, k = torch.rand(2, 9, 1, generator=g), torch.rand(300, 9, 1, generator=g)
    good = mixture_partials(q, k, torch.rand(300, 1, generator=g), torch.zeros(2), 0.5, 0.2)
    assert bool(torch.isfinite(good.o).all())
    with pytest.raises(ValueError, match=r"^values\b"):
        mixture_partials(q, k, torch.rand(30, 1, generator=g), torch.zeros(2), 0.5, 0.2)
    with pytest.raises(ValueError, match=r"^k_pix\b"):
        mixture_partials(q, k[:, :4], torch.rand(300, 1, generator=g), torch.zeros(2), 0.5, 0.2)


# --- item 9: above 30 channels, auto falls back ----------------------------------------------------------------

def _plan(channels):
    return plan_classes(lm.Denoising(), PatchGeometry((channels, 6, 6), 3, "zeros", "all"))


def test_auto_falls_back_to_the_matrix_product_above_the_channel_limit():
    """A 31-channel denoising bank: ``kernel="auto"`` gives the numbers of ``kernel="torch"``."""
    train, z = images(6, 31, 6), images(1, 31, 6, seed=3)
    runs = [lm.estimate(train, z, lm.Denoising(), sigma=0.2, patch_size=3, stats=("variance", "ess"), kernel=k)
            for k in ("auto", "torch")]
    for name in ("mean", "variance", "ess"):
        assert torch.equal(getattr(runs[0], name), getattr(runs[1], name)), name
    assert runs[0].info["sliding_class"] is None


def test_explicit_sliding_above_the_channel_limit_names_the_reason():
    if sliding.load() is None:
        pytest.skip("no compiled sliding kernel here (no C compiler)")
    assert image_class(_plan(30), F32) is not None
    assert image_class(_plan(31), F32) is None
    with pytest.raises(KernelUnavailable, match="sliding: handles at most 30 channels"):
        resolve("sliding", _plan(31), dtype=F32, device="cpu")
    with pytest.raises(KernelUnavailable, match="at most 30 channels"):
        lm.estimate(images(6, 31, 6), images(1, 31, 6), lm.Denoising(), sigma=0.2, patch_size=3, kernel="sliding")
