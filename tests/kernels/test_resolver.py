"""The kernel resolver (lemmse_ray.kernels.resolver): which backend evaluates each class, and the one error that
lists every backend's reasons when a request cannot be honoured; ``kernel`` in Config, flags and the Ray path."""
from __future__ import annotations

import importlib

import pytest
import torch

import lemmse_ray as lm
from lemmse_ray import cli
from lemmse_ray.core.classes import plan_classes
from lemmse_ray.core.patches import PatchGeometry
from lemmse_ray.kernels import epilogue, resolver
from lemmse_ray.kernels.resolver import Choice, KernelUnavailable, image_class, resolve
from lemmse_ray.runs.config import Config, ConfigError

F32, F64 = torch.float32, torch.float64


def plan(problem=None, padding="zeros", size=6, patch_size=3):
    return plan_classes(problem or lm.Denoising(), PatchGeometry((1, size, size), patch_size, padding, "all"))


def backends(choices: dict) -> dict[int, str]:
    return {c: choice.backend for c, choice in choices.items()}


def test_zero_padding_denoising_in_memory():
    """Nine classes under zero padding with P = 3 (the interior and eight border patterns): the interior is the
    one the sliding kernel evaluates; the borders use the matrix product."""
    p = plan()
    assert p.n_classes == 9
    interior = image_class(p, F32)
    assert interior is not None and sorted(p.positions(interior)) == [r * 6 + c for r in range(1, 5)
                                                                     for c in range(1, 5)]
    others = {c: "torch" for c in range(9) if c != interior}
    for kernel in ("auto", "sliding"):
        chosen = resolve(kernel, p, dtype=F32, device="cpu", images=interior)
        assert backends(chosen) == {**others, interior: "sliding"}
    assert set(backends(resolve("torch", p, dtype=F32, device="cpu", images=interior)).values()) == {"torch"}
    # top-k: the sliding kernel keeps none, so auto uses the matrix product everywhere
    assert set(backends(resolve("auto", p, dtype=F32, device="cpu", stats=("topk",), images=interior)).values()) \
        == {"torch"}
    # Triton (here in its interpreter, as the test session sets TRITON_INTERPRET=1) for every class
    assert set(backends(resolve("triton", p, dtype=F32, device="cpu", images=interior)).values()) == {"triton"}


def test_image_class_needs_float32_and_a_sliding_implementation(monkeypatch):
    """float32; on the CPU the compiled kernel, on CUDA the Triton one (test_triton_sliding.py checks the latter)."""
    p = plan()
    assert image_class(p, F64) is None
    assert image_class(plan(lm.Inpainting(keep_prob=0.5, input="adjoint")), F32) is None  # masked kind
    assert image_class(p, F32, "cuda", sliding_variant="compiled") is None  # the C kernel runs on the CPU
    monkeypatch.setattr(resolver, "triton_installed", lambda: False)
    assert image_class(p, F32, "cuda") is None


def test_auto_on_cuda_takes_triton_for_matrix_products_only():
    """On a CUDA device (only named here: nothing runs) auto takes Triton for the matrix-product kinds; the mixture
    kind and top-k stay on torch, whose epilogue is then pure torch (the compiled one is CPU only)."""
    cuda = torch.device("cuda")
    assert set(backends(resolve("auto", plan(), dtype=F32, device=cuda)).values()) == {"triton"}
    assert set(backends(resolve("auto", plan(), dtype=F64, device=cuda)).values()) == {"torch"}
    mixture = plan(lm.Inpainting(keep_prob=0.5, input="direct"))
    assert mixture.kind == "mixture"
    assert set(resolve("auto", mixture, dtype=F32, device=cuda).values()) == {Choice("torch", "torch")}
    assert set(resolve("triton", mixture, dtype=F32, device=cuda).values()) == {Choice("torch", "torch")}
    assert set(resolve("auto", plan(), dtype=F32, device=cuda, stats=("topk",)).values()) == {Choice("torch")}


def test_epilogue_choice(monkeypatch):
    p = plan()
    assert set(resolve("torch", p, dtype=F64, device="cpu").values()) == {Choice("torch", "torch")}
    if epilogue.load() is not None:  # a C compiler is present (CI): float32 on the CPU takes the compiled one
        assert set(resolve("torch", p, dtype=F32, device="cpu").values()) == {Choice("torch", "compiled")}
    monkeypatch.setattr(epilogue, "load", lambda: None)  # as without a compiler
    assert set(resolve("torch", p, dtype=F32, device="cpu").values()) == {Choice("torch", "torch")}
    with pytest.raises(ValueError, match="epilogue='compiled' needs"):
        resolver.epilogue_library("compiled", F32, "cpu")
    with pytest.raises(ValueError, match="epilogue must be one of"):
        resolver.epilogue_library("fast", F32, "cpu")


