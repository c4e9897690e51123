"""The trainers: what a run does epoch by epoch (dp) or round by round (fl).

    loop.py          what both share: stopping (signals, StopTraining, target accuracy, the
                     privacy budget), checkpoint cadence, the end of a run (Trainer, run)
    dataparallel.py  --mode dp: one Allreduce of the flat gradient per step
    dpsgd.py         DP-SGD's noise on the summed gradient, DP-PCA's projection of the data
    federated.py     --mode fl: sample -> train -> aggregate -> broadcast -> record
"""
