"""The secure-aggregation collector: the server (world rank 0) learns only the sum of the round's
updates (privacy/secagg.py: Bonawitz et al. 2017 against a malicious server, SecAgg+ of Bell et
al. 2020), run over the client groups' leaders.

Each client's contribution is quantised to uint32 words (fixed point), masked, and relayed
through rank 0 with Gatherv/Scatterv, as a real server would relay it: signed keys, encrypted
shares, masked inputs, consistency signatures, unmask responses. Each client acts on its own: one
client's abort never silences another's messages. Without DP a contribution is
n_k * clip(w_k - w, +-R) with its weight n_k (R large enough not to cut real updates:
secagg_range); with DP it is clip_L2(w_k - w, S) plus the client's share of the noise, from the
CSPRNG (noise.py), so that the server never sees an un-noised sum. Under DP the clients keep the
privacy books (ledger.ClientBooks): a share is sized for the fewest honest survivors a client
accepts, a client refuses any view with fewer, and it joins a round only while its own ledger
stays within --dp-epsilon; the records carry no counts (only the noised model leaves).

Also here: the settings' checks and the per-round protocol parameters (round_plan), which the
configuration's validation shares.
"""
from __future__ import annotations

import math
import secrets as _secrets
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import UsageError
from ..privacy import fixedpoint, mechanisms, secagg, secagg_graph
from ..privacy.sampling import corrupt_count
from .context import ClientUpdate, FedContext, RoundResult

if TYPE_CHECKING:
    from ..config import Config
    from ..privacy.ledger import ClientBooks
    from ..privacy.plan import DpPlan
    from ..runtime.testing import Hooks

TAIL = 6        # words after the model: weight, weight x steps, samples seen, loss sum (fixed point),
                # diverged, clipped (coordinates cut by the range); all zero under DP
STAGES = ("keys", "shares", "masking", "unmasking")
PRIVATE_SKIP = "too few clients were left to unmask the round's sum securely"


class _Status:
    """What the server tells every leader when a stage cannot go on (the codes of _down)."""
    SKIP, ERROR, VIOLATION, BUDGET = 1, 2, 3, 4
    KEYS = {SKIP: "skip", ERROR: "error", VIOLATION: "violation", BUDGET: "budget"}


class _Raised(Exception):
    """A status that ends a round's protocol, carried between the stages."""

    def __init__(self, code: int, text: str):
        super().__init__(text)
        self.code, self.text = code, text


def _server_status(exc: secagg.SecAggError) -> int:
    """What a server-side protocol error ends the round with: too few clients left (skip), or an
    error."""
    return _Status.SKIP if isinstance(exc, secagg.SecAggAbort) else _Status.ERROR


def _status_of(exc: secagg.SecAggError) -> int:
    """What a client's protocol error ends the round with: its abort for a violation, else as on
    the server."""
    return _Status.VIOLATION if isinstance(exc, secagg.SecAggViolation) else _server_status(exc)


def _each(step: Callable[[int], Any], clients: Iterable[int]) -> tuple[dict[int, Any], tuple[int, str] | None]:
    """step(k) for each client on its own: the messages of those that answered, and the gravest
    error of those that did not (a violation outranks an error)."""
    out, error = {}, None
    for k in clients:
        try:
            out[k] = step(k)
        except secagg.SecAggError as exc:
            code = _status_of(exc)
            if error is None or code > error[0]:
                error = (code, str(exc))
    return out, error


