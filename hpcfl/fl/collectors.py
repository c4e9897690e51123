"""How the server (world rank 0) collects a round's client contributions.
(secagg.py, and with it the cryptography package, ~75 ms of start-up, is imported by the
collectors that use it, when they do.)

Three collectors, one interface: the group leaders `add` each trained client's model, then every
rank calls `finish`, which returns on rank 0 the round's average model (None: the round is
skipped) and the round's statistics.

- PlainCollector: FedAvg in the clear. Leaders Reduce [sum_k n_k w_k | sum_k n_k | loss | seen]
  in float64 to rank 0 (McMahan et al. 2017).
- DpCollector: DP-FedAvg with a trusted server (McMahan et al. 2018). Each client's delta
  w_k - w is clipped to L2 norm S; leaders Reduce the sum; rank 0 adds N(0, z^2 S^2) to every
  coordinate and divides by the expected number of clients q N (clients count equally).
- SecureCollector: the server learns only the sum (secagg.py: Bonawitz et al. 2017 against a
  malicious server, SecAgg+). Each client's contribution is quantised to uint32 (fixed point),
  masked, and relayed through rank 0 with Gatherv/Scatterv, as a real server would relay it:
  signed keys, encrypted shares, masked inputs, consistency signatures, unmask responses.
  Without DP a contribution is n_k * clip(w_k - w, +-R) with its weight n_k (R large enough
  not to cut real updates: secagg_range); with DP it is clip_L2(w_k - w, S) plus the client's
  share of the noise (privacy.DpPlan.share_std, sized so that a low quantile of the honest
  survivors gives the planned z), from the CSPRNG (noise.py), so that the server never sees an
  un-noised sum; a round that would take epsilon past the budget is withheld before unmasking.

Only comm.py talks MPI: this module calls Comm's methods.
"""
from __future__ import annotations

import math
import secrets as _secrets
import time

import numpy as np

from ..privacy import accountant as privacy
from ..fl import aggregators as robust
from ..errors import UsageError

# Test hooks (rank 0 only): observers(server_round, {client: uploaded masked vector}) see what
# the server receives; tamper(server_round, {receiver: routed ciphertext map}) may alter what it
# relays. Both empty outside the tests.
observers: list = []
tamper = None

TAIL = 6        # words after the model: weight, weight x steps, samples seen, loss sum (fixed point),
                # diverged, clipped (coordinates cut by the range; with DP: whether the L2 clip bit)


def _reason(delta: np.ndarray, loss_sum: float, n: int, max_norm) -> str | None:
    """Why the server rejects a client's contribution (robust.validate, and a NaN/Inf training
    loss: a client whose local training diverged), or None."""
    if not math.isfinite(loss_sum):
        return f"its training loss is {loss_sum}"
    return robust.validate(delta, n, max_norm)


