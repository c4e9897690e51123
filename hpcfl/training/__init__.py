"""The trainers: what a run does epoch by epoch (dp) or round by round (fl).

    loop.py          what both share: stopping (signals, StopTraining, target accuracy),
                     checkpoint cadence, the end of a run
    dataparallel.py  --mode dp: one Allreduce of the flat gradient per step; DP-SGD
    federated.py     --mode fl: client sampling, local training, aggregation, broadcast
"""