class SecureCollector:
    """Secure aggregation over the group leaders; rank 0 is the server and a leader too. Each
    client always trains on the same group (FedContext.home), whose leader holds its long-term
    identity key; the leaders exchange the public halves once, among themselves (the trusted
    set-up: the server relays none of it)."""

    def __init__(self, ctx: FedContext, cfg: Config, plan: DpPlan | None, hooks: Hooks):
        assert ctx.home is not None, "secure aggregation needs each client trained by one group"
        self.ctx, self.cfg, self.plan, self.hooks = ctx, cfg, plan, hooks
        self.n = ctx.n
        self.max_client = int(ctx.sizes.max())
        self.range = secagg_range(cfg, ctx.sizes)
        self.directory: dict[int, bytes] = {}
        self.identities: dict[int, secagg.Identity] = {}
        if ctx.leader:
            self.identities = {int(k): secagg.Identity() for k in ctx.home[ctx.leaders.rank]}
            for part in ctx.leaders.allgather({k: i.public for k, i in self.identities.items()}):
                self.directory.update(part)
        self.attack = cfg.server_attack
        self.words = self.n if plan is not None else 2 * self.n     # uint32 words of the model part
        self.gaussian: Any = None
        self.books: ClientBooks | None = None          # DP: this leader's clients' own ledgers
        self.stages = dict.fromkeys(STAGES, 0.0)
        self.traffic_up = self.traffic_down = 0
        self.target: int | None = None                  # --server-attack: its target, on rank 0
        self.colluders: list[int] = []                  # ... and the clients colluding with it
        self.attack_record: dict[str, Any] | None = None

    # ---- a round's inputs
    def begin(self, server_round: int, global_w: np.ndarray, sampled: Sequence[int], dropped: set[int],
              owners: list[list[int]]) -> None:
        self.server_round, self.sampled, self.dropped = server_round, list(sampled), set(dropped)
        self.global_w, self.owned_by = global_w, owners    # owned_by[g]: the clients leader g trains
        m = len(self.sampled)
        self.params: secagg_graph.RoundParams | None = None
        self.skip: str | None = None
        self.refused = 0                                    # this leader's clients kept out for their budget
        self.all_refused = 0                                # ... every leader's (rank 0, after the round)
        if self.plan is not None and self.books is None and self.ctx.leader:
            self.books = self._open_books()
        if m < 2:
            self.skip = f"{m} client(s) sampled: secure aggregation needs 2 or more"
        else:
            k, t, corrupt, absent = round_plan(self.cfg, m)
            try:
                at_least = self.plan.min_survivors(m) if self.plan is not None else 0
                self.params = secagg_graph.RoundParams.make(server_round, self.sampled, self.words + TAIL, k=k,
                                                            threshold=t, corrupt=corrupt, max_absent=absent,
                                                            at_least=at_least)
            except ValueError as exc:
                self.skip = PRIVATE_SKIP if self.plan is not None else f"{m} clients sampled: {exc}"
        # The sum of m contributions must not wrap mod 2^32 (FixedPoint raises if it could).
        self.model_fp: fixedpoint.FixedPoint | fixedpoint.WideFixedPoint
        if self.plan is None:     # two limbs: the plain model's float32 bits (WideFixedPoint)
            self.model_fp = fixedpoint.WideFixedPoint(self.max_client * self.range, max(m, 1))
        else:
            # 10 standard deviations: a noise share is clipped with probability ~1e-23 per coordinate
            self.model_fp = fixedpoint.FixedPoint(self.plan.clip + 10 * self.plan.share_std, max(m, 1))
        loss_bound = 100.0 * self.max_client * self.cfg.local_epochs   # a mean loss above 100 has diverged
        self.loss_fp = fixedpoint.FixedPoint(loss_bound, max(m, 1))
        self.inputs: dict[int, np.ndarray] = {}

    def _open_books(self) -> ClientBooks:
        from ..privacy.ledger import ClientBooks

        assert self.plan is not None and self.ctx.home is not None
        return ClientBooks.open(self.cfg.checkpoint_dir, self.ctx.leaders.rank, self.ctx.home[self.ctx.leaders.rank],
                                self.plan.mu2_budget)

    def noise_share(self, k: int) -> np.ndarray:
        """Client k's share of the round's noise, N(0, share_std^2) per coordinate, from the
        CSPRNG: keyed by (the noise seed, k, the round) with --dp-noise-seed (reproducible),
        else by a fresh key from the OS that nobody else ever holds."""
        from ..privacy import noise

        assert self.plan is not None
        if self.gaussian is None:
            self.gaussian = noise.Gaussian()
        key = (noise.derive_key(self.plan.noise_seed, "share", k, self.server_round) if self.plan.seeded
               else _secrets.token_bytes(noise.KEY_BYTES))
        out = self.gaussian.standard_normal(key, 0, np.empty(self.n, np.float64))
        out *= self.plan.share_std
        return out

    def add(self, update: ClientUpdate) -> None:
        u, n, w = update, self.n, self.words
        x = np.zeros(w + TAIL, np.uint32)
        delta = u.params.astype(np.float64) - self.global_w
        finite = bool(np.isfinite(delta).all() and math.isfinite(u.loss_sum))
        if self.plan is None:
            assert isinstance(self.model_fp, fixedpoint.WideFixedPoint)
            if finite:
                weight = u.num_examples / u.steps if self.cfg.straggler_rate > 0 else u.num_examples   # FedNova
                over = np.count_nonzero(np.abs(delta) > self.range)
                np.clip(delta, -self.range, self.range, out=delta)
                delta *= weight
                self.model_fp.encode(delta, out=x[:w])
                x[w:w + 2] = (u.num_examples, u.num_examples * u.steps)
                x[w + 2] = u.seen
                x[w + 3] = self.loss_fp.encode(np.array([u.loss_sum]))[0]
                x[w + 5] = over
            else:
                x[:w] = self.model_fp.encode(np.zeros(n))     # zero in the offset encoding
                x[w + 4] = 1      # diverged: a zero update; the server learns only how many did
        else:
            # every client adds its noise share, a diverged one to a zero update (zero-out: the
            # accounting counts every survivor's share); the tail stays zero: no count, no loss
            clipped, _ = mechanisms.clip_l2(delta, self.plan.clip) if finite else (np.zeros(n), 0.0)
            x[:n] = self.model_fp.encode(clipped + self.noise_share(u.client))
        self.inputs[u.client] = x

    # ---- the protocol's message flow, through rank 0
    def _up(self, payload: dict[int, bytes], error: tuple[int, str] | None
            ) -> tuple[dict[int, bytes], list[tuple[int, str]]] | None:
        """Leaders -> server: each leader's {client: message} and its gravest error; on rank 0 all
        the messages merged and the errors, gravest first."""
        head = bytes([error[0]]) + error[1].encode() if error else b""
        blob = len(head).to_bytes(4, "little") + head + secagg.encode_map(payload)
        parts = self.ctx.leaders.gather_bytes(blob)
        if parts is None:
            return None
        merged, errors = {}, []
        for part in parts:
            size = int.from_bytes(part[:4], "little")
            if size:
                errors.append((part[4], part[5:4 + size].decode()))
            merged.update(secagg.decode_map(part[4 + size:]))
        self.traffic_up += sum(len(p) for p in parts)
        return merged, sorted(errors, key=lambda e: -e[0])

    def _down(self, replies: dict[int, bytes] | None, status: tuple[int, str] = (0, "")) -> dict[int, bytes]:
        """Server -> leaders: each leader gets the replies for its own clients, or the status
        (_Status) that ends the protocol everywhere."""
        leaders = self.ctx.leaders
        payloads = None
        if leaders.rank == 0:
            code, text = status
            payloads = []
            for g in range(leaders.size):
                if code:
                    payloads.append(bytes([code]) + text.encode())
                else:
                    assert replies is not None
                    mine = {c: replies[c] for c in self.owned_by[g] if c in replies}
                    payloads.append(b"\x00" + secagg.encode_map(mine))
            self.traffic_down += sum(len(p) for p in payloads)
        got = leaders.scatter_bytes(payloads)
        if got[:1] != b"\x00":
            raise _Raised(got[0], got[1:].decode())
        return secagg.decode_map(got[1:])

    def _exchange(self, server_step: Callable[[dict[int, bytes]], dict[int, bytes]],
                  client_step: Callable[[int], bytes], clients: Iterable[int]) -> dict[int, bytes]:
        """One exchange: each client -> server (server_step turns the merged messages into
        replies), server -> clients. The honest server ends the round on any client's error;
        the simulated malicious one goes on with what it was sent (run.note keeps the first
        abort). A failure anywhere reaches every leader, then is raised."""
        payload, error = _each(client_step, clients)
        status, replies = (0, ""), None
        up = self._up(payload, error)
        if up is not None:
            merged, errors = up
            try:
                if errors:
                    self._run.note(errors)
                    if self._run.evil is None:
                        raise _Raised(*errors[0])
                replies = server_step(merged)
            except _Raised as exc:
                status = (exc.code, exc.text)
            except secagg.SecAggError as exc:
                status = (_server_status(exc), str(exc))
        return self._down(replies, status)

    def _protocol(self, my_clients: list[int]) -> dict[str, Any]:
        """Run the five stages (keys, shares, masking, consistency, unmasking); on rank 0 return
        the unmasked sum of the survivors' inputs ("total") and their count ("survivors")."""
        assert self.params is not None
        run = self._run = _ProtocolRun(self, my_clients)
        clock = time.perf_counter
        t = clock()
        try:
            lists = run.keys()
            self.stages["keys"], t = clock() - t, clock()
            routed = run.shares(lists)
            self.stages["shares"], t = clock() - t, clock()
            requests = run.masking(routed)
            self.stages["masking"], t = clock() - t, clock()
            sigs = run.consistency(requests)
            run.unmasking(sigs)
        finally:
            self.stages["unmasking"] = clock() - t
            run.close()
        return run.out

    # ---- the round's result
    def finish(self, server_round, clients):
        ctx = self.ctx
        t0 = time.perf_counter()
        self.traffic_up = self.traffic_down = 0
        # wall seconds of each stage on rank 0 (key agreement, share generation and encryption,
        # mask expansion and upload, unmasking): each includes the other leaders' work
        self.stages = dict.fromkeys(STAGES, 0.0)
        self.attack_record = None
        if self.attack:
            self._prepare_attack()
        outcome = self._run_protocol()
        spent = self._spent()
        if ctx.comm.rank != 0:
            return None, RoundResult()
        assert outcome is not None
        result = RoundResult(secagg_seconds=time.perf_counter() - t0, bytes_to_server=self.traffic_up,
                             bytes_from_server=self.traffic_down, secagg_stages=dict(self.stages),
                             loss_sum=0.0, seen=0, dp_mu2=spent)
        if self.attack:
            result.server_attack = self.attack_record
            outcome.pop("violation", None)
            outcome.setdefault("skip", "the simulated malicious server builds no model")
        for key in ("violation", "error"):       # every rank raises it, once the Federation has broadcast it
            if key in outcome:
                why = "a client or the server stopped the protocol (under DP no message names a client)" \
                    if self.plan is not None else outcome[key]
                result.error = f"secure aggregation failed: {why}; no model was built from it"
                return None, result
        if "skip" in outcome:
            if self._out_of_budget():
                result.budget_stop = ("the clients' own privacy budgets (--dp-epsilon) are spent: too few "
                                      "of them can join a round")
            result.skipped = PRIVATE_SKIP if self.plan is not None and not self.attack else outcome["skip"]
            return None, result
        return self._unmasked_model(outcome["total"], outcome["survivors"], result)

    def _spent(self) -> float | None:
        """DP: the largest spend in any client's own ledger (every leader's books), on rank 0;
        also how many sampled clients stayed out for their budgets this round."""
        if self.plan is None:
            return None
        mu2, refused = 0.0, 0
        if self.ctx.leader:
            assert self.books is not None
            mu2 = self.ctx.leaders.allreduce(self.books.max_spent(), "max")
            refused = self.ctx.leaders.allreduce(self.refused, "sum")
        self.all_refused = int(refused)
        return mu2

    def _out_of_budget(self) -> bool:
        if self.plan is None or self.attack or not self.all_refused:
            return False
        return self.plan.out_of_budget(len(self.sampled), self.all_refused)

    def _run_protocol(self) -> dict[str, Any] | None:
        """The protocol on the leaders; on rank 0 its outcome: the unmasked sum, or why not."""
        ctx = self.ctx
        if self.params is None:
            return {"skip": self.skip}
        if not ctx.leader:
            return None
        try:
            out = self._protocol(list(self.owned_by[ctx.leaders.rank]))
            return out if ctx.comm.rank == 0 else None
        except _Raised as exc:
            return {_Status.KEYS[exc.code]: exc.text} if ctx.comm.rank == 0 else None

    def _unmasked_model(self, total: np.ndarray, survivors: int,
                        result: RoundResult) -> tuple[np.ndarray | None, RoundResult]:
        """The new average model from the unmasked sum of `survivors` inputs."""
        w = self.words
        summed = self.model_fp.decode(total[:w], survivors)
        if self.plan is None:
            diverged = int(total[w + 4])
            result.loss_sum = float(self.loss_fp.decode(total[w + 3:w + 4], survivors)[0])
            result.seen, result.nonfinite = int(total[w + 2]), diverged
            result.rejected = [("?", "its training diverged")] * diverged
            result.secagg_clipped = int(total[w + 5])
            weight = int(total[w])
            if weight == 0:
                result.skipped = "every client's training diverged"
                return None, result
            mean = summed / weight
            if self.cfg.straggler_rate > 0:
                mean *= int(total[w + 1]) / weight                 # FedNova's tau_eff
            return (self.global_w + mean).astype(np.float32), result
        # the noise was released with the sum; every accepted view carries at least the planned z
        result.dp_noise = self.plan.z
        return (self.global_w + summed / self.plan.expected).astype(np.float32), result

    # ---- --server-attack: the simulated malicious server
    def _prepare_attack(self) -> None:
        """The target (the smallest sampled client of rank 0's group, so that the simulation's
        oracle, its true input, is on rank 0) and its colluders: as many of rank 0's other
        sampled clients as the corrupt share the protocol withstands, never the target."""
        self.target, self.colluders = None, []
        mine = [int(c) for c in self.sampled if c in self.owned_by[0] and c not in self.dropped]
        if self.ctx.comm.rank == 0 and mine and self.params is not None:
            self.target = mine[0]
            _, _, corrupt, _ = round_plan(self.cfg, len(self.sampled))
            self.colluders = mine[1:1 + corrupt]


