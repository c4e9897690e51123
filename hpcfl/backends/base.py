"""What a compute backend provides: the same functions with the same signatures on every backend
(numpy, the reference; numba, CPU; cupy, GPU). A backend is a module; `backends.get(name)`
returns it typed as Backend. tests/test_kernels.py checks that every backend module has every
member below and tests each against the reference.

`params`/`grads` are lists of (W, b) views into flat buffers (core.layout.Layout.views); arrays
are the backend's (`xp`: numpy or cupy). Kernels are pure: they read their inputs and write only
the outputs and workspaces they are given.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

Array = Any          # numpy.ndarray or cupy.ndarray
Views = list         # [(W, b), ...] per layer


class Backend(Protocol):
    xp: Any                                            # the array module (numpy or cupy)
    # Workspace(layout, max_batch): preallocated activations, reused every step (.max_batch)
    Workspace: Callable[[Any, int], Any]

    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run here (checked at run time: a GPU, a library), or None."""

    def gather(self, src_u8: Array, idx: Array, out: Array, mean: float, std: float) -> None:
        """out[:len(idx)] = (src[idx] / 255 - mean) / std as float32 (the data set's statistics)."""

    def gather_labels(self, labels: Array, idx: Array, out: Array) -> None:
        """out[:len(idx)] = labels[idx] as int32."""

    def forward_backward(self, params: Views, x: Array, y: Array, grads: Views, ws: Any,
                         on_layer_ready: Callable[[int], None] | None = None) -> float:
        """The summed cross-entropy loss of the batch; grads = the SUM of its gradients.
        on_layer_ready(i) is called once layer i's gradients are final (last layer first)."""

    def forward_backward_clipped(self, params: Views, x: Array, y: Array, grads: Views, ws: Any,
                                 clip: float) -> tuple[float, int]:
        """DP-SGD: (loss sum, samples clipped); grads = the sum of the per-sample gradients each
        clipped to L2 norm `clip`, without materialising them."""

    def evaluate(self, params: Views, x: Array, y: Array, ws: Any) -> tuple[int, float]:
        """(correct predictions, summed loss) of the batch."""

    def sgd_update(self, p: Array, g: Array, buf: Array, lr: float, momentum: float,
                   weight_decay: float, scale: float) -> None:
        """SGD with momentum and weight decay on flat buffers (PyTorch's form), g scaled by scale."""

    def adam_update(self, p: Array, g: Array, m: Array, v: Array, lr: float, beta1: float,
                    beta2: float, eps: float, weight_decay: float, scale: float, t: int) -> None:
        """Adam (with bias correction at step t) on flat buffers, g scaled by scale."""

    def to_device(self, a: Any) -> Array:
        """A host array on the backend's device (the same array on a CPU backend)."""

    def to_host(self, a: Array) -> Any:
        """A device array on the host, as numpy (the same array on a CPU backend)."""

    def upload_images(self, a: Any) -> Array:
        """A whole data set's uint8 images (or labels) on the device, once (CPU: as it is)."""

    def synchronize(self) -> None:
        """Wait for the device's queued work (a no-op on the CPU)."""


class HostBackend(Backend, Protocol):
    """A backend whose arrays live in host memory (numpy, numba): --allreduce shm's kernels, which
    read the node's shared gradient slots (slots: (L, n + 2) float32, slice lo:hi)."""

    def sum_slots(self, slots: Array, lo: int, hi: int, out: Array) -> None:
        """out = the sum over the L slots of columns lo:hi."""

    def sgd_update_slots(self, slots: Array, lo: int, hi: int, p: Array, buf: Array, lr: float,
                         momentum: float, weight_decay: float, scale: float) -> None:
        """sgd_update of p[lo:hi] with the slots' summed gradient, in one pass."""

    def adam_update_slots(self, slots: Array, lo: int, hi: int, p: Array, m: Array, v: Array, lr: float,
                          beta1: float, beta2: float, eps: float, weight_decay: float, scale: float,
                          t: int) -> None:
        """adam_update of p[lo:hi] with the slots' summed gradient, in one pass."""


MEMBERS = ("xp", "Workspace", "unavailable_reason", "gather", "gather_labels", "forward_backward",
           "forward_backward_clipped", "evaluate", "sgd_update", "adam_update", "to_device", "to_host",
           "upload_images", "synchronize")
HOST_MEMBERS = MEMBERS + ("sum_slots", "sgd_update_slots", "adam_update_slots")
