"""The malicious server of server_attacks.py against honest clients, in one process: every attack
is detected and learns nothing, and each is real: against clients whose checks are switched off
it recovers the target's input bit for bit (so `learned_individual` can fail). Also the graph
bounds of Bell et al. 2020 and the signed, round-bound key advertisements."""
from __future__ import annotations

import math

import numpy as np
import pytest

from hpcfl.privacy import secagg, secagg_graph, server_attacks
from hpcfl.privacy.secagg_graph import RoundParams


class NoDefence(secagg.Client):
    """A client that trusts the server: every check that would abort passes."""

    def _refuse(self, message):
        pass


def inputs(m, n=96, seed=0):
    rng = np.random.default_rng(seed)   # test data, not secrets
    return {c: rng.integers(0, 2**32, n, dtype=np.uint64).astype(np.uint32) for c in range(m)}


# (attack, clients, neighbours K, threshold t): settings in which the attack works on a trusting
# client; lie-dropped needs 2t holders besides the target, split-graph a threshold of 2 for the
# "dropped" neighbours' keys to be rebuilt from the survivors left around them
WORKS = [("empty-route", 5, None, None), ("empty-route", 12, 4, None),
         ("key-swap", 5, None, None), ("key-swap", 12, 4, None),
         ("lie-dropped", 12, None, 3), ("lie-dropped", 12, 4, 2),
         ("split-graph", 12, 4, 2)]


@pytest.mark.parametrize("name,m,k,t", WORKS)
@pytest.mark.parametrize("target", [0, 3])
def test_each_attack_recovers_the_target_from_trusting_clients(name, m, k, t, target):
    params = RoundParams.make(3, range(m), 96, k=k, threshold=t)
    xs = inputs(m, seed=target)
    out = server_attacks.run(params, xs, name, target, client_cls=NoDefence, colluders=range(m))
    assert out["learned_individual"]


@pytest.mark.parametrize("name", server_attacks.ATTACKS)
@pytest.mark.parametrize("m,k,t", [(5, None, None), (10, None, None), (12, None, 3), (12, 4, None),
                                   (12, 4, 2), (30, 8, None)])
@pytest.mark.parametrize("target", [0, 4])
def test_honest_clients_detect_every_attack_and_it_learns_nothing(name, m, k, t, target):
    params = RoundParams.make(3, range(m), 96, k=k, threshold=t)
    xs = inputs(m, seed=m + target)
    out = server_attacks.run(params, xs, name, target, colluders=range(m))
    assert out["detected"] and "aborts the round" in out["detected"]
    assert not out["learned_individual"]


@pytest.mark.parametrize("name,why", [("empty-route", "holds the shares of 0 neighbours"),
                                      ("key-swap", "not signed by client"),
                                      ("lie-dropped", "the views disagree"),
                                      ("split-graph", "disconnected")])
def test_each_attack_is_stopped_by_its_own_check(name, why):
    m, k, t = (12, 4, 2) if name in ("lie-dropped", "split-graph") else (5, None, None)
    out = server_attacks.run(RoundParams.make(1, range(m), 96, k=k, threshold=t), inputs(m), name, 0,
                             colluders=range(m))
    assert why in out["detected"]


def test_finding_3_an_empty_share_map_no_longer_yields_the_input():
    # the audit's attack, by hand: the target gets no shares, so without the check y - PRG(b) = x
    params = RoundParams.make(0, range(5), 64)
    ids, directory = secagg.identities(params.clients)
    target = secagg.Client(0, params, ids[0], directory)
    others = {c: secagg.Client(c, params, ids[c], directory) for c in range(1, 5)}
    server = secagg.Server(params, directory)
    ads = server.collect_keys({0: target.advertise_keys(), **{c: o.advertise_keys() for c, o in others.items()}})
    target.share_keys(ads)
    for o in others.values():
        o.share_keys(ads)
    with pytest.raises(secagg.SecAggViolation, match="client 0 aborts the round: it holds the shares of 0"):
        target.masked_input(np.zeros(64, np.uint32), secagg.encode_map({}))


def test_key_advertisements_are_bound_to_the_round_and_the_client():
    params = RoundParams.make(4, range(3), 8)
    ids, directory = secagg.identities(params.clients)
    c = secagg.Client(1, params, ids[1], directory)
    ad = c.advertise_keys()
    msg = secagg._keys_message(4, 1, ad[:64])
    assert secagg.verify(directory[1], ad[64:], msg)
    assert not secagg.verify(directory[1], ad[64:], secagg._keys_message(5, 1, ad[:64]))   # replayed
    assert not secagg.verify(directory[2], ad[64:], secagg._keys_message(4, 2, ad[:64]))   # re-labelled
    server = secagg.Server(params, directory)
    forged = {0: ad, 1: ad, 2: ad}                          # client 1's advertisement under other ids
    with pytest.raises(secagg.SecAggError, match="not signed by its identity key"):
        server.collect_keys(forged)


