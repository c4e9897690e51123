"""A malicious secure-aggregation server, for researchers: `--server-attack NAME` runs it against
honest clients (secagg.Client), which is how a user sees the protocol's guarantees hold. Pure
protocol code like secagg.py, no MPI: the trainer (fl/secure.py) and the tests call the same hooks.

Each attack deviates against one target client, and what the server could learn is computed by
the leakage oracle (leakage.py) from everything it holds; `recover` is the attack's own attempt
at the target's input, as a real attacker would compute it.
  empty-route     routes the target no shares, so that it adds no pairwise masks (Bonawitz et al.
                  2017, section 6): y_t - PRG(b_t) is x_t once the survivors return b_t's shares.
  key-swap        gives the target a key list in which every other client's keys are the server's
                  own: the target encrypts its shares to the server, which decrypts b_t and s_t.
  lie-dropped     tells some of the target's share holders that it survived and the others that
                  it dropped, to collect both b_t's and s_t's shares (split views).
  split-graph     claims that two runs of K/2 clients on the ring dropped, so that the survivors'
                  graph splits and the target's part is itself and one colluding client, whose
                  input the server knows (Bell et al. 2020: a sparse graph must stay connected).
  route-drop      routes the target the shares of only t - 1 holders A (colluders first), so that
                  it masks with A alone, then names A's honest members dropped to rebuild their
                  mask keys, and the target's self mask from the others' shares. On a sparse graph
                  it routes every client only its own arc of the ring and the declared-dropped
                  windows between arcs, to learn each arc's sum.
  thin-survivors  names only min_survivors survivors and the rest dropped (every check holds: the
                  protocol allows it); under DP it shrinks the honest noise a round carries.
The defences (secagg.Client): signed keys checked against the trusted set-up, the share count
before masking, the signed consistency round, the routing bound to the signed view, the
survivors' count, connectivity and absent neighbours, and self-mask shares only for survivors
that signed the view.

FuzzServer deviates at random at every stage (routings, drop declarations, split views, forged
keys and colluder signatures); `play` runs a round against any of them and returns the oracle's
verdict, with each honest client acting on its own (one client's abort never silences another).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from ..privacy import leakage, secagg, secagg_graph
from ..privacy.secagg import KEY_BYTES, KIND_B, KIND_S

ATTACKS = ("empty-route", "key-swap", "lie-dropped", "split-graph", "route-drop", "thin-survivors")


def decode_response(message: bytes) -> dict[int, tuple[int, int]]:
    """An unmask response as {owner: (kind, share)}; malformed entries are left out."""
    out = {}
    for j, e in secagg.decode_map(message).items():
        if len(e) == 1 + secagg.SHARE_BYTES and e[0] in (KIND_B, KIND_S):
            out[j] = (e[0], int.from_bytes(e[1:], "big"))
    return out


class Deviation:
    """The hooks a malicious server overrides, called in protocol order around the honest
    secagg.Server (`server`) of the round; the defaults are the honest server's behaviour."""

    def __init__(self, server: secagg.Server, colluders: Iterable[int] = ()):
        self.server = server
        self.colluders = {int(c) for c in colluders}
        self.uploads: dict[int, np.ndarray] = {}
        self.colluder_clients: dict[int, secagg.Client] = {}   # their state is the server's too
        self.fake_c: set[bytes] = set()             # public halves of keys it made itself
        self.fake_s: set[bytes] = set()

    def advertisements_for(self, receiver: int, advertisements: bytes) -> bytes:
        return advertisements

    def shares_up(self, shares: dict[int, bytes]) -> dict[int, bytes]:
        """What the honest route stage is given (a deviation may substitute what it cannot route)."""
        return shares

    def route(self, shares_up: Mapping[int, bytes], routed: dict[int, bytes]) -> dict[int, bytes]:
        return routed

    def masked_inputs(self, uploads: Mapping[int, np.ndarray]) -> None:
        self.uploads = {c: np.array(v, np.uint32) for c, v in uploads.items()}

    def requests(self, uploads: Mapping[int, np.ndarray]) -> dict[int, bytes]:
        """The unmask request each survivor gets: the honest server's, or (when the honest one
        would abort) the honest view anyway."""
        try:
            return self.server.unmask_request(uploads)
        except secagg.SecAggAbort:
            u2 = set(self.server._u2)
            request = secagg.encode_unmask_request(set(uploads), u2 - set(uploads))
            self.server.request = request
            return dict.fromkeys(sorted(uploads), request)

    def signatures_for(self, signatures: Mapping[int, bytes], requests: Mapping[int, bytes]) -> dict[int, bytes]:
        """What each survivor is sent in the consistency round: the signatures on its own view."""
        groups: dict[bytes, dict[int, bytes]] = {}
        for c, s in signatures.items():
            groups.setdefault(requests[c], {})[c] = s
        return {c: secagg.encode_map(groups[requests[c]]) for c in signatures}

    def adversary(self, advertisements: bytes) -> leakage.Adversary:
        """The keys whose secrets it knows: its own substitutes and the colluders' real keys."""
        ads = secagg.decode_map(advertisements)
        c_keys, s_keys = set(self.fake_c), set(self.fake_s)
        for c in self.colluders & set(ads):
            c_keys.add(ads[c][:KEY_BYTES])
            s_keys.add(ads[c][KEY_BYTES:2 * KEY_BYTES])
        return leakage.Adversary(c_keys, s_keys, set(self.colluders))


