"""What TensorRT's ONNX parser accepts, as published by NVIDIA, for the JetPacks we ship to.

Sources (onnx/onnx-tensorrt, docs/operators.md, "Operator Support Matrix", rows marked `Y`):
- release/8.5-GA: "TensorRT 8.5 supports operators up to Opset 17" (JetPack 5.1, TensorRT 8.5;
  JetPack 6.0's 8.6 reads the same opset range and every operator below).
- release/10.x: "TensorRT 10.0 supports operators in the inclusive range of opset 9 to opset 20"
  (JetPack 6.1/6.2 ship 10.3); the operator rows were transcribed from the 10.x branch's table
  (10.15 header), of which only operators also in the 8.5 table matter to us.
A bundle must parse on every JetPack it may meet, so an operator is accepted only when both
tables mark it supported. Restrictions in the tables' last column (e.g. "2D or 3D pooling only")
are not checked statically: the TensorRT parser reports them at build time.

No onnx import here: the numbers below are ONNX's TensorProto.DataType values.
"""
from __future__ import annotations

from typing import Dict, FrozenSet

MAX_OPSET = 17  # TensorRT 8.5/8.6 parsers read opsets up to 17
MIN_OPSET = 9  # TensorRT 10.x parsers read opsets from 9
MAX_IR_VERSION = 8  # TensorRT 8.5's parser is built against onnx 1.12 (IR version 8)
DEFAULT_DOMAINS = ("", "ai.onnx")

TRT_8_5_OPS: FrozenSet[str] = frozenset(
    """
    Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil
    Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace
    DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather
    GatherElements GatherND Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual
    GridSample GRU HardSigmoid HardSwish Identity If ImageScaler InstanceNormalization IsNaN LeakyRelu
    Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool Mean
    MeanVarianceNormalization Min Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
    ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
    RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax
    ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RNN
    RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign Sin
    Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh
    ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
    """.split()
)

# Rows marked `Y` in the 10.x table that are not in the 8.5 one: usable only from JetPack 6.1 on.
TRT_10_ONLY_OPS: FrozenSet[str] = frozenset(
    """
    Attention BlackmanWindow CastLike DeformConv Gelu GroupNormalization HammingWindow HannWindow
    Hardmax IsInf LayerNormalization Mish RMSNormalization RotaryEmbedding STFT TensorScatter
    """.split()
)
TRT_10_OPS: FrozenSet[str] = TRT_8_5_OPS | TRT_10_ONLY_OPS

SUPPORTED_OPS: FrozenSet[str] = TRT_8_5_OPS & TRT_10_OPS  # what every JetPack we target parses

# ONNX TensorProto.DataType -> name, for messages.
ONNX_DTYPE_NAMES: Dict[int, str] = {
    0: "UNDEFINED", 1: "FLOAT", 2: "UINT8", 3: "INT8", 4: "UINT16", 5: "INT16", 6: "INT32", 7: "INT64",
    8: "STRING", 9: "BOOL", 10: "FLOAT16", 11: "DOUBLE", 12: "UINT32", 13: "UINT64", 14: "COMPLEX64",
    15: "COMPLEX128", 16: "BFLOAT16", 17: "FLOAT8E4M3FN", 18: "FLOAT8E4M3FNUZ", 19: "FLOAT8E5M2",
    20: "FLOAT8E5M2FNUZ", 21: "UINT4", 22: "INT4", 23: "FLOAT4E2M1",
}
# 8.5 lists FLOAT32, FLOAT16, INT8, BOOL, with INT32/INT64 cast down where needed (shape tensors).
# DOUBLE is refused although TensorRT "supports" it: it is cast down to FLOAT with clamping, so the
# engine would not compute what ONNX Runtime computes. UINT8 and BFLOAT16 arrive only with 10.x.
SUPPORTED_DTYPES: FrozenSet[int] = frozenset({1, 3, 6, 7, 9, 10})


# Per-operator restrictions of the tables (and of TensorRT's layer limits) that our graph meets; checked
# statically by engine.check. INT32 = 6.
TOPK_MAX_K = 3840  # ITopKLayer's limit in 8.5, 8.6 and 10.x; ArgMax/ArgMin are built as TopK with k = 1
NO_INT32_INPUT_OPS: FrozenSet[str] = frozenset({"TopK", "ArgMax", "ArgMin", "MatMul"})  # 8.5: FP32/FP16 only
INT32 = 6
RESIZE_MODES: FrozenSet[str] = frozenset({"nearest", "linear"})  # 8.5's table; cubic arrives later
RESIZE_COORDINATE_MODES: FrozenSet[str] = frozenset(
    {"half_pixel", "pytorch_half_pixel", "tf_half_pixel_for_nn", "asymmetric", "align_corners"})
RESIZE_NEAREST_MODES: FrozenSet[str] = frozenset({"floor", "ceil", "round_prefer_floor", "round_prefer_ceil"})


def dtype_name(dtype: int) -> str:
    return ONNX_DTYPE_NAMES.get(int(dtype), f"dtype #{dtype}")


def op_support(domain: str, op_type: str) -> str:
    """'ok', '10-only', 'custom-domain' or 'unsupported' for one ONNX node."""
    if domain not in DEFAULT_DOMAINS:
        return "custom-domain"
    if op_type in SUPPORTED_OPS:
        return "ok"
    if op_type in TRT_10_ONLY_OPS:
        return "10-only"
    return "unsupported"
