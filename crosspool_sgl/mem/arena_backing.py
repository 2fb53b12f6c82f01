"""What physically backs the KV arena: a plain tensor, or CUDA virtual memory mapped chunk by chunk.

The KV pool reserves one contiguous range of addresses for the whole arena and
tells its backing which chunks are owned. With CUDA virtual memory (VMM) only
owned chunks are backed by physical GPU memory (cuMemCreate + cuMemMap); a
released chunk is unmapped and its memory really returns to the device, so
the weights pool (or anything else) can use it. On CPU, and on GPUs where the
driver API can't be loaded, the arena is a plain tensor and map/unmap only
count — the same accounting, tested on CPU.

The CUDA path talks to libcuda through ctypes (no extra dependency). It has
not been run on a GPU in this project yet (no GPU was lent when it was
written); tests/gpu/test_arena_backing_gpu.py exercises it where one exists.
"""

from __future__ import annotations

import ctypes
from typing import Protocol

import torch


class ArenaBacking(Protocol):
    tensor: torch.Tensor  # uint8 [total_bytes], addressable in full; only mapped chunks may be touched

    def map(self, chunk: int) -> None: ...

    def unmap(self, chunk: int) -> None: ...

    @property
    def mapped_bytes(self) -> int: ...


class PlainBacking:
    """A plain tensor: every chunk is always backed; map/unmap keep the accounting only."""

    def __init__(self, total_bytes: int, chunk_bytes: int, device: torch.device) -> None:
        self.tensor = torch.zeros(total_bytes, dtype=torch.uint8, device=device)
        self.chunk_bytes = chunk_bytes
        self.mapped: set[int] = set()

    def map(self, chunk: int) -> None:
        self.mapped.add(chunk)

    def unmap(self, chunk: int) -> None:
        self.mapped.discard(chunk)

    @property
    def mapped_bytes(self) -> int:
        return len(self.mapped) * self.chunk_bytes


# ---- CUDA virtual memory through the driver API ---------------------------------------------------
class _Location(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _AllocFlags(ctypes.Structure):
    _fields_ = [
        ("compressionType", ctypes.c_ubyte),
        ("gpuDirectRDMACapable", ctypes.c_ubyte),
        ("usage", ctypes.c_ushort),
        ("reserved", ctypes.c_ubyte * 4),
    ]


class _AllocProp(ctypes.Structure):  # CUmemAllocationProp
    _fields_ = [
        ("type", ctypes.c_int),
        ("requestedHandleTypes", ctypes.c_int),
        ("location", _Location),
        ("win32HandleMetaData", ctypes.c_void_p),
        ("allocFlags", _AllocFlags),
    ]


class _AccessDesc(ctypes.Structure):  # CUmemAccessDesc
    _fields_ = [("location", _Location), ("flags", ctypes.c_int)]


_ALLOCATION_TYPE_PINNED = 1
_LOCATION_TYPE_DEVICE = 1
_ACCESS_READ_WRITE = 3
_GRANULARITY_MINIMUM = 0


class CudaVMMError(RuntimeError):
    pass


class _CudaArrayView:
    """Exposes a raw device range to torch through __cuda_array_interface__ (no copy)."""

    def __init__(self, ptr: int, num_bytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (num_bytes,),
            "typestr": "|u1",
            "data": (ptr, False),
            "version": 3,
            "strides": None,
        }


class CudaVMMBacking:
    """Reserve the arena's addresses once; back each owned chunk with its own physical allocation."""

    def __init__(self, total_bytes: int, chunk_bytes: int, device: torch.device) -> None:
        self.cuda = _load_libcuda()
        self.device_index = device.index if device.index is not None else torch.cuda.current_device()
        torch.empty(1, device=device)  # make the primary context current on this thread
        self.prop = _AllocProp(type=_ALLOCATION_TYPE_PINNED)
        self.prop.location = _Location(_LOCATION_TYPE_DEVICE, self.device_index)
        gran = ctypes.c_size_t()
        self._check("cuMemGetAllocationGranularity", ctypes.byref(gran), ctypes.byref(self.prop), 0)
        if chunk_bytes % gran.value:
            raise CudaVMMError(
                f"KV chunk of {chunk_bytes} bytes is not a multiple of the VMM granularity {gran.value}"
            )
        self.chunk_bytes = chunk_bytes
        self.total_bytes = total_bytes
        self.base = ctypes.c_uint64()
        self._check("cuMemAddressReserve", ctypes.byref(self.base), ctypes.c_size_t(total_bytes), 0, 0, 0)
        self.handles: dict[int, ctypes.c_uint64] = {}
        self.tensor = torch.as_tensor(_CudaArrayView(self.base.value, total_bytes), device=device)

    def _check(self, fn: str, *args) -> None:
        rc = getattr(self.cuda, fn)(*args)
        if rc != 0:
            raise CudaVMMError(f"{fn} failed with CUresult {rc}")

    def map(self, chunk: int) -> None:
        if chunk in self.handles:
            return
        handle = ctypes.c_uint64()
        size = ctypes.c_size_t(self.chunk_bytes)
        self._check("cuMemCreate", ctypes.byref(handle), size, ctypes.byref(self.prop), 0)
        addr = ctypes.c_uint64(self.base.value + chunk * self.chunk_bytes)
        self._check("cuMemMap", addr, size, ctypes.c_size_t(0), handle, 0)
        access = _AccessDesc(_Location(_LOCATION_TYPE_DEVICE, self.device_index), _ACCESS_READ_WRITE)
        self._check("cuMemSetAccess", addr, size, ctypes.byref(access), ctypes.c_size_t(1))
        self.handles[chunk] = handle

    def unmap(self, chunk: int) -> None:
        handle = self.handles.pop(chunk, None)
        if handle is None:
            return
        torch.cuda.synchronize(self.device_index)  # no kernel may still read the chunk
        addr = ctypes.c_uint64(self.base.value + chunk * self.chunk_bytes)
        self._check("cuMemUnmap", addr, ctypes.c_size_t(self.chunk_bytes))
        self._check("cuMemRelease", handle)

    @property
    def mapped_bytes(self) -> int:
        return len(self.handles) * self.chunk_bytes

    def close(self) -> None:
        for chunk in list(self.handles):
            self.unmap(chunk)
        self._check("cuMemAddressFree", self.base, ctypes.c_size_t(self.total_bytes))


def _load_libcuda() -> ctypes.CDLL:
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        raise CudaVMMError(f"CUDA driver library not found: {e}") from e
    for name in ("cuMemAddressReserve", "cuMemMap", "cuMemSetAccess", "cuMemUnmap"):
        getattr(lib, name).restype = ctypes.c_int
    return lib


def create_backing(total_bytes: int, chunk_bytes: int, device: torch.device, use_vmm: bool | None = None):
    """CUDA VMM on a GPU when the driver allows it (use_vmm None = try), else a plain tensor."""
    if device.type == "cuda" and use_vmm is not False:
        try:
            return CudaVMMBacking(total_bytes, chunk_bytes, device)
        except CudaVMMError:
            if use_vmm:
                raise
    return PlainBacking(total_bytes, chunk_bytes, device)
