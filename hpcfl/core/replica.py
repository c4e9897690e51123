"""One copy of the model on this rank, and one synchronous training step over a communicator.

A Replica composes three concerns:
- ModelState: the flat parameters, the optimizer and the preallocated workspaces (the
  gradient buffer belongs to the sync strategy, whose collective carries it);
- a synchronisation strategy (parallel/sync.py: fused, overlap, NCCL, shm), which finishes each
  step (reduction and update) and knows where parameters and optimizer state live;
- hooks: `pre_reduce(gradbuf)` before the collective (a fault test's NaN, DP noise), and
  `post_reduce(params, grads, denominator)` on the summed gradient before the update
  (FedProx's proximal term, SCAFFOLD's correction).
Each rank computes the rows shard_range gives it of every global batch, so P ranks follow the
trajectory of one process on the same global batch (up to float summation order).
"""
from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from ..core import layout as model
from ..core import optim
from ..data.shard import shard_range
from ..errors import TrainingError
from ..parallel import sync
from ..runtime import watchdog

if TYPE_CHECKING:
    from ..backends.base import Backend
    from ..config import Config
    from ..parallel.comm import Comm

EVAL_BATCH = 1000


class ModelState:
    """Parameters, optimizer state and workspaces of one replica (no communication)."""

    def __init__(self, cfg: Config, backend: Backend, layout: model.Layout, max_local_batch: int,
                 grads: Any, norm: tuple[float, float], params: Any = None):
        self.cfg, self.backend, self.layout = cfg, backend, layout
        self.norm = (float(norm[0]), float(norm[1]))         # the data's pixel mean, std
        # params: the node's shared copy under --allreduce shm (written by the sync), else our own
        self.params = params if params is not None else backend.to_device(model.init_params(layout, cfg.seed))
        self.grads = grads
        self.pviews, self.gviews = layout.views(self.params), layout.views(grads)
        self.opt = optim.create(cfg.optimizer, backend, layout.n_params, cfg.momentum, cfg.weight_decay)
        n_in = layout.sizes[0]
        self.ws = backend.Workspace(layout, max_local_batch)
        self.xbuf = backend.xp.empty((max_local_batch, n_in), np.float32)
        self.ybuf = backend.xp.empty(max_local_batch, np.int32)
        self.eval_ws = backend.Workspace(layout, EVAL_BATCH)
        self.eval_x = backend.xp.empty((EVAL_BATCH, n_in), np.float32)
        self.eval_y = backend.xp.empty(EVAL_BATCH, np.int32)
        self.clip: float | None = None         # DP-SGD: per-sample gradients clipped to this norm
        self.clipped = 0                       # how many samples the clip cut (a statistic, not private)
        self._chunk_grads: Any = None          # DP-SGD's rare oversized batch: partial sums
        self._chunk_views: list = []

    def local_gradient(self, images: Any, labels: Any, idx: Any,
                       on_layer_ready: Callable[[int], None] | None = None) -> float:
        """Summed loss and gradients of rows `idx` (into grads)."""
        n, be = len(idx), self.backend
        if n == 0:                              # a rank with no rows in a tiny last batch (fl)
            self.grads[...] = 0
            return 0.0
        if self.clip is not None:
            return self._clipped_gradient(images, labels, idx, self.clip)
        be.gather(images, idx, self.xbuf, *self.norm)
        be.gather_labels(labels, idx, self.ybuf)
        if on_layer_ready is None:
            return be.forward_backward(self.pviews, self.xbuf[:n], self.ybuf[:n], self.gviews, self.ws)
        return be.forward_backward(self.pviews, self.xbuf[:n], self.ybuf[:n], self.gviews, self.ws,
                                   on_layer_ready=on_layer_ready)

    def _clipped_gradient(self, images: Any, labels: Any, idx: Any, clip: float) -> float:
        """DP-SGD: the sum of the rows' gradients, each clipped to self.clip (the backends'
        forward_backward_clipped). A Poisson batch larger than the buffers (probability below
        1e-12 per step by their size) is processed in chunks and summed: never resampled, which
        would change the sampling the privacy accounting assumes."""
        be, cap, loss = self.backend, self.ws.max_batch, 0.0
        for start in range(0, len(idx), cap):
            rows = idx[start:start + cap]
            n = len(rows)
            be.gather(images, rows, self.xbuf, *self.norm)
            be.gather_labels(labels, rows, self.ybuf)
            out = self.grads if start == 0 else self._spare_grads()
            views = self.gviews if start == 0 else self._chunk_views
            part, cut = be.forward_backward_clipped(self.pviews, self.xbuf[:n], self.ybuf[:n], views,
                                                    self.ws, clip)
            if start:
                self.grads += out
            loss += part
            self.clipped += cut
        return loss

    def _spare_grads(self):
        if self._chunk_grads is None:
            self._chunk_grads = self.backend.xp.zeros_like(self.grads)
            self._chunk_views = self.layout.views(self._chunk_grads)
        return self._chunk_grads

    def evaluate(self, comm: Comm, images: Any, labels: Any) -> tuple[float, float]:
        """(accuracy, mean loss) on the whole set; each rank scores its slice, counts are summed."""
        lo, hi = shard_range(len(labels), comm.rank, comm.size)
        counts = np.zeros(2, np.float64)
        for start in range(lo, hi, EVAL_BATCH):
            idx = np.arange(start, min(start + EVAL_BATCH, hi))
            self.backend.gather(images, idx, self.eval_x, *self.norm)
            self.backend.gather_labels(labels, idx, self.eval_y)
            correct, loss = self.backend.evaluate(self.pviews, self.eval_x[: len(idx)],
                                                  self.eval_y[: len(idx)], self.eval_ws)
            counts += (correct, loss)
        comm.Allreduce_sum(counts)
        return counts[0] / len(labels), counts[1] / len(labels)

    def reset_optimizer(self) -> None:
        self.opt.reset()


