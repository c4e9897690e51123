"""A malicious secure-aggregation server, for researchers: `--server-attack NAME` runs it against
honest clients (secagg.Client), which is how a user sees the protocol's guarantees hold. Pure
protocol code like secagg.py, no MPI: the trainer (fl/secure.py) and the tests call the same hooks.

Each attack deviates at one stage against one target client and then tries to compute the
target's input from what it was sent, as a real attacker would (`recover`); `learned_individual`
compares that estimate with the true input, which only the simulation knows.
  empty-route   routes the target no shares, so that it adds no pairwise masks (Bonawitz et al.
                2017, section 6): y_t - PRG(b_t) is x_t once the survivors return b_t's shares.
  key-swap      gives the target a key list in which every other client's keys are the server's
                own: the target encrypts its shares to the server, which decrypts b_t and s_t.
  lie-dropped   tells some of the target's share holders that it survived and the others that it
                dropped, to collect both b_t's and s_t's shares (split views).
  split-graph   claims that two runs of K/2 clients on the ring dropped, so that the survivors'
                graph splits and the target's part is itself and one colluding client, whose
                input the server knows (Bell et al. 2020: a sparse graph must stay connected).
The defences (secagg.Client): signed keys checked against the trusted set-up, the share count
before masking, the signed consistency round, and the survivors' count and connectivity.
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ..privacy import secagg, secagg_graph
from ..privacy.secagg import KEY_BYTES, KIND_B, KIND_S

ATTACKS = ("empty-route", "key-swap", "lie-dropped", "split-graph")


class MaliciousServer:
    """Wraps the honest secagg.Server of a round (for its bookkeeping) and deviates against
    `target`. The trainer calls the hooks in protocol order, and uses the honest server's
    outputs where a hook is not the attack's."""

    def __init__(self, name: str, server: secagg.Server, target: int,
                 colluders: Mapping[int, np.ndarray] | None = None):
        if name not in ATTACKS:
            raise ValueError(f"unknown server attack {name!r}; choose from {', '.join(ATTACKS)}")
        self.name, self.server, self.target = name, server, target
        self.colluders = dict(colluders or {})        # {client: its true input}: they tell the server
        self.uploads: dict[int, np.ndarray] = {}
        self._fake: dict[int, tuple[X25519PrivateKey, X25519PrivateKey]] = {}
        self._target_shares: dict[int, bytes] = {}   # key-swap: the target's ciphertexts
        self._routed_to_target: set[int] = set()
        self._views: dict[int, bytes] = {}
        self._s_shares: dict[int, dict[int, int]] = {}   # split-graph: the "dropped" mask keys' shares

    # ---- stage 0: the key list each client gets
    def advertisements_for(self, receiver: int, advertisements: bytes) -> bytes:
        if self.name != "key-swap" or receiver != self.target:
            return advertisements
        ads = secagg.decode_map(advertisements)
        for j in ads:
            if j != self.target:                     # the server's keys, the client's signature
                c, s = X25519PrivateKey.generate(), X25519PrivateKey.generate()
                self._fake[j] = (c, s)
                ads[j] = secagg._raw_public(c) + secagg._raw_public(s) + ads[j][2 * KEY_BYTES:]
        forged = secagg.encode_map(ads)
        self._target_view = secagg.transcript_hash(self.server.params.server_round, forged)
        return forged

    # ---- stage 1: what each client is routed
    def route(self, shares_up: Mapping[int, bytes], routed: dict[int, bytes]) -> dict[int, bytes]:
        p, t = self.server.params, self.target
        if self.name == "empty-route" and t in routed:
            routed = {**routed, t: secagg.encode_map({})}
        elif self.name == "key-swap" and t in shares_up:
            self._target_shares = secagg.decode_map(shares_up[t])
            # ciphertexts "from" each of the target's neighbours (in its view), made with the fake keys
            ads = secagg.decode_map(self.server.advertisements)
            graph = p.graph(ads, self._target_view)
            c_pk_t = ads[t][:KEY_BYTES]
            forged = {}
            for j in graph[t]:
                aead, aad = secagg._share_aead(self._fake[j][0], c_pk_t, p.server_round, j, t)
                nonce = bytes(secagg.NONCE_BYTES)
                forged[j] = nonce + aead.encrypt(nonce, bytes(2 * secagg.SHARE_BYTES), aad)
            routed = {**routed, t: secagg.encode_map(forged)}
        if t in routed:
            self._routed_to_target = set(secagg.decode_map(routed[t]))
        return routed

    def masked_inputs(self, uploads: Mapping[int, np.ndarray]) -> None:
        self.uploads = {c: np.array(v, np.uint32) for c, v in uploads.items()}

    @property
    def y_target(self):
        return self.uploads.get(self.target)

    def split_part(self) -> tuple[set[int], set[int]] | None:
        """split-graph: (the target's part, the clients claimed dropped): the target and its
        next client on the ring, cut off by the K/2 clients on either side; None when the
        graph is complete or the next client does not collude."""
        srv, t = self.server, self.target
        k = srv.params.k
        members = sorted(srv.graph)
        if k is None or k >= len(members) - 1 or k % 2:
            return None
        ring = secagg_graph.shuffled_ring(members, srv.transcript)
        pos, h, m = ring.index(t), k // 2, len(ring)
        part = {ring[pos], ring[(pos + 1) % m]}
        cut = {ring[(pos - d) % m] for d in range(1, h + 1)} | {ring[(pos + 1 + d) % m] for d in range(1, h + 1)}
        if len(part | cut) >= m or not (part - {t}) <= set(self.colluders):
            return None
        return part, cut

    # ---- stage 2: the unmask request each survivor gets
    def requests(self, requests: dict[int, bytes]) -> dict[int, bytes]:
        srv, t = self.server, self.target
        if t not in requests:
            return requests
        survivors, dropped = secagg.decode_unmask_request(requests[t])
        if self.name == "split-graph":
            split = self.split_part()
            if split is None:                        # nothing to split: the target alone
                cut = set(srv.graph[t]) & survivors
            else:
                cut = split[1] & survivors
            lie = secagg.encode_unmask_request(survivors - cut, dropped | cut)
            return dict.fromkeys(survivors - cut, lie)
        if self.name == "lie-dropped":
            others = [j for j in srv.graph[t] if j in survivors]
            told_dropped = set(others[len(others) // 2:])   # the rest are told that t survived
            lie = secagg.encode_unmask_request(survivors - {t}, dropped | {t})
            self._views = {c: (lie if c in told_dropped else requests[c]) for c in requests}
            return self._views
        return requests

    def signatures_for(self, signatures: Mapping[int, bytes]) -> dict[int, bytes]:
        """What each survivor is sent in the consistency round: all the signatures (with split
        views, those of its own view's group: nothing else could pass its check)."""
        if self._views:
            groups: dict[bytes, dict[int, bytes]] = {}
            for c, s in signatures.items():
                groups.setdefault(self._views[c], {})[c] = s
            return {c: secagg.encode_map(groups[self._views[c]]) for c in signatures}
        blob = secagg.encode_map(dict(signatures))
        return dict.fromkeys(signatures, blob)

    # ---- after the round: the attempt
    def recover(self, responses: Mapping[int, bytes]) -> np.ndarray | None:
        """The server's estimate of the target's input from what it holds, or None."""
        srv, p, t = self.server, self.server.params, self.target
        if self.y_target is None:
            return None
        b = s = None
        if self.name == "key-swap":
            if not self._target_shares:
                return None
            ads = secagg.decode_map(srv.advertisements)
            bs, ss = {}, {}
            for j, ct in self._target_shares.items():
                if j in self._fake:
                    try:
                        bj, sj = secagg.decrypt_shares(self._fake[j][0], ads[t][:KEY_BYTES], ct,
                                                       p.server_round, t, j)
                    except secagg.SecAggError:
                        continue
                    bs[j + 1], ss[j + 1] = bj, sj
            if len(bs) < p.threshold:
                return None
            b, s = srv.secret(bs, t, "self-mask seed"), srv.secret(ss, t, "mask key")
        else:
            bs, ss = {}, {}
            for k, msg in responses.items():
                entries = secagg.decode_map(msg)
                if t in entries and len(entries[t]) == 1 + secagg.SHARE_BYTES:
                    kind, share = entries[t][0], secagg._share_from_bytes(entries[t][1:])
                    (bs if kind == KIND_B else ss)[k + 1] = share
                if self.name == "split-graph":       # the "dropped" neighbours' mask keys
                    for j, e in entries.items():
                        if j != t and e[0] == KIND_S:
                            self._s_shares_of(j)[k + 1] = secagg._share_from_bytes(e[1:])
            if len(bs) < p.threshold:
                return None
            b = srv.secret(bs, t, "self-mask seed")
            if len(ss) >= p.threshold:
                s = srv.secret(ss, t, "mask key")
        estimate = self.y_target.copy()
        g = secagg.Prg(p.n)
        g.add(estimate, b, -1)
        ads = secagg.decode_map(srv.advertisements)
        split = self.split_part() if self.name == "split-graph" else None
        if split is not None:                        # the part's sum, less the colluder's input
            return self._recover_part(estimate, g, split, responses, ads)
        for j in sorted(self._routed_to_target):
            key = self._pair_key(j, s, ads)
            if key is None:
                return None
            g.add(estimate, key, -secagg._sign(t, j))
        return estimate

    def _recover_part(self, estimate, g, split, responses, ads):
        srv, p, t = self.server, self.server.params, self.target
        part, cut = split
        for r in part - {t}:
            if r not in self.uploads:
                return None
            estimate += self.uploads[r]
            bs = {}
            for k, msg in responses.items():
                e = secagg.decode_map(msg).get(r)
                if e is not None and e[0] == KIND_B:
                    bs[k + 1] = secagg._share_from_bytes(e[1:])
            if len(bs) < p.threshold:
                return None
            g.add(estimate, srv.secret(bs, r, "self-mask seed"), -1)
            estimate -= self.colluders[r]
        for a in part:                               # masks shared with the "dropped": rebuilt
            for j in srv.graph[a]:
                if j in cut:
                    shares = self._s_shares.get(j, {})
                    if len(shares) < p.threshold:
                        return None
                    s_j = X25519PrivateKey.from_private_bytes(srv.secret(shares, j, "mask key"))
                    g.add(estimate, secagg.pair_key(s_j, ads[a][KEY_BYTES:2 * KEY_BYTES], p.server_round, j, a),
                          -secagg._sign(a, j))
        return estimate

    def _s_shares_of(self, j: int) -> dict[int, int]:
        return self._s_shares.setdefault(j, {})

    def _pair_key(self, j: int, s: bytes | None, ads) -> bytes | None:
        """s_tj, from the target's mask key, a fake key of the server's, or j's rebuilt mask key."""
        p, t = self.server.params, self.target
        if self.name == "key-swap":
            return secagg.pair_key(self._fake[j][1], ads[t][KEY_BYTES:2 * KEY_BYTES], p.server_round, t, j)
        if s is not None:
            return secagg.pair_key(X25519PrivateKey.from_private_bytes(s), ads[j][KEY_BYTES:2 * KEY_BYTES],
                                   p.server_round, t, j)
        shares = self._s_shares.get(j, {})
        if len(shares) < p.threshold:
            return None
        s_j = X25519PrivateKey.from_private_bytes(self.server.secret(shares, j, "mask key"))
        return secagg.pair_key(s_j, ads[t][KEY_BYTES:2 * KEY_BYTES], p.server_round, j, t)


def learned_individual(estimate: np.ndarray | None, x_true: np.ndarray) -> bool:
    return estimate is not None and np.array_equal(estimate, x_true)


def run(params: secagg_graph.RoundParams, xs: Mapping[int, np.ndarray], name: str, target: int,
        client_cls=secagg.Client, colluders=()) -> dict:
    """One round in one process against the malicious server; returns {"detected": who aborted
    and why (or None), "learned_individual": bool}. client_cls lets a test remove a defence."""
    ids, directory = secagg.identities(params.clients)
    clients = {c: client_cls(c, params, ids[c], directory) for c in params.clients}
    server = secagg.Server(params, directory)
    evil = MaliciousServer(name, server, target, {c: xs[c] for c in colluders})
    responses: dict[int, bytes] = {}
    detected = None
    try:
        ads = server.collect_keys({c: cl.advertise_keys() for c, cl in clients.items()})
        shares_up = {c: cl.share_keys(evil.advertisements_for(c, ads)) for c, cl in clients.items()}
        honest = {c: v for c, v in shares_up.items() if c != target or name != "key-swap"}
        readdressed = {target: readdress(server, target)} if len(honest) < len(shares_up) else {}
        routed = server.route_shares({**honest, **readdressed})
        routed = evil.route(shares_up, routed)
        ys = {c: clients[c].masked_input(xs[c], routed[c]) for c in routed}
        evil.masked_inputs(ys)
        requests = evil.requests(server.unmask_request(ys))
        sigs = {c: clients[c].consistency(r) for c, r in requests.items()}
        sent = evil.signatures_for(sigs)
        responses = {c: clients[c].unmask(sent[c]) for c in sent}
    except secagg.SecAggViolation as exc:
        detected = str(exc)
    return {"detected": detected, "learned_individual": learned_individual(evil.recover(responses), xs[target])}


def readdress(server: secagg.Server, target: int) -> bytes:
    """key-swap: the target's shares went to the server's keys; what the honest route stage
    needs in their place (empty ciphertexts to its real neighbours: they never decrypt them
    unless the round reaches unmasking)."""
    return secagg.encode_map({j: bytes(secagg.CIPHERTEXT_BYTES) for j in server.graph[target]})
