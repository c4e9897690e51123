"""A saved model in interchange formats: ONNX.

The ONNX graph is the whole of `Model.logits` and `Model.predict`, normalisation included, so a
runtime feeds it raw images:

    pixels  uint8 [N, H, W]  -> Flatten [N, H*W] -> Cast float32 -> Mul 1/(255 std) -> Sub mean/std
            [-> MatMul projection, a model trained with --dp-pca]
            -> (Gemm -> Relu) per hidden layer -> Gemm -> logits float32 [N, classes]
                                                          -> ArgMax axis 1 -> class int64 [N]

metadata_props carries dataset, image_shape, num_classes, mean, std, input and hpcfl_version.
onnx is imported only when an export runs: `import hpcfl.export` needs nothing extra.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..core.model import input_constants
from ..errors import UsageError
from ..io.files import atomic_write

OPSET = 17
MAX_IR_VERSION = 9     # what opset 17 needs and onnxruntime >= 1.15 reads; a newer onnx would stamp more
MISSING = "ONNX export needs the onnx package: pip install -e '.[onnx]'"


def _onnx():
    try:
        import onnx
    except ImportError:
        raise UsageError(MISSING) from None
    return onnx


def to_onnx(model) -> bytes:
    """The serialised ONNX ModelProto of `model` (an hpcfl.inference.Model), checked."""
    onnx = _onnx()
    from onnx import TensorProto, helper, numpy_helper

    from .. import __version__

    h, w = (int(d) for d in model.image_shape)
    classes = model.sizes[-1]
    # The very float32 constants Model.logits uses: the same roundings, the same inputs to layer 1.
    scale, shift = input_constants(model.mean, model.std)

    inits = [numpy_helper.from_array(np.array(scale, np.float32), "input_scale"),
             numpy_helper.from_array(np.array(shift, np.float32), "input_shift")]
    nodes = [helper.make_node("Flatten", ["pixels"], ["flat"], axis=1),   # [N, H*W]; fine for N = 0
             helper.make_node("Cast", ["flat"], ["flat_f"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["flat_f", "input_scale"], ["scaled"]),
             helper.make_node("Sub", ["scaled", "input_shift"], ["x"])]
    h_in = "x"
    if model.projection is not None:           # --dp-pca: the standardised image times the directions
        inits.append(numpy_helper.from_array(model.projection, "projection"))
        nodes.append(helper.make_node("MatMul", ["x", "projection"], ["x_projected"], name="dp_pca"))
        h_in = "x_projected"
    views = model.layout.views(model.params)
    for i, (wt, b) in enumerate(views, start=1):
        last = i == len(views)
        inits += [numpy_helper.from_array(np.ascontiguousarray(wt), f"W{i}"),
                  numpy_helper.from_array(np.ascontiguousarray(b), f"b{i}")]
        z = "logits" if last else f"z{i}"
        # W is (fan_in, fan_out) as stored, so h @ W + b is Gemm without transposes
        nodes.append(helper.make_node("Gemm", [h_in, f"W{i}", f"b{i}"], [z], name=f"dense{i}"))
        if not last:
            nodes.append(helper.make_node("Relu", [z], [f"h{i}"], name=f"relu{i}"))
            h_in = f"h{i}"
    # ArgMax keeps the first largest logit, as numpy's argmax (select_last_index=0)
    nodes.append(helper.make_node("ArgMax", ["logits"], ["class"], axis=1, keepdims=0))

    graph = helper.make_graph(
        nodes, "hpcfl_mlp",
        [helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["N", h, w])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes]),
         helper.make_tensor_value_info("class", TensorProto.INT64, ["N"])],
        initializer=inits,
        doc_string=f"hpcfl MLP {list(model.sizes)}: uint8 {h}x{w} images -> logits and class")
    proto = helper.make_model(graph, producer_name="hpcfl", producer_version=__version__,
                              opset_imports=[helper.make_opsetid("", OPSET)],
                              doc_string=(f"{model.dataset} classifier, sizes {list(model.sizes)}; input "
                                          f"(pixel / 255 - {model.mean!r}) / {model.std!r} is computed "
                                          "inside the graph: feed raw uint8 pixels"))
    proto.ir_version = min(onnx.IR_VERSION, MAX_IR_VERSION)
    # repr keeps every digit, so mean and std read back to the same floats
    helper.set_model_props(proto, {"dataset": model.dataset, "image_shape": f"{h},{w}",
                                   "num_classes": str(model.num_classes), "mean": repr(float(model.mean)),
                                   "std": repr(float(model.std)), "input": "(pixel / 255 - mean) / std",
                                   "hpcfl_version": __version__})
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


def write_onnx(model, path) -> Path:
    """Write `model` as an ONNX file at `path` (atomically); returns the path."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{path} is a folder: give the .onnx file to write")
    if not path.parent.is_dir():
        raise UsageError(f"cannot write {path}: the folder {path.parent} does not exist")
    data = to_onnx(model)      # before the file is touched: a failed export leaves nothing behind
    try:
        atomic_write(path, lambda f: f.write(data))
    except OSError as e:
        raise UsageError(f"cannot write {path}: {e.strerror or e}") from e
    return path


def export(model_path, onnx_path) -> Path:
    """model.npz (or a folder written by --out) -> an ONNX file; returns its path."""
    from ..core.model import load_model

    return write_onnx(load_model(model_path), onnx_path)