class PlainCollector:
    """The weighted mean in the clear (FedAvg), through one Reduce of float64 sums:
    [sum n_k d_k | sum n_k | sum n_k tau_k | loss | seen | rejected non-finite] where d_k is the
    client's delta w_k - w (clipped to --max-update-norm with --aggregator norm-bounded), divided
    by its local steps tau_k with stragglers (FedNova, Wang et al. 2020: the mean is then scaled by
    tau_eff = sum n_k tau_k / sum n_k). Each update is validated before it enters the sum: the
    server's check, run on the rank that relays the update (the Reduce is only transport)."""

    def __init__(self, fed, cfg=None):
        self.fed, self.cfg, n = fed, cfg, fed.n
        self.fednova = bool(cfg and cfg.straggler_rate > 0)
        self.clip = cfg.max_update_norm if cfg and cfg.aggregator == "norm-bounded" else None
        self.max_norm = cfg.max_update_norm if cfg and cfg.aggregator != "norm-bounded" else None
        self.extra = n + 1 if cfg and cfg.scaffold else 0         # SCAFFOLD: sum of dc_k, count
        self.sendbuf = np.zeros(n + 5 + self.extra, np.float64)
        self.recvbuf = np.zeros_like(self.sendbuf) if fed.comm.rank == 0 else None
        self._delta = np.empty(n, np.float64)       # add()'s work buffer: no allocation per client

    def begin(self, server_round: int, sampled, dropped) -> None:
        self.sendbuf[...] = 0
        self.rejected = []

    def add(self, k: int, w_k: np.ndarray, n_k: int, loss_sum: float, seen: int, steps: int = 1,
            dc: np.ndarray | None = None) -> None:
        n, buf = self.fed.n, self.sendbuf
        delta = np.subtract(w_k, self.fed.global_w, out=self._delta, dtype=np.float64)
        why = _reason(delta, loss_sum, n, self.max_norm)
        if why is not None:
            self.rejected.append((k, why))
            buf[n + 4] += not (np.isfinite(delta).all() and math.isfinite(loss_sum))
            return
        if self.clip is not None:
            delta, _ = privacy.clip_l2(delta, self.clip)
        delta *= n_k / steps if self.fednova else n_k     # in place: delta is the work buffer (or clip's copy)
        buf[:n] += delta
        buf[n:n + 4] += (n_k, n_k * steps, loss_sum, seen)
        if dc is not None:
            buf[n + 5:-1] += dc
            buf[-1] += 1

    def _reduce(self):
        fed = self.fed
        if fed.leader:
            fed.leaders.Reduce_sum(self.sendbuf, self.recvbuf, root=0)
        return self.recvbuf

    def _rejections(self) -> list:
        """Every leader's rejected clients, on rank 0 (one small gather of pickled lists)."""
        fed = self.fed
        if not fed.leader:
            return []
        lists = fed.leaders.gather(self.rejected)
        return sorted(r for part in lists for r in part) if lists is not None else []

    def finish(self, server_round: int, global_w: np.ndarray, clients: int):
        rejected = self._rejections()
        total = self._reduce()
        if self.fed.comm.rank != 0:
            return None, {}
        n = self.fed.n
        stats = {"loss_sum": total[n + 2], "seen": total[n + 3], "rejected": rejected,
                 "nonfinite": int(total[n + 4]),
                 "bytes_to_server": min(self.fed.n_groups, clients) * self.sendbuf[:n + 5].nbytes}
        if self.extra:
            stats["scaffold"] = (total[n + 5:-1].copy(), int(total[-1]))
            stats["bytes_to_server"] *= 2
        if total[n] == 0:
            return None, {**stats, "skipped": "every update was rejected" if rejected else "no client reported"}
        mean = total[:n] / total[n]
        if self.fednova:
            mean *= total[n + 1] / total[n]        # tau_eff
        return (global_w + mean).astype(np.float32), stats


class GatheredCollector(PlainCollector):
    """The robust rules (median, trimmed mean, Krum, Multi-Krum) need every update at the server:
    the leaders Gatherv their clients' deltas (float32) to rank 0, which validates each one, stacks
    them (m, n) and applies robust.aggregate. The cost (memory of the stack, gather and
    aggregation time) is in the round's record."""

    def begin(self, server_round, sampled, dropped) -> None:
        self.parts = {}

    def add(self, k, w_k, n_k, loss_sum, seen, steps=1, dc=None) -> None:
        delta = (w_k.astype(np.float64) - self.fed.global_w).astype(np.float32)
        head = np.array([n_k, steps, loss_sum, seen], np.float64).tobytes()
        self.parts[k] = head + delta.tobytes()

    def finish(self, server_round, global_w, clients):
        from ..privacy import secagg
        fed, n, cfg = self.fed, self.fed.n, self.cfg
        t0 = time.perf_counter()
        got = fed.leaders.gather_bytes(secagg.encode_map(self.parts)) if fed.leader else None
        if fed.comm.rank != 0:
            return None, {}
        gather_s = time.perf_counter() - t0
        merged = {}
        for part in got:
            merged.update(secagg.decode_map(part))
        rows, weights, steps, rejected, loss, seen, nonfinite = [], [], [], [], 0.0, 0, 0
        for k in sorted(merged):
            head = np.frombuffer(merged[k][:32], np.float64)
            delta = np.frombuffer(merged[k][32:], np.float32)
            why = _reason(delta, float(head[2]), n, cfg.max_update_norm)
            if why is not None:
                rejected.append((k, why))
                nonfinite += not (np.isfinite(delta).all() and math.isfinite(head[2]))
                continue
            rows.append(delta)
            weights.append(head[0])
            steps.append(head[1])
            loss, seen = loss + head[2], seen + int(head[3])
        stats = {"loss_sum": loss, "seen": seen, "rejected": rejected, "nonfinite": nonfinite,
                 "bytes_to_server": sum(map(len, got)), "gather_seconds": gather_s,
                 "aggregate_memory_bytes": robust.memory_bytes(len(rows), n)}
        if not rows:
            return None, {**stats, "skipped": "every update was rejected" if rejected else "no client reported"}
        deltas = np.stack(rows)
        if self.cfg.straggler_rate > 0:           # FedNova's normalisation, then the robust rule
            tau = np.array(steps)
            deltas = deltas / tau[:, None].astype(np.float32) * np.float32(tau.mean())
        t1 = time.perf_counter()
        try:
            agg = robust.aggregate(cfg.aggregator, deltas, np.array(weights), f=cfg.byzantine,
                                   beta=cfg.trim_fraction, m_select=cfg.krum_m, max_norm=cfg.max_update_norm)
        except ValueError as exc:                 # e.g. too few valid updates left for Krum's f
            return None, {**stats, "skipped": f"--aggregator {cfg.aggregator}: {exc}"}
        stats["aggregate_seconds"] = time.perf_counter() - t1
        return (global_w + agg.astype(np.float64)).astype(np.float32), stats


