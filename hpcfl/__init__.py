"""hpcfl: data-parallel and federated MLP training with MPI.

    import hpcfl
    result = hpcfl.train(hpcfl.Config(epochs=2))          # one process, or every rank under mpirun
    print(result.test_accuracy)
    ds = hpcfl.load_dataset("mnist")
    labels = result.model.predict(ds.test_images[:10])
    result.model.save("model/")
    model = hpcfl.load_model("model/")

Everything is imported on first use, so `import hpcfl` stays cheap (no MPI, no Numba).
"""
__version__ = "0.2.0"

__all__ = ["Config", "train", "Result", "Model", "load_model", "load_dataset", "Dataset",
           "HpcflError", "UsageError", "DataError", "TrainingError", "Preempted", "StopTraining"]

_WHERE = {"Config": "config", "train": "api", "Result": "api", "load_dataset": "api",
          "Model": "core.model", "load_model": "core.model", "Dataset": "data",
          "HpcflError": "errors", "UsageError": "errors", "DataError": "errors",
          "TrainingError": "errors", "Preempted": "errors", "StopTraining": "errors"}


def __getattr__(name):
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(f"hpcfl.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'hpcfl' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
