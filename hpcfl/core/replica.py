"""One copy of the model on this rank, and one synchronous training step over a communicator.

A Replica composes three concerns:
- ModelState: the flat parameters, the optimizer and the preallocated workspaces (the
  gradient buffer belongs to the sync strategy, whose collective carries it);
- a gradient synchronisation strategy (sync.py: fused, overlap, NCCL);
- hooks: `pre_reduce(gradbuf)` before the collective (a fault test's NaN, DP noise), and
  `post_reduce(params, grads, denominator)` on the summed gradient before the update
  (FedProx's proximal term, SCAFFOLD's correction).
Each rank computes the rows shard_range gives it of every global batch, so P ranks follow the
trajectory of one process on the same global batch (up to float summation order).
"""
from __future__ import annotations

import zlib

import numpy as np

from ..core import layout as model
from ..core import optim
from ..parallel import sync
from ..runtime import watchdog
from ..data.catalogue import MEAN, STD
from ..data.shard import shard_range
from ..errors import TrainingError

EVAL_BATCH = 1000


class ModelState:
    """Parameters, optimizer state and workspaces of one replica (no communication)."""

    def __init__(self, cfg, backend, layout, max_local_batch: int, grads, norm=None, params=None):
        self.cfg, self.backend, self.layout = cfg, backend, layout
        self.norm = tuple(norm) if norm is not None else (MEAN, STD)   # the data's pixel mean, std
        # params: the node's shared copy under --allreduce shm (written by the sync), else our own
        self.params = params if params is not None else backend.to_device(model.init_params(layout, cfg.seed))
        self.grads = grads
        self.pviews, self.gviews = layout.views(self.params), layout.views(grads)
        self.opt = optim.make(cfg.optimizer, backend, layout.n_params, cfg.momentum, cfg.weight_decay)
        n_in = layout.sizes[0]
        self.ws = backend.Workspace(layout, max_local_batch)
        self.xbuf = backend.xp.empty((max_local_batch, n_in), np.float32)
        self.ybuf = backend.xp.empty(max_local_batch, np.int32)
        self.eval_ws = backend.Workspace(layout, EVAL_BATCH)
        self.eval_x = backend.xp.empty((EVAL_BATCH, n_in), np.float32)
        self.eval_y = backend.xp.empty(EVAL_BATCH, np.int32)
        self.clip = None                       # DP-SGD: per-sample gradients clipped to this norm
        self.clipped = 0                       # how many samples the clip cut (a statistic, not private)
        self._chunk_grads = None               # DP-SGD's rare oversized batch: partial sums

    def local_gradient(self, images, labels, idx, on_layer_ready=None) -> float:
        """Summed loss and gradients of rows `idx` (into grads)."""
        n, be = len(idx), self.backend
        if n == 0:                              # a rank with no rows in a tiny last batch (fl)
            self.grads[...] = 0
            return 0.0
        if self.clip is not None:
            return self._clipped_gradient(images, labels, idx)
        be.gather(images, idx, self.xbuf, *self.norm)
        be.gather_labels(labels, idx, self.ybuf)
        if on_layer_ready is None:
            return be.forward_backward(self.pviews, self.xbuf[:n], self.ybuf[:n], self.gviews, self.ws)
        return be.forward_backward(self.pviews, self.xbuf[:n], self.ybuf[:n], self.gviews, self.ws,
                                   on_layer_ready=on_layer_ready)

    def _clipped_gradient(self, images, labels, idx) -> float:
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
                                                    self.ws, self.clip)
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

    def evaluate(self, comm, images, labels) -> tuple[float, float]:
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

    def __init__(self, backend, mu: float, anchor):
        self.xp, self.mu, self.anchor = backend.xp, mu, anchor
        self._tmp = backend.xp.empty_like(anchor)

    def __call__(self, params, grads, denominator: float) -> None:
        self.xp.subtract(params, self.anchor, out=self._tmp)
        self._tmp *= np.float32(self.mu * denominator)   # the optimizer scales the sum by 1/denominator
        grads += self._tmp


def buffer_bytes(cfg, layout, max_local_batch: int) -> dict[str, int]:
    """What a Replica allocates, by what it grows with (for the memory check before a run):
    the model (parameters, gradients, optimizer state) and the batch (activations and deltas of
    every layer, the gathered input rows), plus evaluation's fixed 1000-row workspace."""
    n, f = layout.n_params, 4
    opt = {"sgd": 1, "adam": 2}[cfg.optimizer]
    rows = sum(layout.sizes[1:]) * 2 + layout.sizes[0] + 1
    return {"model": f * n * (2 + opt), "batch": f * max_local_batch * rows, "eval": f * EVAL_BATCH * rows}


