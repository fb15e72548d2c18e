"""Brute-force float64 reference for the exact LE-MMSE estimators.

Written from the mathematics of ``docs/theory.md``, independently of the package's code: it imports NOTHING
from ``lemmse_ray``, builds every operator as an explicit matrix and loops over queries, rows and (agnostic
random masks) mask patterns.  The tests compare the library against this file, so the two must stay
independent.  What it implements, by section of ``docs/theory.md``:

* §1 Setting: the measurement ``y = A x + sigma e`` (identity, pixel mask, circular blur, or any function
  given as a callable), the input ``z = B y`` (direct, adjoint, thresholded pseudo-inverse, Tikhonov), and the patch
  ``Pi_k`` under the boundary rule (``zeros`` or ``circular``);
* §2 The estimator: the mixture over every (training image, position) pair, component
  ``N(p; Pi_j B A x_i, sigma^2 S_j)`` with ``S_j = Pi_j B B^T Pi_j^T``; for random masks the aware form
  (likelihood of the kept pixels times the mask prior) and the agnostic one (the per-pixel two-term
  mixture, here summed over every mask pattern of the patch);
* §3 The class rule, without forming classes: each component's support is found from the
  eigen-decomposition of ``S_j`` (pseudo-inverse and pseudo-determinant on it) and, among the components
  whose support holds the query, only those of the smallest dimension count; for aware random masks, rows
  of every border pattern compete, each with its own mask prior (a kept pixel on padding has probability 0);
* §4 Statistics: mean, variance, ess, max_weight, entropy, log_evidence and the top-k rows of one query,
  from its normalised weights;
* §6, a patch that covers the whole image: :func:`global_mmse`, the global empirical MMSE of denoising.

Conventions (the layout of the library's inputs and outputs)
-------------------------------------------------------------
* Images are (C, H, W); a flattened image uses index ``(c*H + u)*W + v``.
* The patch ``Pi_k z`` at pixel k = (r, c) is C x P x P flattened in (channel, row, col)
  order; patch coordinate (ch, a, b) <-> pixel (r + a - P//2, c + b - P//2).
  "zeros": out-of-image coordinates are exactly 0 (zero rows of Pi);
  "circular": coordinates wrap modulo (H, W).
* Position index of pixel (r, c) is r*W + c.

Everything here is float64 numpy and only meant for tiny problems (n = C*H*W <= ~100).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

LOG2PI = math.log(2.0 * math.pi)


# --------------------------------------------------------------------------------------
# indexing, patches, candidates
# --------------------------------------------------------------------------------------
def flat_index(ch: int, u: int, v: int, H: int, W: int) -> int:
    return (ch * H + u) * W + v


def patch_pixels(H: int, W: int, P: int, r: int, c: int, padding: str):
    """Image pixel (u, v) of each patch pixel (a, b) in row-major (a, b) order, or None
    when the patch pixel lies outside the image under zero padding."""
    h = P // 2
    out = []
    for a in range(P):
        for b in range(P):
            u, v = r + a - h, c + b - h
            if padding == "zeros":
                out.append((u, v) if (0 <= u < H and 0 <= v < W) else None)
            elif padding == "circular":
                out.append((u % H, v % W))
            else:
                raise ValueError(f"unknown padding {padding!r}")
    return out


def patch_matrix(C: int, H: int, W: int, P: int, r: int, c: int, padding: str) -> np.ndarray:
    """Explicit selection matrix Pi (C*P*P x C*H*W) of the patch centred at (r, c)."""
    pix = patch_pixels(H, W, P, r, c, padding)
    Pi = np.zeros((C * P * P, C * H * W))
    for ch in range(C):
        for t, uv in enumerate(pix):
            if uv is not None:
                Pi[ch * P * P + t, flat_index(ch, uv[0], uv[1], H, W)] = 1.0
    return Pi


def padded_pixels(H: int, W: int, P: int, r: int, c: int, padding: str) -> np.ndarray:
    """Boolean (P*P,): which patch pixels are outside the image (always False for circular)."""
    return np.array([uv is None for uv in patch_pixels(H, W, P, r, c, padding)], dtype=bool)


def candidate_positions(H: int, W: int, P: int, padding: str, candidates: str):
    h = P // 2
    if candidates == "all":
        return [(r, c) for r in range(H) for c in range(W)]
    if candidates == "interior":
        assert padding == "circular"
        return [(r, c) for r in range(H) for c in range(W) if h <= r < H - h and h <= c < W - h]
    raise ValueError(f"unknown candidates {candidates!r}")


# --------------------------------------------------------------------------------------
# explicit operator matrices
# --------------------------------------------------------------------------------------
def conv_matrix(kernel: np.ndarray, C: int, H: int, W: int) -> np.ndarray:
    """Circular convolution written literally:
    (A x)[c,u,v] = sum_{a,b} h[a,b] x[c, (u - a + kh//2) mod H, (v - b + kw//2) mod W]."""
    h = np.asarray(kernel, dtype=np.float64)
    kh, kw = h.shape
    n = C * H * W
    A = np.zeros((n, n))
    for ch in range(C):
        for u in range(H):
            for v in range(W):
                row = flat_index(ch, u, v, H, W)
                for a in range(kh):
                    for b in range(kw):
                        col = flat_index(ch, (u - a + kh // 2) % H, (v - b + kw // 2) % W, H, W)
                        A[row, col] += h[a, b]
    return A


def dft_matrix(n: int) -> np.ndarray:
    k = np.arange(n)
    return np.exp(-2j * np.pi * np.outer(k, k) / n)


def dft2_matrix(H: int, W: int) -> np.ndarray:
    """Explicit 2-D DFT acting on a row-major flattened (H, W) array."""
    return np.kron(dft_matrix(H), dft_matrix(W))


def kernel_spectrum(kernel: np.ndarray, H: int, W: int) -> np.ndarray:
    """h-hat: DFT2 of h placed in an H x W array with its centre (kh//2, kw//2) at (0, 0)."""
    h = np.asarray(kernel, dtype=np.float64)
    kh, kw = h.shape
    hpad = np.zeros((H, W))
    for a in range(kh):
        for b in range(kw):
            hpad[(a - kh // 2) % H, (b - kw // 2) % W] += h[a, b]
    return (dft2_matrix(H, W) @ hpad.reshape(-1)).reshape(H, W)


def spectral_matrix(bhat: np.ndarray, C: int, H: int, W: int) -> np.ndarray:
    """B = real(F^-1 diag(bhat) F), applied independently to each channel."""
    F = dft2_matrix(H, W)
    Finv = F.conj().T / (H * W)
    M = Finv @ np.diag(np.asarray(bhat).reshape(-1)) @ F
    assert np.abs(M.imag).max() < 1e-9 * max(1.0, np.abs(M.real).max()), "spectrum not Hermitian"
    return np.kron(np.eye(C), M.real)


def mask_matrix(mask: np.ndarray, C: int) -> np.ndarray:
    m = np.asarray(mask, dtype=np.float64).reshape(-1)
    return np.diag(np.tile(m, C))


# --------------------------------------------------------------------------------------
# problem description (plain data, no library objects)
# --------------------------------------------------------------------------------------
@dataclass
class RefProblem:
    """kind: "denoising" | "inpainting" (fixed mask) | "deblurring" | "random_inpainting" |
    "generic".  input: "direct" | "adjoint" | "pinv" | "tikhonov"."""

    kind: str
    input: str = "direct"
    mask: Optional[np.ndarray] = None          # (H, W) fixed inpainting mask
    kernel: Optional[np.ndarray] = None        # (kh, kw) blur kernel
    keep_prob: Optional[float] = None          # random inpainting
    reg: float = 0.01
    threshold: float = 0.05
    forward_fn: Optional[Callable[[np.ndarray], np.ndarray]] = None   # generic, on (C,H,W)
    input_fn: Optional[Callable[[np.ndarray], np.ndarray]] = None     # generic, linear, on (C,H,W)
    extra: dict = field(default_factory=dict)

    # forward operator ---------------------------------------------------------------
    def forward_matrix(self, C, H, W) -> np.ndarray:
        n = C * H * W
        if self.kind == "denoising":
            return np.eye(n)
        if self.kind == "inpainting":
            return mask_matrix(self.mask, C)
        if self.kind == "deblurring":
            return conv_matrix(self.kernel, C, H, W)
        raise ValueError(self.kind)

    def forward_apply(self, x: np.ndarray) -> np.ndarray:
        C, H, W = x.shape
        if self.kind == "generic":
            return np.asarray(self.forward_fn(x), dtype=np.float64)
        return (self.forward_matrix(C, H, W) @ x.reshape(-1)).reshape(C, H, W)

    # input operator -----------------------------------------------------------------
    def input_matrix(self, C, H, W) -> np.ndarray:
        n = C * H * W
        mode = self.input
        if self.kind == "generic":
            if self.input_fn is None:
                return np.eye(n)
            cols = []
            for t in range(n):
                e = np.zeros(n)
                e[t] = 1.0
                cols.append(np.asarray(self.input_fn(e.reshape(C, H, W)), dtype=np.float64).reshape(-1))
            return np.stack(cols, axis=1)
        if mode == "direct":
            return np.eye(n)
        if self.kind == "denoising":
            if mode in ("adjoint", "pinv"):
                return np.eye(n)
            if mode == "tikhonov":
                return np.eye(n) / (1.0 + self.reg)
        if self.kind == "inpainting":
            if mode in ("adjoint", "pinv"):
                return mask_matrix(self.mask, C)
            if mode == "tikhonov":
                return mask_matrix(self.mask, C) / (1.0 + self.reg)
        if self.kind == "deblurring":
            hh = kernel_spectrum(self.kernel, H, W)
            if mode == "adjoint":
                bhat = np.conj(hh)
            elif mode == "pinv":
                bhat = np.zeros_like(hh)
                keep = np.abs(hh) > self.threshold
                bhat[keep] = 1.0 / hh[keep]
            elif mode == "tikhonov":
                bhat = np.conj(hh) / (np.abs(hh) ** 2 + self.reg)
            else:
                raise ValueError(mode)
            return spectral_matrix(bhat, C, H, W)
        raise ValueError(f"{self.kind}/{mode}")

    # measurement (used only by reference self-tests) ---------------------------------
    def measure(self, x: np.ndarray, sigma: float, rng: np.random.Generator):
        """x (B,C,H,W) -> y, z, mask (numpy)."""
        Bn, C, H, W = x.shape
        ys, zs, ms = [], [], []
        for b in range(Bn):
            if self.kind == "random_inpainting":
                m = (rng.random((H, W)) < self.keep_prob).astype(np.float64)
                y = m[None] * x[b] + sigma * rng.standard_normal((C, H, W))
                z = y if self.input == "direct" else m[None] * y
                if self.input == "tikhonov":
                    z = z / (1.0 + self.reg)
                ms.append(m[None])
            else:
                y = self.forward_apply(x[b]) + sigma * rng.standard_normal((C, H, W))
                z = (self.input_matrix(C, H, W) @ y.reshape(-1)).reshape(C, H, W)
            ys.append(y)
            zs.append(z)
        return np.stack(ys), np.stack(zs), (np.stack(ms) if ms else None)


# --------------------------------------------------------------------------------------
# statistics of one query
# --------------------------------------------------------------------------------------
STAT_NAMES = ("variance", "ess", "max_weight", "entropy", "log_evidence", "topk")


@dataclass
class QueryResult:
    mean: np.ndarray            # (C,)
    variance: np.ndarray        # (C,)
    ess: float
    max_weight: float
    entropy: float
    log_evidence: float
    rows_image: np.ndarray      # counted rows, sorted by decreasing log-density
    rows_position: np.ndarray
    rows_logdens: np.ndarray
    support_dim: int
    n_counted: int


def _logsumexp(a: np.ndarray, axis=None):
    m = np.max(a, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(divide="ignore"):
        out = np.log(np.sum(np.exp(a - m), axis=axis, keepdims=True)) + m
    return np.squeeze(out, axis=axis) if axis is not None else out.reshape(())


def query_statistics(s, img, pos, values, n_rows_total, support_dim) -> QueryResult:
    """s: (R,) log-densities of the rows that count; values (R, C) clean centre pixels."""
    s = np.asarray(s, dtype=np.float64)
    smax = s.max()
    e = np.exp(s - smax)
    w = e / e.sum()
    mean = w @ values
    variance = w @ (values ** 2) - mean ** 2
    ess = 1.0 / np.sum(w ** 2)
    max_weight = w.max()
    pos_w = w[w > 0]
    entropy = -np.sum(pos_w * np.log(pos_w))
    log_evidence = smax + math.log(e.sum()) - math.log(n_rows_total)
    order = np.argsort(-s, kind="stable")
    return QueryResult(mean, variance, float(ess), float(max_weight), float(entropy),
                       float(log_evidence), img[order], pos[order], s[order],
                       int(support_dim), int(len(s)))


@dataclass
class RefResult:
    mean: np.ndarray          # (B,C,H,W)
    variance: np.ndarray      # (B,C,H,W)
    ess: np.ndarray           # (B,H,W)
    max_weight: np.ndarray
    entropy: np.ndarray
    log_evidence: np.ndarray
    queries: list             # queries[b][r][c] -> QueryResult
    n_rows: int

    def topk(self, k: int):
        """(image, position, logits) arrays (B,H,W,k); -1 / -inf where fewer rows count."""
        Bn, _, H, W = self.mean.shape
        ti = -np.ones((Bn, H, W, k), dtype=np.int64)
        tp = -np.ones((Bn, H, W, k), dtype=np.int64)
        tl = np.full((Bn, H, W, k), -np.inf)
        for b in range(Bn):
            for r in range(H):
                for c in range(W):
                    q = self.queries[b][r][c]
                    m = min(k, q.n_counted)
                    ti[b, r, c, :m] = q.rows_image[:m]
                    tp[b, r, c, :m] = q.rows_position[:m]
                    tl[b, r, c, :m] = q.rows_logdens[:m]
        return ti, tp, tl


def _assemble(queries, Bn, C, H, W, n_rows) -> RefResult:
    mean = np.full((Bn, C, H, W), np.nan)
    var = np.full((Bn, C, H, W), np.nan)
    ess, mw, ent, lev = (np.full((Bn, H, W), np.nan) for _ in range(4))
    for b in range(Bn):
        for r in range(H):
            for c in range(W):
                q = queries[b][r][c]
                if q is None:
                    continue
                mean[b, :, r, c] = q.mean
                var[b, :, r, c] = q.variance
                ess[b, r, c] = q.ess
                mw[b, r, c] = q.max_weight
                ent[b, r, c] = q.entropy
                lev[b, r, c] = q.log_evidence
    return RefResult(mean, var, ess, mw, ent, lev, queries, n_rows)


# --------------------------------------------------------------------------------------
# deterministic problems: Denoising, fixed-mask Inpainting, Deblurring, generic
# --------------------------------------------------------------------------------------
def estimate_linear(train, z, problem: RefProblem, sigma: float, P: int, padding: str = "zeros",
                    candidates: str = "all", *, rank_tol: float = 1e-9,
                    support_tol: float = 1e-8) -> RefResult:
    """Brute force of the fixed-operator estimator.

    Components (i, j): N(p; mu_ij, sigma^2 S_j), mu_ij = Pi_j B A x_i, S_j = Pi_j B B^T Pi_j^T.
    Support = mu_ij + range(S_j) (checked with the eigen-decomposition of S_j); among components
    whose support contains p only the smallest support dimension counts; on the support the
    log-density uses the pseudo-inverse and the pseudo-determinant.
    """
    train = np.asarray(train, dtype=np.float64)
    z = np.asarray(z, dtype=np.float64)
    N, C, H, W = train.shape
    Bn = z.shape[0]
    assert z.shape[1:] == (C, H, W)
    n, d = C * H * W, C * P * P
    Bmat = problem.input_matrix(C, H, W)
    BAX = np.stack([Bmat @ problem.forward_apply(train[i]).reshape(-1) for i in range(N)])  # (N, n)
    BBt = Bmat @ Bmat.T

    cands = candidate_positions(H, W, P, padding, candidates)
    J = len(cands)
    mus, Ss, values = [], [], []
    for (r, c) in cands:
        Pi = patch_matrix(C, H, W, P, r, c, padding)
        mus.append(BAX @ Pi.T)                          # (N, d)
        S = Pi @ BBt @ Pi.T
        Ss.append(0.5 * (S + S.T))
        values.append(train[:, :, r, c])                # (N, C)
    mus = np.stack(mus)                                 # (J, N, d)
    values = np.stack(values)                           # (J, N, C)
    eig = [np.linalg.eigh(S) for S in Ss]
    scale = max(max(float(lam.max()) for lam, _ in eig), 1e-300)
    Spinv = np.zeros((J, d, d))
    Q0 = np.zeros((J, d, d))      # projector onto the null space of S_j
    rank = np.zeros(J, dtype=np.int64)
    logpdet = np.zeros(J)
    for jj, (lam, U) in enumerate(eig):
        keep = lam > rank_tol * scale
        Ur = U[:, keep]
        Spinv[jj] = Ur @ np.diag(1.0 / lam[keep]) @ Ur.T
        Q0[jj] = np.eye(d) - Ur @ Ur.T
        rank[jj] = int(keep.sum())
        logpdet[jj] = float(np.sum(np.log(lam[keep])))
    img_idx = np.broadcast_to(np.arange(N)[None, :], (J, N))
    pos_idx = np.broadcast_to(np.array([r * W + c for (r, c) in cands])[:, None], (J, N))
    dims = np.broadcast_to(rank[:, None], (J, N))
    n_rows = N * J
    mu_norm = np.linalg.norm(mus, axis=-1)

    queries = [[[None] * W for _ in range(H)] for _ in range(Bn)]
    for b in range(Bn):
        zb = z[b].reshape(-1)
        for r in range(H):
            for c in range(W):
                p = patch_matrix(C, H, W, P, r, c, padding) @ zb
                R = p[None, None, :] - mus                               # (J, N, d)
                null_res = np.linalg.norm(np.einsum("jde,jne->jnd", Q0, R), axis=-1)
                in_support = null_res <= support_tol * (1.0 + np.linalg.norm(p) + mu_norm)
                if not in_support.any():
                    continue
                dmin = dims[in_support].min()
                counted = in_support & (dims == dmin)
                quad = np.einsum("jnd,jde,jne->jn", R, Spinv, R)
                s = -0.5 * quad / sigma ** 2 - 0.5 * (dims * math.log(2 * math.pi * sigma ** 2)
                                                      + logpdet[:, None])
                queries[b][r][c] = query_statistics(
                    s[counted], img_idx[counted], pos_idx[counted], values[counted], n_rows, dmin)
    return _assemble(queries, Bn, C, H, W, n_rows)


# --------------------------------------------------------------------------------------
# random-mask inpainting
# --------------------------------------------------------------------------------------
def mask_patch(mask_hw: np.ndarray, P: int, r: int, c: int, padding: str) -> np.ndarray:
    """Pi_k m over pixels: (P*P,), zero-padded under "zeros", wrapped under "circular"."""
    H, W = mask_hw.shape
    return np.array([0.0 if uv is None else float(mask_hw[uv]) for uv in
                     patch_pixels(H, W, P, r, c, padding)])


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


def estimate_random_mask(train, z, mask, keep_prob: float, sigma: float, P: int,
                         padding: str = "zeros", candidates: str = "all", *, aware: bool,
                         z_scale: float = 1.0) -> RefResult:
    """Random iid Bernoulli(q) masks shared over channels, y = m*x + sigma e.

    aware:    z = m*y (times 1/z_scale for tikhonov; pass z_scale = 1 + reg), mask known.
              log-density = log P(mp|j) - ||mp*(p - mu)||^2/(2 sigma^2) - (C n1/2) log(2 pi sigma^2)
              with P(mp|j) written literally per pixel (padded pixels must be masked).
    agnostic: z = y; density = sum over ALL 2^(P*P) mask patterns of
              P(pattern | j) * N(p; pattern*mu, sigma^2 I) on the non-padded coordinates
              (padded coordinates are deterministic zeros); smallest support dimension counts.
    """
    train = np.asarray(train, dtype=np.float64)
    z = np.asarray(z, dtype=np.float64) * z_scale
    mask = np.asarray(mask, dtype=np.float64).reshape(z.shape[0], z.shape[2], z.shape[3])
    N, C, H, W = train.shape
    Bn = z.shape[0]
    q = float(keep_prob)
    P2 = P * P
    cands = candidate_positions(H, W, P, padding, candidates)
    J = len(cands)
    mus = np.stack([train.reshape(N, -1) @ patch_matrix(C, H, W, P, r, c, padding).T
                    for (r, c) in cands])                                   # (J, N, d)
    mus_pix = mus.reshape(J, N, C, P2)
    values = np.stack([train[:, :, r, c] for (r, c) in cands])             # (J, N, C)
    padded = np.stack([padded_pixels(H, W, P, r, c, padding) for (r, c) in cands])  # (J, P2)
    img_idx = np.broadcast_to(np.arange(N)[None, :], (J, N))
    pos_idx = np.broadcast_to(np.array([r * W + c for (r, c) in cands])[:, None], (J, N))
    n_rows = N * J
    log2pis2 = math.log(2 * math.pi * sigma ** 2)

    if not aware:
        patterns = np.array(list(itertools.product([0, 1], repeat=P2)), dtype=np.float64)  # (M, P2)
        M = patterns.shape[0]
        # log P(pattern | j): padded pixels of j are always 0 in the (zero-padded) mask patch
        logPpat = np.zeros((J, M))
        for jj in range(J):
            for mm in range(M):
                tot = 0.0
                for a in range(P2):
                    if padded[jj, a]:
                        tot += 0.0 if patterns[mm, a] == 0 else -math.inf
                    else:
                        tot += _log(q) if patterns[mm, a] == 1 else _log(1.0 - q)
                logPpat[jj, mm] = tot
        nonpad = (~padded).astype(np.float64)                              # (J, P2)
        dims_j = C * (~padded).sum(axis=1)

    queries = [[[None] * W for _ in range(H)] for _ in range(Bn)]
    for b in range(Bn):
        zb = z[b].reshape(-1)
        for r in range(H):
            for c in range(W):
                p = patch_matrix(C, H, W, P, r, c, padding) @ zb
                p_pix = p.reshape(C, P2)
                if aware:
                    mp = mask_patch(mask[b], P, r, c, padding)
                    logPm = np.zeros(J)
                    for jj in range(J):
                        tot = 0.0
                        for a in range(P2):
                            if padded[jj, a]:
                                tot += 0.0 if mp[a] == 0 else -math.inf
                            else:
                                tot += _log(q) if mp[a] == 1 else _log(1.0 - q)
                        logPm[jj] = tot
                    n1 = mp.sum()
                    resid = mp[None, None, None, :] * (p_pix[None, None] - mus_pix)   # (J,N,C,P2)
                    s = (logPm[:, None] - np.sum(resid ** 2, axis=(2, 3)) / (2 * sigma ** 2)
                         - 0.5 * C * n1 * log2pis2)
                    counted = np.isfinite(s)
                    dmin = int(C * n1)
                else:
                    # support of component j: p == 0 on j's padded coordinates
                    in_support_j = np.array([np.all(p_pix[:, padded[jj]] == 0.0) for jj in range(J)])
                    if not in_support_j.any():
                        continue
                    dmin = dims_j[in_support_j].min()
                    keep_j = in_support_j & (dims_j == dmin)
                    L1 = -np.sum((p_pix[None, None] - mus_pix) ** 2, axis=2) / (2 * sigma ** 2)  # (J,N,P2)
                    L0 = -np.sum(p_pix ** 2, axis=0) / (2 * sigma ** 2)                          # (P2,)
                    # loglik[j,n,m] = sum_{a non padded} pat_a L1 + (1 - pat_a) L0
                    loglik = (np.einsum("jna,ma->jnm", L1 * nonpad[:, None, :], patterns)
                              + np.einsum("ja,ma->jm", L0[None, :] * nonpad, 1.0 - patterns)[:, None, :])
                    loglik = loglik - 0.5 * dims_j[:, None, None] * log2pis2
                    s = _logsumexp(logPpat[:, None, :] + loglik, axis=2)                # (J, N)
                    counted = np.broadcast_to(keep_j[:, None], (J, N)) & np.isfinite(s)
                if not counted.any():
                    continue
                queries[b][r][c] = query_statistics(
                    s[counted], img_idx[counted], pos_idx[counted], values[counted], n_rows, dmin)
    return _assemble(queries, Bn, C, H, W, n_rows)


def estimate(train, z, problem: RefProblem, sigma: float, P: int, padding: str = "zeros",
             candidates: str = "all", mask=None) -> RefResult:
    """Dispatch to the right brute force."""
    if problem.kind == "random_inpainting":
        aware = problem.input != "direct"
        z_scale = (1.0 + problem.reg) if problem.input == "tikhonov" else 1.0
        return estimate_random_mask(train, z, mask, problem.keep_prob, sigma, P, padding,
                                    candidates, aware=aware, z_scale=z_scale)
    return estimate_linear(train, z, problem, sigma, P, padding, candidates)


def global_mmse(train, z, sigma: float) -> np.ndarray:
    """Global empirical MMSE for denoising: sum_i softmax_i(-||z - x_i||^2/(2 sigma^2)) x_i."""
    train = np.asarray(train, dtype=np.float64)
    z = np.asarray(z, dtype=np.float64)
    out = np.empty_like(z)
    for b in range(z.shape[0]):
        logits = np.array([-np.sum((z[b] - x) ** 2) / (2 * sigma ** 2) for x in train])
        w = np.exp(logits - logits.max())
        w /= w.sum()
        out[b] = np.tensordot(w, train, axes=1)
    return out
