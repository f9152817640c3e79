"""Reading Hugging Face safetensors checkpoints (single file or sharded with an index), lazily."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from tokenspeed_engine.loader.source import TensorSource

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsCheckpoint:
    """All tensors of a checkpoint directory: ``names()``, ``has(name)``, ``get(name) -> TensorSource``."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(self.path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no *.safetensors files (and no model.safetensors.index.json) in {self.path}")
            weight_map = {}
            for f in files:
                with safe_open(f, framework="pt") as h:
                    weight_map.update({k: f.name for k in h.keys()})
        self._file_of = weight_map
        self._handles: dict[str, object] = {}
        missing = sorted({f for f in weight_map.values() if not (self.path / f).exists()})
        if missing:
            raise FileNotFoundError(f"checkpoint index names shard files that do not exist: {missing}")

    def _handle(self, fname: str):
        if fname not in self._handles:
            self._handles[fname] = safe_open(self.path / fname, framework="pt", device="cpu")
        return self._handles[fname]

    def names(self) -> list[str]:
        """Tensor names grouped by shard file (so files are read one after another)."""
        return sorted(self._file_of, key=lambda n: (self._file_of[n], n))

    def has(self, name: str) -> bool:
        return name in self._file_of

    def get(self, name: str) -> TensorSource:
        if name not in self._file_of:
            raise KeyError(f"tensor {name!r} is not in the checkpoint at {self.path}")
        sl = self._handle(self._file_of[name]).get_slice(name)
        shape = tuple(sl.get_shape())
        dtype = _DTYPES[sl.get_dtype()]

        def read(idx: tuple[slice, ...]) -> torch.Tensor:
            return sl[idx]

        return TensorSource(name, shape, dtype, read)
