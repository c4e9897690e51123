"""SCAFFOLD (Karimireddy et al. 2020, Algorithm 1 with option II control variates): its formulas,
pure, and its state on every rank.

The server control variate c lives on every rank (broadcast each round); each client's variate
c_i lives on the rank group that always trains that client (FedContext.home: clients are
assigned to groups once, balanced by size, so c_i never moves), with the round it was computed
in. Each local step adds the correction c - c_i to the gradient (y <- y - eta_l (g_i(y) - c_i +
c)), or c alone when c_i is older than --scaffold-max-age rounds; after the client's K steps c_i
is updated and delta c_i travels to the server with the model. A checkpoint holds c, every c_i
and its round.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..parallel import wire

if TYPE_CHECKING:
    from ..backends.base import Backend
    from .context import FedContext


# ---- the formulas

def scaffold_correction(c: np.ndarray, c_i: np.ndarray | None, age: int, max_age: int) -> tuple[np.ndarray, bool]:
    """What each local step adds to the client's gradient: c - c_i (Algorithm 1), and whether
    c_i was left out: then it is c alone, as in the client's first round (no c_i yet), also when
    max_age > 0 and c_i was computed more than max_age rounds ago. A c_i is a mean of gradients
    at an old global model: with 10% of the clients per round it is ~10 rounds old, and the
    paper has no rule for that (its client-sampling analysis only shrinks the step size);
    correcting with old c_i made SCAFFOLD diverge at local lr 0.1 (benchmarks/ROBUSTNESS.md)."""
    if c_i is None or (max_age > 0 and age > max_age):
        return c.copy(), True
    return c - c_i, False


def scaffold_client_variate(c_i: np.ndarray, c: np.ndarray, x: np.ndarray, y: np.ndarray,
                            steps: int, local_lr: float, left_out: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """c_i+ = c_i - c + (x - y) / (K eta_l) (option II, eq. 4: no extra gradient pass), from the
    global model x and the client's model y after its K local steps at learning rate eta_l:
    the mean of the client's own gradients along those steps, since each moved y by
    -eta_l (g_i(y) - c_i + c). When the correction left c_i out (scaffold_correction), each step
    moved y by -eta_l (g_i(y) + c), and that mean is -c + (x - y) / (K eta_l). Returns (c_i+,
    delta c_i = c_i+ - c_i): against the stored c_i, the one the server's c holds."""
    new = (-c if left_out else c_i - c) + (x - y) / (steps * local_lr)
    return new, new - c_i


def scaffold_server_variate(c: np.ndarray, dc_sum: np.ndarray, count: int, num_clients: int) -> np.ndarray:
    """c <- c + (|S| / N) * mean over the round's clients S of delta c_i = c + sum / N (eq. 5):
    c stays the mean of all N stored c_i (0 for a client not seen yet)."""
    return c + dc_sum / num_clients if count else c


# ---- the state

class Correction:
    """post_reduce hook: + (c - c_i) on the mean gradient, for the client being trained."""

    def __init__(self, backend: Backend, n: int):
        self.diff = backend.xp.zeros(n, np.float32)
        self._tmp = backend.xp.zeros(n, np.float32)

    def __call__(self, params: Any, grads: Any, denominator: float) -> None:
        self._tmp[...] = self.diff
        self._tmp *= np.float32(denominator)     # the optimizer scales the gradient sum by 1/denominator
        grads += self._tmp


