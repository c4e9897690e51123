"""Secure aggregation, the pure protocol with no MPI and no I/O: the double masking of Bonawitz et
al. 2017 ("Practical Secure Aggregation for Privacy-Preserving Machine Learning") on the sparse
neighbour graph of Bell et al. 2020 (SecAgg+). The caller moves every message, all `bytes`,
between the processes; the masked inputs are uint32 arrays, summed by the caller (an MPI SUM on
uint32 wraps mod 2^32, which is what the masks need) or by `Server.aggregate`.

One round, for the sampled clients U (threat model: honest-but-curious server; up to t-1
colluding clients learn nothing beyond the survivors' sum):
  0 advertise_keys   each client: two X25519 key pairs, c (encrypts shares) and s (agrees masks)
     collect_keys    server -> each client: its neighbours' public keys          U1 = who sent
  1 share_keys       client i: self-mask seed b_i; Shamir shares of b_i and of its s secret key
                     for its holders (itself + neighbours), AES-GCM-encrypted to each holder
     route_shares    server -> each client j: {sender: ciphertext for j}          U2 = who sent
  2 masked_input     y_i = x_i + PRG(b_i) + sum_{j in N(i) & U2} sign(i,j) PRG(s_ij)   mod 2^32
     unmask_request  server names the survivors U3 (sent y) and the dropped D = U2 - U3
  3 unmask           each survivor: b-shares of survivors, s-shares of the dropped, never both
     aggregate       sum y - PRG(b_j) for j in U3 - the masks the survivors shared with D

Wire formats (all integers little-endian):
  keys message      c_pk (32 raw bytes) || s_pk (32 raw bytes)
  id map            u32 count, count x (u32 id, u32 length), then the payloads in that order;
                    ids strictly increasing. Carries {id: bytes} (neighbour keys, ciphertexts,
                    unmask responses).
  share ciphertext  nonce (12) || AES-GCM(b-share || s-share) with its 16-byte tag; 160 bytes.
                    A share is its y-value, 66 bytes big-endian (the field is mod 2^521 - 1);
                    its x is the receiver's id + 1.
  unmask request    u32 n_survivors, u32 n_dropped, then the survivor ids, then the dropped ids
  unmask response   id map {owner: kind (1 byte: 1 = b-share, 2 = s-share) || share (66 bytes)}

Out of scope: a malicious server. Bonawitz's consistency check (signed views of U3) is left out,
so a server that sent different unmask requests to different clients could collect both kinds
of share of one client; the round seed of the graph is public, chosen by the caller.
"""
from __future__ import annotations

import hashlib
import math
import os
import secrets
import struct
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import HpcflError

PRIME = 2**521 - 1                 # Mersenne prime > 2^256: any 32-byte secret is a field element
SHARE_BYTES = 66                   # ceil(521 / 8)
KEY_BYTES = 32                     # X25519 keys, seeds and derived keys: full 256 bits
KEYS_MESSAGE_BYTES = 2 * KEY_BYTES
NONCE_BYTES = 12
CIPHERTEXT_BYTES = NONCE_BYTES + 2 * SHARE_BYTES + 16
KIND_B, KIND_S = 1, 2
_ZERO_IV = bytes(16)               # each PRG key expands exactly one stream, so a fixed IV is safe


class SecAggError(HpcflError):
    """A message that breaks the protocol (malformed, out of order, or refused)."""


class SecAggAbort(SecAggError):
    """Too few clients are left to finish the round securely: the caller skips the round."""


class SecAggAuthError(SecAggError):
    """A share ciphertext failed AES-GCM authentication: tampered, misrouted or truncated."""

    def __init__(self, sender: int, receiver: int, server_round: int):
        super().__init__(f"round {server_round}: the share ciphertext from client {sender} to "
                         f"client {receiver} failed authentication (AES-GCM)")
        self.sender, self.receiver, self.server_round = sender, receiver, server_round


# ---------------------------------------------------------------------------- round parameters

def check_threshold(t: int, n_holders: int) -> int:
    if not 2 <= t <= n_holders:
        raise ValueError(f"secure aggregation threshold t={t} must satisfy 2 <= t <= {n_holders} "
                         f"(the number of share holders per client)")
    return t


