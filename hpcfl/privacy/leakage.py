"""The leakage oracle: what a secure-aggregation server can compute exactly from a round's
transcript, found by linear algebra rather than by the attacks anyone thought of.

Every masked upload is y_i = x_i + sum of masks (mod 2^32), each mask the AES-CTR stream of one
key: the client's self-mask seed b_i, or a pair key s_ij shared with neighbour j (sign +1 on the
smaller id's side, -1 on the other). A mask is *known* when the adversary can compute its key:
  - b_i, when it holds t genuine Shamir shares of it (from the unmask responses it was actually
    sent, and from ciphertexts it can decrypt: those addressed to colluders or to keys it
    substituted);
  - s_ij, when it knows the secret of either side's X25519 key as the client saw it (a colluder's,
    a key the server substituted, or s_i rebuilt from t genuine shares).
Every unknown mask is a uniform unknown. A linear combination sum_i a_i y_i is then a function
of the inputs alone exactly when sum_i a_i C[i, m] = 0 for every unknown mask m, C the (uploads x
unknown masks) coefficient matrix: the server learns precisely the functions a . x for `a` in
the left null space of C. (Each column of C has at most two entries, of opposite sign (+1, -1),
and a mask used by one upload alone forces a_i = 0, so the solutions over Z_2^32 are those over a
field: `analyse` checks this shape and computes the null space exactly modulo the prime 2^31 - 1.)

The guarantee checked (`Leak.ok`): every such function is a multiple of the sum over the honest
uploads of one survivor set U3 that an honest client accepted (answered the unmask request for)
and that has at least `min_survivors` members. `learned_individual`: some single input is such a
function; `learned_partial`: some function is not an accepted survivor set's sum (a part of one,
two sums, a difference...).

The oracle reads each honest client's own record of what it did (`Truth`, which only the
simulation has) to tell genuine shares from forged ones and to name the keys of its masks; what
it concludes uses only what the adversary holds.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

PRIME = 2**31 - 1        # products of two residues fit int64
KIND_B, KIND_S = 1, 2    # as in secagg's unmask responses


@dataclass
class Truth:
    """One honest client's round, as it recorded it (Client.disclose)."""
    cid: int
    s_pk: bytes                                   # its own mask-agreement public key
    self_key: bytes = b""                         # b_i, the key of its self mask
    pair_keys: dict[int, bytes] = field(default_factory=dict)      # partner -> key of the pair mask it added
    signs: dict[int, int] = field(default_factory=dict)            # partner -> that mask's sign in y
    partner_s_pk: dict[int, bytes] = field(default_factory=dict)   # partner -> its s key in this client's view
    partner_c_pk: dict[int, bytes] = field(default_factory=dict)   # holder -> the key its shares were encrypted to
    shares: dict[int, tuple[int, int]] = field(default_factory=dict)  # x (holder + 1) -> (b-share, s-share)
    uploaded: bool = False                        # it sent y
    signed: frozenset[int] | None = None          # U3 of the view it signed, if it did
    answered: bool = False                        # it sent unmask responses (for `signed`)


@dataclass
class Adversary:
    """What the server holds besides the messages: the secrets of X25519 keys it knows (its own
    substitutes, the colluders'), as sets of public keys, and who colludes."""
    c_keys: set[bytes] = field(default_factory=set)
    s_keys: set[bytes] = field(default_factory=set)
    colluders: set[int] = field(default_factory=set)


@dataclass
class Leak:
    """The oracle's verdict on one round."""
    functions: list[dict[int, int]]               # a basis of what it learns: {client: coefficient}
    allowed: list[frozenset[int]]                 # the honest uploads of each accepted survivor set
    known_b: set[int]                             # honest clients whose self-mask seed it holds
    known_s: set[int]                             # ... whose mask key it holds
    individuals: set[int]                         # clients whose input alone it can compute
    learned_partial: bool
    smallest: int | None                          # the fewest inputs in one learned function

    @property
    def learned_individual(self) -> bool:
        return bool(self.individuals)

    @property
    def ok(self) -> bool:
        """The guarantee holds: nothing but one accepted survivor set's sum (which is a single
        input only when colluders make up the rest of that set)."""
        return not self.learned_partial


def genuine_shares(truths: Mapping[int, Truth], responses: Mapping[int, Mapping[int, tuple[int, int]]],
                   adversary: Adversary) -> tuple[dict[int, set[int]], dict[int, set[int]]]:
    """{owner: x's of its genuine b-shares} and {owner: ... s-shares} that the adversary holds:
    from the unmask responses actually sent ({responder: {owner: (kind, share)}}) and from the
    ciphertexts it can open (addressed to a key whose secret it knows)."""
    b: dict[int, set[int]] = {i: set() for i in truths}
    s: dict[int, set[int]] = {i: set() for i in truths}
    for i, tr in truths.items():
        for x, (_bs, _ss) in tr.shares.items():
            holder = x - 1
            if holder != i and tr.partner_c_pk.get(holder) in adversary.c_keys:
                b[i].add(x)
                s[i].add(x)
    for k, entries in responses.items():
        for owner, (kind, value) in entries.items():
            made = truths[owner].shares if owner in truths else {}
            if k + 1 not in made:
                continue
            if kind == KIND_B and made[k + 1][0] == value:
                b[owner].add(k + 1)
            elif kind == KIND_S and made[k + 1][1] == value:
                s[owner].add(k + 1)
    return b, s