class DpCollector(PlainCollector):
    """Central DP: clip on the clients, noise on the (trusted) server, from the CSPRNG keyed by
    (the secret noise seed, the round): a resumed run draws the same noise. The Reduce carries
    [sum clip(d_k) | count | clipped | loss | seen | rejected non-finite]; non-finite updates
    are rejected like any other (their clipped delta would be NaN)."""

    def __init__(self, fed, dp, cfg=None):
        super().__init__(fed, None)
        self.dp = dp
        self.clip, self.z, self.expected, self.noise_seed = dp.clip, dp.z, dp.expected, dp.noise_seed

    def begin(self, server_round, sampled, dropped) -> None:
        super().begin(server_round, sampled, dropped)
        self.server_round = server_round

    def add(self, k, w_k, n_k, loss_sum, seen, steps=1, dc=None) -> None:
        n, buf = self.fed.n, self.sendbuf
        delta = w_k.astype(np.float64) - self.fed.global_w
        why = _reason(delta, loss_sum, n, None)
        if why is not None:
            self.rejected.append((k, why))
            buf[n + 4] += 1
            return
        delta, norm = privacy.clip_l2(delta, self.clip)
        buf[:n] += delta
        buf[n:n + 4] += (1, norm > self.clip, loss_sum, seen)   # clipped: how often the clip bites

    def finish(self, server_round, global_w, clients):
        rejected = self._rejections()
        total = self._reduce()
        if self.fed.comm.rank != 0:
            return None, {}
        n = self.fed.n
        stats = {"loss_sum": total[n + 2], "seen": total[n + 3], "dp_noise": self.z, "clipped": int(total[n + 1]),
                 "rejected": rejected, "nonfinite": int(total[n + 4]),
                 "bytes_to_server": min(self.fed.n_groups, clients) * self.sendbuf.nbytes}
        if clients == 0:                         # Poisson sampling drew nobody: the model stays
            return None, {**stats, "skipped": "no client was sampled"}
        if total[n] == 0 and rejected:
            return None, {**stats, "skipped": "every update was rejected"}
        plan = self.dp
        if plan.target is not None:                # the round is withheld if it would overshoot
            eps = plan.accountant.epsilon(plan.q, plan.z)
            if eps > plan.target * (1 + 1e-9):
                return None, {**stats, "budget_stop": f"round {server_round} would take epsilon to "
                                                      f"{eps:.4g}, past --dp-epsilon {plan.target:g}"}
        from ..privacy import noise as noise_mod

        key = noise_mod.derive_key(self.noise_seed, "central", server_round)
        noise = noise_mod.standard_normal(key, 0, n) * (self.z * self.clip)
        # the fixed denominator q N (not the count): the average's sensitivity stays S / (q N)
        return (global_w + (total[:n] + noise) / self.expected).astype(np.float32), stats


class _Status:
    """What the server tells every leader when a stage cannot go on (the codes of _down)."""
    SKIP, ERROR, VIOLATION, BUDGET = 1, 2, 3, 4