def test_refusal_lists_every_backend():
    with pytest.raises(KernelUnavailable) as info:
        resolve("sliding", plan(), dtype=F64, device="cpu", stats=("variance", "topk"))
    message = str(info.value)
    assert message.startswith("kernel='sliding' needs what this run lacks: sliding: ")
    for reason in ("computes in float32 only (dtype torch.float64)", "keeps no top-k rows", "torch: available",
                   "triton: computes in float32 only"):
        assert reason in message, message
    assert "\n" not in message


def test_sliding_refusals(monkeypatch):
    p = plan()
    with pytest.raises(KernelUnavailable, match="holds no images"):  # a bank built without the sliding kernel
        resolve("sliding", p, dtype=F32, device=None)
    # the driver of Ray actors (device unknown) names the class the actors' parts hold as images
    chosen = backends(resolve("sliding", p, dtype=F32, device=None, images=image_class(p, F32, None)))
    assert chosen[image_class(p, F32)] == "sliding" and set(chosen.values()) == {"sliding", "torch"}, chosen
    assert image_class(p, F32, None) == image_class(p, F32, "cpu") is not None
    assert image_class(p, F64, None) is None
    with pytest.raises(KernelUnavailable, match="whitened by a multiple of the identity"):
        resolve("sliding", plan(lm.Inpainting(keep_prob=0.5, input="adjoint")), dtype=F32, device="cpu")
    with pytest.raises(KernelUnavailable, match="runs on the CPU, not cuda"):  # the compiled kernel, asked for
        resolve("sliding", p, dtype=F32, device="cuda", images=image_class(p, F32),
                sliding_variant="compiled")
    monkeypatch.setattr(resolver, "triton_installed", lambda: False)  # on CUDA, the Triton one needs triton
    with pytest.raises(KernelUnavailable, match="runs on the CPU, not cuda .on CUDA the Triton sliding kernel needs "
                                                "the triton package"):
        resolve("sliding", p, dtype=F32, device="cuda", images=image_class(p, F32))
    with pytest.raises(ValueError, match="kernel must be one of"):
        resolve("fast", p, dtype=F32, device="cpu")


def test_device_unknown_leaves_machine_checks_to_the_workers(monkeypatch):
    """``device=None`` (the driver of Ray actors): Triton's package and device are checked where the actors run."""
    monkeypatch.setattr(resolver, "triton_installed", lambda: False)
    assert set(backends(resolve("triton", plan(), dtype=F32, device=None)).values()) == {"triton"}
    with pytest.raises(KernelUnavailable, match="triton package"):
        resolve("triton", plan(), dtype=F32, device="cpu")
    with pytest.raises(KernelUnavailable, match="float32 only"):
        resolve("triton", plan(), dtype=F64, device=None)


def test_config_kernel_field():
    assert Config().kernel == "auto"
    assert Config(kernel="sliding").kernel == "sliding"
    with pytest.raises(ConfigError, match="kernel must be one of"):
        Config(kernel="fast")
    with pytest.raises(ConfigError, match="^kernel computes in float32 only"):
        Config(kernel="triton", dtype="float64")


def test_cli_kernel_flag_refuses_sliding_on_ray_before_anything(tmp_path, monkeypatch, capsys):
    """``--kernel sliding`` that the actors could not run (top-k rows asked for): one line naming the backend's
    reason, exit 2, before Ray starts and before anything is written."""
    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started before the kernel was validated")

    # the modules that bind ensure_ray when imported are imported before any patch, then patched too: imported
    # while the session's was patched, they would keep the fake for the rest of the test session (a later Ray
    # test would fail with this AssertionError)
    modules = [importlib.import_module(f"lemmse_ray.{name}") for name in
               ("cluster.session", "cluster.build", "cluster.driver", "studies.engine")]
    for module in modules:
        monkeypatch.setattr(module, "ensure_ray", no_ray)
    out = tmp_path / "out"
    argv = ["estimate", "--dataset", "digits", "--n-train", "20", "--n-queries", "1", "--stats", "topk",
            "--kernel", "sliding", "--out", str(out)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lemmse: error: kernel='sliding' needs what this run lacks: sliding: ") \
        and err.count("\n") == 1, err
    assert "keeps no top-k rows" in err and "torch: available" in err
    assert not out.exists()
    assert cli.main([*argv[:-3], "fast", "--out", str(out)]) == 2
    assert "--kernel must be one of" in capsys.readouterr().err
