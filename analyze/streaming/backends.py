"""Where a block's matrix products run: numpy on the CPU, or torch (a CUDA GPU when there is one).

A backend turns one block of tokens into accumulators: :class:`~hrsa.analyze.accumulators.moments.Moments` for a
matched pair of hidden states, :class:`~hrsa.analyze.accumulators.cross_moments.CrossMoments` for the pairs of a
cross-layer tile. Accumulation and merging always happen afterwards, in float64 numpy, so every
backend feeds the same Chan merge and the same metrics.

- :class:`NumpyBackend` calls the pure math (``Moments.from_chunk``, ``iter_cross_moments``).
- :class:`TorchBackend` reproduces those formulas in torch: each block is centred in float64 on the
  device by the same ``centre_rows`` as the numpy path, its O(n D^2) products run in ``compute_dtype``
  (float32 by default: centred data keeps that accurate, and float32 GEMMs are what GPUs are fast at), and
  the results come back as float64. On ``device="cpu"`` it is the same code, which is how the CPU-only test
  suite checks it.

Choose with :func:`resolve_backend`; ``"auto"`` takes CUDA when torch sees a GPU, numpy otherwise. The
vocabularies of its two options, :data:`BackendName` and :data:`ComputeDtype`, are defined here once.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal, Protocol, get_args, runtime_checkable

import numpy as np
from hrsa.analyze.accumulators.centring import centre_rows, check_float32_range
from hrsa.analyze.accumulators.cross_moments import CrossMoments, iter_cross_moments
from hrsa.analyze.accumulators.cross_tile import BlockMeans, PendingBlocks, stack_centred
from hrsa.analyze.accumulators.moments import Moments
from hrsa.store.errors import UserError

if TYPE_CHECKING:
    import torch
    from hrsa.analyze.streaming.plan import StreamKey, StreamPair

__all__ = ["FLOAT64_MATCHED_MEASURES", "FLOAT64_MEASURES", "matched_backend", "products_on_gpu", "BackendName", "ChunkBackend", "ComputeDtype", "GpuWorkers", "NumpyBackend", "float64_at_full_rate", "gemm_seconds", "TorchBackend", "resolve_backend"]

#: Where the products run (``--backend``).
BackendName = Literal["auto", "numpy", "torch", "cuda"]
#: dtype of the O(n D^2) products (``--compute-dtype``); "auto": see :func:`resolve_backend`.
ComputeDtype = Literal["auto", "float32", "float64"]


@runtime_checkable
class ChunkBackend(Protocol):
    """Statistics of one block of tokens. Implementations are small and picklable (Ray ships them)."""

    @property
    def name(self) -> str:
        """Short name recorded with the results ("numpy", "torch")."""
        ...

    @property
    def compute_dtype(self) -> str:
        """dtype of the products: "float32" or "float64"."""
        ...

    def moments(self, x: np.ndarray, y: np.ndarray) -> Moments:
        """Moments of x (n, Dx) and y (n, Dy)."""
        ...

    def cross_moments(
        self, xs: Mapping[StreamKey, np.ndarray], pairs: Iterable[StreamPair]
    ) -> Iterator[tuple[StreamPair, CrossMoments]]:
        """CrossMoments of each stream pair (key_x, key_y) of the blocks ``xs`` (each (n, D_key)), one at a time."""
        ...

    def fold_cross_tile(self, pending: PendingBlocks | None, xs: Mapping[StreamKey, np.ndarray],
                        selfs: Mapping[StreamKey, PendingBlocks] = {}) -> None:
        """Multiply one block of a cross-layer tile's states (``xs``, each (n, D_key)) into ``pending``'s running sum
        and record it (``pending.finish()`` folds what is left into the total); likewise each state of ``selfs``
        against itself, from the same centred block (``pending`` None: a self tile's, only those)."""
        ...


@dataclass(frozen=True)
class NumpyBackend:
    """The pure-math path on the CPU (BLAS products)."""

    compute_dtype: str = "float64"
    name: str = "numpy"

    def moments(self, x: np.ndarray, y: np.ndarray) -> Moments:
        return Moments.from_chunk(x, y, compute_dtype=self.compute_dtype)

    def cross_moments(
        self, xs: Mapping[StreamKey, np.ndarray], pairs: Iterable[StreamPair]
    ) -> Iterator[tuple[StreamPair, CrossMoments]]:
        return iter_cross_moments(xs, pairs, compute_dtype=self.compute_dtype)

    def fold_cross_tile(self, pending: PendingBlocks | None, xs: Mapping[StreamKey, np.ndarray],
                        selfs: Mapping[StreamKey, PendingBlocks] = {}) -> None:
        dtype, sides = np.dtype(self.compute_dtype), []
        if pending is not None:
            total = pending.total
            n = len(xs[total.keys_x[0]])
            u, mean_x, offset_x = stack_centred([xs[k] for k in total.keys_x], dtype,  # (n, r Dx): A's side by side
                                                pending.stack_buffer("x", n, len(total.keys_x) * total.dx, dtype))
            v, mean_y, offset_y = stack_centred([xs[k] for k in total.keys_y], dtype,  # (n, c Dy): B's
                                                pending.stack_buffer("y", n, len(total.keys_y) * total.dy, dtype))
            pending.multiply(u, v, BlockMeans(u.shape[0], mean_x, mean_y, offset_x, offset_y))
            sides = [(u, total.keys_x, total.dx, mean_x, offset_x), (v, total.keys_y, total.dy, mean_y, offset_y)]
        scratch = pending if pending is not None else next(iter(selfs.values()), None)  # one buffer for the selfs
        for key, own in selfs.items():
            found = [side for side in sides if key in side[1]]
            if found:  # a state of the rectangle: its slot of the stacked block, the very values a self tile makes
                stack, keys, width, means, offsets = found[0]
                cols = slice(keys.index(key) * width, (keys.index(key) + 1) * width)
                part = stack[:, cols]  # (n, D) in place: BLAS reads it with the stack's row stride
                means, offsets = means[cols], (None if offsets is None else offsets[cols])
            else:
                n, width = xs[key].shape
                part, means, offsets = stack_centred([xs[key]], dtype, scratch.stack_buffer("self", n, width, dtype))
            own.multiply(part, part, BlockMeans(part.shape[0], means, means, offsets, offsets))


@dataclass(frozen=True)
class TorchBackend:
    """Products on a torch device (``"cuda"``, ``"cuda:1"``, or ``"cpu"``), float64 results."""

    device: str = "cuda"
    compute_dtype: str = "float32"
    name: str = "torch"

    def moments(self, x: np.ndarray, y: np.ndarray) -> Moments:
        import torch

        # Step 1: centre in float64 on the device (offsets of 1e4 would swamp a float32 product).
        (u, mean_x), (v, mean_y) = self._centre(x), self._centre(y)  # (n, Dx), (n, Dy) float64
        # Step 2: the O(n D^2) products in compute_dtype, back to float64.
        uc, vc = self._cast(u), self._cast(v)
        c_xx, c_yy, c_xy = (uc.T @ uc).double(), (vc.T @ vc).double(), (uc.T @ vc).double()
        del uc, vc  # before the (n, D) temporaries of step 3: the memory plan counts u, v and one of those
        # Step 3: the O(n D) norm moments of debiased CKA, in float64.
        a, b = (u * u).sum(1), (v * v).sum(1)  # (n,), (n,)
        host = [t.cpu().numpy() for t in (mean_x, mean_y, c_xx, c_yy, c_xy, u.T @ a, v.T @ a, u.T @ b, v.T @ b)]
        q = torch.stack([a @ a, b @ b, a @ b]).cpu().numpy()
        mx, my, cxx, cyy, cxy, g_xx, g_xy, g_yx, g_yy = host
        q_xx, q_yy, q_xy = (float(value) for value in q)
        return Moments(int(u.shape[0]), mx, my, cxx, cyy, cxy, q_xx, q_yy, q_xy, g_xx, g_xy, g_yx, g_yy)

    def cross_moments(
        self, xs: Mapping[StreamKey, np.ndarray], pairs: Iterable[StreamPair]
    ) -> Iterator[tuple[StreamPair, CrossMoments]]:
        pairs = list(pairs)
        centred = {}
        for k in {k for pair in pairs for k in pair}:  # each state centred and cast once per block
            u, mean = self._centre(xs[k])
            centred[k] = (self._cast(u), mean.cpu().numpy())
            del u  # the float64 copy goes before the next state's is made (a float32 cast keeps only the cast)
        for kx, ky in pairs:
            (u, mx), (v, my) = centred[kx], centred[ky]
            c_xy = (u.T @ v).double().cpu().numpy()  # (Dx, Dy)
            yield (kx, ky), CrossMoments(int(u.shape[0]), mx, my, c_xy)

    def fold_cross_tile(self, pending: PendingBlocks | None, xs: Mapping[StreamKey, np.ndarray],
                        selfs: Mapping[StreamKey, PendingBlocks] = {}) -> None:
        import torch

        n = len(next(iter(xs.values())))

        def stacked(keys: tuple, width: int) -> tuple[torch.Tensor, np.ndarray]:
            out = torch.empty((n, len(keys) * width), dtype=self._dtype, device=self.device)
            means = []
            for i, key in enumerate(keys):  # one state's float64 centred copy at a time, cast into its slot
                centred, mean = self._centre(xs[key])
                out[:, i * width : (i + 1) * width] = centred
                if self._dtype == torch.float32:
                    check_float32_range(out[:, i * width : (i + 1) * width], centred)
                means.append(mean)
            return out, torch.cat(means).cpu().numpy()

        sides = []
        if pending is not None:
            total = pending.total
            (u, mean_x), (v, mean_y) = stacked(total.keys_x, total.dx), stacked(total.keys_y, total.dy)  # (n, r Dx), (n, c Dy)
            self._multiply(pending, u, v, BlockMeans(n, mean_x, mean_y))
            sides = [(u, total.keys_x, total.dx, mean_x), (v, total.keys_y, total.dy, mean_y)]
        for key, own in selfs.items():
            found = [side for side in sides if key in side[1]]
            if found:
                stack, keys, width, means = found[0]
            else:
                width = xs[key].shape[1]
                (stack, means), keys = stacked((key,), width), (key,)
            cols = slice(keys.index(key) * width, (keys.index(key) + 1) * width)
            self._multiply(own, stack[:, cols], stack[:, cols], BlockMeans(n, means[cols], means[cols]))

    def _multiply(self, pending: PendingBlocks, u: torch.Tensor, v: torch.Tensor, block: BlockMeans) -> None:
        """Add ``u^T v`` to the run's sum: on a GPU a sum that stays there (the runs fold into a float64 sum there too,
        reduced there to the metrics' summaries at the end of a whole pass, else crossing to the host once per
        segment); on the CPU numpy's path on the same memory (float64 straight into the total)."""
        if self._sums_on_host:
            pending.multiply(np.ascontiguousarray(u.numpy()), np.ascontiguousarray(v.numpy()), block)
            return
        if pending.products is None and pending.device_sum is not None and u.dtype == pending.device_sum.dtype:
            # float64 products after the first run: straight into the device's float64 sum (no run sum beside it)
            pending.device_sum.addmm_(u.T, v)
        elif pending.beta:
            pending.products.addmm_(u.T, v)
        else:
            pending.products = u.T @ v
        pending.add(block)

    @property
    def _sums_on_host(self) -> bool:
        import torch

        return torch.device(self.device).type == "cpu"

    @property
    def _dtype(self) -> torch.dtype:
        import torch

        return torch.float32 if self.compute_dtype == "float32" else torch.float64

    def _cast(self, u: torch.Tensor) -> torch.Tensor:
        """Centred float64 rows in the products' dtype; float32 only where their squares hold (check_float32_range)."""
        cast = u.to(self._dtype)
        if cast.dtype != u.dtype:
            check_float32_range(cast, u)
        return cast

    def _centre(self, x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The block (n, D) on the device, centred in float64, and its mean (D,)."""
        import torch

        x = np.asarray(x)
        if x.dtype.name == "bfloat16":  # ml_dtypes' bf16: ship its bits, half the bytes of float32
            t = torch.from_numpy(np.ascontiguousarray(x).view(np.int16)).view(torch.bfloat16)
        else:
            t = torch.from_numpy(np.ascontiguousarray(x))
        return centre_rows(t.to(self.device).double())  # (n, D), (D,) float64 on the device


#: Measures that invert C_xx (or C_yy): their inverses multiply a float32 product's rounding by the condition number,
#: so ``"auto"`` keeps float64 products when one of them is asked for.
FLOAT64_MEASURES = frozenset({"cca", "svcca", "pwcca", "regression"})
#: Stored dtypes whose values a float32 product cannot sum to 1e-6: bf16 keeps 8 bits of mantissa, so a massive
#: activation (3000 + a little noise, as LLMs carry in a few channels) is stored as two or three levels, +-8 on every
#: centred token; a float32 GEMM sums those near-equal squares with roundings that do not average out (relative
#: error ~k * 3e-8 over k tokens, even k = 64 gave 5.6e-7) and CKA moved by 5e-6 (test_compute_dtype.py). So
#: ``"auto"`` keeps float64 products for them: on GPUs with full-rate float64 (an H200: 53 TFLOP/s against 51 in
#: float32) at no cost in time. Not on GPUs whose float64 runs at 1/32-1/64 of their float32 (A10G, L4, RTX; and the
#: H800 and H20, whose compute capability is the H100's): 30-60x slower products there; ``"auto"`` keeps float32 on
#: them (:func:`local_float64_at_full_rate` measures it) and the analysis warns (``--compute-dtype float64`` sums exactly).
FEW_LEVEL_DTYPES = frozenset({"bfloat16", "float16"})
#: Measures that read C_xy's singular vectors: with ``"auto"`` the matched tiles (O(L) pairs, against O(L^2) for the
#: cross-layer matrices) keep float64 products for them: float32 rounding fills C_xy's null space (a rank-deficient
#: layer would pass for determined) and moves singular vectors of close singular values.
FLOAT64_MATCHED_MEASURES = frozenset({"procrustes", "procrustes_distance"})


@dataclass(frozen=True)
class GpuWorkers:
    """A Ray cluster's GPUs as a task on each GPU node found them (the driver's torch sees none of them, and Ray does
    not know their memory): :func:`~hrsa.analyze.streaming.ray_passes.probe_gpu_workers`.

    Attributes:
        free_bytes: the least free memory of one GPU over the nodes (an analysis task holds one GPU).
        float64_at_full_rate: whether every node's GPU ran float64 GEMMs at a quarter of its float32 rate or better
            (a tile's tasks may land on any node: one slow node slows every pass).
        float32_exact: whether float32 GEMMs there are float32 (not TF32: :func:`tf32_matmuls`) on every node.
    """

    free_bytes: int
    float64_at_full_rate: bool
    float32_exact: bool = True


def matched_backend(backend: ChunkBackend, compute_dtype: ComputeDtype, metrics: Iterable[str]) -> ChunkBackend:
    """The backend of the matched tiles: float64 products for :data:`FLOAT64_MATCHED_MEASURES` under ``"auto"``."""
    if compute_dtype == "auto" and FLOAT64_MATCHED_MEASURES & set(metrics) and backend.compute_dtype != "float64":
        return replace(backend, compute_dtype="float64")  # type: ignore[type-var]
    return backend


def resolve_backend(name: BackendName = "auto", compute_dtype: ComputeDtype = "auto",
                    metrics: Iterable[str] = (), *, cluster_gpus: GpuWorkers | None = None,
                    stored_dtypes: Iterable[str] = (), multiplies: bool = True) -> ChunkBackend:
    """The backend to use: ``"auto"`` is CUDA when torch sees a GPU, numpy otherwise.

    Args:
        name: ``"auto"``, ``"numpy"``, ``"cuda"`` (torch on the GPU) or ``"torch"`` (torch on its
            default device, the CPU unless a GPU is there).
        compute_dtype: ``"float32"``, ``"float64"``, or ``"auto"``: float32 products of blocks centred in float64 and
            summed in float64 (CKA, debiased CKA and dimension-wise correlation within 1e-6 of float64 products on
            real SmolLM2 activations and under 1e4 offsets: tests/analyze/test_compute_dtype.py, test_real_smollm2.py;
            about twice BLAS's float64 rate), float64 when ``metrics`` holds one of :data:`FLOAT64_MEASURES` (and for
            the matched tiles of Procrustes: :func:`matched_backend`) or a model is stored in one of
            :data:`FEW_LEVEL_DTYPES` (unless the products run on GPUs whose float64 is slow).
        metrics: the metrics of the run (only for ``"auto"``).
        stored_dtypes: the dtypes the two models are stored in (only for ``"auto"``).
        cluster_gpus: the products run as Ray tasks on a cluster with these GPU workers (a CPU head's torch sees
            none): ``"auto"`` and ``"cuda"`` mean CUDA on them, their float64 rate decides ``"auto"``'s dtype.
        multiplies: whether the run multiplies co-moments at all (False for k-NN or probes alone: no GEMM whose
            dtype to refuse).

    Raises:
        UserError: an unknown name or dtype, or ``"cuda"`` without a CUDA GPU.
    """
    if compute_dtype not in get_args(ComputeDtype):
        raise UserError(f"Expected compute dtype {_one_of(ComputeDtype)}. Got {compute_dtype!r} instead.")
    if name not in get_args(BackendName):
        raise UserError(f"Expected backend {_one_of(BackendName)}. Got {name!r} instead.")
    cuda = name != "numpy" and (cluster_gpus is not None or _cuda_available())
    if name == "cuda" and not cuda:
        raise UserError(
            "Expected a CUDA GPU for --backend cuda. Got none (torch.cuda.is_available() is False). Use --backend numpy."
        )
    tf32 = cuda and (not cluster_gpus.float32_exact if cluster_gpus is not None else tf32_matmuls())
    if compute_dtype == "float32" and tf32 and multiplies:
        raise UserError(
            f"Expected float32 GEMMs on the GPU{'s' if cluster_gpus is not None else ''} for --compute-dtype float32. "
            "Got TF32 (10 bits of mantissa): TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 is set there (NVIDIA's containers set "
            "it), or the process asked for TF32 (allow_tf32, set_float32_matmul_precision). Set "
            "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=0 and precision \"highest\", or pass --compute-dtype float64."
        )
    if compute_dtype == "auto":
        if cluster_gpus is not None:
            slow_float64 = not cluster_gpus.float64_at_full_rate
        else:
            slow_float64 = cuda and not tf32 and not local_float64_at_full_rate()
        float64 = FLOAT64_MEASURES & set(metrics) or (FEW_LEVEL_DTYPES & set(stored_dtypes) and not slow_float64)
        compute_dtype = "float64" if float64 or tf32 else "float32"
    if name == "numpy" or (name == "auto" and not cuda):
        return NumpyBackend(compute_dtype=compute_dtype)
    return TorchBackend(device="cuda" if cuda else "cpu", compute_dtype=compute_dtype)


def products_on_gpu(backend: ChunkBackend) -> bool:
    """Whether ``backend`` runs its products on a CUDA device (torch's ``"cuda"``, ``"cuda:1"``...)."""
    return backend.name == "torch" and str(getattr(backend, "device", "")).startswith("cuda")


def _one_of(vocabulary: object) -> str:
    """A Literal's values as prose: ``auto, numpy, torch or cuda``."""
    *first, last = get_args(vocabulary)
    return f"{', '.join(first)} or {last}"


@functools.cache
def local_float64_at_full_rate() -> bool:
    """Whether this process's CUDA device runs float64 GEMMs at a quarter of its float32 rate or better, measured once:
    the compute capability does not say it (the H800 and H20 share the H100's 9.0 with 1/60 of its float64)."""
    import torch

    device = torch.device("cuda", torch.cuda.current_device())
    seconds: dict[torch.dtype, list[float]] = {torch.float64: [], torch.float32: []}
    for _ in range(3):  # alternated, the best of each: an idle GPU's clocks ramp up under the first GEMMs
        for dtype, taken in seconds.items():
            taken.append(gemm_seconds(device, dtype))
    return float64_at_full_rate(min(seconds[torch.float64]), min(seconds[torch.float32]))


def tf32_matmuls() -> bool:
    """Whether this process's float32 cuBLAS GEMMs would run as TF32 (10 bits of mantissa): TORCH_ALLOW_TF32_CUBLAS_
    OVERRIDE=1 (torch takes exactly "1"; NVIDIA's PyTorch containers set it, and it overrides every flag), or TF32
    asked for in this process (``allow_tf32``, ``set_float32_matmul_precision("high")``, torch 2.9's
    ``fp32_precision = "tf32"``). hrsa reads these, never sets them: the process's settings are its own."""
    if os.environ.get("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE") == "1":
        return True
    import torch

    try:
        return bool(torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:  # torch's old and new TF32 settings disagree: one of them asked for TF32
        return True


def float64_at_full_rate(float64_seconds: float, float32_seconds: float) -> bool:
    """The rule between two timed GEMMs of one size: float64 within 4x of float32. Full-rate parts run it at 1-2x
    (A100, H100, H200; V100 and P100 at 2x), the others at 32-64x: the rule stands far from both."""
    return float64_seconds < 4 * float32_seconds


def gemm_seconds(device: torch.device, dtype: torch.dtype, size: int = 2048, repeats: int = 3) -> float:
    """Seconds of ``repeats`` square GEMMs of ``size`` in ``dtype`` on ``device``, after one to warm its kernels
    (17 GFLOP each: ~50 ms in all on a GPU with slow float64)."""
    import torch

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    matrix = torch.randn(size, size, device=device, dtype=dtype)  # float32 as float32: see tf32_matmuls
    matrix @ matrix
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        matrix @ matrix
    sync()
    return time.perf_counter() - start


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())