class SecureCollector:
    """Secure aggregation over the group leaders; rank 0 is the server and a leader too. Each
    client always trains on the same group (Federation.home), whose leader holds its long-term
    identity key; the leaders exchange the public halves once, among themselves (the trusted
    set-up: the server relays none of it)."""

    def __init__(self, fed, cfg, dp=None):
        from ..privacy import secagg

        self.fed, self.cfg, self.dp = fed, cfg, dp          # dp: privacy.DpPlan or None
        self.n = fed.n
        self.max_client = int(fed.sizes.max())
        self.range = secagg_range(cfg, fed.sizes)
        self.directory: dict[int, bytes] = {}
        self.identities: dict[int, secagg.Identity] = {}
        if fed.leader:
            self.identities = {int(k): secagg.Identity() for k in fed.home[fed.leaders.rank]}
            for part in fed.leaders.allgather({k: i.public for k, i in self.identities.items()}):
                self.directory.update(part)
        self.attack = cfg.server_attack
        self.words = self.n if dp is not None else 2 * self.n     # uint32 words of the model part
        self.reproducible = dp is not None and cfg.dp_noise_seed is not None
        self.gaussian = None

    def begin(self, server_round: int, sampled, dropped) -> None:
        from ..privacy import secagg

        self.server_round, self.sampled, self.dropped = server_round, list(sampled), set(dropped)
        m = len(self.sampled)
        self.params, self.skip = None, None
        if m < 2:
            self.skip = f"{m} client(s) sampled: secure aggregation needs 2 or more"
        else:
            k, t, corrupt = round_plan(self.cfg, m)
            try:
                self.params = secagg.RoundParams.make(server_round, self.sampled, self.words + TAIL, k=k,
                                                      threshold=t, corrupt=corrupt)
            except ValueError as exc:
                self.skip = f"{m} clients sampled: {exc}"
        # The sum of m contributions must not wrap mod 2^32 (FixedPoint raises if it could).
        if self.dp is None:         # two limbs: the plain model's float32 bits (WideFixedPoint)
            self.model_fp = secagg.WideFixedPoint(self.max_client * self.range, max(m, 1))
        else:
            # 10 standard deviations: a noise share is clipped with probability ~1e-23 per coordinate
            self.model_fp = secagg.FixedPoint(self.dp.clip + 10 * self.dp.share_std, max(m, 1))
        loss_bound = 100.0 * self.max_client * self.cfg.local_epochs   # a mean loss above 100 has diverged
        self.loss_fp = secagg.FixedPoint(loss_bound, max(m, 1))
        self.inputs: dict[int, np.ndarray] = {}

    def noise_share(self, k: int) -> np.ndarray:
        """Client k's share of the round's noise, N(0, share_std^2) per coordinate, from the
        CSPRNG: keyed by (the noise seed, k, the round) with --dp-noise-seed (reproducible),
        else by a fresh key from the OS that nobody else ever holds."""
        from ..privacy import noise

        if self.gaussian is None:
            self.gaussian = noise.Gaussian()
        key = (noise.derive_key(self.dp.noise_seed, "share", k, self.server_round) if self.reproducible
               else _secrets.token_bytes(noise.KEY_BYTES))
        out = self.gaussian.standard_normal(key, 0, np.empty(self.n, np.float64))
        out *= self.dp.share_std
        return out

    def add(self, k, w_k, n_k, loss_sum, seen, steps=1, dc=None) -> None:
        n, w, x = self.n, self.words, np.zeros(self.words + TAIL, np.uint32)
        delta = w_k.astype(np.float64) - self.fed.global_w
        finite = bool(np.isfinite(delta).all() and math.isfinite(loss_sum))
        if not finite:
            x[w + 4] = 1          # diverged: a zero update; the server learns only how many did
        if self.dp is None:
            if finite:
                weight = n_k / steps if self.cfg.straggler_rate > 0 else n_k      # FedNova, as in the clear
                over = np.count_nonzero(np.abs(delta) > self.range)
                np.clip(delta, -self.range, self.range, out=delta)
                delta *= weight
                self.model_fp.encode(delta, out=x[:w])
                x[w:w + 2] = (n_k, n_k * steps)
                x[w + 5] = over
            else:
                x[:w] = self.model_fp.encode(np.zeros(n))     # zero in the offset encoding
        else:
            # every client adds its noise share, a diverged one to a zero update (zero-out: the
            # accounting counts every survivor's share)
            clipped, norm = privacy.clip_l2(delta, self.dp.clip) if finite else (np.zeros(n), 0.0)
            x[:n] = self.model_fp.encode(clipped + self.noise_share(k))
            x[w:w + 2] = (1, steps) if finite else (0, 0)
            x[w + 5] = int(finite and norm > self.dp.clip)
        if finite:
            x[w + 2] = seen
            x[w + 3] = self.loss_fp.encode(np.array([loss_sum]))[0]
        self.inputs[k] = x

    # ---- the protocol's message flow, through rank 0
    def _up(self, payload: dict[int, bytes], error: tuple[int, str] | None = None) -> dict[int, bytes] | None:
        """Leaders -> server: each leader's {client: message}; on rank 0, all of them merged,
        or raises the first leader's error (then every leader learns it in the next _down)."""
        from ..privacy import secagg
        blob = bytes([error[0]]) + error[1].encode() if error else b"\x00" + secagg.encode_map(payload)
        parts = self.fed.leaders.gather_bytes(blob)
        if parts is None:
            return None
        merged, errors = {}, []
        for part in parts:
            if part[:1] != b"\x00":
                errors.append((part[0], part[1:].decode()))
            else:
                merged.update(secagg.decode_map(part[1:]))
        self.traffic_up += sum(len(p) for p in parts)
        for code, text in sorted(errors, key=lambda e: -e[0]):   # a violation outranks an error
            raise _Raised(code, text)
        return merged

    def _down(self, replies: dict[int, bytes] | None, status: tuple[int, str] = (0, "")) -> dict[int, bytes]:
        """Server -> leaders: each leader gets the replies for its own clients, or the status
        (_Status) that ends the protocol everywhere."""
        from ..privacy import secagg
        leaders = self.fed.leaders
        payloads = None
        if leaders.rank == 0:
            code, text = status
            payloads = []
            for g in range(leaders.size):
                if code:
                    payloads.append(bytes([code]) + text.encode())
                else:
                    mine = {c: replies[c] for c in self.owned_by[g] if c in replies}
                    payloads.append(b"\x00" + secagg.encode_map(mine))
            self.traffic_down += sum(len(p) for p in payloads)
        got = leaders.scatter_bytes(payloads)
        if got[:1] != b"\x00":
            raise _Raised(got[0], got[1:].decode())
        return secagg.decode_map(got[1:])

    def _exchange(self, server_step, client_step):
        """One exchange: clients -> server (server_step turns the merged messages into replies),
        server -> clients. A failure anywhere reaches every leader, then is raised."""
        from ..privacy import secagg
        error = None
        try:
            payload = client_step()
        except secagg.SecAggViolation as exc:
            payload, error = {}, (_Status.VIOLATION, str(exc))
        except secagg.SecAggError as exc:
            payload, error = {}, (_Status.SKIP if isinstance(exc, secagg.SecAggAbort) else _Status.ERROR, str(exc))
        status, replies = (0, ""), None
        try:
            merged = self._up(payload, error)
            if merged is not None:
                replies = server_step(merged)
        except _Raised as exc:
            status = (exc.code, exc.text)
        except secagg.SecAggAbort as exc:
            status = (_Status.SKIP, str(exc))
        except secagg.SecAggError as exc:
            status = (_Status.ERROR, str(exc))
        return self._down(replies, status)

    def _protocol(self, my_clients: list[int]):
        """Run the five stages; on rank 0 return the unmasked sum of the survivors' inputs."""
        from ..privacy import secagg
        from ..privacy import server_attacks
        p = self.params
        clients = {c: secagg.Client(c, p, self.identities[c], self.directory) for c in my_clients}
        server = secagg.Server(p, self.directory) if self.fed.comm.rank == 0 else None
        evil = None
        if server is not None and self.attack:
            evil = server_attacks.MaliciousServer(self.attack, server, self.target, self.oracle)
        out = {}
        clock = time.perf_counter
        t = clock()

        def keys(merged):
            ads = server.collect_keys(merged)
            return {c: evil.advertisements_for(c, ads) if evil else ads for c in merged}

        lists = self._exchange(keys, lambda: {c: cl.advertise_keys() for c, cl in clients.items()})
        self.stages["keys"], t = clock() - t, clock()

        def route(merged):
            honest = merged
            if evil and self.attack == "key-swap" and self.target in merged:
                honest = {**merged, self.target: server_attacks._readdress(server, self.target)}
            routed = server.route_shares(honest)
            if tamper is not None:
                routed = tamper(self.server_round, routed)
            return evil.route(merged, routed) if evil else routed

        routed = self._exchange(route, lambda: {c: clients[c].share_keys(lists[c]) for c in clients if c in lists})
        self.stages["shares"], t = clock() - t, clock()
        # dropouts: these clients go silent after the key exchange (simulated, seeded by the round)
        alive = [c for c in clients if c not in self.dropped and c in routed]

        # the masked vectors travel as one uint32 matrix per leader (Gatherv straight into the
        # server's stack), their client ids beside them; the other stages' messages are small
        error = None
        try:
            ids = np.array(alive, np.int64)
            ys = np.empty((len(alive), p.n), np.uint32)
            for row, c in enumerate(alive):
                ys[row] = clients[c].masked_input(self.inputs[c], routed[c])
        except secagg.SecAggError as exc:
            ids, ys = np.zeros(0, np.int64), np.empty((0, p.n), np.uint32)
            error = (_Status.VIOLATION if isinstance(exc, secagg.SecAggViolation) else _Status.ERROR, str(exc))
        all_ids = self.fed.leaders.gather(ids)
        stacked = self.fed.leaders.gather_rows(ys)
        errors = self.fed.leaders.gather(error)
        replies, status = None, (0, "")
        if server is not None:
            try:
                for e in sorted((e for e in errors if e), key=lambda e: -e[0]):
                    raise _Raised(*e)
                order = np.concatenate(all_ids)
                uploads = dict(zip(order.tolist(), stacked))
                for observe in observers:
                    observe(self.server_round, uploads)
                if evil:
                    evil.masked_inputs(uploads)
                out["sum"] = np.add.reduce(stacked, axis=0, dtype=np.uint32)   # wraps: mod 2^32
                out["survivors"] = len(order)
                replies = server.unmask_request(uploads)
                # the last moment a round can be withheld: nothing about its sum is out yet
                why = self.withhold(len(order)) if self.dp is not None else None
                if why:
                    raise _Raised(_Status.BUDGET, why)
                if evil:
                    replies = evil.requests(replies)
            except _Raised as exc:
                status = (exc.code, exc.text)
            except secagg.SecAggAbort as exc:
                status = (_Status.SKIP, str(exc))
            except secagg.SecAggError as exc:
                status = (_Status.ERROR, str(exc))
        requests = self._down(replies, status)
        self.stages["masking"], t = clock() - t, clock()

        def signatures(merged):
            if evil:
                return evil.signatures_for(merged)
            blob = server.collect_signatures(merged)
            return dict.fromkeys(merged, blob)

        sigs = self._exchange(signatures, lambda: {c: clients[c].consistency(requests[c])
                                                   for c in alive if c in requests})

        def aggregate(merged):
            if evil:
                out["responses"] = merged
                raise _Raised(_Status.SKIP, "the simulated malicious server builds no model")
            out["total"] = server.aggregate(out["sum"], merged)
            return {}

        try:
            self._exchange(aggregate, lambda: {c: clients[c].unmask(sigs[c]) for c in alive if c in sigs})
        finally:
            self.stages["unmasking"] = clock() - t
            if server is not None:
                self.traffic_up, self.traffic_down = server.bytes_to_server, server.bytes_from_server
                if evil:
                    self.recovered = evil.recover(out.get("responses", {}))
        return out

    def _prepare_attack(self) -> None:
        """--server-attack: the target (the smallest sampled client of rank 0's group, so that
        the simulation's oracle, its true input, is on rank 0) and the colluders' inputs."""
        self.target, self.oracle, self.recovered = None, {}, None
        mine = [int(c) for c in self.sampled if c in self.owned_by[0] and c not in self.dropped]
        if self.fed.comm.rank == 0 and mine:
            self.target = int(mine[0])
            self.oracle = {c: self.inputs[c] for c in mine[1:] if c in self.inputs}

    def finish(self, server_round: int, global_w: np.ndarray, clients: int):
        fed = self.fed
        t0 = time.perf_counter()
        self.traffic_up = self.traffic_down = 0
        # wall seconds of each stage on rank 0 (key agreement, share generation and encryption,
        # mask expansion and upload, unmasking): each includes the other leaders' work
        self.stages = dict.fromkeys(("keys", "shares", "masking", "unmasking"), 0.0)
        # which leader trains which client: the Federation's assignment (the same on every rank)
        self.owned_by = fed.owners_by_leader
        stats = {"dropped": len(self.dropped & set(self.sampled))}
        result = None
        if self.attack:
            self._prepare_attack()
        if self.params is None:
            result = {"skip": self.skip}
        elif fed.leader:
            mine = list(self.owned_by[fed.leaders.rank])
            try:
                out = self._protocol(mine)
                if fed.comm.rank == 0:
                    result = out
            except _Raised as exc:
                result = {_Raised.KEYS[exc.code]: exc.text}
        if fed.comm.rank != 0:
            return None, {}
        stats.update(secagg_seconds=time.perf_counter() - t0, bytes_to_server=self.traffic_up,
                     bytes_from_server=self.traffic_down, secagg_stages=dict(self.stages),
                     loss_sum=0.0, seen=0)
        if self.attack:
            from ..privacy import server_attacks
            x_true = self.inputs.get(self.target) if self.target is not None else None
            stats["server_attack"] = {
                "name": self.attack, "target": self.target,
                "detected": "violation" in result, "detected_by": result.get("violation"),
                "learned_individual": bool(x_true is not None and
                                           server_attacks.learned_individual(self.recovered, x_true))}
            result.pop("violation", None)
            result.setdefault("skip", "the simulated malicious server builds no model")
        if "violation" in result:
            return None, {**stats, "error": f"secure aggregation failed: {result['violation']}; no model "
                                            "was built from it"}
        if "error" in result:      # every rank raises it, once the Federation has broadcast it
            return None, {**stats, "error": f"secure aggregation failed: {result['error']}; no model "
                                            "was built from it"}
        if "budget" in result:
            return None, {**stats, "budget_stop": result["budget"]}
        if "skip" in result:
            return None, {**stats, "skipped": result["skip"]}
        total = result["total"]
        survivors, w = result["survivors"], self.words
        diverged = int(total[w + 4])
        stats.update(loss_sum=float(self.loss_fp.decode(total[w + 3:w + 4], survivors)[0]),
                     seen=int(total[w + 2]), survivors=survivors, nonfinite=diverged,
                     rejected=[("?", "its training diverged")] * diverged)
        summed = self.model_fp.decode(total[:w], survivors)
        if self.dp is None:
            stats["secagg_clipped"] = int(total[w + 5])
            weight = int(total[w])
            if weight == 0:
                return None, {**stats, "skipped": "every client's training diverged"}
            mean = summed / weight
            if self.cfg.straggler_rate > 0:
                mean *= int(total[w + 1]) / weight                 # FedNova's tau_eff
            return (global_w + mean).astype(np.float32), stats
        stats["clipped"] = int(total[w + 5])
        stats["dp_noise"] = self.dp.round_noise(survivors)
        stats["dp_honest_shares"] = self.dp.honest_shares(survivors)
        # the noise was released with the sum: the round counts even if every client diverged
        return (global_w + summed / self.dp.expected).astype(np.float32), stats

    def withhold(self, survivors: int) -> str | None:
        """Why the round's sum must not be released (it would take epsilon past the target), or None."""
        plan = self.dp
        if plan.target is None:
            return None
        z = plan.round_noise(survivors)
        eps = plan.accountant.epsilon(z)
        if eps > plan.target * (1 + 1e-9):
            return (f"round {self.server_round} would take epsilon to {eps:.4g}, past --dp-epsilon "
                    f"{plan.target:g} ({survivors} survivors: {plan.honest_shares(survivors)} honest noise "
                    f"shares besides a client's own, z = {z:.3g})")
        return None


