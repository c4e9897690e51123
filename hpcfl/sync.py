"""Gradient synchronisation: how one step's gradients are summed over the ranks of a replica.

Every strategy owns the step's flat buffer [grads | stop votes | loss]: the batch loss and the
ranks' votes to stop (preemption) ride in the same collective as the gradients, so agreeing on a
stop costs nothing extra (what Horovod calls tensor fusion and DDP a bucket, plus two floats).

- FusedSync: backward, then ONE blocking Allreduce of the whole buffer (MPI, or NCCL when given
  an NcclComm as reducer: --allreduce nccl).
- OverlapSync: a non-blocking Iallreduce of each layer's slice as soon as backward has produced
  it (last layer first), then the two tail slots; wait for all before the update.

`pre_reduce` hooks see the local buffer after backward and before it is sent (a fault test's
NaN, DP-SGD's noise share); they are called with the whole buffer.
"""
from __future__ import annotations

import numpy as np


class FusedSync:
    def __init__(self, backend, layout, reducer=None):
        n = layout.n_params
        self.backend, self.reducer = backend, reducer
        self.gradbuf = backend.xp.zeros(n + 2, dtype=np.float32)
        self.grads = self.gradbuf[:n]

    def _tail(self, stop: bool, pre_reduce) -> None:
        self.gradbuf[-2] = 1.0 if stop else 0.0
        for hook in pre_reduce:
            hook(self.gradbuf)

    def run(self, comm, model, images, labels, idx, stop: bool, pre_reduce=()) -> None:
        """This rank's gradient sum of rows idx (model.local_gradient writes into self.grads and
        returns the loss), then the sum over comm in place."""
        self.gradbuf[-1] = model.local_gradient(images, labels, idx)
        self._tail(stop, pre_reduce)
        (comm if self.reducer is None else self.reducer).Allreduce_sum(self.gradbuf)

    def totals(self) -> tuple[float, float]:
        """(stop votes, loss sum) after run(): one small device -> host copy."""
        votes, loss = (float(v) for v in self.backend.to_host(self.gradbuf[-2:]))
        return votes, loss

    def free(self) -> None:
        if self.reducer is not None:
            self.reducer.Free()


class OverlapSync(FusedSync):
    def __init__(self, backend, layout, reducer=None):
        super().__init__(backend, layout, reducer)
        # one slice per layer (W then b, contiguous in the flat buffer)
        bounds = np.cumsum([0] + [i * o + o for i, o in zip(layout.sizes[:-1], layout.sizes[1:])])
        self.layer_grads = [self.gradbuf[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        self._reqs, self._comm = [], None
        self._on_layer_ready = self._start_layer   # bound once: no allocation per step

    def _start_layer(self, i: int) -> None:
        self._reqs.append(self._comm.Iallreduce_sum(self.layer_grads[i]))

    def run(self, comm, model, images, labels, idx, stop: bool, pre_reduce=()) -> None:
        if comm.size == 1:
            return super().run(comm, model, images, labels, idx, stop, pre_reduce)
        self._reqs.clear()
        self._comm = comm
        self.gradbuf[-1] = model.local_gradient(images, labels, idx, self._on_layer_ready)
        # Every rank starts the same reductions in the same order, also a rank with no rows
        # (backward did not run there, so it started none).
        for i in range(len(self.layer_grads) - 1 - len(self._reqs), -1, -1):
            self._start_layer(i)
        self._tail(stop, pre_reduce)
        self._reqs.append(comm.Iallreduce_sum(self.gradbuf[-2:]))   # stop votes and loss
        comm.Waitall(self._reqs)


def make(cfg, backend, layout, reducer=None):
    if cfg.allreduce == "overlap":
        return OverlapSync(backend, layout, reducer)
    return FusedSync(backend, layout, reducer)
