"""Secure aggregation, the pure protocol with no MPI and no I/O: the double masking of Bonawitz et
al. 2017 ("Practical Secure Aggregation for Privacy-Preserving Machine Learning"), in its version
secure against a malicious server (their section 6: signed keys and a consistency round), on the
sparse neighbour graph of Bell et al. 2020 (SecAgg+). The caller moves every message, all
`bytes`, between the processes; the masked inputs are uint32 arrays, summed by the caller (an MPI
SUM on uint32 wraps mod 2^32, which is what the masks need) or by `Server.aggregate`.

Threat model: the server may deviate arbitrarily (drop, alter, replay, reorder or invent any
message it relays) and collude with fewer than t of a client's share holders; clients are
honest-but-curious. It learns no honest client's input, and no sum over fewer than
`min_survivors` clients or over a disconnected part of the survivors' graph: every honest client
checks what the server sends it and aborts the round (SecAggViolation) instead of answering a
message that no honest server would send. Each client holds a long-term Ed25519 identity key whose
public half reaches the others through a trusted set-up (a PKI; in the MPI trainer the group
leaders exchange them among themselves at start-up, not through the server).

One round, for the sampled clients U:
  0 advertise_keys   each client: two X25519 key pairs, c (encrypts shares) and s (agrees masks),
                     signed with its identity key, bound to the round and its id
     collect_keys    server -> every client: the list of all advertisements        U1 = who sent
  1 share_keys       client i: checks its own advertisement is in the list unchanged, derives the
                     graph from the list's hash (fixed only once every key is committed), checks
                     its neighbours' signatures; then its self-mask seed b_i and Shamir shares of
                     b_i and of its s secret key for its holders (itself + neighbours),
                     AES-GCM-encrypted to each holder
     route_shares    server -> each client j: {sender: ciphertext for j}          U2 = who sent
  2 masked_input     client i aborts unless it holds the shares of at least t - 1 neighbours;
                     y_i = x_i + PRG(b_i) + sum_{j in N(i) & U2} sign(i,j) PRG(s_ij)   mod 2^32
     unmask_request  server names the survivors U3 (sent y) and the dropped D = U2 - U3
  3 consistency      client i aborts unless N(i) & (U3 + D) is exactly the set it masked with
                     (the routing is bound to the view: Bonawitz et al.'s U3 inside its own U2),
                     |U3| >= min_survivors, the graph induced on U3 is connected, and no survivor
                     has more than max_absent neighbours outside U3 (sparse graphs: colluders
                     cannot bridge a gap the server names); it signs (round, transcript, U3, D)
     signatures      server -> every survivor: the signatures it collected         U4
  4 unmask           client i needs min_survivors valid signatures of U3 members on its own view,
                     and the signature of every survivor whose shares it holds; then it sends
                     b-shares of survivors, s-shares of the dropped, never both. A survivor that
                     refused the view (it did not sign) keeps its self mask: its input stays hidden
     aggregate       sum y - PRG(b_j) for j in U3 - the masks the survivors shared with D

min_survivors = max(t, floor((|U| + corrupt) / 2) + 1): two disjoint views of U3 cannot both
collect that many signatures, even when `corrupt` colluders sign both.

Wire formats (all integers little-endian):
  advertisement     c_pk (32 raw bytes) || s_pk (32 raw bytes) || Ed25519 signature (64) over
                    "hpcfl-secagg/keys" || round (i64) || id (u32) || c_pk || s_pk
  id map            u32 count, count x (u32 id, u32 length), then the payloads in that order;
                    ids strictly increasing. Carries {id: bytes} (the advertisements, ciphertexts,
                    signatures, unmask responses).
  transcript        SHA-256("hpcfl-secagg/transcript" || round || the advertisements' id map)
  share ciphertext  nonce (12) || AES-GCM(b-share || s-share) with its 16-byte tag; 160 bytes.
                    A share is its y-value, 66 bytes big-endian (the field is mod 2^521 - 1);
                    its x is the receiver's id + 1.
  unmask request    u32 n_survivors, u32 n_dropped, then the survivor ids, then the dropped ids
  consistency       Ed25519 signature over "hpcfl-secagg/consistency" || round || transcript ||
                    the unmask request
  unmask response   id map {owner: kind (1 byte: 1 = b-share, 2 = s-share) || share (66 bytes)}

Not covered: a server that steers which graph the hash gives, by leaving clients out of the key
list or by having its colluders advertise fresh keys (free: every check above still holds for the
graph it lands on, but on a sparse graph with colluders the 2^-40 bound is per graph tried); clients that deviate (a
malicious client can send any input: robust aggregation cannot see it, see docs/privacy.md);
traffic analysis (who talks when); a survivor that goes silent between masking and the
consistency round makes the round fail (its self mask needs its signature).
"""
from __future__ import annotations

