#!/usr/bin/env python3
"""Convert Silero VAD's TorchScript archive (silero_vad.jit from the PyPI
package silero-vad) into the ggml file whisper.cpp's VAD loader reads.

Standard library only: the archive is a zip whose data.pkl pickles the
module tree and whose data/N entries hold the raw tensor storages, so a
restricted unpickler rebuilds the 16 kHz branch (`_model`) without torch.

The output layout is the one `whisper_vad_init_with_params` (whisper.cpp
1.8.3, src/whisper.cpp) reads: magic, model type, version, window and
context sizes, encoder/LSTM hyper-parameters, then tensors (dims, name
length, type, shape in ggml order, name, data).

usage: silero_vad_to_ggml.py silero_vad.jit out.bin [--version 5.1.2]
"""

import argparse
import pickle
import struct
import sys
import zipfile

GGML_MAGIC = 0x67676D6C
F32, F16 = 0, 1

# The tensors whisper.cpp expects, with the type it allocates them as.
TENSORS = {
    "_model.stft.forward_basis_buffer": F16,
    "_model.encoder.0.reparam_conv.weight": F16,
    "_model.encoder.0.reparam_conv.bias": F32,
    "_model.encoder.1.reparam_conv.weight": F16,
    "_model.encoder.1.reparam_conv.bias": F32,
    "_model.encoder.2.reparam_conv.weight": F16,
    "_model.encoder.2.reparam_conv.bias": F32,
    "_model.encoder.3.reparam_conv.weight": F16,
    "_model.encoder.3.reparam_conv.bias": F32,
    "_model.decoder.rnn.weight_ih": F32,
    "_model.decoder.rnn.weight_hh": F32,
    "_model.decoder.rnn.bias_ih": F32,
    "_model.decoder.rnn.bias_hh": F32,
    "_model.decoder.decoder.2.weight": F16,
    "_model.decoder.decoder.2.bias": F32,
}

DTYPE_BYTES = {"FloatStorage": ("f", 4), "HalfStorage": ("e", 2)}


class Tensor:
    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def values(self):
        """The elements in row-major order, as Python floats."""
        fmt, width, raw = self.storage
        flat = struct.unpack(f"<{len(raw) // width}{fmt}", raw)
        out = []

        def walk(dim, base):
            if dim == len(self.size):
                out.append(flat[base])
                return
            for i in range(self.size[dim]):
                walk(dim + 1, base + i * self.stride[dim])

        walk(0, self.offset)
        return out


class Module:
    """Any scripted module: keeps the attributes it was pickled with."""

    def __init__(self, *args, **kwargs):
        self.__dict__["attrs"] = {}

    def __setstate__(self, state):
        if isinstance(state, dict):
            self.__dict__["attrs"] = state
        elif isinstance(state, tuple) and state and isinstance(state[-1], dict):
            self.__dict__["attrs"] = state[-1]


def rebuild_tensor(storage, offset, size, stride, *_):
    return Tensor(storage, offset, size, stride)


def rebuild_parameter(data, *_):
    return data


class Unpickler(pickle.Unpickler):
    def __init__(self, file, archive, prefix):
        super().__init__(file)
        self.archive, self.prefix = archive, prefix

    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return rebuild_parameter
        if module == "collections" and name == "OrderedDict":
            import collections

            return collections.OrderedDict
        if module == "torch.jit._pickle" and name.startswith("build_") and name.endswith("list"):
            return list
        if module == "torch" and name in DTYPE_BYTES:
            return name
        if module.startswith("__torch__"):
            return type(name, (Module,), {})
        raise pickle.UnpicklingError(f"unexpected global {module}.{name} in the archive")

    def persistent_load(self, pid):
        kind, storage_type, key, _location, _numel = pid
        if kind != "storage" or storage_type not in DTYPE_BYTES:
            raise pickle.UnpicklingError(f"unexpected storage {pid!r}")
        fmt, width = DTYPE_BYTES[storage_type]
        return (fmt, width, self.archive.read(f"{self.prefix}/data/{key}"))


def flatten(obj, prefix, out):
    attrs = obj.attrs if isinstance(obj, Module) else obj if isinstance(obj, dict) else None
    if attrs is None:
        return
    for name, value in attrs.items():
        path = f"{prefix}.{name}" if prefix else str(name)
        if isinstance(value, Tensor):
            out[path] = value
        elif isinstance(value, (Module, dict)):
            flatten(value, path, out)


def load(path):
    with zipfile.ZipFile(path) as archive:
        pkl = next(n for n in archive.namelist() if n.endswith("/data.pkl"))
        prefix = pkl[: -len("/data.pkl")]
        import io

        root = Unpickler(io.BytesIO(archive.read(pkl)), archive, prefix).load()
    tensors = {}
    flatten(root, "", tensors)
    return tensors


def write(tensors, out, version):
    missing = [n for n in TENSORS if n not in tensors]
    if missing:
        sys.exit(f"silero_vad_to_ggml: the archive lacks {', '.join(missing)}; found {sorted(tensors)}")
    enc = [tensors[f"_model.encoder.{i}.reparam_conv.weight"].size for i in range(4)]
    hidden = tensors["_model.decoder.rnn.weight_hh"].size[1]
    final = tensors["_model.decoder.decoder.2.weight"].size
    major, minor, patch = (int(p) for p in version.split("."))
    with open(out, "wb") as f:
        w = lambda fmt, *v: f.write(struct.pack("<" + fmt, *v))  # noqa: E731
        w("I", GGML_MAGIC)
        kind = b"silero-16k"
        w("i", len(kind))
        f.write(kind)
        w("iii", major, minor, patch)
        w("ii", 512, 64)  # window and context samples of the 16 kHz model
        w("i", len(enc))
        for out_ch, in_ch, kernel in enc:
            w("iii", in_ch, out_ch, kernel)
        w("iiii", hidden, hidden, final[1], final[0])
        for name, ttype in TENSORS.items():
            t = tensors[name]
            shape = list(t.size)
            if name == "_model.decoder.decoder.2.weight":
                shape = shape[:2]  # (1, 128, 1) conv kernel read as a (1, 128) matrix
            values = t.values()
            encoded = name.encode()
            w("iii", len(shape), len(encoded), ttype)
            for dim in reversed(shape):
                w("i", dim)
            f.write(encoded)
            f.write(struct.pack(f"<{len(values)}{'e' if ttype == F16 else 'f'}", *values))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("jit")
    p.add_argument("out")
    p.add_argument("--version", default="5.1.2")
    a = p.parse_args()
    write(load(a.jit), a.out, a.version)


if __name__ == "__main__":
    main()
