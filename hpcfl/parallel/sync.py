"""Gradient synchronisation: how one step's gradients are summed over the ranks of a replica.

Every strategy owns the step's flat buffer [grads | stop votes | loss]: the batch loss and the
ranks' votes to stop (preemption) ride in the same collective as the gradients, so agreeing on a
stop costs nothing extra (what Horovod calls tensor fusion and DDP a bucket, plus two floats).

- FusedSync: backward, then ONE blocking Allreduce of the whole buffer (MPI, or NCCL when given
  an NcclComm as reducer: --allreduce nccl).
- OverlapSync: a non-blocking Iallreduce of each layer's slice as soon as backward has produced
  it (last layer first), then the two tail slots; wait for all before the update.
- ShmSync: a node's ranks sum in shared memory and each updates its slice of the parameters.

A strategy does the whole synchronous step after the forward/backward pass: the reduction and
the optimizer's update (ShmSync fuses the two), and owns where the parameters and optimizer
state live for reading, writing and checkpoints. `pre_reduce` hooks see the local buffer after
backward and before it is sent (DP-SGD's noise share, a test's injected NaN); `post_reduce`
hooks see (params, summed grads, denominator) before the update (FedProx, SCAFFOLD).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from ..errors import UsageError

if TYPE_CHECKING:
    from ..backends.base import Backend, HostBackend
    from ..config import Config
    from ..core.layout import Layout
    from ..core.replica import ModelState
    from .comm import Comm

PreReduce = Callable[[Any], None]                 # (gradbuf) -> None
PostReduce = Callable[[Any, Any, float], None]    # (params, grads, denominator) -> None


class Sync(Protocol):
    """How a replica's ranks finish a step together."""
    gradbuf: Any          # [grads | stop votes | loss], what the collective carries
    grads: Any            # gradbuf[:n]: the local gradient sum, then the global one
    shared_params: Any    # the parameters when the strategy holds them (shm), else None

    def step(self, comm: Comm, model: ModelState, images: Any, labels: Any, idx: Any, stop: bool,
             pre_reduce: Sequence[PreReduce], post_reduce: Sequence[PostReduce], lr: float,
             denominator: float) -> None:
        """This rank's gradient of rows idx, the sum over comm, the update of the parameters
        with lr and the gradient sum / denominator."""

    def totals(self) -> tuple[float, float]:
        """(stop votes, loss sum) of the last step."""

    def load_params(self, model: ModelState, flat: np.ndarray) -> None: ...

    def host_params(self, model: ModelState) -> np.ndarray: ...

    def optimizer_state(self, comm: Comm, model: ModelState) -> dict | None:
        """The whole optimizer state on rank 0 (None elsewhere). Collective."""

    def load_optimizer_state(self, model: ModelState, state: dict) -> None: ...

    def free(self) -> None: ...


class FusedSync:
    """The replica owns its parameters and optimizer; the strategy sums, then it updates."""
    shared_params = None

    def __init__(self, backend: Backend, layout: Layout, reducer: Any = None):
        n = layout.n_params
        self.backend, self.reducer = backend, reducer
        self.gradbuf = backend.xp.zeros(n + 2, dtype=np.float32)
        self.grads = self.gradbuf[:n]

    def _tail(self, stop: bool, pre_reduce: Sequence[PreReduce]) -> None:
        self.gradbuf[-2] = 1.0 if stop else 0.0
        for hook in pre_reduce:
            hook(self.gradbuf)

    def run(self, comm: Any, model: ModelState, images: Any, labels: Any, idx: Any, stop: bool,
            pre_reduce: Sequence[PreReduce] = ()) -> None:
        """This rank's gradient sum of rows idx (model.local_gradient writes into self.grads and
        returns the loss), then the sum over comm in place."""
        self.gradbuf[-1] = model.local_gradient(images, labels, idx)
        self._tail(stop, pre_reduce)
        (comm if self.reducer is None else self.reducer).Allreduce_sum(self.gradbuf)

    def step(self, comm: Comm, model: ModelState, images: Any, labels: Any, idx: Any, stop: bool,
             pre_reduce: Sequence[PreReduce], post_reduce: Sequence[PostReduce], lr: float,
             denominator: float) -> None:
        self.run(comm, model, images, labels, idx, stop, pre_reduce)
        for hook in post_reduce:
            hook(model.params, self.grads, denominator)
        model.opt.step(model.params, self.grads, lr, 1.0 / denominator)

    def totals(self) -> tuple[float, float]:
        """(stop votes, loss sum) after run(): one small device -> host copy."""
        votes, loss = (float(v) for v in self.backend.to_host(self.gradbuf[-2:]))
        return votes, loss

    def load_params(self, model: ModelState, flat: np.ndarray) -> None:
        model.params[...] = self.backend.to_device(flat)

    def host_params(self, model: ModelState) -> np.ndarray:
        return self.backend.to_host(model.params)

    def optimizer_state(self, comm: Comm, model: ModelState) -> dict | None:
        return model.opt.state() if comm.rank == 0 else None

    def load_optimizer_state(self, model: ModelState, state: dict) -> None:
        model.opt.load_state(state)

    def free(self) -> None:
        if self.reducer is not None:
            self.reducer.Free()