import hashlib
import os
import secrets
import struct
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import HpcflError
from ..parallel import wire
from . import leakage
from .secagg_graph import RoundParams, check_threshold, holders, is_connected

PRIME = 2**521 - 1                 # Mersenne prime > 2^256: any 32-byte secret is a field element
SHARE_BYTES = 66                   # ceil(521 / 8)
KEY_BYTES = 32                     # X25519 keys, seeds and derived keys: full 256 bits
SIG_BYTES = 64                     # Ed25519
KEYS_MESSAGE_BYTES = 2 * KEY_BYTES + SIG_BYTES
NONCE_BYTES = 12
CIPHERTEXT_BYTES = NONCE_BYTES + 2 * SHARE_BYTES + 16
KIND_B, KIND_S = 1, 2
_ZERO_IV = bytes(16)               # each PRG key expands exactly one stream, so a fixed IV is safe


class SecAggError(HpcflError):
    """A message that breaks the protocol (malformed, out of order, or refused)."""


class SecAggAbort(SecAggError):
    """Too few clients are left to finish the round securely: the caller skips the round."""


class SecAggViolation(SecAggError):
    """An honest client received what no honest server sends (a forged key, too few shares,
    views that disagree, a disconnected survivor graph): it aborts the round. `client` names it."""

    def __init__(self, client: int, message: str):
        super().__init__(f"client {client} aborts the round: {message}")
        self.client = client


class SecAggAuthError(SecAggViolation):
    """A share ciphertext failed AES-GCM authentication: tampered, misrouted or truncated."""

    def __init__(self, sender: int, receiver: int, server_round: int):
        HpcflError.__init__(self, f"round {server_round}: the share ciphertext from client {sender} to "
                                  f"client {receiver} failed authentication (AES-GCM)")
        self.client, self.sender, self.receiver, self.server_round = receiver, sender, receiver, server_round


# ------------------------------------------------------------------------------ identities (PKI)

class Identity:
    """A client's long-term Ed25519 signing key. Only its public half (`public`, 32 bytes) is
    shared, through the trusted set-up, never through the server."""

    def __init__(self, key: Ed25519PrivateKey | None = None):
        self._key = key or Ed25519PrivateKey.generate()
        self.public = self._key.public_key().public_bytes_raw()

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)


def verify(public: bytes | None, signature: bytes, message: bytes) -> bool:
    if public is None or len(signature) != SIG_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
        return True
    except (InvalidSignature, ValueError):
        return False


def _keys_message(server_round: int, cid: int, keys: bytes) -> bytes:
    return b"hpcfl-secagg/keys" + struct.pack("<qI", server_round, cid) + keys


def _consistency_message(server_round: int, transcript: bytes, request: bytes) -> bytes:
    return b"hpcfl-secagg/consistency" + struct.pack("<q", server_round) + transcript + request


def transcript_hash(server_round: int, advertisements: bytes) -> bytes:
    """What every party's view of stage 0 is bound to: the graph seed and the consistency round."""
    return hashlib.sha256(b"hpcfl-secagg/transcript" + struct.pack("<q", server_round)
                          + advertisements).digest()


# ------------------------------------------------------------------------------------ encoding

