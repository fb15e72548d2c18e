"""Kernels that turn query and key features into partials: the torch matrix-product and mixture kernels,
the compiled CPU epilogue, the sliding-window kernel (compiled C on the CPU, Triton on CUDA), the Triton kernel,
the C build cache they share, and the one resolver (:mod:`lemmse_ray.kernels.resolver`) that decides which
backend evaluates each class.
"""
