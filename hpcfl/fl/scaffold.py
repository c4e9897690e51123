"""SCAFFOLD's state on every rank (Karimireddy et al. 2020, option II): the server control
variate c (on every rank, broadcast each round) and each client's variate c_i, kept on the rank
group that always trains that client (clients are assigned to groups once, balanced by size,
so c_i never moves), with the round it was computed in. Each local step adds the correction
c - c_i to the gradient (y <- y - eta_l (g_i(y) - c_i + c)), or c alone when c_i is older than
--scaffold-max-age rounds; after the client's K steps c_i is updated (aggregate.py's formulas)
and delta c_i travels to the server with the model. A checkpoint holds c, every c_i and its
round."""
from __future__ import annotations

import numpy as np

from ..fl import server_opt as aggregate
from ..fl import partition


class Correction:
    """post_reduce hook: + (c - c_i) on the mean gradient, for the client being trained."""

    def __init__(self, backend, n: int):
        self.diff = backend.xp.zeros(n, np.float32)
        self._tmp = backend.xp.zeros(n, np.float32)

    def __call__(self, params, grads, denominator: float) -> None:
        self._tmp[...] = self.diff
        self._tmp *= np.float32(denominator)     # the optimizer scales the gradient sum by 1/denominator
        grads += self._tmp


class Scaffold:
    def __init__(self, fed, backend):
        self.fed, self.backend, n = fed, backend, fed.n
        self.owned = partition.assign_to_groups(np.arange(fed.cfg.num_clients), fed.sizes, fed.n_groups)
        self.c = np.zeros(n, np.float64)
        self.c_i: dict[int, np.ndarray] = {}         # this group's clients that took part so far
        self.when: dict[int, int] = {}               # the round each c_i was computed in
        # this round's new c_i, committed only when the round completes: a round abandoned for a
        # stop signal must leave the checkpointed variates as they were at its start
        self.pending: dict[int, tuple[np.ndarray, int]] = {}
        self.correction = Correction(backend, n)
        self.left_out = False                        # the client being trained corrects with c alone
        fed.rep.post_reduce.append(self.correction)

    def start(self, k: int, server_round: int) -> None:
        c_i = self.c_i.get(k)
        diff, self.left_out = aggregate.scaffold_correction(self.c, c_i, server_round - self.when.get(k, 0),
                                                            self.fed.cfg.scaffold_max_age)
        self.correction.diff[...] = self.backend.to_device(diff.astype(np.float32))

    def finish(self, k: int, y: np.ndarray, steps: int, server_round: int) -> np.ndarray:
        c_i = self.c_i.get(k, np.zeros_like(self.c))
        new, dc = aggregate.scaffold_client_variate(c_i, self.c, self.fed.global_w, y.astype(np.float64),
                                                    steps, self.fed.cfg.local_lr, self.left_out)
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

    def server_update(self, summed) -> None:
        """Rank 0: c <- c + sum delta c_i / N; then every rank gets the new c. The round is
        complete: its clients' new c_i replace the old ones."""
        for k, (new, server_round) in self.pending.items():
            self.c_i[k], self.when[k] = new, server_round
        self.pending.clear()
        if summed is not None:
            dc_sum, count = summed
            self.c = aggregate.scaffold_server_variate(self.c, dc_sum, count, self.fed.cfg.num_clients)
        self.fed.comm.Bcast(self.c)

    # ---- checkpoints: c, every c_i and its round, gathered to rank 0 (a collective call on every rank)
    def gather(self) -> dict[str, np.ndarray] | None:
        from ..privacy.secagg import decode_map, encode_map     # the id-map wire format (no crypto used)

        fed = self.fed
        blob = encode_map({k: v.tobytes() for k, v in self.c_i.items()}) if fed.leader else b""
        parts = fed.leaders.gather_bytes(blob) if fed.leader else None
        whens = fed.leaders.gather(self.when) if fed.leader else None
        if fed.comm.rank != 0:
            return None
        out = {"scaffold.c": self.c.copy()}
        for part in parts:
            for k, raw in decode_map(part).items():
                out[f"scaffold.c_{k}"] = np.frombuffer(raw, np.float64).copy()
        rounds = np.zeros(fed.cfg.num_clients, np.int64)      # 0: no c_i yet
        for part in whens:
            for k, r in part.items():
                rounds[k] = r
        out["scaffold.rounds"] = rounds
        return out

    def restore(self, arrays: dict[str, np.ndarray]) -> None:
        """Every rank: c from the checkpoint, and its group's own c_i with their rounds (a
        checkpoint from before the rounds were kept: round 0, i.e. as old as can be)."""
        self.c[...] = arrays["scaffold.c"]
        mine = set(self.owned[self.fed.group])
        self.c_i = {int(name[len("scaffold.c_"):]): np.array(a, np.float64)
                    for name, a in arrays.items() if name.startswith("scaffold.c_")
                    and int(name[len("scaffold.c_"):]) in mine}
        rounds = arrays.get("scaffold.rounds")
        self.when = {k: int(rounds[k]) if rounds is not None else 0 for k in self.c_i}