encode_map = wire.encode_map


def decode_map(data: bytes) -> dict[int, bytes]:
    """wire.decode_map, a malformed message being a protocol error here."""
    try:
        return wire.decode_map(data)
    except wire.MalformedMessage as exc:
        raise SecAggError(str(exc)) from None


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
    return sum(lam * shares[x] for lam, x in zip(lagrange_at_zero(xs), xs)) % PRIME


# ---------------------------------------------------------------------------- keys, PRG, AEAD

def _hkdf(shared: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def pair_key(s_sk: X25519PrivateKey, s_pk: bytes, server_round: int, i: int, j: int) -> bytes:
    """s_ij = HKDF-SHA256(X25519(s_i, s_j)), bound to the round and the unordered pair {i, j}."""
    shared = s_sk.exchange(X25519PublicKey.from_public_bytes(s_pk))
    return _hkdf(shared, b"hpcfl-secagg/mask" + struct.pack("<qII", server_round, min(i, j), max(i, j)))


def _share_aead(c_sk: X25519PrivateKey, c_pk: bytes, server_round: int, sender: int, receiver: int,
                shared: bytes | None = None):
    """AES-GCM under HKDF(X25519(c_i, c_j)), the key and the AAD both bound to (round, sender,
    receiver): a ciphertext replayed from another round or pair fails authentication. `shared`:
    the X25519 result when the caller already has it (one agreement per pair and round)."""
    info = b"hpcfl-secagg/share" + struct.pack("<qII", server_round, sender, receiver)
    if shared is None:
        shared = c_sk.exchange(X25519PublicKey.from_public_bytes(c_pk))
    return AESGCM(_hkdf(shared, info)), info


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
        Cipher(algorithms.AES(key), modes.CTR(_ZERO_IV)).encryptor().update_into(self._zeros, self._buf)  # type: ignore[arg-type]  # a writable buffer
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
    """One honest client's side of a round; call the five stages in order, once each. `identity`
    is its own signing key, `directory` {client: Ed25519 public key} the trusted set-up's."""

    def __init__(self, cid: int, params: RoundParams, identity: Identity, directory: Mapping[int, bytes]):
        if cid not in params.clients:
            raise ValueError(f"client {cid} is not sampled in round {params.server_round}")
        self.cid, self.params, self._stage = cid, params, 0
        self._identity, self._directory = identity, directory

    def _advance(self, stage: int, name: str) -> None:
        if self._stage != stage:
            raise SecAggError(f"client {self.cid}: {name} called out of order")
        self._stage += 1

    def _refuse(self, message: str):
        raise SecAggViolation(self.cid, message)

    def advertise_keys(self) -> bytes:
        self._advance(0, "advertise_keys")
        self._c_sk, self._s_sk = X25519PrivateKey.generate(), X25519PrivateKey.generate()
        keys = _raw_public(self._c_sk) + _raw_public(self._s_sk)
        self._advert = keys + self._identity.sign(_keys_message(self.params.server_round, self.cid, keys))
        return self._advert

    def share_keys(self, advertisements: bytes) -> bytes:
        """From the list of every advertisement: the graph, then shares of b_i and s_i for itself
        and every neighbour; returns the id map {receiver: ciphertext}."""
        self._advance(1, "share_keys")
        p, me = self.params, self.cid
        ads = decode_map(advertisements)
        if ads.get(me) != self._advert:
            self._refuse("its own key advertisement is missing from the list or altered")
        if not set(ads) <= set(p.clients) or any(len(v) != KEYS_MESSAGE_BYTES for v in ads.values()):
            self._refuse("the key list names an unsampled client or is malformed")
        if len(ads) < p.min_survivors:
            self._refuse(f"the key list has {len(ads)} clients, fewer than the {p.min_survivors} "
                         f"a round needs")
        self._transcript = transcript_hash(p.server_round, advertisements)
        self._graph = p.graph(ads, self._transcript)
        nbrs = self._graph[me]
        for j in nbrs:
            if not verify(self._directory.get(j), ads[j][2 * KEY_BYTES:],
                          _keys_message(p.server_round, j, ads[j][:2 * KEY_BYTES])):
                self._refuse(f"the keys advertised for client {j} are not signed by client {j}'s "
                             f"identity key (substituted keys)")
        if 1 + len(nbrs) < p.threshold:
            raise SecAggAbort(f"client {me}: {1 + len(nbrs)} share holders left, "
                              f"the threshold is {p.threshold}")
        self._c_pk = {j: ads[j][:KEY_BYTES] for j in nbrs}
        self._s_pk = {j: ads[j][KEY_BYTES:2 * KEY_BYTES] for j in nbrs}
        self._b = secrets.token_bytes(KEY_BYTES)
        xs = [h + 1 for h in [me] + sorted(nbrs)]
        b_sh = shamir_split(int.from_bytes(self._b, "big"), xs, p.threshold)
        s_sh = shamir_split(int.from_bytes(self._s_sk.private_bytes_raw(), "big"), xs, p.threshold)
        self._own = (b_sh[me + 1], s_sh[me + 1])
        self._made = {x: (b_sh[x], s_sh[x]) for x in xs}       # for disclose() only
        out = {}
        self._c_shared = {j: self._c_sk.exchange(X25519PublicKey.from_public_bytes(self._c_pk[j])) for j in nbrs}
        for j in nbrs:
            aead, aad = _share_aead(self._c_sk, self._c_pk[j], p.server_round, me, j, self._c_shared[j])
            nonce = os.urandom(NONCE_BYTES)
            plain = _share_to_bytes(b_sh[j + 1]) + _share_to_bytes(s_sh[j + 1])
            out[j] = nonce + aead.encrypt(nonce, plain, aad)
        return encode_map(out)

    def masked_input(self, x_u32: np.ndarray, routed_ciphertexts: bytes) -> np.ndarray:
        """y = x + PRG(b_i) + sum over neighbours j still in the round of sign(i,j) PRG(s_ij).
        Refuses unless it holds the shares of at least t - 1 neighbours: with fewer, the server
        could unmask y from b_i alone (too few pairwise masks)."""
        self._advance(2, "masked_input")
        p, me = self.params, self.cid
        x = np.asarray(x_u32)
        if x.dtype != np.uint32 or x.shape != (p.n,):
            raise ValueError(f"masked_input needs a uint32 vector of length {p.n}, got {x.dtype} {x.shape}")
        held = decode_map(routed_ciphertexts)
        if not set(held) <= set(self._c_pk):
            self._refuse("routed shares from clients that are not its neighbours")
        if 1 + len(held) < p.threshold:
            self._refuse(f"it holds the shares of {len(held)} neighbours; with its own that is fewer "
                         f"than the threshold {p.threshold}, so its masks would not protect its input")
        self._held = held                          # decrypted only at unmasking
        y = x.copy()
        g = Prg(p.n)
        g.add(y, self._b)
        self._pair_keys = {}
        for j in sorted(held):                     # the senders are exactly N(i) & U2
            self._pair_keys[j] = key = pair_key(self._s_sk, self._s_pk[j], p.server_round, me, j)
            g.add(y, key, _sign(me, j))
        return y

    def consistency(self, request: bytes) -> bytes:
        """Checks the unmask request (U3, D) and signs it: the consistency round. Its own
        neighbours in U2 = U3 + D must be exactly those it masked with (Bonawitz et al. 2017:
        U3 inside the client's own U2), so the signed view fixes every honest survivor's masks."""
        self._advance(3, "consistency")
        p, me = self.params, self.cid
        survivors, dropped = decode_unmask_request(request)
        if survivors & dropped:
            self._refuse(f"the unmask request names client {min(survivors & dropped)} both survivor "
                         f"and dropped")
        if me not in survivors:
            self._refuse("the unmask request names it as dropped")
        if not (survivors | dropped) <= set(self._graph):
            self._refuse("the unmask request names clients that advertised no keys")
        for j in sorted(set(self._held)):
            if j not in survivors and j not in dropped:
                self._refuse(f"client {j} is neither survivor nor dropped in the unmask request")
        self._check_routing(survivors, dropped)
        if len(survivors) < p.min_survivors:
            self._refuse(f"{len(survivors)} survivors, fewer than the {p.min_survivors} whose sum "
                         f"may be revealed")
        if not is_connected(self._graph, survivors):
            self._refuse("the survivors' graph is disconnected: unmasking would reveal the sum of "
                         "each part")
        if p.max_absent is not None:
            for j in sorted(survivors):
                absent = len(set(self._graph[j]) - survivors)
                if absent > p.max_absent:
                    self._refuse(f"survivor {j} has {absent} absent neighbours, more than the "
                                 f"{p.max_absent} a round accepts: colluders could bridge the gap")
        self._request, self._survivors, self._dropped = request, survivors, dropped
        return self._identity.sign(_consistency_message(p.server_round, self._transcript, request))

    def _check_routing(self, survivors: set[int], dropped: set[int]) -> None:
        """Its neighbours named in U2 = U3 + D are exactly those whose shares it was routed and
        whose masks it added: a survivor it did not mask with would leave its input open once
        the others it masked with are named dropped (route-then-drop)."""
        named = set(self._graph[self.cid]) & (survivors | dropped)
        if named != set(self._held):
            j = min(named - set(self._held))
            self._refuse(f"the unmask request names client {j} {'a survivor' if j in survivors else 'dropped'}, "
                         f"a neighbour whose shares it was never routed and whose mask it did not add "
                         f"(route-then-drop)")

    def _must_have_signed(self) -> set[int]:
        """The survivors whose self-mask shares it would send: each must have signed the view."""
        return (set(self._held) | {self.cid}) & self._survivors

    def unmask(self, signatures: bytes) -> bytes:
        """With the consistency signatures of its own view: for each client j whose share it
        holds, j's b-share if j survived, its s-share if j dropped. It reveals a survivor's
        self-mask share only if that survivor signed the same view (a survivor that refused the
        view, such as the target of route-then-drop, keeps its self mask), and it needs
        min_survivors valid signatures in all (two disjoint views cannot both have them)."""
        self._advance(4, "unmask")
        p, me = self.params, self.cid
        sigs = decode_map(signatures)
        message = _consistency_message(p.server_round, self._transcript, self._request)
        if not set(sigs) <= self._survivors:
            j = min(set(sigs) - self._survivors)
            self._refuse(f"client {j}'s consistency signature is not a survivor's signature of its "
                         f"view: the views disagree")
        signed = {me}
        owners = self._must_have_signed()
        for j in sorted(owners - signed):
            if j not in sigs or not verify(self._directory.get(j), sigs[j], message):
                self._refuse(f"survivor {j} did not sign this view (the views disagree, or it refused "
                             f"the view): its self mask stays hidden")
            signed.add(j)
        for j in sorted(set(sigs) - signed):        # min_survivors valid ones are the proof: the rest go unread
            if len(signed) >= p.min_survivors:
                break
            if not verify(self._directory.get(j), sigs[j], message):
                self._refuse(f"client {j}'s consistency signature is not a survivor's signature of its "
                             f"view: the views disagree")
            signed.add(j)
        if len(signed) < p.min_survivors:
            self._refuse(f"{len(signed)} consistency signatures of its view, {p.min_survivors} needed: the "
                         f"views disagree")
        out = {}
        for j in sorted(set(self._held) | {me}):
            b, s = self._own if j == me else self._decrypt(j)
            kind, share = (KIND_B, b) if j in self._survivors else (KIND_S, s)
            out[j] = bytes([kind]) + _share_to_bytes(share)
        self._answered = True
        return encode_map(out)

    def disclose(self) -> leakage.Truth:
        """What this client did in the round, secrets included, for the leakage oracle of a
        simulation (a real client never discloses it)."""
        truth = leakage.Truth(self.cid, _raw_public(self._s_sk) if self._stage > 0 else b"")
        if self._stage > 1 and hasattr(self, "_made"):
            truth.shares = dict(self._made)
            truth.partner_c_pk = dict(self._c_pk)
            truth.partner_s_pk = dict(self._s_pk)
            truth.self_key = self._b
        if hasattr(self, "_pair_keys"):
            truth.uploaded = True
            truth.pair_keys = dict(self._pair_keys)
            truth.signs = {j: _sign(self.cid, j) for j in self._pair_keys}
        if hasattr(self, "_survivors"):
            truth.signed = frozenset(self._survivors)
        truth.answered = getattr(self, "_answered", False)
        return truth

    def _decrypt(self, sender: int) -> tuple[int, int]:
        return decrypt_shares(self._c_sk, self._c_pk[sender], self._held[sender], self.params.server_round,
                              sender, self.cid, self._c_shared[sender])


def decrypt_shares(c_sk: X25519PrivateKey, sender_c_pk: bytes, ciphertext: bytes, server_round: int,
                   sender: int, receiver: int, shared: bytes | None = None) -> tuple[int, int]:
    """(b-share, s-share) of `sender` held by `receiver`; SecAggAuthError when it does not verify."""
    aead, aad = _share_aead(c_sk, sender_c_pk, server_round, sender, receiver, shared)
    try:
        pt = aead.decrypt(ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:], aad)
    except (InvalidTag, ValueError):
        raise SecAggAuthError(sender, receiver, server_round) from None
    if len(pt) != 2 * SHARE_BYTES:
        raise SecAggAuthError(sender, receiver, server_round)
    return _share_from_bytes(pt[:SHARE_BYTES]), _share_from_bytes(pt[SHARE_BYTES:])