def test_a_client_whose_own_advertisement_was_altered_aborts():
    params = RoundParams.make(0, range(3), 8)
    ids, directory = secagg.identities(params.clients)
    cl = {c: secagg.Client(c, params, ids[c], directory) for c in range(3)}
    ads = {c: x.advertise_keys() for c, x in cl.items()}
    ads[1] = bytes(64) + ads[1][64:]
    with pytest.raises(secagg.SecAggViolation, match="client 1 aborts.*own key advertisement"):
        cl[1].share_keys(secagg.encode_map(ads))


# ---------------------------------------------------------------------------- graph bounds

def ring_split_probability(m, k, p, trials, seed):
    """Monte Carlo: how often independent removals with probability p disconnect H(k, m)."""
    rng = np.random.default_rng(seed)
    graph = secagg_graph.neighbor_graph(range(m), k, b"g")
    bad = 0
    for _ in range(trials):
        alive = [c for c in range(m) if rng.random() >= p]
        bad += len(alive) > 1 and not secagg_graph.is_connected(graph, alive)
    return bad / trials


def test_min_neighbors_meets_its_stated_bound_and_smaller_k_splits_often():
    # the audit's setting: 100 clients, 10% dropouts. K = 2 splits nearly always, K = 4 often;
    # the bound's K, by Monte Carlo, never (it promises C(m, 2) p^K <= 2^-40)
    k = secagg_graph.min_neighbors(100, 0.1, 0.0)
    assert k == 2 * math.ceil((40 * math.log(2) + math.log(4950)) / (-2 * math.log(0.1)))
    assert math.comb(100, 2) * 0.1 ** k <= 2.0 ** -40
    assert secagg_graph.min_neighbors(100, 0.1, 0.05) == 20           # the default setting's K
    assert ring_split_probability(100, 2, 0.1, 300, 1) > 0.9
    assert ring_split_probability(100, 4, 0.1, 2000, 2) > 0.02
    assert ring_split_probability(100, k, 0.1, 2000, 3) == 0.0
    assert secagg_graph.min_neighbors(10, 0.1, 0.05) is None          # small rounds: complete graph only
    assert secagg_graph.min_neighbors(1000, 0.1, 0.05) < 999


def test_the_union_bound_for_a_split_by_hand():
    # H(4, 6) is the ring with offsets 1 and 2: removing {1, 2} and {4, 5} isolates 0 from 3
    g = secagg_graph.neighbor_graph(range(6), 4, b"x")
    ring = secagg_graph.shuffled_ring(range(6), b"x")
    assert not secagg_graph.is_connected(g, [ring[0], ring[3]])
    assert secagg_graph.is_connected(g, [ring[0], ring[2], ring[3], ring[5]])   # gaps of 1 keep it whole


def test_sparse_threshold_keeps_colluders_below_t():
    t = secagg_graph.sparse_threshold(37, 100, 0.05)
    assert t >= 19                                               # at least the smallest majority
    assert secagg_graph._binom_sf(t, 37, 0.05) <= 2.0 ** -40 / 100
    assert secagg_graph.sparse_threshold(37, 100, 0.3) > 19            # more colluders: a higher t


def test_the_honest_server_never_unmasks_a_disconnected_survivor_graph():
    # finding 5: m = 12, K = 4, four dropouts that cut the ring into two arcs
    params = RoundParams.make(2, range(12), 32, k=4, threshold=2)
    ids, directory = secagg.identities(params.clients)
    clients = {c: secagg.Client(c, params, ids[c], directory) for c in params.clients}
    server = secagg.Server(params, directory)
    ads = server.collect_keys({c: x.advertise_keys() for c, x in clients.items()})
    routed = server.route_shares({c: clients[c].share_keys(ads) for c in clients})
    ring = secagg_graph.shuffled_ring(server.graph, server.transcript)
    gone = {ring[1], ring[2], ring[6], ring[7]}
    ys = {c: clients[c].masked_input(np.zeros(32, np.uint32), routed[c]) for c in routed if c not in gone}
    with pytest.raises(secagg.SecAggAbort, match="disconnected"):
        server.unmask_request(ys)


def test_the_command_line_offers_every_attack_and_no_other():
    import dataclasses

    from hpcfl.config import Config
    field = next(f for f in dataclasses.fields(Config) if f.name == "server_attack")
    assert tuple(field.metadata["choices"]) == server_attacks.ATTACKS