class Replica:
    def __init__(self, cfg, backend, max_local_batch: int, reducer=None, layout=None, norm=None, comm=None):
        self.cfg, self.backend = cfg, backend
        self.layout = layout or model.layout(cfg.hidden)
        self.sync = sync.make(cfg, backend, self.layout, reducer, comm)
        shared = getattr(self.sync, "params", None)
        self.model = ModelState(cfg, backend, self.layout, max_local_batch, self.sync.grads, norm, shared)
        if shared is not None:
            self.sync.write_params(model.init_params(self.layout, cfg.seed))
        self.pre_reduce: list = []
        self.post_reduce: list = []
        self.stop_agreed = False               # set by step(): some rank voted to stop

    # the parts tests and benchmarks look at
    params = property(lambda self: self.model.params)
    grads = property(lambda self: self.sync.grads)
    gradbuf = property(lambda self: self.sync.gradbuf)
    pviews = property(lambda self: self.model.pviews)
    gviews = property(lambda self: self.model.gviews)
    opt = property(lambda self: self.model.opt)
    ws = property(lambda self: self.model.ws)
    xbuf = property(lambda self: self.model.xbuf)
    ybuf = property(lambda self: self.model.ybuf)

    def step(self, comm, images, labels, global_idx, lr: float, stop: bool = False,
             denominator: float | None = None) -> float:
        """One synchronous step on this rank's slice of the global batch; returns the mean loss.

        `stop` is this rank's vote to stop after this step; afterwards self.stop_agreed is the
        same on every rank: True when any rank voted. `denominator` turns the gradient sum into
        the update's mean (default: the batch size; DP-SGD uses the expected batch)."""
        n = len(global_idx)
        lo, hi = shard_range(n, comm.rank, comm.size)
        denominator = float(n) if denominator is None else denominator
        if self.sync.updates_params:           # shm: each rank updates its slice inside run()
            self.sync.run(comm, self.model, images, labels, global_idx[lo:hi], stop, self.pre_reduce,
                          lr=lr, scale=1.0 / denominator)
        else:
            self.sync.run(comm, self.model, images, labels, global_idx[lo:hi], stop, self.pre_reduce)
            for hook in self.post_reduce:
                hook(self.model.params, self.sync.grads, denominator)
            self.model.opt.step(self.model.params, self.sync.grads, lr, 1.0 / denominator)
        votes, loss = self.sync.totals()
        self.stop_agreed = votes > 0
        watchdog.progress()
        return loss / n if n else 0.0

    def evaluate(self, comm, images, labels) -> tuple[float, float]:
        return self.model.evaluate(comm, images, labels)

    def load_params(self, flat_host: np.ndarray) -> None:
        if self.sync.updates_params:
            self.sync.write_params(flat_host)
        else:
            self.model.params[...] = self.backend.to_device(flat_host)

    def host_params(self) -> np.ndarray:
        """The parameters on the host (a copy when they are the node's shared window, which
        goes away with free())."""
        if self.sync.updates_params:
            return np.array(self.model.params)
        return self.backend.to_host(self.model.params)

    def reset_optimizer(self) -> None:
        self.model.reset_optimizer()

    def state(self) -> dict[str, np.ndarray]:
        """Host copies of what a checkpoint holds: the parameters and the optimizer state."""
        out = {"params": self.host_params()}
        for name, value in self.model.opt.state().items():
            out[f"opt.{name}"] = np.array(value, np.int64) if isinstance(value, int) else self.backend.to_host(value)
        return out

    def checkpoint_arrays(self, comm) -> dict | None:
        """state(), gathered where it is sharded (shm): on rank 0, None elsewhere. Collective."""
        if not self.sync.updates_params:
            return self.state() if comm.rank == 0 else None
        full = self.sync.gather_state(comm)
        if comm.rank != 0:
            return None
        out = {"params": self.host_params()}
        for name, value in full.items():
            out[f"opt.{name}"] = np.array(value, np.int64) if isinstance(value, int) else value
        return out

    def load_state(self, arrays: dict[str, np.ndarray]) -> None:
        self.load_params(arrays["params"])
        state = {k[4:]: v for k, v in arrays.items() if k.startswith("opt.")}
        if self.sync.updates_params:
            self.sync.load_state(state)
        else:
            self.model.opt.load_state(state)

    def check_replicas(self, comm) -> None:
        """Replicas must stay bitwise identical; compare a cheap checksum across ranks."""
        sums = comm.allgather(zlib.adler32(self.host_params().tobytes()))
        if len(set(sums)) > 1:
            raise TrainingError(f"model replicas diverged (checksums by rank: {sums})", collective=True)

    def free(self) -> None:
        self.sync.free()