# -------------------------------------------------------------------------------------- server

MESSAGE_KINDS = ("keys_up", "keys_down", "shares_up", "shares_down", "masked_input_up",
                 "unmask_down", "consistency_up", "consistency_down", "unmask_up")


class Server:
    """The honest server's side of a round. `traffic` counts the bytes of each message kind (all
    clients together); bytes_to_server / bytes_from_server add the *_up / *_down kinds."""

    def __init__(self, params: RoundParams, directory: Mapping[int, bytes]):
        self.params, self.directory, self._stage = params, directory, 0
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
            h = holders(self.graph, j)
            left = sum(c in alive for c in h)
            if left < p.threshold:
                raise SecAggAbort(f"round {p.server_round}: {len(alive)} of {len(p.clients)} clients {what}; "
                                  f"client {j} has {left} of its {len(h)} share holders left, "
                                  f"the threshold is {p.threshold}")

    def _check_count(self, alive: set[int], what: str) -> None:
        p = self.params
        if len(alive) < p.min_survivors:
            raise SecAggAbort(f"round {p.server_round}: {len(alive)} of {len(p.clients)} clients {what}, "
                              f"fewer than the {p.min_survivors} needed")

    def collect_keys(self, adverts: Mapping[int, bytes]) -> bytes:
        """{client: advertisement} -> the list every client of U1 gets (the same bytes for all)."""
        self._advance(0, "collect_keys")
        p = self.params
        if not set(adverts) <= set(p.clients) or any(len(v) != KEYS_MESSAGE_BYTES for v in adverts.values()):
            raise SecAggError("advertised keys from an unsampled client, or of the wrong length")
        for c, v in adverts.items():
            signed = _keys_message(p.server_round, c, v[:2 * KEY_BYTES])
            if not verify(self.directory.get(c), v[2 * KEY_BYTES:], signed):
                raise SecAggError(f"client {c}'s key advertisement is not signed by its identity key")
        self._keys = {c: bytes(v[:2 * KEY_BYTES]) for c, v in adverts.items()}
        self._u1 = set(adverts)
        self._check_count(self._u1, "advertised keys")
        self.advertisements = encode_map(adverts)
        self.transcript = transcript_hash(p.server_round, self.advertisements)
        self.graph = p.graph(self._u1, self.transcript)
        self._check_holders(self._u1, self._u1, "advertised keys")
        self.traffic["keys_up"] += sum(map(len, adverts.values()))
        self.traffic["keys_down"] += len(self.advertisements) * len(self._u1)
        return self.advertisements

    def route_shares(self, shares: Mapping[int, bytes]) -> dict[int, bytes]:
        """{sender: id map receiver -> ciphertext} -> {receiver: id map sender -> ciphertext},
        for the receivers that sent shares themselves (U2)."""
        self._advance(1, "route_shares")
        decoded = {i: decode_map(v) for i, v in shares.items()}
        for i, m in decoded.items():
            if i not in self._u1 or set(m) != set(self.graph[i]):
                raise SecAggError(f"client {i}'s shares are not addressed to its neighbours")
        self._u2 = set(shares)
        self._check_count(self._u2, "shared keys")
        self._check_holders(self._u2, self._u2, "shared keys")
        out = {j: encode_map({i: decoded[i][j] for i in self.graph[j] if i in self._u2})
               for j in sorted(self._u2)}
        self.traffic["shares_up"] += sum(map(len, shares.values()))
        self.traffic["shares_down"] += sum(map(len, out.values()))
        return out

    def unmask_request(self, survivors: Iterable[int]) -> dict[int, bytes]:
        """survivors (U3: who sent y) -> {survivor: request naming U3 and D = U2 - U3}."""
        self._advance(2, "unmask_request")
        p = self.params
        self._u3 = set(survivors)
        if not self._u3 <= self._u2:
            raise ValueError(f"survivors {sorted(self._u3 - self._u2)} did not share keys this round")
        self._check_count(self._u3, "survived")
        self._check_holders(self._u3, self._u2, "survived")
        if not is_connected(self.graph, self._u3):
            raise SecAggAbort(f"round {p.server_round}: the graph of the {len(self._u3)} survivors is "
                              f"disconnected; unmasking would reveal partial sums")
        req = encode_unmask_request(self._u3, self._u2 - self._u3)
        self.request = req
        self.traffic["unmask_down"] += len(req) * len(self._u3)
        self.traffic["masked_input_up"] += 4 * p.n * len(self._u3)
        return dict.fromkeys(sorted(self._u3), req)

    def collect_signatures(self, signatures: Mapping[int, bytes]) -> bytes:
        """{survivor: consistency signature} -> the id map every survivor gets (U4)."""
        self._advance(3, "collect_signatures")
        p = self.params
        message = _consistency_message(p.server_round, self.transcript, self.request)
        for c, s in signatures.items():
            if c not in self._u3 or not verify(self.directory.get(c), s, message):
                raise SecAggError(f"client {c}'s consistency signature does not verify")
        self._u4 = set(signatures)
        self._check_count(self._u4, "signed the survivor set")
        out = encode_map(signatures)
        self.traffic["consistency_up"] += sum(map(len, signatures.values()))
        self.traffic["consistency_down"] += len(out) * len(self._u4)
        return out

    def aggregate(self, y: np.ndarray | Iterable[np.ndarray], responses: Mapping[int, bytes]) -> np.ndarray:
        """The exact sum mod 2^32 of the survivors' x, from the sum of their y (or the list of
        y) and the unmask responses of any survivors that answered."""
        self._advance(4, "aggregate")
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
        if not set(responses) <= self._u4:
            raise SecAggError(f"unmask responses from clients that did not sign {sorted(set(responses) - self._u4)}")
        self.traffic["unmask_up"] += sum(map(len, responses.values()))
        self._check_holders(set(responses), u2, "answered the unmask request")
        shares = self.collect_shares(responses)
        g = Prg(p.n)
        for j in sorted(u3):
            g.add(total, self.secret(shares[j], j, "self-mask seed"), -1)
        for j in sorted(u2 - u3):
            s_sk = X25519PrivateKey.from_private_bytes(self.secret(shares[j], j, "mask key"))
            if _raw_public(s_sk) != self._keys[j][KEY_BYTES:]:
                raise SecAggError(f"client {j}'s reconstructed mask key does not match its public key")
            for k in self.graph[j]:
                if k in u3:                        # k added sign(k, j) PRG(s_kj): take it out
                    s_kj = pair_key(s_sk, self._keys[k][KEY_BYTES:], p.server_round, j, k)
                    g.add(total, s_kj, -_sign(k, j))
        return total

    def collect_shares(self, responses: Mapping[int, bytes], kinds: Mapping[int, int] | None = None
                       ) -> dict[int, dict[int, int]]:
        """{owner: {x: share}} from unmask responses, each entry checked to be of the kind the
        request implies (b for survivors, s for the dropped), or of `kinds` when given."""
        u2, u3 = self._u2, self._u3
        shares: dict[int, dict[int, int]] = {j: {} for j in u2}
        for k, msg in responses.items():
            entries = decode_map(msg)
            if set(entries) != {k} | {j for j in self.graph[k] if j in u2}:
                raise SecAggError(f"client {k}'s unmask response covers the wrong clients")
            for j, e in entries.items():
                want = kinds[j] if kinds is not None else (KIND_B if j in u3 else KIND_S)
                if len(e) != 1 + SHARE_BYTES or e[0] != want:
                    raise SecAggError(f"client {k} sent the wrong kind of share of client {j}")
                shares[j][k + 1] = _share_from_bytes(e[1:])
        return shares

    def secret(self, shares: Mapping[int, int], owner: int, what: str) -> bytes:
        """Lagrange at 0 from the t lowest holders; coefficients cached per holder set."""
        if len(shares) < self.params.threshold:
            raise SecAggError(f"{len(shares)} shares of client {owner}'s {what}, {self.params.threshold} needed")
        xs = tuple(sorted(shares)[:self.params.threshold])
        if xs not in self._lagrange:
            self._lagrange[xs] = lagrange_at_zero(xs)
        value = sum(lam * shares[x] for lam, x in zip(self._lagrange[xs], xs)) % PRIME
        if value >= 2**(8 * KEY_BYTES):            # inconsistent shares: never a 32-byte secret
            raise SecAggError(f"client {owner}'s {what} shares are inconsistent")
        return value.to_bytes(KEY_BYTES, "big")