class _ProtocolRun:
    """One round of the protocol on a leader: its clients' state, and on rank 0 the server (and
    the simulated malicious server with --server-attack). Each stage is one exchange through the
    server (SecureCollector._exchange); `out` collects rank 0's results."""

    def __init__(self, collector: SecureCollector, my_clients: list[int]):
        from ..privacy import server_attacks

        c = self.c = collector
        p = collector.params
        assert p is not None
        self.p: secagg_graph.RoundParams = p
        self.clients = {k: secagg.Client(k, p, c.identities[k], c.directory) for k in my_clients}
        self.server = secagg.Server(p, c.directory) if c.ctx.comm.rank == 0 else None
        self.evil: server_attacks.MaliciousServer | None = None
        if self.server is not None and c.attack:
            # a target nobody is (-1) when rank 0 trains no sampled client this round
            target = c.target if c.target is not None else -1
            self.evil = server_attacks.MaliciousServer(c.attack, self.server, target,
                                                       {k: c.inputs[k] for k in c.colluders if k in c.inputs})
            self.evil.colluder_clients = {k: self.clients[k] for k in c.colluders if k in self.clients}
        self.out: dict[str, Any] = {}
        self.alive: list[int] = []
        self.requests: dict[int, bytes] = {}
        self.ads = b""

    def note(self, errors: list[tuple[int, str]]) -> None:
        """Rank 0: the first client abort (a violation) is what detected the attack."""
        for code, text in errors:
            if code == _Status.VIOLATION:
                self.out.setdefault("violation", text)

    @property
    def srv(self) -> secagg.Server:
        """The server: its steps run on rank 0 only."""
        assert self.server is not None
        return self.server

    def keys(self) -> dict[int, bytes]:
        evil = self.evil

        def collect(merged):
            self.ads = ads = self.srv.collect_keys(merged)
            return {k: evil.advertisements_for(k, ads) if evil else ads for k in merged}

        return self.c._exchange(collect, lambda k: self.clients[k].advertise_keys(), self.clients)

    def shares(self, lists: dict[int, bytes]) -> dict[int, bytes]:
        c, evil = self.c, self.evil

        def route(merged):
            routed = c.hooks.relay(c.server_round, self.srv.route_shares(evil.shares_up(merged) if evil else merged))
            return evil.route(merged, routed) if evil else routed

        routed = c._exchange(route, lambda k: self.clients[k].share_keys(lists[k]),
                             [k for k in self.clients if k in lists])
        # dropouts: these clients go silent after the key exchange (simulated, seeded by the round),
        # and under DP so do those whose own budget cannot take the round
        self.alive = [k for k in self.clients if k not in c.dropped and k in routed]
        if c.books is not None and c.plan is not None:
            cost = c.plan.round_mu2
            afford = [k for k in self.alive if c.books.can_afford(k, cost, c.server_round, c.plan.noise_name)]
            c.refused = len(self.alive) - len(afford)
            self.alive = afford
        return routed

    def masking(self, routed: dict[int, bytes]) -> dict[int, bytes]:
        """The masked vectors travel as one uint32 matrix per leader (Gatherv straight into the
        server's stack), their client ids beside them; the other stages' messages are small.
        Under DP each client's spend is in its ledger before its masked input leaves."""
        c, p, leaders = self.c, self.p, self.c.ctx.leaders
        if c.books is not None and c.plan is not None:
            c.books.spend(c.server_round, self.alive, c.plan.round_mu2, c.plan.noise_name)
        masked, error = _each(lambda k: self.clients[k].masked_input(c.inputs[k], routed[k]), self.alive)
        ids = np.array(sorted(masked), np.int64)
        ys = np.empty((len(ids), p.n), np.uint32)
        for row, k in enumerate(ids.tolist()):
            ys[row] = masked[k]
        all_ids = leaders.gather(ids)
        stacked = leaders.gather_rows(ys)
        errors = leaders.gather(error)
        replies, status = None, (0, "")
        if self.server is not None:                  # rank 0: the gathers' root
            assert all_ids is not None and stacked is not None and errors is not None
            try:
                replies = self._unmask_request(all_ids, stacked, sorted((e for e in errors if e), key=lambda e: -e[0]))
            except _Raised as exc:
                status = (exc.code, exc.text)
            except secagg.SecAggError as exc:
                status = (_server_status(exc), str(exc))
        return c._down(replies, status)

    def _unmask_request(self, all_ids: list[np.ndarray], stacked: np.ndarray,
                        errors: list[tuple[int, str]]) -> dict[int, bytes]:
        """Rank 0: the stacked uploads' sum and the unmask request to the survivors, unless a
        leader failed (the honest server)."""
        c, evil = self.c, self.evil
        if errors:
            self.note(errors)
            if evil is None:
                raise _Raised(*errors[0])
        order = np.concatenate(all_ids)
        uploads = dict(zip(order.tolist(), stacked))
        c.hooks.uploads(c.server_round, uploads)
        self.out["sum"] = np.add.reduce(stacked, axis=0, dtype=np.uint32)   # wraps: mod 2^32
        self.out["survivors"] = len(order)
        if evil:
            evil.masked_inputs(uploads)
            self.requests = evil.requests(uploads)
        else:
            self.requests = self.srv.unmask_request(uploads)
        return self.requests

    def consistency(self, requests: dict[int, bytes]) -> dict[int, bytes]:
        evil = self.evil

        def signatures(merged):
            if evil:
                return evil.signatures_for(merged, self.requests)
            blob = self.srv.collect_signatures(merged)
            return dict.fromkeys(merged, blob)

        return self.c._exchange(signatures, lambda k: self.clients[k].consistency(requests[k]),
                                [k for k in self.alive if k in requests])

    def unmasking(self, sigs: dict[int, bytes]) -> None:
        evil, out = self.evil, self.out

        def aggregate(merged):
            if evil:
                out["responses"] = merged
                raise _Raised(_Status.SKIP, "the simulated malicious server builds no model")
            out["total"] = self.srv.aggregate(out["sum"], merged)
            return {}

        self.c._exchange(aggregate, lambda k: self.clients[k].unmask(sigs[k]), [k for k in self.alive if k in sigs])

    def close(self) -> None:
        """Rank 0: the round's traffic. With --server-attack (every leader): each honest client's
        own record of the round goes to rank 0, where the leakage oracle computes what the
        simulated server can learn from everything it was sent."""
        c = self.c
        if self.server is not None:
            c.traffic_up, c.traffic_down = self.server.bytes_to_server, self.server.bytes_from_server
        if not c.attack:
            return
        colluders = set(c.colluders)
        truths = c.ctx.leaders.gather([cl.disclose() for k, cl in self.clients.items() if k not in colluders])
        if self.evil is not None and truths is not None:
            c.attack_record = self._attack_record([t for part in truths for t in part])

    def _attack_record(self, truths: list) -> dict[str, Any]:
        from ..privacy import leakage, server_attacks

        evil, c, p = self.evil, self.c, self.p
        assert evil is not None
        responses = self.out.get("responses", {})
        leak = leakage.analyse({t.cid: t for t in truths},
                               {k: server_attacks.decode_response(v) for k, v in responses.items()},
                               evil.adversary(self.ads) if self.ads else leakage.Adversary(),
                               p.threshold, p.min_survivors)
        x_true = c.inputs.get(c.target) if c.target is not None else None
        estimate = evil.recover(responses) if x_true is not None else None
        return {"name": c.attack, "target": c.target, "colluders": len(c.colluders),
                "detected": "violation" in self.out, "detected_by": self.out.get("violation"),
                "learned_individual": c.target in leak.individuals, "learned_partial": leak.learned_partial,
                "smallest_sum_learned": leak.smallest,
                "words_recovered": server_attacks.words_recovered(estimate, x_true) if x_true is not None else 0}