class OverlapSync(FusedSync):
    def __init__(self, backend: Backend, layout: Layout, reducer: Any = None):
        super().__init__(backend, layout, reducer)
        # one slice per layer (W then b, contiguous in the flat buffer)
        bounds = np.cumsum([0] + [i * o + o for i, o in zip(layout.sizes[:-1], layout.sizes[1:])])
        self.layer_grads = [self.gradbuf[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        self._reqs: list = []
        self._comm: Any = None                     # the step's communicator, for _start_layer
        self._on_layer_ready = self._start_layer   # bound once: no allocation per step

    def _start_layer(self, i: int) -> None:
        self._reqs.append(self._comm.Iallreduce_sum(self.layer_grads[i]))

    def run(self, comm: Any, model: ModelState, images: Any, labels: Any, idx: Any, stop: bool,
            pre_reduce: Sequence[PreReduce] = ()) -> None:
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


class ShmSync:
    """--allreduce shm: node-aware reduction fused with a sharded optimizer update.

    The L ranks of a node share one MPI-3 window: L gradient slots [grads | stop | loss] (each
    rank's backward writes straight into its own), one copy of the parameters, and the summed
    tail. After a node barrier, local rank l owns slice l of the flat buffer (shard_range): it
    sums that slice over the L slots and, in the same pass, applies the optimizer to that slice
    of the shared parameters with its own 1/L of the optimizer state (ZeRO stage 1, Rajbhandari
    et al. 2020, inside a node). Across nodes, the owners of slice l Allreduce their slice sums
    first (one communicator per local rank index: inter-node traffic is spread over the node's
    L ranks, as in hierarchical allreduce), then update. A second barrier, and every rank's next
    forward reads the same parameters. The last slice's owner also reduces the stop votes and
    the loss, for everyone to read."""

    def __init__(self, cfg: Config, backend: HostBackend, layout: Layout, comm: Comm):
        from ..core import optim
        from ..data.shard import shard_range

        n = self.n = layout.n_params
        self.backend = backend
        self.node = comm.shm_node_comm()
        L, l = self.node.size, self.node.rank  # noqa: E741  (the paper-style L ranks, slice l)
        sizes = sorted(set(comm.allgather(L)))
        if len(sizes) > 1:     # slice l must be the same columns on every node
            self.node.Free()
            raise UsageError(f"--allreduce shm needs as many ranks on every node; this job has nodes "
                             f"of {' and '.join(map(str, sizes))} ranks: use --allreduce fused",
                             collective=True)
        self.cross = comm.Split(l, comm.rank)            # slice l's owners on every node
        self.window = self.node.allocate_shared(L * (n + 2) + n + 2)
        arr = self.window.array
        self.slots = arr[:L * (n + 2)].reshape(L, n + 2)
        self.gradbuf = self.slots[l]
        self.grads = self.gradbuf[:n]
        self.params = self.shared_params = arr[L * (n + 2):L * (n + 2) + n]
        self.result = arr[-2:]
        self.lo, self.hi = shard_range(n, l, L)
        self.owns_tail = l == L - 1
        self.cfg = cfg
        self.opt = optim.create(cfg.optimizer, backend, self.hi - self.lo, cfg.momentum, cfg.weight_decay)
        self.red = np.zeros(self.hi - self.lo + 2, np.float32)    # multi-node: slice sum (+ tail)

    def load_params(self, model: ModelState, flat: np.ndarray) -> None:
        """The node's rank 0 writes the shared parameters; every rank waits until it has."""
        if self.node.rank == 0:
            self.params[...] = flat
        self.window.Sync()
        self.node.Barrier()
        self.window.Sync()

    def step(self, comm: Comm, model: ModelState, images: Any, labels: Any, idx: Any, stop: bool,
             pre_reduce: Sequence[PreReduce], post_reduce: Sequence[PostReduce], lr: float,
             denominator: float) -> None:
        assert not post_reduce, "--allreduce shm updates inside the reduction: no post_reduce hooks"
        self.run(comm, model, images, labels, idx, stop, pre_reduce, lr=lr, scale=1.0 / denominator)

    def run(self, comm: Comm, model: ModelState, images: Any, labels: Any, idx: Any, stop: bool,
            pre_reduce: Sequence[PreReduce] = (), lr: float = 0.0,
            scale: float = 1.0) -> None:
        n, lo, hi, opt, be = self.n, self.lo, self.hi, self.opt, self.backend
        self.gradbuf[-1] = model.local_gradient(images, labels, idx)
        self.gradbuf[-2] = 1.0 if stop else 0.0
        for hook in pre_reduce:
            hook(self.gradbuf)
        self.window.Sync()
        self.node.Barrier()                                  # every slot is written
        self.window.Sync()
        if self.cross.size == 1:                             # one node: sum and update in one pass
            self._update(lr, scale)
            if self.owns_tail:
                self.result[...] = self.slots[:, n:].sum(axis=0)
        else:                                                # several: sum, Allreduce, update
            be.sum_slots(self.slots, lo, hi, self.red[:hi - lo])
            self.red[-2:] = self.slots[:, n:].sum(axis=0) if self.owns_tail else 0.0
            self.cross.Allreduce_sum(self.red)
            opt.step(self.params[lo:hi], self.red[:hi - lo], lr, scale)
            if self.owns_tail:
                self.result[...] = self.red[-2:]
        self.window.Sync()
        self.node.Barrier()                                  # every slice is updated
        self.window.Sync()

    def _update(self, lr: float, scale: float) -> None:
        from ..core import optim

        opt, be, lo, hi = self.opt, self.backend, self.lo, self.hi
        if isinstance(opt, optim.SGD):
            be.sgd_update_slots(self.slots, lo, hi, self.params, opt.buf, lr, opt.momentum,
                                opt.weight_decay, scale)
        else:
            assert isinstance(opt, optim.Adam)
            opt.t += 1
            be.adam_update_slots(self.slots, lo, hi, self.params, opt.m, opt.v, lr, opt.beta1,
                                 opt.beta2, opt.eps, opt.weight_decay, scale, opt.t)

    def totals(self) -> tuple[float, float]:
        return float(self.result[0]), float(self.result[1])

    def host_params(self, model: ModelState) -> np.ndarray:
        """A copy: the shared window goes away with free()."""
        return np.array(self.params)

    def optimizer_state(self, comm: Comm, model: ModelState) -> dict | None:
        """The whole optimizer state on rank 0, from the slices of node 0's ranks (every node
        holds the same): a checkpoint of an shm run is that of a fused one. Collective."""
        mine = {k: (v if isinstance(v, int) else np.array(v)) for k, v in self.opt.state().items()}
        parts = comm.gather((self.cross.rank, self.lo, self.hi, mine))
        if parts is None:                       # not rank 0
            return None
        full: dict[str, Any] = {}
        for node, lo, hi, state in parts:
            if node != 0:
                continue
            for k, v in state.items():
                if isinstance(v, int):
                    full[k] = v
                else:
                    full.setdefault(k, np.zeros(self.n, np.float32))[lo:hi] = v
        return full

    def load_optimizer_state(self, model: ModelState, state: dict) -> None:
        """This rank's slice of a full optimizer state (of a fused or an shm run)."""
        self.opt.load_state({k: (v if np.ndim(v) == 0 else np.asarray(v)[self.lo:self.hi])
                             for k, v in state.items()})

    def free(self) -> None:
        self.window.Free()
        self.cross.Free()
        self.node.Free()


# --allreduce's choices: (cfg, backend, layout, reducer, comm) -> Sync. nccl is the fused
# strategy over an NCCL communicator (the reducer the trainer builds).
SYNCS: dict[str, Callable[..., Sync]] = {
    "fused": lambda cfg, backend, layout, reducer, comm: FusedSync(backend, layout, reducer),
    "overlap": lambda cfg, backend, layout, reducer, comm: OverlapSync(backend, layout, reducer),
    "nccl": lambda cfg, backend, layout, reducer, comm: FusedSync(backend, layout, reducer),
    "shm": lambda cfg, backend, layout, reducer, comm: ShmSync(cfg, backend, layout, comm),
}


def create(cfg: Config, backend: Backend, layout: Layout, reducer: Any = None, comm: Comm | None = None) -> Sync:
    """The strategy of --allreduce (shm needs the world communicator; without one, fused)."""
    name = cfg.allreduce if cfg.allreduce != "shm" or comm is not None else "fused"
    return SYNCS[name](cfg, backend, layout, reducer, comm)


def gradient_reducer(cfg: Config, comm: Comm, world: Comm | None = None, group: int = 0) -> Any:
    """What sums a step's gradients over `comm`: an NCCL communicator with --allreduce nccl
    (collective over `world` to create), else None, meaning comm's MPI Allreduce."""
    if cfg.allreduce != "nccl" or comm.size == 1:
        return None
    from .nccl import NcclComm

    return NcclComm(comm, world=world, group=group)
