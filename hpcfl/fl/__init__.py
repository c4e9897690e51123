"""Federated learning's parts, each pure where it can be (no MPI):

    server_opt.py   server optimizers (FedAvg, FedAvgM, FedAdam) and their registry
    aggregators.py  update validation and Byzantine-robust aggregation rules, and their registry
    collectors.py   how the server collects a round's updates: plain, gathered, DP, secure
    partition.py    client partitions (iid, shards, Dirichlet) and client sampling
    scaffold.py     SCAFFOLD's control variates and its formulas
    attacks.py      simulated malicious clients, for robustness experiments
"""