def secagg_range(cfg: Config, sizes: np.ndarray) -> float:
    """The clipping range R of each coordinate of a client's update under secure aggregation
    without DP: --secagg-range, or local lr x the most local steps any client takes (a
    coordinate moves by at most lr per step when its gradient is at most 1, as the output
    layer's biases' always are); `secagg_clipped` counts the coordinates it cuts."""
    if cfg.secagg_range is not None:
        return float(cfg.secagg_range)
    steps = cfg.local_epochs * math.ceil(int(np.max(sizes)) / cfg.local_batch_size)
    return max(1.0, cfg.local_lr * steps)


def round_plan(cfg: Config, m: int) -> tuple[int | None, int, int, int | None]:
    """(K, t, corrupt, max_absent) of a round of m clients: K from --secagg-neighbors when it
    meets Bell et al.'s bound (secagg_graph.min_neighbors) at this m, else the bound's K, or the
    complete graph (None); t, the derived threshold (the smallest majority of the holders, raised
    on sparse graphs by secagg_graph.sparse_threshold), or --secagg-threshold above it; corrupt,
    the colluders the consistency round withstands; max_absent, the absent neighbours a survivor
    may have (sparse graphs with colluders; secagg_graph.max_absent)."""
    dropout, corrupt = secagg_bounds(cfg, m)
    k = neighbours(cfg, m)
    holders = secagg_graph.holders_per_client(k, m)
    t = derived_threshold(cfg, m, k)
    if cfg.secagg_threshold is not None:
        t = max(t, min(cfg.secagg_threshold, holders))
    absent = None
    if k is not None and corrupt > 0:
        absent = secagg_graph.max_absent(holders - 1, m, dropout)
    return k, t, corrupt_count(m, cfg.dp_colluders, cfg.secagg_corrupt_fraction), absent


