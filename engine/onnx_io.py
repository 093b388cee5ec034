"""The inputs and outputs of an ONNX graph, read straight from its protobuf bytes.

A bundle's graph is checked against its bundle.yaml at load, on a Jetson where the onnx package (a
`train` extra) is absent; ONNX Runtime could tell too, but opening a session costs seconds and TensorRT
never opens one. So the few fields needed are read from protobuf's wire format; initializers (the bulk of
the file) are skipped by their length, only their names are read.
"""
from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Set, Tuple, Union

# Field numbers from onnx.proto (stable since IR version 3).
MODEL_GRAPH = 7
GRAPH_INITIALIZER, GRAPH_INPUT, GRAPH_OUTPUT = 5, 11, 12
TENSOR_NAME = 8  # TensorProto.name
VALUE_INFO_NAME, VALUE_INFO_TYPE = 1, 2
TYPE_TENSOR = 1
TENSOR_ELEM_TYPE, TENSOR_SHAPE = 1, 2
SHAPE_DIM = 1
DIM_VALUE = 1
WIRE_VARINT, WIRE_64BIT, WIRE_BYTES, WIRE_32BIT = 0, 1, 2, 5

ELEM_FLOAT = 1  # TensorProto.FLOAT
ELEM_NAMES = {1: "float32", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool", 10: "float16",
              11: "float64", 16: "bfloat16"}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    elem_type: int  # TensorProto.DataType; 0 when the graph does not say
    shape: Optional[Tuple[Optional[int], ...]]  # None: rank unknown; a None dim: dynamic

    @property
    def dtype(self) -> str:
        return ELEM_NAMES.get(self.elem_type, f"type {self.elem_type}")


@dataclass(frozen=True)
class GraphIO:
    inputs: Tuple[TensorInfo, ...]  # graph inputs that are not initializers
    outputs: Tuple[TensorInfo, ...]

    def input(self, name: str) -> Optional[TensorInfo]:
        return next((t for t in self.inputs if t.name == name), None)

    def output(self, name: str) -> Optional[TensorInfo]:
        return next((t for t in self.outputs if t.name == name), None)


Span = Tuple[int, int]


def _varint(buf: memoryview, pos: int) -> Tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("malformed varint")


def _fields(buf: memoryview, span: Span) -> Iterator[Tuple[int, int, Union[int, Span, None]]]:
    """(field number, wire type, value): an int for varints, a (start, end) span for bytes."""
    pos, end = span
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == WIRE_VARINT:
            value, pos = _varint(buf, pos)
            yield number, wire, value
        elif wire == WIRE_BYTES:
            length, pos = _varint(buf, pos)
            if pos + length > end:
                raise ValueError("a field runs past the end of its message (truncated file?)")
            yield number, wire, (pos, pos + length)
            pos += length
        elif wire == WIRE_64BIT:
            pos += 8
            yield number, wire, None
        elif wire == WIRE_32BIT:
            pos += 4
            yield number, wire, None
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
    if pos != end:
        raise ValueError("truncated message")


def _text(buf: memoryview, span: Span) -> str:
    return bytes(buf[span[0]:span[1]]).decode("utf-8", "replace")


def _value_info(buf: memoryview, span: Span) -> TensorInfo:
    name, elem, dims = "", 0, None
    for number, wire, value in _fields(buf, span):
        if number == VALUE_INFO_NAME and wire == WIRE_BYTES:
            name = _text(buf, value)  # type: ignore[arg-type]
        elif number == VALUE_INFO_TYPE and wire == WIRE_BYTES:
            for n2, w2, v2 in _fields(buf, value):  # type: ignore[arg-type]
                if n2 != TYPE_TENSOR or w2 != WIRE_BYTES:
                    continue
                for n3, w3, v3 in _fields(buf, v2):  # type: ignore[arg-type]
                    if n3 == TENSOR_ELEM_TYPE and w3 == WIRE_VARINT:
                        elem = int(v3)  # type: ignore[arg-type]
                    elif n3 == TENSOR_SHAPE and w3 == WIRE_BYTES:
                        dims = []
                        for n4, w4, v4 in _fields(buf, v3):  # type: ignore[arg-type]
                            if n4 == SHAPE_DIM and w4 == WIRE_BYTES:
                                dim = None
                                for n5, w5, v5 in _fields(buf, v4):  # type: ignore[arg-type]
                                    if n5 == DIM_VALUE and w5 == WIRE_VARINT and int(v5) > 0:  # type: ignore[arg-type]
                                        dim = int(v5)  # type: ignore[arg-type]
                                dims.append(dim)
    return TensorInfo(name, elem, None if dims is None else tuple(dims))


def read_graph_io(path: Union[str, Path]) -> GraphIO:
    """Inputs (initializers excluded) and outputs of an ONNX file; ValueError when it is not one."""
    with open(path, "rb") as fh:
        size = fh.seek(0, 2)
        if size == 0:
            raise ValueError("empty file")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            buf = memoryview(mapped)
            try:
                return _read(buf, size)
            except IndexError:
                raise ValueError("truncated file") from None
            finally:
                buf.release()


def _read(buf: memoryview, size: int) -> GraphIO:
    graph: Optional[Span] = None
    for number, wire, value in _fields(buf, (0, size)):
        if number == MODEL_GRAPH and wire == WIRE_BYTES:
            graph = value  # type: ignore[assignment]
    if graph is None:
        raise ValueError("no graph in the file")
    inputs: List[TensorInfo] = []
    outputs: List[TensorInfo] = []
    initializers: Set[str] = set()
    for number, wire, value in _fields(buf, graph):
        if wire != WIRE_BYTES:
            continue
        if number == GRAPH_INPUT:
            inputs.append(_value_info(buf, value))  # type: ignore[arg-type]
        elif number == GRAPH_OUTPUT:
            outputs.append(_value_info(buf, value))  # type: ignore[arg-type]
        elif number == GRAPH_INITIALIZER:
            for n2, w2, v2 in _fields(buf, value):  # type: ignore[arg-type]
                if n2 == TENSOR_NAME and w2 == WIRE_BYTES:
                    initializers.add(_text(buf, v2))  # type: ignore[arg-type]
    return GraphIO(tuple(t for t in inputs if t.name not in initializers), tuple(outputs))