class Scaffold:
    """c, this group's c_i, and the hook that corrects the local gradients (`correction`, which
    the Federation puts on its replica's post_reduce hooks)."""

    def __init__(self, ctx: FedContext, backend: Backend, local_lr: float, max_age: int):
        assert ctx.home is not None, "SCAFFOLD needs each client trained by one group"
        self.ctx, self.backend, self.local_lr, self.max_age = ctx, backend, local_lr, max_age
        self.owned = ctx.home
        self.c = np.zeros(ctx.n, np.float64)
        self.c_i: dict[int, np.ndarray] = {}         # this group's clients that took part so far
        self.when: dict[int, int] = {}               # the round each c_i was computed in
        # this round's new c_i, committed only when the round completes: a round abandoned for a
        # stop signal must leave the checkpointed variates as they were at its start
        self.pending: dict[int, tuple[np.ndarray, int]] = {}
        self.correction = Correction(backend, ctx.n)
        self.left_out = False                        # the client being trained corrects with c alone

    def start(self, k: int, server_round: int) -> None:
        c_i = self.c_i.get(k)
        diff, self.left_out = scaffold_correction(self.c, c_i, server_round - self.when.get(k, 0), self.max_age)
        self.correction.diff[...] = self.backend.to_device(diff.astype(np.float32))

    def finish(self, k: int, y: np.ndarray, steps: int, server_round: int, global_w: np.ndarray) -> np.ndarray:
        c_i = self.c_i.get(k, np.zeros_like(self.c))
        new, dc = scaffold_client_variate(c_i, self.c, global_w, y.astype(np.float64), steps,
                                          self.local_lr, self.left_out)
        if not np.isfinite(new).all():
            # its training diverged, so the server rejects its update (and ignores dc): it keeps
            # its old c_i, which would otherwise stay NaN and, once left out for its age, send a
            # NaN delta c_i with a good model that makes c NaN
            return np.zeros_like(dc)
        self.pending[k] = (new, server_round)
        return dc

    def discard(self) -> None:
        """The round was abandoned (a stop signal): its c_i updates never happened."""
        self.pending.clear()

    def server_update(self, summed: tuple[np.ndarray, int] | None) -> None:
        """Rank 0: c <- c + sum delta c_i / N; then every rank gets the new c. The round is
        complete: its clients' new c_i replace the old ones."""
        for k, (new, server_round) in self.pending.items():
            self.c_i[k], self.when[k] = new, server_round
        self.pending.clear()
        if summed is not None:
            dc_sum, count = summed
            self.c = scaffold_server_variate(self.c, dc_sum, count, self.ctx.num_clients)
        self.ctx.comm.Bcast(self.c)

    # ---- checkpoints: c, every c_i and its round, gathered to rank 0 (a collective call on every rank)
    def gather(self) -> dict[str, np.ndarray] | None:
        ctx = self.ctx
        blob = wire.encode_map({k: v.tobytes() for k, v in self.c_i.items()}) if ctx.leader else b""
        parts = ctx.leaders.gather_bytes(blob) if ctx.leader else None
        whens = ctx.leaders.gather(self.when) if ctx.leader else None
        if ctx.comm.rank != 0:
            return None
        assert parts is not None and whens is not None
        out: dict[str, np.ndarray] = {"scaffold.c": self.c.copy()}
        for part in parts:
            for k, raw in wire.decode_map(part).items():
                out[f"scaffold.c_{k}"] = np.frombuffer(raw, np.float64).copy()
        rounds = np.zeros(ctx.num_clients, np.int64)      # 0: no c_i yet
        for when in whens:
            for k, r in when.items():
                rounds[k] = r
        out["scaffold.rounds"] = rounds
        return out

    def restore(self, arrays: dict[str, np.ndarray]) -> None:
        """Every rank: c from the checkpoint, and its group's own c_i with their rounds (a
        checkpoint from before the rounds were kept: round 0, i.e. as old as can be)."""
        self.c[...] = arrays["scaffold.c"]
        mine = set(self.owned[self.ctx.group])
        self.c_i = {int(name[len("scaffold.c_"):]): np.array(a, np.float64)
                    for name, a in arrays.items() if name.startswith("scaffold.c_")
                    and int(name[len("scaffold.c_"):]) in mine}
        rounds = arrays.get("scaffold.rounds")
        self.when = {k: int(rounds[k]) if rounds is not None else 0 for k in self.c_i}