def neighbours(cfg: Config, m: int) -> int | None:
    """K of a round of m clients (None: the complete graph)."""
    dropout, corrupt = secagg_bounds(cfg, m)
    bound = secagg_graph.min_neighbors(m, dropout, corrupt)
    k = cfg.secagg_neighbors
    if bound is None or k is None and m <= 2 * bound:   # small rounds: complete is as cheap
        return None
    if k is None or k < bound:
        return bound
    return k


def derived_threshold(cfg: Config, m: int, k: int | None) -> int:
    """The threshold the round's graph needs: the smallest majority of a client's holders, raised
    on a sparse graph until the corrupt among them reach it with probability <= 2^-40 / m."""
    _, corrupt = secagg_bounds(cfg, m)
    holders = secagg_graph.holders_per_client(k, m)
    if k is None:
        return secagg_graph.default_threshold(holders)
    return secagg_graph.sparse_threshold(holders, m, corrupt)


def secagg_bounds(cfg: Config, m: int) -> tuple[float, float]:
    """(the dropout fraction the graph must survive, the corrupt fraction it must withstand) in
    a round of m clients. The colluders are those the DP accounting assumes too (one adversary,
    one set of numbers): max(--dp-colluders C, ceil(G m)) of m, so a fraction max(G, C / m)."""
    dropout = cfg.secagg_max_dropout if cfg.secagg_max_dropout is not None else max(0.1, cfg.dropout_rate)
    return dropout, max(cfg.secagg_corrupt_fraction, cfg.dp_colluders / max(m, 1))


