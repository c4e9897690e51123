"""Privacy and security, the pure parts (no MPI):

    accountant.py      DP accounting (RDP / PLD via dp-accounting), calibration, clipping,
                       Poisson sampling, DP-PCA, secure DP-FedAvg's accounting
    noise.py           Gaussian noise from a CSPRNG (AES-256-CTR keyed by HKDF)
    secagg.py          secure aggregation (Bonawitz et al. 2017, SecAgg+ of Bell et al. 2020):
                       the protocol, its wire format and fixed-point encoding
    server_attacks.py  a malicious server, for researchers and for the tests that play it
"""