class MaliciousServer(Deviation):
    """One of ATTACKS against `target`. `colluders` {client: its true input}: clients that tell the
    server everything (their keys too, through `colluder_keys`), never the target."""

    def __init__(self, name: str, server: secagg.Server, target: int,
                 colluders: Mapping[int, np.ndarray] | None = None):
        if name not in ATTACKS:
            raise ValueError(f"unknown server attack {name!r}; choose from {', '.join(ATTACKS)}")
        inputs = dict(colluders or {})
        if target in inputs:
            raise ValueError(f"the target {target} cannot be among its own colluders")
        super().__init__(server, inputs)
        self.name, self.target, self.inputs = name, target, inputs
        self._fake: dict[int, tuple[X25519PrivateKey, X25519PrivateKey]] = {}
        self._target_shares: dict[int, bytes] = {}   # key-swap: the target's ciphertexts
        self._routed_to_target: set[int] = set()
        self._views: dict[int, bytes] = {}
        self._declared: set[int] = set()             # route-drop: the honest clients it names dropped

    # ---- stage 0: the key list each client gets
    def advertisements_for(self, receiver: int, advertisements: bytes) -> bytes:
        if self.name != "key-swap" or receiver != self.target:
            return advertisements
        ads = secagg.decode_map(advertisements)
        for j in ads:
            if j != self.target:                     # the server's keys, the client's signature
                c, s = X25519PrivateKey.generate(), X25519PrivateKey.generate()
                self._fake[j] = (c, s)
                self.fake_c.add(secagg._raw_public(c))
                self.fake_s.add(secagg._raw_public(s))
                ads[j] = secagg._raw_public(c) + secagg._raw_public(s) + ads[j][2 * KEY_BYTES:]
        forged = secagg.encode_map(ads)
        self._target_view = secagg.transcript_hash(self.server.params.server_round, forged)
        return forged

    def shares_up(self, shares: dict[int, bytes]) -> dict[int, bytes]:
        t = self.target
        if self.name == "key-swap" and t in shares:   # its shares went to the server's keys
            return {**shares, t: readdress(self.server, t)}
        return shares

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
        elif self.name == "route-drop" and t in routed:
            routed = self._route_drop(routed)
        if t in routed:
            self._routed_to_target = set(secagg.decode_map(routed[t]))
        return routed

    def _route_drop(self, routed: dict[int, bytes]) -> dict[int, bytes]:
        """The target gets the shares of t - 1 holders A (colluders first); their honest members
        are named dropped. On a sparse graph whose threshold leaves too few other holders for
        that: arcs of the ring get the shares of their own arc and of the clients named dropped
        only (_arcs)."""
        srv, t = self.server, self.target
        p, graph = srv.params, srv.graph
        # the target's self mask needs t responders among its holders outside A: on a sparse graph
        # with a threshold above a bare majority there are too few, and arcs are what it can learn
        if p.k is not None and p.k < len(graph) - 1 and len(graph[t]) + 1 < 2 * p.threshold - 1:
            arcs, dropped = self._arcs()
            self._declared = dropped
            part = {c: n for n, arc in enumerate(arcs) for c in arc}
            out = {}
            for j, message in routed.items():
                if j not in part:                     # the others hold and mask with everything
                    out[j] = message
                    continue
                out[j] = secagg.encode_map({i: ct for i, ct in secagg.decode_map(message).items()
                                            if i in dropped or part.get(i) == part[j]})
            return out
        nbrs = sorted(graph[t], key=lambda j: (j not in self.colluders, j))
        chosen = set(nbrs[:p.threshold - 1])
        self._declared = chosen - self.colluders
        kept = {i: ct for i, ct in secagg.decode_map(routed[t]).items() if i in chosen}
        return {**routed, t: secagg.encode_map(kept)}

    def _arcs(self) -> tuple[list[set[int]], set[int]]:
        """Arcs of the shuffled ring (the first starts at the target), each followed by a window
        of h = K/2 clients in which every other one is named dropped. An arc's client then masks
        only with its own arc and the dropped ones (about h/2 + h of its neighbours), while the
        window's survivors hold its shares (they mask with it and cannot be unmasked
        themselves): the arc's sum is left."""
        srv = self.server
        ring = secagg_graph.shuffled_ring(srv.graph, srv.transcript)
        h = srv.params.k // 2                         # type: ignore[operator]
        start = ring.index(self.target)
        ring = ring[start:] + ring[:start]
        count = max(1, len(ring) // (2 * h + 1))
        spare = len(ring) - count * (2 * h + 1)
        arcs, dropped, pos = [], set(), 0
        for a in range(count):
            size = h + 1 + spare // count + (a < spare % count)
            arcs.append(set(ring[pos:pos + size]))
            window = ring[pos + size:pos + size + h]
            dropped |= set(window[::2]) - self.colluders
            pos += size + h
        return arcs, dropped

    # ---- stage 2: the unmask request each survivor gets
    def requests(self, uploads: Mapping[int, np.ndarray]) -> dict[int, bytes]:
        requests = super().requests(uploads)
        srv, t = self.server, self.target
        if t not in requests:
            return requests
        survivors, dropped = secagg.decode_unmask_request(requests[t])
        if self.name == "split-graph":
            split = self.split_part()
            cut = (split[1] if split is not None else set(srv.graph[t])) & survivors
            lie = secagg.encode_unmask_request(survivors - cut, dropped | cut)
            return dict.fromkeys(sorted(survivors - cut), lie)
        if self.name == "lie-dropped":
            others = [j for j in srv.graph[t] if j in survivors]
            told_dropped = set(others[len(others) // 2:])   # the rest are told that t survived
            lie = secagg.encode_unmask_request(survivors - {t}, dropped | {t})
            self._views = {c: (lie if c in told_dropped else requests[c]) for c in requests}
            return self._views
        if self.name == "route-drop":
            named = self._declared & survivors
            view = secagg.encode_unmask_request(survivors - named, dropped | named)
            return dict.fromkeys(sorted(survivors - named), view)
        if self.name == "thin-survivors":
            keep = sorted(survivors - {t})[:srv.params.min_survivors - 1] + [t]
            view = secagg.encode_unmask_request(set(keep), dropped | (survivors - set(keep)))
            return dict.fromkeys(sorted(keep), view)
        return requests

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
        if len(part | cut) >= m or not (part - {t}) <= self.colluders:
            return None
        return part, cut

    # ---- after the round: the attack's own attempt
    @property
    def y_target(self):
        return self.uploads.get(self.target)

    def recover(self, responses: Mapping[int, bytes]) -> np.ndarray | None:
        """The server's estimate of the target's input from what it holds, or None."""
        srv, p, t = self.server, self.server.params, self.target
        if self.y_target is None:
            return None
        shares = self._shares(responses)
        b, s = self._secret(shares, t, KIND_B), self._secret(shares, t, KIND_S)
        if self.name == "key-swap":
            b, s = self._swapped_secrets(t)
        if b is None:
            return None
        estimate = self.y_target.copy()
        g = secagg.Prg(p.n)
        g.add(estimate, b, -1)
        ads = secagg.decode_map(srv.advertisements)
        split = self.split_part() if self.name == "split-graph" else None
        if split is not None:                        # the part's sum, less the colluder's input
            return self._recover_part(estimate, g, split, shares, ads)
        for j in sorted(self._routed_to_target):
            key = self._pair_key(j, s, shares, ads)
            if key is None:
                return None
            g.add(estimate, key, -secagg._sign(t, j))
        return estimate

    def _shares(self, responses: Mapping[int, bytes]) -> dict[tuple[int, int], dict[int, int]]:
        """{(owner, kind): {x: share}} from every response it was sent."""
        out: dict[tuple[int, int], dict[int, int]] = {}
        for k, msg in responses.items():
            for j, (kind, value) in decode_response(msg).items():
                out.setdefault((j, kind), {})[k + 1] = value
        return out

    def _secret(self, shares, owner: int, kind: int) -> bytes | None:
        got = shares.get((owner, kind), {})
        if len(got) < self.server.params.threshold:
            return None
        try:
            return self.server.secret(got, owner, "secret")
        except secagg.SecAggError:
            return None

    def _swapped_secrets(self, t: int) -> tuple[bytes | None, bytes | None]:
        """key-swap: b_t and s_t from the target's ciphertexts to the server's own keys."""
        srv, p = self.server, self.server.params
        ads = secagg.decode_map(srv.advertisements)
        bs, ss = {}, {}
        for j, ct in self._target_shares.items():
            if j in self._fake:
                try:
                    bj, sj = secagg.decrypt_shares(self._fake[j][0], ads[t][:KEY_BYTES], ct, p.server_round, t, j)
                except secagg.SecAggError:
                    continue
                bs[j + 1], ss[j + 1] = bj, sj
        if len(bs) < p.threshold:
            return None, None
        return srv.secret(bs, t, "self-mask seed"), srv.secret(ss, t, "mask key")

    def _recover_part(self, estimate, g, split, shares, ads):
        srv, p = self.server, self.server.params
        part, cut = split
        for r in part - {self.target}:
            b_r = self._secret(shares, r, KIND_B)
            if r not in self.uploads or b_r is None:
                return None
            estimate += self.uploads[r]
            g.add(estimate, b_r, -1)
            estimate -= self.inputs[r]
        for a in part:                               # masks shared with the "dropped": rebuilt
            for j in srv.graph[a]:
                if j in cut:
                    s_j = self._secret(shares, j, KIND_S)
                    if s_j is None:
                        return None
                    key = X25519PrivateKey.from_private_bytes(s_j)
                    g.add(estimate, secagg.pair_key(key, ads[a][KEY_BYTES:2 * KEY_BYTES], p.server_round, j, a),
                          -secagg._sign(a, j))
        return estimate

    def _pair_key(self, j: int, s: bytes | None, shares, ads) -> bytes | None:
        """s_tj, from the target's mask key, a fake key of the server's, a colluder's key, or j's
        rebuilt mask key."""
        p, t = self.server.params, self.target
        s_pk = ads[j][KEY_BYTES:2 * KEY_BYTES]
        if self.name == "key-swap":
            return secagg.pair_key(self._fake[j][1], ads[t][KEY_BYTES:2 * KEY_BYTES], p.server_round, t, j)
        if s is not None:
            return secagg.pair_key(X25519PrivateKey.from_private_bytes(s), s_pk, p.server_round, t, j)
        s_j = self.colluder_clients[j]._s_sk.private_bytes_raw() if j in self.colluder_clients else \
            self._secret(shares, j, KIND_S)
        if s_j is None:
            return None
        return secagg.pair_key(X25519PrivateKey.from_private_bytes(s_j), ads[t][KEY_BYTES:2 * KEY_BYTES],
                               p.server_round, j, t)


def readdress(server: secagg.Server, target: int) -> bytes:
    """key-swap: the target's shares went to the server's keys; what the honest route stage
    needs in their place (empty ciphertexts to its real neighbours: they never decrypt them
    unless the round reaches unmasking)."""
    return secagg.encode_map({j: bytes(secagg.CIPHERTEXT_BYTES) for j in server.graph[target]})


def learned_individual(estimate: np.ndarray | None, x_true: np.ndarray) -> bool:
    """Whether the attack's own estimate is the target's input (every word)."""
    return estimate is not None and np.array_equal(estimate, x_true)


def words_recovered(estimate: np.ndarray | None, x_true: np.ndarray) -> int:
    """How many words of the estimate equal the input's (chance: 2^-32 of them)."""
    return 0 if estimate is None else int(np.count_nonzero(estimate == x_true))


# ------------------------------------------------------------------------- the fuzzing server

@dataclass
class FuzzChoices:
    """What a FuzzServer did in one round (for a failing seed's report)."""
    seed: int
    notes: list[str] = field(default_factory=list)


class FuzzServer(Deviation):
    """A server that deviates at random, a few clients at a time so that rounds often get through:
    forged keys in a key list, routings that withhold some senders' shares from some receivers
    (and a ciphertext under another sender's name), survivor and dropped sets that name
    uploaders dropped, clients that never uploaded survivors, or the withheld senders dropped
    (route-then-drop in general), several views at once, signatures held back, and colluders'
    signatures on whatever view it likes (it holds their identity keys). Each stage deviates in
    about half the rounds."""

    def __init__(self, server: secagg.Server, rng: np.random.Generator, colluders: Iterable[int],
                 identities: Mapping[int, secagg.Identity]):
        super().__init__(server, colluders)
        self.rng, self.identities = rng, identities
        self.choices = FuzzChoices(int(rng.integers(2**31)))
        self.stages = {stage: bool(rng.random() < odds) for stage, odds in
                       (("keys", 0.1), ("route", 0.6), ("views", 0.6), ("signatures", 0.3))}
        self.withheld: set[int] = set()            # senders whose shares some receiver was not given

    def _note(self, text: str) -> None:
        self.choices.notes.append(text)

    def _few(self, items, most: int) -> list[int]:
        items = sorted(items)
        if not items:
            return []
        count = int(self.rng.integers(1, min(most, len(items)) + 1))
        return [int(c) for c in self.rng.choice(items, size=count, replace=False)]

    def advertisements_for(self, receiver: int, advertisements: bytes) -> bytes:
        if not self.stages["keys"] or self.rng.random() > 0.3:
            return advertisements
        ads = secagg.decode_map(advertisements)
        for j in self._few([j for j in ads if j != receiver], 2):
            c, s = X25519PrivateKey.generate(), X25519PrivateKey.generate()
            self.fake_c.add(secagg._raw_public(c))
            self.fake_s.add(secagg._raw_public(s))
            ads[j] = secagg._raw_public(c) + secagg._raw_public(s) + ads[j][2 * KEY_BYTES:]
            self._note(f"forged keys of {j} for {receiver}")
        return secagg.encode_map(ads)

    def shares_up(self, shares: dict[int, bytes]) -> dict[int, bytes]:
        # a client whose key list was forged addressed other neighbours: the honest stage gets
        # what it expects, and route() below relays the real ciphertexts
        graph = self.server.graph
        return {i: m if set(secagg.decode_map(m)) == set(graph[i]) else readdress(self.server, i)
                for i, m in shares.items()}

    def route(self, shares_up: Mapping[int, bytes], routed: dict[int, bytes]) -> dict[int, bytes]:
        rng = self.rng
        sent = {i: secagg.decode_map(m) for i, m in shares_up.items()}
        out = {j: {i: m[j] for i, m in sent.items() if j in m} for j in routed}
        if self.stages["route"]:
            for j in self._few(out, 4):
                held = sorted(out[j])
                keep = int(rng.integers(0, len(held) + 1))
                kept = set(rng.choice(held, size=keep, replace=False).tolist()) if held else set()
                self.withheld |= set(held) - kept
                out[j] = {i: ct for i, ct in out[j].items() if i in kept}
                self._note(f"{j} routed {sorted(kept)}")
            if rng.random() < 0.05:                   # a ciphertext under another sender's name
                j = int(rng.choice(list(out)))
                if out[j]:
                    a, b = int(rng.choice(list(out[j]))), int(rng.choice(list(sent)))
                    if b not in out[j]:
                        out[j][b] = out[j].pop(a)
                        self._note(f"relabelled {a}->{b} for {j}")
        return {j: secagg.encode_map(m) for j, m in out.items()}

    def _view(self, uploads: list[int]) -> bytes:
        rng, members = self.rng, sorted(self.server.graph)
        u3 = set(uploads)
        kind = int(rng.integers(4))
        if kind == 1:                                 # name some uploaders dropped
            u3 -= set(self._few(u3, max(1, len(u3) // 2)))
        elif kind == 2 and self.withheld:             # route-then-drop: the withheld senders dropped
            u3 -= set(self._few(self.withheld, len(self.withheld)))
        elif kind == 3:                               # clients that did not upload named survivors
            u3 |= set(self._few(set(members) - u3, 3)) if set(members) - u3 else set()
        rest = [c for c in members if c not in u3]
        dropped = {c for c in rest if rng.random() < 0.9}
        self._note(f"view {sorted(u3)} dropped {sorted(dropped)}")
        return secagg.encode_unmask_request(u3, dropped)

    def requests(self, uploads: Mapping[int, np.ndarray]) -> dict[int, bytes]:
        if not self.stages["views"]:
            return super().requests(uploads)
        up = sorted(uploads)
        views = [self._view(up) for _ in range(int(self.rng.choice([1, 1, 2, 3])))]
        return {c: views[int(self.rng.integers(len(views)))] for c in up}

    def signatures_for(self, signatures: Mapping[int, bytes], requests: Mapping[int, bytes]) -> dict[int, bytes]:
        rng, p = self.rng, self.server.params
        out = {}
        for c in signatures:
            view = requests[c]
            same = {k: s for k, s in signatures.items() if requests.get(k) == view}
            if self.stages["signatures"] and rng.random() < 0.5:
                same = {k: s for k, s in same.items() if rng.random() < 0.7}
            survivors, _ = secagg.decode_unmask_request(view)
            message = secagg._consistency_message(p.server_round, self.server.transcript, view)
            for k in self.colluders & survivors:      # they sign whatever it likes
                same[k] = self.identities[k].sign(message)
            out[c] = secagg.encode_map(same)
        return out


# ------------------------------------------------------------------------------ one round, played

def play(params: secagg_graph.RoundParams, xs: Mapping[int, np.ndarray], make_server,
         client_cls=secagg.Client, colluders: Iterable[int] = ()) -> dict[str, Any]:
    """One round in one process against the server `make_server(honest_server, identities)`
    returns (a Deviation). Every honest client acts on its own: an abort stops only that client.
    Returns {"detected": the first abort's message or None, "aborted": {client: message},
    "leak": the oracle's Leak, "responses": {client: bytes}, "server": the Deviation}."""
    ids, directory = secagg.identities(params.clients)
    colluders = {int(c) for c in colluders}
    clients = {c: client_cls(c, params, ids[c], directory) for c in params.clients}
    server = secagg.Server(params, directory)
    evil = make_server(server, ids)
    evil.colluder_clients = {c: clients[c] for c in colluders}
    aborted: dict[int, str] = {}

    def each(stage, who):
        out = {}
        for c in sorted(who):
            if c in aborted:
                continue
            try:
                out[c] = stage(c)
            except secagg.SecAggViolation as exc:
                aborted[c] = str(exc)
            except secagg.SecAggError as exc:         # malformed or failing at this client
                aborted[c] = f"client {c}: {exc}"
        return out

    responses: dict[int, bytes] = {}
    ads = b""
    try:
        ads = server.collect_keys({c: cl.advertise_keys() for c, cl in clients.items()})
        shares_up = each(lambda c: clients[c].share_keys(evil.advertisements_for(c, ads)), clients)
        routed = evil.route(shares_up, server.route_shares(evil.shares_up(shares_up)))
        ys = each(lambda c: clients[c].masked_input(xs[c], routed[c]), routed)
        evil.masked_inputs(ys)
        requests = evil.requests(ys)
        sigs = each(lambda c: clients[c].consistency(requests[c]), requests)
        sent = evil.signatures_for(sigs, requests)
        responses = each(lambda c: clients[c].unmask(sent[c]), sent)
    except secagg.SecAggError as exc:                 # the honest bookkeeping gave up: no round
        aborted.setdefault(-1, f"server: {exc}")
    truths = {c: clients[c].disclose() for c in clients if c not in colluders}
    decoded = {k: decode_response(v) for k, v in responses.items()}
    leak = leakage.analyse(truths, decoded, evil.adversary(ads) if ads else leakage.Adversary(),
                           params.threshold, params.min_survivors)
    detected = next((m for c, m in sorted(aborted.items()) if c >= 0), None)
    return {"detected": detected, "aborted": aborted, "leak": leak, "responses": responses, "server": evil}


def run(params: secagg_graph.RoundParams, xs: Mapping[int, np.ndarray], name: str, target: int,
        client_cls=secagg.Client, colluders: Iterable[int] = ()) -> dict[str, Any]:
    """One round against the named attack on `target`; {"detected", "learned_individual" (the
    oracle's: the target's input alone is computable), "learned_partial", "recovered" (the
    attack's own estimate equals the target's input), "words" (how many words of it do),
    "leak"}. client_cls lets a test remove a defence."""
    colluders = [int(c) for c in colluders]
    holder: dict[str, Any] = {}

    def make(server, ids):
        holder["evil"] = MaliciousServer(name, server, target, {c: xs[c] for c in colluders})
        return holder["evil"]

    out = play(params, xs, make, client_cls, colluders)
    evil = holder["evil"]
    leak = out["leak"]
    estimate = evil.recover(out["responses"])
    return {**out, "learned_individual": target in leak.individuals, "learned_partial": leak.learned_partial,
            "recovered": learned_individual(estimate, xs[target]), "words": words_recovered(estimate, xs[target])}


def fuzz_round(seed: int) -> tuple[secagg_graph.RoundParams, int]:
    """The round the fuzzer plays for `seed`, and the colluders it may hold: complete graphs of
    3-10 clients with up to the colluders the consistency round withstands, or sparse graphs of
    8-14 clients (any K) without colluders; where the guarantee holds whatever the server does."""
    rng = np.random.default_rng([seed, 7])              # test randomness, not secrets
    if rng.random() < 0.6:
        m = int(rng.integers(3, 11))
        corrupt = int(rng.integers(0, max(1, m // 4) + 1))
        return secagg_graph.RoundParams.make(seed, range(m), 4, corrupt=corrupt), corrupt
    m = int(rng.integers(8, 15))
    return secagg_graph.RoundParams.make(seed, range(m), 4, k=int(rng.choice([2, 4, 6]))), 0


def fuzz(params: secagg_graph.RoundParams, seed: int, corrupt: int = 0, client_cls=secagg.Client,
         n: int = 4) -> dict[str, Any]:
    """One round against a FuzzServer seeded by `seed`, with up to `corrupt` random colluders."""
    rng = np.random.default_rng([seed, 0xF022])          # test randomness, not secrets
    m = len(params.clients)
    colluders = set(rng.choice(params.clients, size=int(rng.integers(0, corrupt + 1)), replace=False).tolist()) \
        if corrupt else set()
    xs = {c: rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32) for c in params.clients}
    holder: dict[str, Any] = {}

    def make(server, ids):
        holder["evil"] = FuzzServer(server, rng, colluders, ids)
        return holder["evil"]

    out = play(params, xs, make, client_cls, colluders)
    out["choices"] = holder["evil"].choices
    out["colluders"] = colluders
    out["m"] = m
    return out
