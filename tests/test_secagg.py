"""Secure aggregation (hpcfl/privacy/secagg.py), in one process: every message goes through the bytes the
MPI trainer would move. Expected sums are the plain uint64 sums of the inputs, reduced mod 2^32."""
from __future__ import annotations

import itertools
import math
import struct

import numpy as np
import pytest

from hpcfl.privacy import fixedpoint, secagg, secagg_graph
from hpcfl.privacy.fixedpoint import FixedPoint
from hpcfl.privacy.secagg import Client, SecAggAbort, SecAggAuthError, SecAggError, Server
from hpcfl.privacy.secagg_graph import RoundParams


def inputs(clients, n, seed=0):
    rng = np.random.default_rng(seed)   # test data, not secrets
    return {c: rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32) for c in clients}


def plain_sum(xs, clients):
    return (sum(xs[c].astype(np.uint64) for c in clients) % 2**32).astype(np.uint32)


def make_round(params):
    """Honest clients with identities from a trusted set-up, and the server."""
    ids, directory = secagg.identities(params.clients)
    return {c: Client(c, params, ids[c], directory) for c in params.clients}, Server(params, directory)


def run_to_unmask(params, xs, drop_before_input=()):
    """Stages 0-2 by hand; returns (clients, server, ys, routed, requests)."""
    clients, server = make_round(params)
    ads = server.collect_keys({c: cl.advertise_keys() for c, cl in clients.items()})
    routed = server.route_shares({c: clients[c].share_keys(ads) for c in clients})
    drop = drop_before_input(server) if callable(drop_before_input) else drop_before_input
    ys = {c: clients[c].masked_input(xs[c], routed[c]) for c in routed if c not in drop}
    return clients, server, ys, routed, server.unmask_request(ys)


def signed(clients, server, req):
    """The consistency round: the signatures every survivor gets."""
    return server.collect_signatures({c: clients[c].consistency(req[c]) for c in req})


def run_round(params, xs, drop_before_input=()):
    clients, server, ys, routed, req = run_to_unmask(params, xs, drop_before_input)
    sigs = signed(clients, server, req)
    return server, server.aggregate(list(ys.values()), {c: clients[c].unmask(sigs) for c in req})


# ------------------------------------------------------------------------------ exact sums

@pytest.mark.parametrize("m,k", [(2, None), (3, None), (5, None), (10, None), (10, 4),
                                 (30, 2 * round(math.log2(30))), (10, 3)])
def test_unmasked_sum_is_the_exact_plain_sum(m, k):
    params = RoundParams.make(4, range(m), 1001, k=k)
    xs = inputs(params.clients, params.n, seed=m)
    np.testing.assert_array_equal(secagg.simulate(params, xs), plain_sum(xs, params.clients))


def test_every_message_is_bytes_and_y_is_uint32():
    params = RoundParams.make(0, range(4), 64)
    xs = inputs(params.clients, 64)
    clients, server = make_round(params)
    up = {c: cl.advertise_keys() for c, cl in clients.items()}
    down = server.collect_keys(up)
    assert type(down) is bytes
    shares = {c: clients[c].share_keys(down) for c in clients}
    routed = server.route_shares(shares)
    ys = {c: clients[c].masked_input(xs[c], routed[c]) for c in routed}
    req = server.unmask_request(ys)
    sigs_up = {c: clients[c].consistency(req[c]) for c in req}
    sigs = server.collect_signatures(sigs_up)
    resp = {c: clients[c].unmask(sigs) for c in req}
    for msgs in (up, shares, routed, req, sigs_up, resp):
        assert all(type(v) is bytes for v in msgs.values())
    assert all(y.dtype == np.uint32 and y.shape == (64,) for y in ys.values())
    summed = (sum(y.astype(np.uint64) for y in ys.values()) % 2**32).astype(np.uint32)
    np.testing.assert_array_equal(server.aggregate(summed, resp), plain_sum(xs, range(4)))


# -------------------------------------------------------------------------------- dropouts

@pytest.mark.parametrize("m,k", [(10, None), (10, 4)])
def test_dropping_holders_minus_t_clients_after_share_keys_keeps_the_survivors_sum(m, k):
    params = RoundParams.make(2, range(m), 257, k=k)
    t, gone = params.threshold, []

    def pick(server):                                     # all inside client 0's holder set
        holders = secagg_graph.holders(server.graph, 0)
        gone[:] = [h for h in holders if h != 0][:len(holders) - t]
        return gone

    xs = inputs(params.clients, params.n)
    _, total = run_round(params, xs, drop_before_input=pick)
    np.testing.assert_array_equal(total, plain_sum(xs, set(params.clients) - set(gone)))