def check_settings(cfg: Config, per_round: float) -> None:
    """Settings secure aggregation cannot work with, for `per_round` clients a round (the same
    on every rank: config.validate calls it)."""
    if per_round < 2:
        raise UsageError(f"--secure-agg needs at least 2 clients per round (this run samples "
                         f"{per_round:g}): with one, the sum the server learns is that client's update")
    m = round(per_round)
    dropout, corrupt = secagg_bounds(cfg, m)
    colluders = corrupt_count(m, cfg.dp_colluders, cfg.secagg_corrupt_fraction)
    if colluders + 2 > m:
        raise UsageError(f"--secure-agg with {m} clients per round and {colluders} admitted colluder(s) "
                         f"(--secagg-corrupt-fraction, --dp-colluders): the sum the server learns could be "
                         f"one honest client's update; sample {colluders + 2} or more clients per round")
    if cfg.dropout_rate > dropout:
        raise UsageError(f"--dropout-rate {cfg.dropout_rate:g} is above --secagg-max-dropout {dropout:g}, "
                         "the dropout the neighbour graph is sized for")
    bound = secagg_graph.min_neighbors(m, dropout, corrupt)
    k = cfg.secagg_neighbors
    if k is not None and k < m - 1 and (bound is None or k < bound):
        need = f"K >= {bound}" if bound is not None else f"the complete graph (K >= {m - 1})"
        raise UsageError(f"--secagg-neighbors {k} is below Bell et al.'s bound for {m} clients per round: "
                         f"the survivors' graph must stay connected, except with probability 2^-{secagg_graph.SIGMA}, "
                         f"when up to {dropout:g} of them drop out (--secagg-max-dropout) and {corrupt:.3g} "
                         f"collude (--secagg-corrupt-fraction, --dp-colluders), and colluders must not bridge "
                         f"clients a malicious server names absent; that needs {need}, or leave the option out")
    k = neighbours(cfg, m)
    holders = secagg_graph.holders_per_client(k, m)
    t = cfg.secagg_threshold
    if t is not None:
        need_t = derived_threshold(cfg, m, k)
        if t < need_t:
            raise UsageError(f"--secagg-threshold {t} is below the {need_t} that {m} clients per round need "
                             f"(the smallest majority of each client's {holders} share holders"
                             f"{', raised so that colluders stay below it' if k is not None else ''}): with "
                             f"fewer, a server and a few colluders could rebuild a client's secrets; leave "
                             f"the option out, or raise it")
        if t > holders:
            others = "neighbours" if k is not None else "fellow sampled clients"
            raise UsageError(f"--secagg-threshold {t} must be at most the {holders} share holders of each "
                             f"client (the client and its {others})")