def analyse(truths: Mapping[int, Truth], responses: Mapping[int, Mapping[int, tuple[int, int]]],
            adversary: Adversary, threshold: int, min_survivors: int) -> Leak:
    """The oracle (module docstring) for one round."""
    b_shares, s_shares = genuine_shares(truths, responses, adversary)
    known_b = {i for i, xs in b_shares.items() if len(xs) >= threshold}
    known_s = {i for i, xs in s_shares.items() if len(xs) >= threshold}
    s_secret = adversary.s_keys | {truths[i].s_pk for i in known_s}
    rows = sorted(i for i, tr in truths.items() if tr.uploaded)
    columns: dict[bytes, dict[int, int]] = {}          # unknown mask key -> {upload: coefficient}
    for i in rows:
        tr = truths[i]
        if i not in known_b:
            columns.setdefault(tr.self_key, {})[i] = 1
        for j, key in tr.pair_keys.items():
            if tr.s_pk in s_secret or tr.partner_s_pk.get(j) in s_secret:
                continue
            col = columns.setdefault(key, {})
            col[i] = col.get(i, 0) + tr.signs[j]
    _check_shape(columns.values())
    basis = left_null_space(rows, columns.values())
    accepted = {tr.signed for tr in truths.values() if tr.answered and tr.signed is not None}
    allowed = sorted({frozenset(u3) & frozenset(rows) for u3 in accepted if len(u3) >= min_survivors},
                     key=sorted)
    functions = [{rows[c]: int(v) for c, v in enumerate(vec) if v} for vec in basis]
    individuals = {rows[r] for r in range(len(rows))
                   if basis and in_span(basis, [int(c == r) for c in range(len(rows))])}
    partial = len(basis) > 1 or any(not _is_sum_of(f, allowed) for f in functions)
    smallest = min((len(f) for f in functions), default=None)
    return Leak(functions, allowed, known_b, known_s, individuals, partial, smallest)


def _check_shape(columns: Iterable[Mapping[int, int]]) -> None:
    """The property the docstring's claim rests on: every unknown mask enters at most two uploads,
    with coefficients +1 and -1 when two."""
    for col in columns:
        values = sorted(v for v in col.values() if v)
        if len(values) > 2 or len(values) == 2 and values != [-1, 1] or any(abs(v) != 1 for v in values):
            raise AssertionError(f"a mask enters the uploads as {col}: the oracle's algebra does not cover it")


def _is_sum_of(function: Mapping[int, int], allowed: list[frozenset[int]]) -> bool:
    """Whether the function is c * (sum of the inputs of one allowed set), c != 0."""
    return len(set(function.values())) == 1 and frozenset(function) in allowed


def left_null_space(rows: list[int], columns: Iterable[Mapping[int, int]]) -> list[np.ndarray]:
    """A basis of {a : sum_i a_i col[i] = 0 for every column} over GF(PRIME), in reduced form
    (each vector's first nonzero entry is 1)."""
    index = {r: n for n, r in enumerate(rows)}
    cols = [c for c in columns if any(c.values())]
    a = np.zeros((len(cols), len(rows)), np.int64)      # A a = 0: one equation per unknown mask
    for e, col in enumerate(cols):
        for r, coeff in col.items():
            a[e, index[r]] = coeff % PRIME
    pivots = _rref(a)
    pivot_cols = set(pivots.values())
    free = [c for c in range(len(rows)) if c not in pivot_cols]
    basis = []
    for f in free:
        v = np.zeros(len(rows), np.int64)
        v[f] = 1
        for row, c in pivots.items():
            v[c] = (-a[row, f]) % PRIME
        nz = np.flatnonzero(v)
        v = v * pow(int(v[nz[0]]), PRIME - 2, PRIME) % PRIME
        basis.append(_signed(v))
    return basis


def _rref(a: np.ndarray) -> dict[int, int]:
    """Row-reduces a in place over GF(PRIME); returns {pivot row: pivot column}."""
    pivots: dict[int, int] = {}
    r = 0
    for c in range(a.shape[1]):
        if r == a.shape[0]:
            break
        nz = np.flatnonzero(a[r:, c])
        if not len(nz):
            continue
        p = r + int(nz[0])
        if p != r:
            a[[r, p]] = a[[p, r]]
        a[r] = a[r] * pow(int(a[r, c]), PRIME - 2, PRIME) % PRIME
        others = np.flatnonzero(a[:, c])
        others = others[others != r]
        if len(others):
            a[others] = (a[others] - np.outer(a[others, c], a[r]) % PRIME) % PRIME
        pivots[r] = c
        r += 1
    return pivots


def _signed(v: np.ndarray) -> np.ndarray:
    """Residues as the small integers they stand for (-1 for PRIME - 1)."""
    return np.where(v > PRIME // 2, v - PRIME, v)


def in_span(basis: list[np.ndarray], v: list[int]) -> bool:
    """Whether v is a combination of the basis vectors over GF(PRIME)."""
    if not basis:
        return not any(v)
    a = np.array([b % PRIME for b in basis] + [np.array(v, np.int64) % PRIME])
    return len(_rref(a.copy())) == len(_rref(a[:-1].copy()))