@pytest.mark.parametrize("m,k", [(10, None), (10, 4)])
def test_one_more_dropout_aborts_with_the_reason(m, k):
    params = RoundParams.make(2, range(m), 257, k=k)
    t, gone, size = params.threshold, [], []

    def pick(server):
        holders = secagg_graph.holders(server.graph, 0)
        size.append(len(holders))
        gone[:] = [h for h in holders if h != 0][:len(holders) - t + 1]
        return gone

    with pytest.raises(SecAggAbort) as err:
        run_round(params, inputs(params.clients, params.n), drop_before_input=pick)
    msg = str(err.value)
    assert f"{m - len(gone)} of {m} clients survived" in msg
    if k is None:      # complete graph: the survivors' count is what fails first
        assert f"fewer than the {params.min_survivors} needed" in msg
    else:
        assert f"{t - 1} of its {size[0]} share holders" in msg and f"threshold is {t}" in msg


def test_dropouts_at_every_stage():
    # 10 clients, t = 6: 1 leaves before sharing, 1 before its input, 1 during unmasking
    params = RoundParams.make(3, range(10), 300)
    xs = inputs(params.clients, params.n, seed=3)
    total = secagg.simulate(params, xs, drop_before_shares=[7], drop_before_input=[2],
                            drop_before_unmask=[5])
    # 5 sent y, so its input counts even though it never answered the unmask request
    np.testing.assert_array_equal(total, plain_sum(xs, [0, 1, 3, 4, 5, 6, 8, 9]))


def test_too_few_keys_aborts_early():
    params = RoundParams.make(0, range(5), 8)            # t = 3
    clients, server = make_round(params)
    with pytest.raises(SecAggAbort, match="2 of 5 clients advertised keys, fewer than the 3 needed"):
        server.collect_keys({c: clients[c].advertise_keys() for c in (0, 1)})


# ------------------------------------------------------------------------ authentication

def test_flipped_ciphertext_byte_raises_auth_error_naming_sender_and_receiver():
    params = RoundParams.make(9, range(5), 32)
    xs = inputs(params.clients, params.n)
    clients, server = make_round(params)
    ads = server.collect_keys({c: cl.advertise_keys() for c, cl in clients.items()})
    routed = server.route_shares({c: clients[c].share_keys(ads) for c in clients})
    held = secagg.decode_map(routed[2])
    ct = bytearray(held[4])
    ct[40] ^= 0x01
    held[4] = bytes(ct)
    routed[2] = secagg.encode_map(held)
    ys = {c: clients[c].masked_input(xs[c], routed[c]) for c in routed}
    sigs = signed(clients, server, server.unmask_request(ys))
    with pytest.raises(SecAggAuthError) as err:
        clients[2].unmask(sigs)
    assert (err.value.sender, err.value.receiver, err.value.server_round) == (4, 2, 9)
    assert "from client 4 to client 2" in str(err.value) and "round 9" in str(err.value)
    assert isinstance(err.value, secagg.SecAggViolation) and err.value.client == 2
    clients[3].unmask(sigs)                                # the others are untouched


def test_ciphertext_relabelled_as_another_senders_fails_authentication():
    params = RoundParams.make(1, range(4), 16)
    clients, server = make_round(params)
    ads = server.collect_keys({c: cl.advertise_keys() for c, cl in clients.items()})
    routed = server.route_shares({c: clients[c].share_keys(ads) for c in clients})
    held = secagg.decode_map(routed[0])
    held[1], held[2] = held[2], held[1]                    # the AAD binds the sender
    routed[0] = secagg.encode_map(held)
    ys = {c: clients[c].masked_input(np.zeros(16, np.uint32), routed[c]) for c in routed}
    with pytest.raises(SecAggAuthError, match="from client 1 to client 0"):
        clients[0].unmask(signed(clients, server, server.unmask_request(ys)))


# ------------------------------------------------------------------ masked inputs look random

N_UNIFORM = 1 << 20