class _Raised(Exception):
    """A status that ends a round's protocol, carried between the stages."""
    KEYS = {_Status.SKIP: "skip", _Status.ERROR: "error", _Status.VIOLATION: "violation",
            _Status.BUDGET: "budget"}

    def __init__(self, code: int, text: str):
        super().__init__(text)
        self.code, self.text = code, text


def secagg_range(cfg, sizes) -> float:
    """The clipping range R of each coordinate of a client's update under secure aggregation
    without DP: --secagg-range, or local lr x the most local steps any client takes (a
    coordinate moves by at most lr per step when its gradient is at most 1, as the output
    layer's biases' always are); `secagg_clipped` counts the coordinates it cuts."""
    if cfg.secagg_range is not None:
        return float(cfg.secagg_range)
    steps = cfg.local_epochs * math.ceil(int(np.max(sizes)) / cfg.local_batch_size)
    return max(1.0, cfg.local_lr * steps)


def round_plan(cfg, m: int) -> tuple[int | None, int | None, int]:
    """(K, t, corrupt) of a round of m clients: K from --secagg-neighbors when it meets Bell et
    al.'s bound (secagg.min_neighbors) at this m, else the bound's K, or the complete graph
    (None); t from --secagg-threshold, else the smallest majority (complete graph) or
    secagg.sparse_threshold; corrupt = the colluders the consistency round withstands."""
    from ..privacy import secagg

    dropout, corrupt = secagg_bounds(cfg)
    bound = secagg.min_neighbors(m, dropout, corrupt)
    k = cfg.secagg_neighbors
    if bound is None or k is None and m <= 2 * bound:   # small rounds: complete is as cheap
        k = None
    elif k is None or k < bound:
        k = bound
    holders = secagg.holders_per_client(k, m)
    t = cfg.secagg_threshold
    if t is None and k is not None:
        t = secagg.sparse_threshold(holders, m, corrupt)
    if t is not None:
        t = min(t, holders)
    return k, t, math.ceil(corrupt * m)