# ------------------------------------------------------------------------------ in-process run

def identities(clients: Iterable[int]) -> tuple[dict[int, Identity], dict[int, bytes]]:
    """A trusted set-up for tests and simulations: an identity per client and the directory."""
    ids = {int(c): Identity() for c in clients}
    return ids, {c: i.public for c, i in ids.items()}


def simulate(params: RoundParams, xs: Mapping[int, np.ndarray], drop_before_shares: Iterable[int] = (),
             drop_before_input: Iterable[int] = (), drop_before_unmask: Iterable[int] = (),
             setup: tuple[Mapping[int, Identity], Mapping[int, bytes]] | None = None) -> np.ndarray:
    """One round in one process, the message flow an MPI trainer reproduces: each drop_* set
    stops sending from that stage on. Returns the server's sum (raises what the server raises)."""
    ids, directory = setup or identities(params.clients)
    gone: set[int] = set()
    clients = {c: Client(c, params, ids[c], directory) for c in params.clients}
    server = Server(params, directory)
    ads = server.collect_keys({c: cl.advertise_keys() for c, cl in clients.items()})
    gone |= set(drop_before_shares)
    routed = server.route_shares({c: clients[c].share_keys(ads) for c in clients if c not in gone})
    gone |= set(drop_before_input)
    ys = {c: clients[c].masked_input(xs[c], routed[c]) for c in routed if c not in gone}
    requests = server.unmask_request(ys)
    sigs = server.collect_signatures({c: clients[c].consistency(requests[c]) for c in requests})
    gone |= set(drop_before_unmask)
    responses = {c: clients[c].unmask(sigs) for c in requests if c not in gone}
    return server.aggregate(list(ys.values()), responses)