@pytest.mark.parametrize("pattern", ["zeros", "ramp"])
def test_masked_input_is_uniform_and_uncorrelated_with_x(pattern):
    params = RoundParams.make(0, range(3), N_UNIFORM)
    ramp = np.arange(N_UNIFORM, dtype=np.uint32)
    x = np.zeros(N_UNIFORM, np.uint32) if pattern == "zeros" else ramp
    _, _, ys, _, _ = run_to_unmask(params, dict.fromkeys(params.clients, x))
    y = ys[1]
    counts = np.bincount(y >> 24, minlength=256)                  # top 8 bits
    expected = N_UNIFORM / 256
    # p > 1e-4 <=> chi^2 < 347.654, the 1 - 1e-4 quantile of chi^2 with 255 degrees of freedom
    # (scipy.stats.chi2.isf(1e-4, 255)); the mask-free y = x would give millions
    assert ((counts - expected) ** 2 / expected).sum() < 347.654
    # r is about N(0, 1/n) for independent vectors: 6 sigma
    assert abs(np.corrcoef(ramp.astype(np.float64), y.astype(np.float64))[0, 1]) < 6 / math.sqrt(N_UNIFORM)
    assert abs(np.corrcoef(ys[0].astype(np.float64), y.astype(np.float64))[0, 1]) < 6 / math.sqrt(N_UNIFORM)


# -------------------------------------------------------------------------- unmask refusal

def pack_request(survivors, dropped):
    """The documented wire format, written out here independently of the module's encoder."""
    return struct.pack(f"<II{len(survivors) + len(dropped)}I", len(survivors), len(dropped),
                       *survivors, *dropped)


def test_unmask_request_naming_a_client_both_ways_is_refused():
    params = RoundParams.make(0, range(4), 16)
    clients, server, ys, routed, req = run_to_unmask(params, inputs(range(4), 16))
    assert req[0] == pack_request([0, 1, 2, 3], [])
    with pytest.raises(secagg.SecAggViolation, match="names client 3 both"):
        clients[0].consistency(pack_request([0, 1, 2, 3], [3]))
    with pytest.raises(ValueError, match="both"):
        secagg.encode_unmask_request([0, 1, 2], [2, 3])


def test_unmask_request_leaving_a_client_out_or_naming_the_receiver_dropped_is_refused():
    params = RoundParams.make(0, range(4), 16)
    clients, *_ = run_to_unmask(params, inputs(range(4), 16))
    with pytest.raises(secagg.SecAggViolation, match="neither"):
        clients[0].consistency(pack_request([0, 1, 2], []))
    clients, *_ = run_to_unmask(params, inputs(range(4), 16))
    with pytest.raises(secagg.SecAggViolation, match="names it as dropped"):
        clients[0].consistency(pack_request([1, 2, 3], [0]))


def test_unmask_response_gives_one_kind_of_share_per_client():
    params = RoundParams.make(0, range(5), 16)              # t = 3
    clients, server, ys, routed, req = run_to_unmask(params, inputs(range(5), 16), drop_before_input=[4])
    entries = secagg.decode_map(clients[0].unmask(signed(clients, server, req)))
    assert sorted(entries) == [0, 1, 2, 3, 4]
    assert [e[0] for _, e in sorted(entries.items())] == [1, 1, 1, 1, 2]   # b b b b s
    assert all(len(e) == 1 + 66 for e in entries.values())


def test_server_refuses_survivors_that_did_not_share_keys_and_calls_out_of_order():
    params = RoundParams.make(0, range(4), 8)
    clients, server = make_round(params)
    with pytest.raises(SecAggError, match="out of order"):
        server.unmask_request([0, 1])
    ads = server.collect_keys({c: cl.advertise_keys() for c, cl in clients.items()})
    server.route_shares({c: clients[c].share_keys(ads) for c in (0, 1, 2)})
    with pytest.raises(ValueError, match="did not share keys"):
        server.unmask_request([0, 1, 2, 3])


# -------------------------------------------------------------------------------- Shamir

def test_any_t_shares_reconstruct_and_t_minus_1_do_not():
    secret = int.from_bytes(bytes(range(32)), "big")
    xs = [1, 2, 5, 8, 9, 11, 14]
    shares = secagg.shamir_split(secret, xs, 4)
    for subset in itertools.combinations(xs, 4):
        assert secagg.shamir_reconstruct({x: shares[x] for x in subset}) == secret
    for subset in itertools.combinations(xs, 3):
        assert secagg.shamir_reconstruct({x: shares[x] for x in subset}) != secret


