"""The leakage oracle (hpcfl/privacy/leakage.py) on transcripts built by hand, where what the
server can compute is worked out on paper, and against an independent computation of the same
null space (components of the graph of unknown pair masks, by union-find)."""
from __future__ import annotations

import numpy as np
import pytest

from hpcfl.privacy import leakage
from hpcfl.privacy.leakage import Adversary, Truth


def truth(cid, pairs, *, s_pk=None, uploaded=True, signed=None, answered=True):
    """A client whose pair masks are `pairs` {partner: key}, signs by id order as secagg does."""
    t = Truth(cid, s_pk or bytes([cid]) * 32, self_key=b"b" + bytes([cid]) * 31)
    t.pair_keys = dict(pairs)
    t.signs = {j: 1 if cid < j else -1 for j in pairs}
    t.partner_s_pk = {j: bytes([j]) * 32 for j in pairs}
    t.uploaded, t.signed, t.answered = uploaded, signed, answered
    return t


def key(i, j):
    return bytes([min(i, j), max(i, j)]) * 16


def complete(clients, signed=None):
    return {i: truth(i, {j: key(i, j) for j in clients if j != i}, signed=signed) for i in clients}


def with_b_known(truths, who, threshold=2):
    """Responses that give the server `threshold` genuine b-shares of each client in `who`."""
    responses = {}
    for i in who:
        for x in range(1, threshold + 1):
            truths[i].shares[x] = (1000 * i + x, 0)
            responses.setdefault(x - 1, {})[i] = (leakage.KIND_B, 1000 * i + x)
    return responses


def test_the_survivors_sum_and_nothing_else_when_every_self_mask_is_known():
    ts = complete([0, 1, 2], signed=frozenset({0, 1, 2}))
    leak = leakage.analyse(ts, with_b_known(ts, [0, 1, 2]), Adversary(), threshold=2, min_survivors=3)
    assert leak.functions == [{0: 1, 1: 1, 2: 1}] and leak.allowed == [frozenset({0, 1, 2})]
    assert leak.ok and not leak.learned_individual and leak.smallest == 3


def test_nothing_at_all_while_one_self_mask_is_unknown():
    ts = complete([0, 1, 2], signed=frozenset({0, 1, 2}))
    leak = leakage.analyse(ts, with_b_known(ts, [0, 1]), Adversary(), threshold=2, min_survivors=3)
    assert leak.functions == [] and leak.ok


def test_a_client_whose_pair_masks_are_all_known_is_learned_alone():
    # client 2's partners' keys are the server's (a key swap in 2's view): y_2 - PRG(b_2) = x_2
    ts = complete([0, 1, 2], signed=frozenset({0, 1, 2}))
    ts[2].partner_s_pk = {0: b"F" * 32, 1: b"G" * 32}
    ts[2].pair_keys = {0: b"f" * 32, 1: b"g" * 32}
    leak = leakage.analyse(ts, with_b_known(ts, [0, 1, 2]), Adversary(s_keys={b"F" * 32, b"G" * 32}),
                           threshold=2, min_survivors=2)
    assert 2 in leak.individuals and leak.learned_partial and not leak.ok
    # 0 and 1: their masks with 2 are unpaired unknowns (2 masked with other keys): locked
    assert {0, 1}.isdisjoint(leak.individuals)


def test_a_sum_smaller_than_min_survivors_or_not_accepted_is_a_partial_leak():
    ts = complete([0, 1, 2, 3], signed=frozenset({0, 1, 2, 3}))
    for j in (2, 3):                          # 2 and 3 masked with nobody in {0, 1}: a split view
        ts[j].pair_keys = {k: v for k, v in ts[j].pair_keys.items() if k in (2, 3)}
        ts[j].signs = {k: v for k, v in ts[j].signs.items() if k in (2, 3)}
    for j in (0, 1):
        ts[j].pair_keys = {k: v for k, v in ts[j].pair_keys.items() if k in (0, 1)}
        ts[j].signs = {k: v for k, v in ts[j].signs.items() if k in (0, 1)}
    leak = leakage.analyse(ts, with_b_known(ts, [0, 1, 2, 3]), Adversary(), threshold=2, min_survivors=3)
    assert sorted(map(sorted, (f.keys() for f in leak.functions))) == [[0, 1], [2, 3]]
    assert leak.learned_partial and not leak.ok and leak.smallest == 2


def test_only_genuine_shares_count_and_opened_ciphertexts_do():
    ts = complete([0, 1, 2], signed=frozenset({0, 1, 2}))
    for i in ts:
        ts[i].shares = {x: (100 * i + x, 200 * i + x) for x in (1, 2, 3)}
    forged = {0: {2: (leakage.KIND_B, 999)}, 1: {2: (leakage.KIND_B, 999)}}   # not 2's shares
    b, s = leakage.genuine_shares(ts, forged, Adversary())
    assert b[2] == set()
    genuine = {0: {2: (leakage.KIND_B, 201)}, 1: {2: (leakage.KIND_S, 402)}}
    b, s = leakage.genuine_shares(ts, genuine, Adversary())
    assert b[2] == {1} and s[2] == {2}
    ts[2].partner_c_pk = {0: b"C" * 32, 1: b"D" * 32}       # 2 encrypted to a key the server holds
    b, s = leakage.genuine_shares(ts, {}, Adversary(c_keys={b"C" * 32}))
    assert b[2] == {1} and s[2] == {1}


def test_a_mask_entering_the_uploads_outside_the_oracles_algebra_is_refused():
    ts = complete([0, 1])
    ts[1].signs[0] = 1                        # both add +PRG(k01): not the protocol's shape
    with pytest.raises(AssertionError, match="does not cover it"):
        leakage.analyse(ts, with_b_known(ts, [0, 1]), Adversary(), threshold=2, min_survivors=2)


def components(rows, columns):
    """The same null space the structural way: uploads joined by an unknown mask both use are
    one unknown; a mask only one upload uses pins that upload's component to zero. Each free
    component contributes its indicator."""
    parent = {r: r for r in rows}

    def find(r):
        while parent[r] != r:
            parent[r] = parent[parent[r]]
            r = parent[r]
        return r

    pinned = set()
    for col in columns:
        users = [r for r, v in col.items() if v]
        if len(users) == 2:
            parent[find(users[0])] = find(users[1])
        elif len(users) == 1:
            pinned.add(users[0])
    pinned = {find(r) for r in pinned}
    groups: dict[int, set] = {}
    for r in rows:
        groups.setdefault(find(r), set()).add(r)
    return sorted(sorted(g) for root, g in groups.items() if root not in pinned)


@pytest.mark.parametrize("seed", range(40))
def test_the_null_space_is_the_union_find_components(seed):
    rng = np.random.default_rng(seed)         # random incidence structures of the protocol's shape
    rows = list(range(int(rng.integers(1, 25))))
    columns = []
    for _ in range(int(rng.integers(0, 60))):
        a, b = rng.choice(rows, size=2, replace=len(rows) < 2)
        columns.append({int(a): 1} if a == b or rng.random() < 0.15 else {int(a): 1, int(b): -1})
    basis = leakage.left_null_space(rows, columns)
    got = sorted(sorted(int(rows[c]) for c in np.flatnonzero(v)) for v in basis)
    assert got == components(rows, columns)
    for v in basis:                           # each a component's indicator (all coefficients 1)
        assert set(v[np.flatnonzero(v)].tolist()) == {1}
