"""Privacy and security, the pure parts (no MPI):

    plan.py            a run's differential privacy (DpPlan): calibration to --dp-epsilon, the seed
    ledger.py          privacy spent, written down before each release; the clients' own books
    accountant.py      DP accounting (RDP / PLD via dp-accounting, Gaussian DP) and calibration
    sampling.py        Poisson sampling (DP-SGD's batches), the honest survivors of a secure round
    mechanisms.py      clipping to the sensitivity, DP-PCA's release
    noise.py           Gaussian noise from a CSPRNG (AES-256-CTR keyed by HKDF)
    secagg.py          secure aggregation (Bonawitz et al. 2017): clients, server, their messages
    secagg_graph.py    who shares with whom: thresholds, Bell et al. 2020's bounds, the graph
    fixedpoint.py      real vectors as uint32 words that sum mod 2^32
    server_attacks.py  a malicious server, for researchers and for the tests that play it; a fuzzing one
    leakage.py         the leakage oracle: what a server can compute from a round's transcript
"""