def test_shamir_reconstruct_of_a_hand_worked_line():
    # f(x) = 5 + 3x: f(1) = 8, f(2) = 11; and f(x) = 7 - 2x + x^2 at 1, 3, 4: 6, 10, 15
    assert secagg.shamir_reconstruct({1: 8, 2: 11}) == 5
    assert secagg.shamir_reconstruct({1: 6, 3: 10, 4: 15}) == 7
    assert secagg.shamir_reconstruct({1: 8}) == 8            # one share is just f(1)


def test_shares_are_fresh_and_the_field_is_large():
    assert secagg.PRIME > 2**256 and pow(3, secagg.PRIME - 1, secagg.PRIME) == 1
    a, b = secagg.shamir_split(42, [1, 2, 3], 2), secagg.shamir_split(42, [1, 2, 3], 2)
    assert a != b


@pytest.mark.parametrize("n_holders,t", [(2, 2), (3, 2), (5, 3), (10, 6), (15, 8), (100, 51)])
def test_default_threshold_is_the_smallest_majority(n_holders, t):
    assert secagg_graph.default_threshold(n_holders) == t


@pytest.mark.parametrize("t,n", [(1, 5), (6, 5), (0, 3)])
def test_invalid_thresholds_are_refused(t, n):
    with pytest.raises(ValueError, match=f"2 <= t <= {n}"):
        secagg_graph.check_threshold(t, n)
    with pytest.raises(ValueError):
        RoundParams(0, tuple(range(n)), None, t, 8, n)


def test_a_single_client_cannot_aggregate_securely():
    with pytest.raises(ValueError, match="2 <= t"):
        RoundParams.make(0, [3], 8)


# --------------------------------------------------------------------------------- graph

@pytest.mark.parametrize("m,k", [(10, 4), (30, 10), (10, 3), (100, 14), (9, 2)])
def test_neighbor_graph_is_symmetric_k_regular_and_seeded(m, k):
    g = secagg_graph.neighbor_graph(range(m), k, b"seed/round-1")
    assert all(len(v) == k and len(set(v)) == k and c not in v for c, v in g.items())
    assert all(c in g[d] for c, v in g.items() for d in v)
    assert g == secagg_graph.neighbor_graph(range(m), k, b"seed/round-1")
    assert g != secagg_graph.neighbor_graph(range(m), k, b"seed/round-2")


def test_neighbor_graph_odd_k_on_odd_m_rounds_up():
    g = secagg_graph.neighbor_graph(range(11), 3, 5)
    assert {len(v) for v in g.values()} == {4}


@pytest.mark.parametrize("k", [None, 9, 12])
def test_neighbor_graph_is_complete_when_k_reaches_m_minus_1(k):
    g = secagg_graph.neighbor_graph([3, 1, 7, 0, 2, 5, 4, 6, 8, 9], k, 1)
    assert g == {c: tuple(d for d in range(10) if d != c) for c in range(10)}


def test_round_params_use_the_graph_and_the_holders_threshold():
    p = RoundParams.make(5, range(100), 10, k=14)
    graph = p.graph(p.clients, b"transcript-1")
    assert p.threshold == 8 and all(len(secagg_graph.holders(graph, c)) == 15 for c in p.clients)
    assert graph != p.graph(p.clients, b"transcript-2")    # the graph follows the transcript
    assert p.min_survivors == 51 and RoundParams.make(5, range(100), 10, k=14, corrupt=10).min_survivors == 56


# ----------------------------------------------------------------------------------- PRG

def test_prg_is_aes256_ctr_known_answer():
    # FIPS-197 style: AES-256 of the zero block under the zero key is dc95c078a2408989ad48a21492842087
    words = secagg.prg(bytes(32), 5)
    assert words[:4].astype("<u4").tobytes().hex() == "dc95c078a2408989ad48a21492842087"


def test_prg_needs_full_keys_and_is_deterministic():
    with pytest.raises(ValueError, match="32 bytes"):
        secagg.prg(bytes(16), 8)
    key = bytes(range(32))
    a = secagg.prg(key, 100_003)
    np.testing.assert_array_equal(a, secagg.prg(key, 100_003))
    g = secagg.Prg(100_003)
    np.testing.assert_array_equal(g.expand(key), a)
    assert not np.array_equal(g.expand(bytes(32)), a)          # the buffer is reused


