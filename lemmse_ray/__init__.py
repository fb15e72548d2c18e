"""lemmse_ray — exact Local-Equivariant MMSE estimators for imaging inverse problems, at cluster scale.

In memory::

    import lemmse_ray as lm
    problem = lm.Denoising()
    y, z, mask = problem.measure(x, sigma=0.1, generator=torch.Generator().manual_seed(0))
    res = lm.estimate(train, z, problem, sigma=0.1, patch_size=5)
    res.mean  # (B, C, H, W)
"""
from .bank.memory import PatchBank, estimate
from .core.partials import Partials, merge
from .core.problems import (Deblurring, Denoising, Inpainting, LinearInverseProblem, Problem, from_physics,
                            gaussian_kernel)
from .core.statistics import Result, finalize
from .core.version import __version__

__all__ = ["Deblurring", "Denoising", "Inpainting", "LinearInverseProblem", "Partials", "PatchBank", "Problem", "Result",
           "__version__", "estimate", "finalize", "from_physics", "gaussian_kernel", "merge"]
