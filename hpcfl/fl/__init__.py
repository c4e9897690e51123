"""Federated learning's server-side parts, each pure where it can be (no MPI of its own):

    context.py      what a round's parts hand each other: FedContext, ClientUpdate, RoundResult
    server_opt.py   server optimizers (FedAvg, FedAvgM, FedAdam): ServerOptimizer, a registry
    aggregators.py  update validation and the aggregation rules (mean, robust): Aggregator, a registry
    collectors.py   how the server collects a round's updates: Collector (plain, gathered, central DP)
    secure.py       the secure-aggregation collector, and secure aggregation's settings
    partition.py    client partitions (iid, shards, Dirichlet), client sampling, dropouts, stragglers
    scaffold.py     SCAFFOLD's formulas and its control variates
    attacks.py      simulated malicious clients, for robustness experiments
"""