def test_pair_keys_are_full_symmetric_and_distinct():
    sk = [secagg.X25519PrivateKey.generate() for _ in range(3)]
    pk = [k.public_key().public_bytes_raw() for k in sk]
    k01 = secagg.pair_key(sk[0], pk[1], 7, 0, 1)
    assert len(k01) == 32
    assert k01 == secagg.pair_key(sk[1], pk[0], 7, 1, 0)
    assert k01 != secagg.pair_key(sk[0], pk[2], 7, 0, 2)
    assert k01 != secagg.pair_key(sk[0], pk[1], 8, 0, 1)           # bound to the round
    assert not np.array_equal(secagg.prg(k01, 64), secagg.prg(secagg.pair_key(sk[0], pk[2], 7, 0, 2), 64))


def test_masks_of_two_survivors_cancel():
    params = RoundParams.make(0, [0, 1], 4096)
    x = inputs([0, 1], 4096, seed=1)
    clients, server, ys, routed, req = run_to_unmask(params, x)
    pair = (ys[0] - secagg.prg(clients[0]._b, 4096)) + (ys[1] - secagg.prg(clients[1]._b, 4096))
    np.testing.assert_array_equal(pair, plain_sum(x, [0, 1]))
    assert not np.array_equal(ys[0] - secagg.prg(clients[0]._b, 4096), x[0])   # a pair mask is there


# ------------------------------------------------------------------------------ encoding

def test_id_map_round_trip_and_documented_layout():
    items = {7: b"abc", 2: b"", 40: bytes(5)}
    data = secagg.encode_map(items)
    assert data == struct.pack("<7I", 3, 2, 0, 7, 3, 40, 5) + b"abc" + bytes(5)
    assert secagg.decode_map(data) == items
    for bad in (data[:-1], data + b"x", data[:6]):
        with pytest.raises(SecAggError):
            secagg.decode_map(bad)


def test_traffic_accounting_matches_the_wire_format():
    m, n = 3, 10
    params = RoundParams.make(0, range(m), n)
    clients, server = make_round(params)
    ads = server.collect_keys({c: cl.advertise_keys() for c, cl in clients.items()})
    routed = server.route_shares({c: clients[c].share_keys(ads) for c in clients})
    ys = {c: clients[c].masked_input(np.zeros(n, np.uint32), routed[c]) for c in routed}
    req = server.unmask_request(ys)
    sigs = signed(clients, server, req)
    server.aggregate(list(ys.values()), {c: clients[c].unmask(sigs) for c in req})
    two_entry_map, three_entry_map = 4 + 2 * 8, 4 + 3 * 8  # headers of id maps with 2 and 3 entries
    assert server.traffic == {
        "keys_up": 3 * 128, "keys_down": 3 * (three_entry_map + 3 * 128),
        "shares_up": 3 * (two_entry_map + 2 * 160), "shares_down": 3 * (two_entry_map + 2 * 160),
        "masked_input_up": 3 * 4 * n, "unmask_down": 3 * (8 + 3 * 4),
        "consistency_up": 3 * 64, "consistency_down": 3 * (three_entry_map + 3 * 64),
        "unmask_up": 3 * (4 + 3 * 8 + 3 * 67)}
    assert server.bytes_to_server == 384 + 3 * 340 + 120 + 192 + 3 * 229
    assert server.bytes_from_server == 3 * 412 + 3 * 340 + 60 + 3 * 220


def test_out_of_order_calls_are_refused():
    params = RoundParams.make(0, range(3), 8)
    c = make_round(params)[0][0]
    with pytest.raises(SecAggError, match="out of order"):
        c.share_keys(secagg.encode_map({}))
    c.advertise_keys()
    with pytest.raises(SecAggError, match="out of order"):
        c.advertise_keys()


def test_masked_input_rejects_non_uint32():
    params = RoundParams.make(0, range(3), 8)
    c, server = make_round(params)
    ads = server.collect_keys({i: c[i].advertise_keys() for i in range(3)})
    routed = server.route_shares({i: c[i].share_keys(ads) for i in range(3)})
    with pytest.raises(ValueError, match="uint32"):
        c[0].masked_input(np.zeros(8, np.int64), routed[0])


# --------------------------------------------------------------------------- fixed point

def test_fixed_point_round_trip_within_the_bound_with_negatives():
    fp = FixedPoint(bound=1.0, max_terms=10)
    x = np.linspace(-1, 1, 10_001)
    np.testing.assert_array_less(np.abs(fp.decode(fp.encode(x)) - x), fp.error_bound(1) + 1e-300)
    assert fp.encode([-1.0])[0] == 2**32 - (2**31 - 1) // 10      # two's complement of -q_max
    assert fp.error_bound(1) < 2.4e-9 * 1.0001                   # 0.5 / (214748364 / 1)