def default_threshold(n_holders: int) -> int:
    """The smallest majority of the share holders: n_holders // 2 + 1."""
    return check_threshold(n_holders // 2 + 1, n_holders)


def neighbor_graph(clients: Iterable[int], k: int | None,
                   round_seed: bytes | int) -> dict[int, tuple[int, ...]]:
    """The SecAgg+ communication graph: complete when k is None or k >= m-1, otherwise the
    Harary graph H(k, m) over a permutation of the clients drawn from round_seed (each client
    is joined to the k/2 nearest on either side of a shuffled ring). Odd k: with m even each
    client also joins the one opposite on the ring (exactly k-regular); with m odd no k-regular
    graph exists, so k+1 is used. Every process computes the same graph from the public seed."""
    clients = sorted(set(int(c) for c in clients))
    m = len(clients)
    if k is None or k >= m - 1:
        return {c: tuple(d for d in clients if d != c) for c in clients}
    if k < 1:
        raise ValueError(f"neighbour count k={k} must be at least 1")
    seed = round_seed if isinstance(round_seed, bytes) else str(int(round_seed)).encode()
    prefix = b"hpcfl-secagg/graph" + struct.pack("<I", len(seed)) + seed
    # a permutation from a hash rather than a seeded numpy RNG: no 32-bit seed, same everywhere
    ring = sorted(clients, key=lambda c: hashlib.sha256(prefix + struct.pack("<Q", c)).digest())
    if k % 2 and m % 2:
        k += 1
    offsets = list(range(1, k // 2 + 1)) + [-d for d in range(1, k // 2 + 1)]
    if k % 2:
        offsets.append(m // 2)
    return {c: tuple(sorted(ring[(p + d) % m] for d in offsets)) for p, c in enumerate(ring)}


@dataclass(frozen=True)
class RoundParams:
    """What every process knows before a round: server_round, the sampled clients U, the
    neighbour graph, the Shamir threshold t and the vector length n (uint32 words)."""

    server_round: int
    clients: tuple[int, ...]
    neighbors: Mapping[int, tuple[int, ...]]
    threshold: int
    n: int

    def __post_init__(self):
        if sorted(self.neighbors) != list(self.clients) or list(self.clients) != sorted(set(self.clients)):
            raise ValueError("clients must be sorted, distinct and match the neighbour graph")
        if self.clients and not 0 <= self.clients[0] <= self.clients[-1] < 2**32 - 1:
            raise ValueError("client ids must be in [0, 2^32 - 2]")
        for c, nbrs in self.neighbors.items():
            if c in nbrs or any(c not in self.neighbors.get(d, ()) for d in nbrs):
                raise ValueError(f"the neighbour graph is not symmetric or has a loop at client {c}")
        for c in self.clients:
            check_threshold(self.threshold, len(self.holders(c)))
        if self.n < 1:
            raise ValueError(f"vector length n={self.n} must be positive")

    @classmethod
    def make(cls, server_round: int, clients: Iterable[int], n: int, k: int | None = None,
             threshold: int | None = None, round_seed: bytes | int | None = None) -> "RoundParams":
        """Graph from round_seed (default: server_round; pass one derived from the run's seed
        and the round); threshold defaults to the smallest majority of the holders."""
        clients = tuple(sorted(set(int(c) for c in clients)))
        graph = neighbor_graph(clients, k, server_round if round_seed is None else round_seed)
        if threshold is None:
            threshold = default_threshold(1 + min((len(v) for v in graph.values()), default=0))
        return cls(int(server_round), clients, graph, int(threshold), int(n))

    def holders(self, cid: int) -> tuple[int, ...]:
        """Who holds shares of cid's secrets: cid itself and its neighbours, sorted."""
        return tuple(sorted((cid,) + tuple(self.neighbors[cid])))


# ------------------------------------------------------------------------------------ encoding

def encode_map(items: Mapping[int, bytes]) -> bytes:
    ids = sorted(items)
    head = struct.pack(f"<I{2 * len(ids)}I", len(ids), *[v for i in ids for v in (i, len(items[i]))])
    return head + b"".join(bytes(items[i]) for i in ids)


def decode_map(data: bytes) -> dict[int, bytes]:
    data = bytes(data)
    if len(data) < 4:
        raise SecAggError("truncated id map")
    (count,) = struct.unpack_from("<I", data)
    end = 4 + 8 * count
    if len(data) < end:
        raise SecAggError("truncated id map header")
    fields = struct.unpack_from(f"<{2 * count}I", data, 4)
    ids, lengths = fields[0::2], fields[1::2]
    if any(a >= b for a, b in zip(ids, ids[1:])) or end + sum(lengths) != len(data):
        raise SecAggError("malformed id map (ids not increasing, or lengths do not add up)")
    out = {}
    for i, n in zip(ids, lengths):
        out[i] = data[end:end + n]
        end += n
    return out


def encode_unmask_request(survivors: Iterable[int], dropped: Iterable[int]) -> bytes:
    survivors, dropped = sorted(set(survivors)), sorted(set(dropped))
    both = set(survivors) & set(dropped)
    if both:
        raise ValueError(f"client {min(both)} cannot be both a survivor and dropped")
    return struct.pack(f"<II{len(survivors) + len(dropped)}I", len(survivors), len(dropped),
                       *survivors, *dropped)


def decode_unmask_request(data: bytes) -> tuple[set[int], set[int]]:
    if len(data) < 8:
        raise SecAggError("truncated unmask request")
    n_u, n_d = struct.unpack_from("<II", data)
    if len(data) != 8 + 4 * (n_u + n_d):
        raise SecAggError("malformed unmask request")
    ids = struct.unpack_from(f"<{n_u + n_d}I", data, 8)
    return set(ids[:n_u]), set(ids[n_u:])


def _share_to_bytes(y: int) -> bytes:
    return y.to_bytes(SHARE_BYTES, "big")


def _share_from_bytes(b: bytes) -> int:
    y = int.from_bytes(b, "big")
    if len(b) != SHARE_BYTES or y >= PRIME:
        raise SecAggError("malformed Shamir share")
    return y


# -------------------------------------------------------------------------------------- Shamir

def shamir_split(secret: int, xs: Sequence[int], t: int) -> dict[int, int]:
    """{x: f(x)} for a random polynomial f of degree t-1 over GF(PRIME) with f(0) = secret."""
    if not 0 <= secret < PRIME or len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError("the secret must be a field element and the xs distinct and nonzero")
    check_threshold(t, len(xs))
    coeffs = [secrets.randbelow(PRIME) for _ in range(t - 1)]
    out = {}
    for x in xs:
        y = 0
        for a in reversed(coeffs):                 # Horner: ((a_{t-1} x + ...) x + a_1) x
            y = (y + a) * x % PRIME
        out[x] = (y + secret) % PRIME
    return out


def lagrange_at_zero(xs: Sequence[int]) -> list[int]:
    """l_i(0) = prod_{j != i} x_j / (x_j - x_i) mod PRIME: f(0) = sum_i l_i(0) f(x_i)."""
    out = []
    for i, xi in enumerate(xs):
        num = den = 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        out.append(num * pow(den, -1, PRIME) % PRIME)
    return out


def shamir_reconstruct(shares: Mapping[int, int]) -> int:
    xs = list(shares)
    return sum(l * shares[x] for l, x in zip(lagrange_at_zero(xs), xs)) % PRIME


# ---------------------------------------------------------------------------- keys, PRG, AEAD

def _hkdf(shared: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def pair_key(s_sk: X25519PrivateKey, s_pk: bytes, server_round: int, i: int, j: int) -> bytes:
    """s_ij = HKDF-SHA256(X25519(s_i, s_j)), bound to the round and the unordered pair {i, j}."""
    shared = s_sk.exchange(X25519PublicKey.from_public_bytes(s_pk))
    return _hkdf(shared, b"hpcfl-secagg/mask" + struct.pack("<qII", server_round, min(i, j), max(i, j)))


def _share_aead(c_sk: X25519PrivateKey, c_pk: bytes, server_round: int, sender: int, receiver: int):
    """AES-GCM under HKDF(X25519(c_i, c_j)), the key and the AAD both bound to (round, sender,
    receiver): a ciphertext replayed from another round or pair fails authentication."""
    info = b"hpcfl-secagg/share" + struct.pack("<qII", server_round, sender, receiver)
    return AESGCM(_hkdf(c_sk.exchange(X25519PublicKey.from_public_bytes(c_pk)), info)), info


class Prg:
    """AES-256-CTR keystream read as n uint32 words, written into one reused buffer."""

    def __init__(self, n: int):
        self.n = n
        self._zeros = bytes(4 * n)
        self._buf = np.empty(4 * n + 15, np.uint8)  # update_into wants len(data) + block - 1
        self.words = self._buf[:4 * n].view(np.uint32)

    def expand(self, key: bytes) -> np.ndarray:
        """The stream of key; a view of the reused buffer, overwritten by the next call."""
        if len(key) != KEY_BYTES:
            raise ValueError(f"PRG keys are {KEY_BYTES} bytes, got {len(key)}")
        Cipher(algorithms.AES(key), modes.CTR(_ZERO_IV)).encryptor().update_into(self._zeros, self._buf)
        return self.words

    def add(self, acc: np.ndarray, key: bytes, sign: int = 1) -> None:
        """acc <- acc + sign * PRG(key) mod 2^32, in place."""
        (np.add if sign > 0 else np.subtract)(acc, self.expand(key), out=acc)


def prg(key: bytes, n: int) -> np.ndarray:
    return Prg(n).expand(key).copy()


def _sign(i: int, j: int) -> int:
    return 1 if i < j else -1


def _raw_public(sk: X25519PrivateKey) -> bytes:
    return sk.public_key().public_bytes_raw()


# -------------------------------------------------------------------------------------- client

class Client:
    """One client's side of a round; call the four stages in order, once each."""

    def __init__(self, cid: int, params: RoundParams):
        if cid not in params.neighbors:
            raise ValueError(f"client {cid} is not sampled in round {params.server_round}")
        self.cid, self.params, self._stage = cid, params, 0

    def _advance(self, stage: int, name: str) -> None:
        if self._stage != stage:
            raise SecAggError(f"client {self.cid}: {name} called out of order")
        self._stage += 1

    def advertise_keys(self) -> bytes:
        self._advance(0, "advertise_keys")
        self._c_sk, self._s_sk = X25519PrivateKey.generate(), X25519PrivateKey.generate()
        return _raw_public(self._c_sk) + _raw_public(self._s_sk)

    def share_keys(self, neighbour_keys: bytes) -> bytes:
        """Shares of b_i and s_i for itself and every neighbour that advertised keys; returns
        the id map {receiver: ciphertext}."""
        self._advance(1, "share_keys")
        p, me = self.params, self.cid
        keys = decode_map(neighbour_keys)
        if not set(keys) <= set(p.neighbors[me]) or any(len(v) != KEYS_MESSAGE_BYTES for v in keys.values()):
            raise SecAggError(f"client {me}: neighbour keys name a non-neighbour or are malformed")
        if 1 + len(keys) < p.threshold:
            raise SecAggAbort(f"client {me}: {1 + len(keys)} share holders left, "
                              f"the threshold is {p.threshold}")
        self._c_pk = {j: v[:KEY_BYTES] for j, v in keys.items()}
        self._s_pk = {j: v[KEY_BYTES:] for j, v in keys.items()}
        self._b = secrets.token_bytes(KEY_BYTES)
        xs = [h + 1 for h in [me] + sorted(keys)]
        b_sh = shamir_split(int.from_bytes(self._b, "big"), xs, p.threshold)
        s_sh = shamir_split(int.from_bytes(self._s_sk.private_bytes_raw(), "big"), xs, p.threshold)
        self._own = (b_sh[me + 1], s_sh[me + 1])
        out = {}
        for j in keys:
            aead, aad = _share_aead(self._c_sk, self._c_pk[j], p.server_round, me, j)
            nonce = os.urandom(NONCE_BYTES)
            plain = _share_to_bytes(b_sh[j + 1]) + _share_to_bytes(s_sh[j + 1])
            out[j] = nonce + aead.encrypt(nonce, plain, aad)
        return encode_map(out)

    def masked_input(self, x_u32: np.ndarray, routed_ciphertexts: bytes) -> np.ndarray:
        """y = x + PRG(b_i) + sum over neighbours j still in the round of sign(i,j) PRG(s_ij)."""
        self._advance(2, "masked_input")
        p, me = self.params, self.cid
        x = np.asarray(x_u32)
        if x.dtype != np.uint32 or x.shape != (p.n,):
            raise ValueError(f"masked_input needs a uint32 vector of length {p.n}, got {x.dtype} {x.shape}")
        held = decode_map(routed_ciphertexts)
        if not set(held) <= set(self._c_pk):
            raise SecAggError(f"client {me}: routed shares from clients it has no keys of")
        self._held = held                          # decrypted only at unmasking
        y = x.copy()
        g = Prg(p.n)
        g.add(y, self._b)
        for j in sorted(held):                     # the senders are exactly N(i) & U2
            g.add(y, pair_key(self._s_sk, self._s_pk[j], p.server_round, me, j), _sign(me, j))
        return y

    def unmask(self, request: bytes) -> bytes:
        """For each client j whose share it holds: j's b-share if j survived, its s-share if j
        dropped. Refuses a request that names a client both ways or leaves it out."""
        self._advance(3, "unmask")
        p, me = self.params, self.cid
        survivors, dropped = decode_unmask_request(request)
        if survivors & dropped:
            raise SecAggError(f"client {me} refuses to unmask: client {min(survivors & dropped)} "
                              f"is named both survivor and dropped")
        if me not in survivors:
            raise SecAggError(f"client {me} refuses to unmask: the request names it as dropped")
        if len(survivors) < p.threshold:
            raise SecAggAbort(f"client {me} refuses to unmask: {len(survivors)} survivors, "
                              f"the threshold is {p.threshold}")
        out = {}
        for j in sorted(set(self._held) | {me}):
            if j not in survivors and j not in dropped:
                raise SecAggError(f"client {me} refuses to unmask: client {j} is neither "
                                  f"survivor nor dropped")
            if j == me:
                b, s = self._own
            else:
                b, s = self._decrypt(j)
            kind, share = (KIND_B, b) if j in survivors else (KIND_S, s)
            out[j] = bytes([kind]) + _share_to_bytes(share)
        return encode_map(out)

    def _decrypt(self, sender: int) -> tuple[int, int]:
        ct, rnd = self._held[sender], self.params.server_round
        aead, aad = _share_aead(self._c_sk, self._c_pk[sender], rnd, sender, self.cid)
        try:
            pt = aead.decrypt(ct[:NONCE_BYTES], ct[NONCE_BYTES:], aad)
        except (InvalidTag, ValueError):
            raise SecAggAuthError(sender, self.cid, rnd) from None
        if len(pt) != 2 * SHARE_BYTES:
            raise SecAggAuthError(sender, self.cid, rnd)
        return _share_from_bytes(pt[:SHARE_BYTES]), _share_from_bytes(pt[SHARE_BYTES:])


# -------------------------------------------------------------------------------------- server

MESSAGE_KINDS = ("keys_up", "keys_down", "shares_up", "shares_down", "masked_input_up",
                 "unmask_down", "unmask_up")


class Server:
    """The server's side of a round. `traffic` counts the bytes of each message kind (all
    clients together); bytes_to_server / bytes_from_server add the *_up / *_down kinds."""

    def __init__(self, params: RoundParams):
        self.params, self._stage = params, 0
        self.traffic = dict.fromkeys(MESSAGE_KINDS, 0)
        self._lagrange: dict[tuple[int, ...], list[int]] = {}

    @property
    def bytes_to_server(self) -> int:
        return sum(v for k, v in self.traffic.items() if k.endswith("_up"))

    @property
    def bytes_from_server(self) -> int:
        return sum(v for k, v in self.traffic.items() if k.endswith("_down"))

    def _advance(self, stage: int, name: str) -> None:
        if self._stage != stage:
            raise SecAggError(f"server: {name} called out of order")
        self._stage += 1

    def _check_holders(self, alive: set[int], owners: Iterable[int], what: str) -> None:
        """SecAggAbort unless every owner's secrets still have t live holders."""
        p = self.params
        for j in sorted(owners):
            h = p.holders(j)
            left = sum(c in alive for c in h)
            if left < p.threshold:
                raise SecAggAbort(f"round {p.server_round}: {len(alive)} of {len(p.clients)} clients {what}; "
                                  f"client {j} has {left} of its {len(h)} share holders left, "
                                  f"the threshold is {p.threshold}")

    def collect_keys(self, keys: Mapping[int, bytes]) -> dict[int, bytes]:
        """{client: advertised keys} -> {client: id map of its neighbours' keys}."""
        self._advance(0, "collect_keys")
        p = self.params
        if not set(keys) <= set(p.clients) or any(len(v) != KEYS_MESSAGE_BYTES for v in keys.values()):
            raise SecAggError("advertised keys from an unsampled client, or of the wrong length")
        self._keys = {c: bytes(v) for c, v in keys.items()}
        self._u1 = set(keys)
        self._check_holders(self._u1, self._u1, "advertised keys")
        out = {i: encode_map({j: self._keys[j] for j in p.neighbors[i] if j in self._u1})
               for i in sorted(self._u1)}
        self.traffic["keys_up"] += sum(map(len, keys.values()))
        self.traffic["keys_down"] += sum(map(len, out.values()))
        return out

    def route_shares(self, shares: Mapping[int, bytes]) -> dict[int, bytes]:
        """{sender: id map receiver -> ciphertext} -> {receiver: id map sender -> ciphertext},
        for the receivers that sent shares themselves (U2)."""
        self._advance(1, "route_shares")
        p = self.params
        decoded = {i: decode_map(v) for i, v in shares.items()}
        for i, m in decoded.items():
            if i not in self._u1 or set(m) != {j for j in p.neighbors[i] if j in self._u1}:
                raise SecAggError(f"client {i}'s shares are not addressed to its neighbours with keys")
        self._u2 = set(shares)
        self._check_holders(self._u2, self._u2, "shared keys")
        out = {j: encode_map({i: decoded[i][j] for i in p.neighbors[j] if i in self._u2})
               for j in sorted(self._u2)}
        self.traffic["shares_up"] += sum(map(len, shares.values()))
        self.traffic["shares_down"] += sum(map(len, out.values()))
        return out

    def unmask_request(self, survivors: Iterable[int]) -> dict[int, bytes]:
        """survivors (U3: who sent y) -> {survivor: request naming U3 and D = U2 - U3}."""
        self._advance(2, "unmask_request")
        self._u3 = set(survivors)
        if not self._u3 <= self._u2:
            raise ValueError(f"survivors {sorted(self._u3 - self._u2)} did not share keys this round")
        self._check_holders(self._u3, self._u2, "survived")
        req = encode_unmask_request(self._u3, self._u2 - self._u3)
        self.traffic["unmask_down"] += len(req) * len(self._u3)
        self.traffic["masked_input_up"] += 4 * self.params.n * len(self._u3)
        return {k: req for k in sorted(self._u3)}

    def aggregate(self, y: np.ndarray | Iterable[np.ndarray], responses: Mapping[int, bytes]) -> np.ndarray:
        """The exact sum mod 2^32 of the survivors' x, from the sum of their y (or the list of
        y) and the unmask responses of any survivors that answered."""
        self._advance(3, "aggregate")
        p, u2, u3 = self.params, self._u2, self._u3
        if isinstance(y, np.ndarray):
            total = y.copy()
        else:
            total = np.zeros(p.n, np.uint32)
            for v in y:
                if v.dtype != np.uint32 or v.shape != (p.n,):
                    raise ValueError(f"aggregate needs uint32 vectors of length {p.n}, got {v.dtype}")
                total += v
        if total.dtype != np.uint32 or total.shape != (p.n,):
            raise ValueError(f"aggregate needs uint32 vectors of length {p.n}, "
                             f"got {total.dtype} {total.shape}")
        if not set(responses) <= u3:
            raise SecAggError(f"unmask responses from non-survivors {sorted(set(responses) - u3)}")
        self.traffic["unmask_up"] += sum(map(len, responses.values()))
        self._check_holders(set(responses), u2, "answered the unmask request")
        shares: dict[int, dict[int, int]] = {j: {} for j in u2}
        for k, msg in responses.items():
            entries = decode_map(msg)
            if set(entries) != {k} | {j for j in p.neighbors[k] if j in u2}:
                raise SecAggError(f"client {k}'s unmask response covers the wrong clients")
            for j, e in entries.items():
                if len(e) != 1 + SHARE_BYTES or e[0] != (KIND_B if j in u3 else KIND_S):
                    raise SecAggError(f"client {k} sent the wrong kind of share of client {j}")
                shares[j][k + 1] = _share_from_bytes(e[1:])
        g = Prg(p.n)
        for j in sorted(u3):
            g.add(total, self._secret(shares[j], j, "self-mask seed"), -1)
        for j in sorted(u2 - u3):
            s_sk = X25519PrivateKey.from_private_bytes(self._secret(shares[j], j, "mask key"))
            if _raw_public(s_sk) != self._keys[j][KEY_BYTES:]:
                raise SecAggError(f"client {j}'s reconstructed mask key does not match its public key")
            for k in p.neighbors[j]:
                if k in u3:                        # k added sign(k, j) PRG(s_kj): take it out
                    s_kj = pair_key(s_sk, self._keys[k][KEY_BYTES:], p.server_round, j, k)
                    g.add(total, s_kj, -_sign(k, j))
        return total

    def _secret(self, shares: Mapping[int, int], owner: int, what: str) -> bytes:
        """Lagrange at 0 from the t lowest holders; coefficients cached per holder set."""
        xs = tuple(sorted(shares)[:self.params.threshold])
        if xs not in self._lagrange:
            self._lagrange[xs] = lagrange_at_zero(xs)
        value = sum(l * shares[x] for l, x in zip(self._lagrange[xs], xs)) % PRIME
        if value >= 2**(8 * KEY_BYTES):            # inconsistent shares: never a 32-byte secret
            raise SecAggError(f"client {owner}'s {what} shares are inconsistent")
        return value.to_bytes(KEY_BYTES, "big")


# --------------------------------------------------------------------------------- fixed point

class FixedPoint:
    """Floats <-> uint32 for masking. Each value is clipped to [-bound, bound], scaled by
    `scale` and rounded to the nearest integer q, |q| <= q_max = round(bound * scale); the
    default scale = floor((2^31 - 1) / max_terms) / bound makes max_terms * q_max < 2^31, so
    the sum of up to max_terms contributions stays in (-2^31, 2^31) and the uint32 sum mod 2^32,
    read as int32 (two's complement), is the exact integer sum. Decoding that sum of n_terms
    contributions (each within the bound) errs per coordinate by at most
    n_terms * (1/2 + 2^-20) / scale: half a step per rounding, plus a margin for float64."""

    def __init__(self, bound: float, max_terms: int, scale: float | None = None):
        if not (math.isfinite(bound) and bound > 0) or max_terms < 1:
            raise ValueError(f"fixed point needs bound > 0 and max_terms >= 1, got {bound}, {max_terms}")
        if scale is None:
            if max_terms > 2**31 - 1:
                raise ValueError(f"{max_terms} terms cannot share 31 bits")
            scale = ((2**31 - 1) // max_terms) / bound
        self.bound, self.max_terms, self.scale = float(bound), int(max_terms), float(scale)
        self.q_max = int(np.rint(self.bound * self.scale))
        if self.q_max < 1 or max_terms * self.q_max >= 2**31:
            raise ValueError(f"{max_terms} terms of up to {self.q_max} steps (bound {bound} x scale "
                             f"{scale:g}) can leave (-2^31, 2^31): lower the scale or max_terms")

    def encode(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, np.float64)
        if not np.isfinite(x).all():
            raise ValueError("fixed point cannot encode NaN or infinity")
        q = np.rint(np.clip(x, -self.bound, self.bound) * self.scale)
        np.clip(q, -self.q_max, self.q_max, out=q)     # guards float rounding at the bound
        return q.astype(np.int32).view(np.uint32)

    def decode(self, s_u32: np.ndarray, n_terms: int = 1) -> np.ndarray:
        if n_terms > self.max_terms:
            raise ValueError(f"a sum of {n_terms} terms may have overflowed (max_terms={self.max_terms})")
        return np.asarray(s_u32, np.uint32).view(np.int32) / self.scale

    def error_bound(self, n_terms: int = 1) -> float:
        return n_terms * (0.5 + 2.0**-20) / self.scale


# ------------------------------------------------------------------------------ in-process run

def simulate(params: RoundParams, xs: Mapping[int, np.ndarray], drop_before_shares: Iterable[int] = (),
             drop_before_input: Iterable[int] = (), drop_before_unmask: Iterable[int] = ()) -> np.ndarray:
    """One round in one process, the message flow an MPI trainer reproduces: each drop_* set
    stops sending from that stage on. Returns the server's sum (raises what the server raises)."""
    gone: set[int] = set()
    clients = {c: Client(c, params) for c in params.clients}
    server = Server(params)
    keys = server.collect_keys({c: cl.advertise_keys() for c, cl in clients.items()})
    gone |= set(drop_before_shares)
    routed = server.route_shares({c: clients[c].share_keys(keys[c]) for c in keys if c not in gone})
    gone |= set(drop_before_input)
    ys = {c: clients[c].masked_input(xs[c], routed[c]) for c in routed if c not in gone}
    requests = server.unmask_request(ys)
    gone |= set(drop_before_unmask)
    responses = {c: clients[c].unmask(requests[c]) for c in requests if c not in gone}
    return server.aggregate(list(ys.values()), responses)
