"""What a run reads and writes besides the data:

    files.py        durable writes: atomic replace, fsync, appends
    locks.py        one run per output path
    checkpoint.py   checkpoints: atomic save on rank 0, load and broadcast
    report.py       rank 0's progress bar, epoch/round lines and JSON Lines metrics
    tensorboard.py  TensorBoard scalars (optional extra)
    plots.py        accuracy and loss curves (optional extra)
    export.py       a saved model as ONNX (optional extra)
"""
