"""A GGUF file's metadata and tensors, read fast: the tensor types auto's mixes start from
(fasttune.export), and every file the tests inspect; and a file written from two others' tensors
(auto's mixes, fasttune.mix).

Written by hand because gguf's GGUFReader builds a numpy view for every element of every array: about
16 s per file for Qwen's 151,936-token vocab and 151,387 merges. This walks the same layout (gguf's
spec: header, key/values, tensor infos, aligned data) once.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

T = gguf.GGUFValueType
SCALARS = {T.UINT8: "<B", T.INT8: "<b", T.UINT16: "<H", T.INT16: "<h", T.UINT32: "<I", T.INT32: "<i",
           T.FLOAT32: "<f", T.BOOL: "<?", T.UINT64: "<Q", T.INT64: "<q", T.FLOAT64: "<d"}
NUMPY = {T.UINT8: "<u1", T.INT8: "<i1", T.UINT16: "<u2", T.INT16: "<i2", T.UINT32: "<u4", T.INT32: "<i4",
         T.FLOAT32: "<f4", T.BOOL: "?", T.UINT64: "<u8", T.INT64: "<i8", T.FLOAT64: "<f8"}


@dataclass
class Tensor:
    name: str
    tensor_type: gguf.GGMLQuantizationType
    shape: list[int]  # GGUF order: ne[0] (the contiguous dimension) first
    offset: int  # absolute, in the file
    nbytes: int
    data: memoryview  # a view into the file's bytes


@dataclass
class GGUFFile:
    fields: dict[str, object]  # key -> Python value (str, int, float, bool, or a list of them)
    tensors: dict[str, Tensor]  # in the file's order
    header: memoryview  # the file's bytes up to the tensor infos: magic, version, counts, key/values
    alignment: int


class _Cursor:
    def __init__(self, buf: memoryview):
        self.buf, self.pos = buf, 0

    def scalar(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        self.pos += n
        return str(self.buf[self.pos - n: self.pos], "utf-8")

    def value(self, kind: int):
        kind = T(kind)
        if kind == T.STRING:
            return self.string()
        if kind != T.ARRAY:
            return self.scalar(SCALARS[kind])
        item, n = T(self.scalar("<I")), self.scalar("<Q")
        if item in NUMPY:  # numbers: one read
            values = np.frombuffer(self.buf, NUMPY[item], n, self.pos)
            self.pos += values.nbytes
            return values.tolist()
        if item == T.STRING:  # a vocabulary: 300,000 strings for Qwen, so the loop stays this tight
            out, buf, pos, unpack = [], self.buf, self.pos, struct.Struct("<Q").unpack_from
            for _ in range(n):
                (size,) = unpack(buf, pos)
                out.append(str(buf[pos + 8: pos + 8 + size], "utf-8"))
                pos += 8 + size
            self.pos = pos
            return out
        return [self.value(item) for _ in range(n)]


def read(path: str | Path) -> GGUFFile:
    if Path(path).stat().st_size == 0:
        raise ValueError(f"{path}: empty file, not a GGUF")
    with open(path, "rb") as f:  # mapped, not read: a Modelfile needs the header of a 5 GB file
        data = memoryview(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))  # tensors are views into it
    c = _Cursor(data)
    magic, version, n_tensors, n_kv = c.scalar("<I"), c.scalar("<I"), c.scalar("<Q"), c.scalar("<Q")
    if (magic, version) != (gguf.GGUF_MAGIC, gguf.GGUF_VERSION):
        raise ValueError(f"{path}: not a GGUF v{gguf.GGUF_VERSION} file (magic {magic:#x}, version {version})")
    fields = {}
    for _ in range(n_kv):
        key = c.string()
        fields[key] = c.value(c.scalar("<I"))
    header, infos = data[: c.pos], []
    for _ in range(n_tensors):
        name = c.string()
        shape = [c.scalar("<Q") for _ in range(c.scalar("<I"))]
        infos.append((name, gguf.GGMLQuantizationType(c.scalar("<I")), shape, c.scalar("<Q")))
    alignment = fields.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT)
    start = gguf.GGUFWriter.ggml_pad(c.pos, alignment)
    tensors = {}
    for name, qtype, shape, offset in infos:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        nbytes = int(np.prod(shape)) // block * size
        tensors[name] = Tensor(name, qtype, shape, start + offset, nbytes,
                               data[start + offset: start + offset + nbytes])
    return GGUFFile(fields, tensors, header, alignment)


def write_swapped(base: str | Path, donor: str | Path, names: set[str], out: str | Path) -> Path:
    """`base` with the tensors `names` taken, type and bytes, from `donor` (the same weights in another
    type), everything else as it is in `base`: its key/values byte for byte, its tensor order, its
    alignment. Where base was quantized from a bit copy of the weights donor was written from, this is
    the file llama_model_quantize writes for base's type with those tensors overridden to donor's and
    the rest pinned (tests/test_mix.py, bf16), without quantizing again. By hand: gguf's writer needs
    every key's type, which only its slow reader recovers."""
    a, b = read(base), read(donor)
    missing = sorted(set(names) - (a.tensors.keys() & b.tensors.keys()))
    reshaped = sorted(n for n in set(names) - set(missing) if a.tensors[n].shape != b.tensors[n].shape)
    if missing or reshaped:
        raise ValueError(f"{donor} is not {base} in another type (tensors missing: {missing}, shapes differ: "
                         f"{reshaped}): write both from the same model")
    tensors = [b.tensors[t.name] if t.name in names else t for t in a.tensors.values()]
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    try:
        _write(tmp, a, tensors)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _write(path: Path, a: GGUFFile, tensors: list[Tensor]) -> None:
    """a's header, then `tensors`' infos and data, each aligned as a's are."""
    with open(path, "wb") as f:
        f.write(a.header)
        offset = 0
        for t in tensors:
            name = t.name.encode()
            f.write(struct.pack("<Q", len(name)) + name + struct.pack("<I", len(t.shape)))
            f.write(struct.pack(f"<{len(t.shape)}Q", *t.shape) + struct.pack("<IQ", t.tensor_type, offset))
            offset = gguf.GGUFWriter.ggml_pad(offset + t.nbytes, a.alignment)
        f.write(bytes(gguf.GGUFWriter.ggml_pad(f.tell(), a.alignment) - f.tell()))
        for t in tensors:
            f.write(t.data)
            f.write(bytes(gguf.GGUFWriter.ggml_pad(t.nbytes, a.alignment) - t.nbytes))


def writable_array(path: Path, tensor: Tensor) -> np.memmap:
    """An f32 tensor of the file, mapped for writing in numpy's order (the GGUF shape reversed)."""
    assert tensor.tensor_type == gguf.GGMLQuantizationType.F32, tensor.tensor_type
    return np.memmap(path, np.float32, "r+", tensor.offset, tuple(reversed(tensor.shape)))
