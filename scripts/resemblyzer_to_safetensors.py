#!/usr/bin/env python3
"""Convert Resemblyzer's pretrained.pt (a PyTorch checkpoint in the legacy, pre-1.6,
non-zip format) into a safetensors file holding the encoder's tensors (`model_state`:
lstm.*, linear.*, similarity_*), which triage's SpeakerEncoder reads. Python standard
library only: the checkpoint's pickle is read with stand-ins for torch's classes, and
each storage's raw little-endian bytes follow the pickles in the file.

    python3 scripts/resemblyzer_to_safetensors.py pretrained.pt OUT.safetensors
"""

import json
import pickle
import struct
import sys

MAGIC = 0x1950A86A20F9469CFC6C
DTYPES = {"FloatStorage": ("F32", 4)}


class StorageType:
    def __init__(self, name):
        self.name = name


def rebuild_tensor(storage, offset, size, stride, *_):
    return {"storage": storage, "offset": offset, "size": tuple(size), "stride": tuple(stride)}


class Reader(pickle.Unpickler):
    def find_class(self, module, name):
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return rebuild_tensor
        if module == "torch" and name.endswith("Storage"):
            return StorageType(name)
        if module == "collections" and name == "OrderedDict":
            import collections
            return collections.OrderedDict
        raise pickle.UnpicklingError(f"unexpected class {module}.{name} in the checkpoint")

    def persistent_load(self, pid):
        # ('storage', storage type, key, location, number of elements, view)
        kind, storage_type, key, _location, numel, view = pid
        if kind != "storage" or view is not None:
            raise pickle.UnpicklingError(f"unsupported storage reference {pid!r}")
        return {"key": key, "type": storage_type.name, "numel": numel}


def main():
    src, dst = sys.argv[1], sys.argv[2]
    with open(src, "rb") as f:
        if pickle.load(f) != MAGIC:
            raise SystemExit(f"{src}: not a legacy PyTorch checkpoint")
        pickle.load(f)  # protocol version
        pickle.load(f)  # system info
        checkpoint = Reader(f).load()
        keys = pickle.load(f)
        raw = {}
        for key in keys:
            (numel,) = struct.unpack("<q", f.read(8))
            raw[key] = (numel, f.tell())
            # Every storage in the file is skipped over; only the model's are kept.
            f.seek(numel * 4, 1)
        state = checkpoint["model_state"]
        header, blobs, at = {}, [], 0
        for name, t in state.items():
            dtype, size = DTYPES[t["storage"]["type"]]
            numel, pos = raw[t["storage"]["key"]]
            count = 1
            for d in t["size"]:
                count *= d
            # Only contiguous row-major tensors (all of this checkpoint's are).
            expect, s = [], 1
            for d in reversed(t["size"]):
                expect.insert(0, s)
                s *= d
            if list(t["stride"]) != expect or t["offset"] + count > numel:
                raise SystemExit(f"{name}: not a contiguous tensor")
            f.seek(pos + t["offset"] * size)
            blob = f.read(count * size)
            header[name] = {"dtype": dtype, "shape": list(t["size"]),
                            "data_offsets": [at, at + len(blob)]}
            blobs.append(blob)
            at += len(blob)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    with open(dst, "wb") as out:
        out.write(struct.pack("<Q", len(head)))
        out.write(head)
        for b in blobs:
            out.write(b)


if __name__ == "__main__":
    main()
