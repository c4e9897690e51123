"""The model and one step of training it, knowing nothing of MPI beyond a communicator.

    layout.py   layer sizes, initialisation, the one flat float32 buffer and its per-layer views
    model.py    a trained model outside training: predict, evaluate, save, load
    optim.py    SGD (momentum), Adam on the flat buffer; the learning-rate schedule
    replica.py  this rank's copy of the model and one synchronous step
"""