class FedProx:
    """post_reduce hook: + mu (w - w_global) on the mean gradient (Li et al. 2020)."""

    def __init__(self, backend: Backend, mu: float, anchor: Any):
        self.xp, self.mu, self.anchor = backend.xp, mu, anchor
        self._tmp = backend.xp.empty_like(anchor)

    def __call__(self, params: Any, grads: Any, denominator: float) -> None:
        self.xp.subtract(params, self.anchor, out=self._tmp)
        self._tmp *= np.float32(self.mu * denominator)   # the optimizer scales the sum by 1/denominator
        grads += self._tmp


def buffer_bytes(cfg: Config, layout: model.Layout, max_local_batch: int) -> dict[str, int]:
    """What a Replica allocates, by what it grows with (for the memory check before a run):
    the model (parameters, gradients, optimizer state) and the batch (activations and deltas of
    every layer, the gathered input rows), plus evaluation's fixed 1000-row workspace."""
    n, f = layout.n_params, 4
    opt = optim.STATE_VECTORS[cfg.optimizer]
    rows = sum(layout.sizes[1:]) * 2 + layout.sizes[0] + 1
    return {"model": f * n * (2 + opt), "batch": f * max_local_batch * rows, "eval": f * EVAL_BATCH * rows}


class Replica:
    """This rank's copy of the model, trained one synchronous step at a time over a communicator.
    `model` (ModelState) holds parameters, optimizer and workspaces; `sync` finishes each step."""

    def __init__(self, cfg: Config, backend: Backend, max_local_batch: int, reducer: Any = None,
                 layout: model.Layout | None = None, *, norm: tuple[float, float], comm: Comm | None = None):
        """norm: the data's pixel (mean, std), with which the kernels standardise every row."""
        self.cfg, self.backend = cfg, backend
        self.layout = layout or model.layout(cfg.hidden)
        self.sync = sync.create(cfg, backend, self.layout, reducer, comm)
        shared = self.sync.shared_params
        self.model = ModelState(cfg, backend, self.layout, max_local_batch, self.sync.grads, norm, shared)
        if shared is not None:
            self.sync.load_params(self.model, model.init_params(self.layout, cfg.seed))
        self.pre_reduce: list[sync.PreReduce] = []
        self.post_reduce: list[sync.PostReduce] = []
        self.stop_agreed = False               # set by step(): some rank voted to stop

    def step(self, comm: Comm, images: Any, labels: Any, global_idx: Any, lr: float, stop: bool = False,
             denominator: float | None = None) -> float:
        """One synchronous step on this rank's slice of the global batch; returns the mean loss.

        `stop` is this rank's vote to stop after this step; afterwards self.stop_agreed is the
        same on every rank: True when any rank voted. `denominator` turns the gradient sum into
        the update's mean (default: the batch size; DP-SGD uses the expected batch)."""
        n = len(global_idx)
        lo, hi = shard_range(n, comm.rank, comm.size)
        denominator = float(n) if denominator is None else denominator
        self.sync.step(comm, self.model, images, labels, global_idx[lo:hi], stop, self.pre_reduce,
                       self.post_reduce, lr, denominator)
        votes, loss = self.sync.totals()
        self.stop_agreed = votes > 0
        watchdog.progress()
        return loss / n if n else 0.0

    def evaluate(self, comm: Comm, images: Any, labels: Any) -> tuple[float, float]:
        return self.model.evaluate(comm, images, labels)

    def load_params(self, flat_host: np.ndarray) -> None:
        self.sync.load_params(self.model, flat_host)

    def host_params(self) -> np.ndarray:
        """The parameters on the host (a copy when they are the node's shared window, which
        goes away with free())."""
        return self.sync.host_params(self.model)

    def reset_optimizer(self) -> None:
        self.model.reset_optimizer()

    def checkpoint_arrays(self, comm: Comm) -> dict[str, np.ndarray] | None:
        """What a checkpoint holds, on rank 0 (None elsewhere): the parameters and the optimizer
        state, host copies, gathered where the state is sharded (shm). Collective."""
        state = self.sync.optimizer_state(comm, self.model)
        if comm.rank != 0 or state is None:
            return None
        out = {"params": self.host_params()}
        for name, value in state.items():
            out[f"opt.{name}"] = np.array(value, np.int64) if isinstance(value, int) else self.backend.to_host(value)
        return out

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        self.load_params(arrays["params"])
        self.sync.load_optimizer_state(self.model, {k[4:]: v for k, v in arrays.items() if k.startswith("opt.")})

    def check_replicas(self, comm: Comm) -> None:
        """Replicas must stay bitwise identical; compare a cheap checksum across ranks."""
        sums = comm.allgather(zlib.adler32(self.host_params().tobytes()))
        if len(set(sums)) > 1:
            raise TrainingError(f"model replicas diverged (checksums by rank: {sums})", collective=True)

    def free(self) -> None:
        self.sync.free()