def test_fixed_point_modular_sum_wraps_and_decodes():
    fp = FixedPoint(bound=0.5, max_terms=4)
    terms = [np.array([-0.5, 0.5, -0.25, 0.1]), np.array([-0.5, 0.5, 0.2, -0.3]),
             np.array([-0.5, 0.5, -0.3, 0.05]), np.array([-0.5, 0.5, 0.1, 0.1])]
    enc = [fp.encode(t) for t in terms]
    s = np.zeros(4, np.uint32)
    for e in enc:
        s += e                                                 # wraps mod 2^32
    assert s[0] > 2**31                                        # a negative sum wrapped around
    np.testing.assert_allclose(fp.decode(s, 4), np.sum(terms, axis=0), rtol=0, atol=fp.error_bound(4))
    np.testing.assert_allclose(fp.decode(s, 4)[:2], [-2.0, 2.0], rtol=0, atol=fp.error_bound(4))


def test_fixed_point_clips_to_the_bound():
    fp = FixedPoint(bound=2.0, max_terms=3)
    decoded = fp.decode(fp.encode([5.0, -7.0, 1.0]))
    np.testing.assert_allclose(decoded, [2.0, -2.0, 1.0], rtol=0, atol=fp.error_bound())


def test_fixed_point_overflow_check():
    with pytest.raises(ValueError, match="2\\^31"):
        FixedPoint(bound=1.0, max_terms=10, scale=2**31 / 10)
    FixedPoint(bound=1.0, max_terms=10, scale=(2**31 - 1) // 10)
    with pytest.raises(ValueError):
        FixedPoint(bound=1.0, max_terms=2**31)
    with pytest.raises(ValueError, match="overflowed"):
        FixedPoint(bound=1.0, max_terms=10).decode(np.zeros(3, np.uint32), 11)
    with pytest.raises(ValueError, match="NaN"):
        FixedPoint(bound=1.0, max_terms=10).encode([np.nan])


def test_fixed_point_through_secure_aggregation():
    m, n = 5, 1000
    fp = FixedPoint(bound=0.1, max_terms=m)
    rng = np.random.default_rng(5)
    floats = {c: rng.uniform(-0.1, 0.1, n) for c in range(m)}
    total = secagg.simulate(RoundParams.make(0, range(m), n), {c: fp.encode(v) for c, v in floats.items()})
    np.testing.assert_allclose(fp.decode(total, m), sum(floats.values()), rtol=0, atol=fp.error_bound(m))


@pytest.mark.parametrize("m", [1, 2, 7, 100])
def test_wide_fixed_point_sums_match_float64_far_below_a_float32_ulp(m):
    fp = fixedpoint.WideFixedPoint(bound=3.0, max_terms=m)
    rng = np.random.default_rng(m)
    terms = [rng.uniform(-3, 3, 2001) for _ in range(m)]
    total = np.zeros(2 * 2001, np.uint32)
    for t in terms:
        total += fp.encode(t)                                  # each limb's sum stays below 2^31
    exact = np.sum(terms, axis=0)
    np.testing.assert_allclose(fp.decode(total, m), exact, rtol=0, atol=fp.error_bound(m))
    # the mean of m terms errs by error_bound / m: a millionth of a float32 ulp at 1 (48 bits at m = 100)
    assert fp.error_bound(m) / m < 1e-6 * np.spacing(np.float32(1.0))
    np.testing.assert_array_equal(fp.decode(fp.encode(np.zeros(5)), 1), np.zeros(5))
    np.testing.assert_allclose(fp.decode(fp.encode([9.0, -9.0]), 1), [3.0, -3.0], atol=fp.error_bound())
    with pytest.raises(ValueError, match="overflowed"):
        fp.decode(total, m + 1)


def test_wide_fixed_point_through_secure_aggregation():
    m, n = 6, 500
    fp = fixedpoint.WideFixedPoint(bound=250000.0, max_terms=m)     # n_k x the range of 12 clients of 5000
    rng = np.random.default_rng(9)
    floats = {c: rng.uniform(-250000, 250000, n) for c in range(m)}
    total = secagg.simulate(RoundParams.make(0, range(m), 2 * n), {c: fp.encode(v) for c, v in floats.items()})
    np.testing.assert_allclose(fp.decode(total, m), sum(floats.values()), rtol=0, atol=fp.error_bound(m))