def secagg_bounds(cfg) -> tuple[float, float]:
    """(the dropout fraction the graph must survive, the corrupt fraction it must withstand)."""
    dropout = cfg.secagg_max_dropout if cfg.secagg_max_dropout is not None else max(0.1, cfg.dropout_rate)
    return dropout, cfg.secagg_corrupt_fraction


def check_secure(cfg, per_round: float) -> None:
    """Settings secure aggregation cannot work with (the same on every rank)."""
    from ..privacy import secagg

    if per_round < 2:
        raise UsageError(f"--secure-agg needs at least 2 clients per round (this run samples "
                         f"{per_round:g}): with one, the sum the server learns is that client's update",
                         collective=True)
    m = round(per_round)
    dropout, corrupt = secagg_bounds(cfg)
    if cfg.dropout_rate > dropout:
        raise UsageError(f"--dropout-rate {cfg.dropout_rate:g} is above --secagg-max-dropout {dropout:g}, "
                         "the dropout the neighbour graph is sized for", collective=True)
    bound = secagg.min_neighbors(m, dropout, corrupt)
    k = cfg.secagg_neighbors
    if k is not None and k < m - 1 and (bound is None or k < bound):
        need = f"K >= {bound}" if bound is not None else f"the complete graph (K >= {m - 1})"
        raise UsageError(f"--secagg-neighbors {k} is below Bell et al.'s bound for {m} clients per round: "
                         f"the survivors' graph must stay connected, except with probability 2^-{secagg.SIGMA}, "
                         f"when up to {dropout:g} of them drop out (--secagg-max-dropout) and {corrupt:g} "
                         f"collude (--secagg-corrupt-fraction); that needs {need}, or leave the option out",
                         collective=True)
    k, _, _ = round_plan(cfg, m)
    holders = secagg.holders_per_client(k, m)
    if cfg.secagg_threshold is not None and not 2 <= cfg.secagg_threshold <= holders:
        raise UsageError(f"--secagg-threshold {cfg.secagg_threshold} must be between 2 and the "
                         f"{holders} share holders of each client (the client and its "
                         f"{'neighbours' if k is not None else 'fellow sampled clients'})",
                         collective=True)


def make(fed, cfg, dp):
    """The collector for this run's settings."""
    if cfg.secure_agg:
        return SecureCollector(fed, cfg, dp)
    if dp is not None:
        return DpCollector(fed, dp)
    if cfg.aggregator in ("median", "trimmed-mean", "krum", "multi-krum"):
        return GatheredCollector(fed, cfg)
    return PlainCollector(fed, cfg)
