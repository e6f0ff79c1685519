"""The paged K/V pool, one K and one V tensor per layer, in the layout of the kernels that read it:

- CPU (C++ kernels): K as [kv_heads, blocks, head_dim, block_size] (each block stored transposed, so one
  vector load gives one dimension of W consecutive keys: the attention kernel's scores need no horizontal
  sums) and V as [kv_heads, blocks, block_size, head_dim]; a bfloat16 cache in pairs, the operand of the
  bfloat16 dot product (`cpu_shapes`, `to_cpu_layout`);
- Triton (CUDA): K and V as [blocks, kv_heads, block_size, head_dim] (gpu/attention.py says why).

One block past the pool (`scratch_block`) is never handed out: padded rows of a captured decode step
write their K/V there.
"""

from __future__ import annotations

import re

import torch

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def parse_kv_memory(spec: str, device: torch.device) -> int:
    """'0.25' = a quarter of free memory; '2GiB', '512MB', '1000000' = bytes."""
    text = str(spec).strip().lower()
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([a-z]*)", text)
    if m is None or m.group(2) not in _UNITS:
        raise ValueError(f"--kv-cache-memory {spec!r}: use a fraction like 0.25 or a size like 2GiB")
    value = float(m.group(1))
    if not m.group(2) and value <= 1.0:
        return int(value * free_memory_bytes(device))
    return int(value * _UNITS[m.group(2)])


KV_CACHE_DTYPES = ("auto", "float16", "bfloat16")  # --kv-cache-dtype: auto = the model's dtype (model_runner.py)


def cpu_shapes(kv_heads: int, blocks: int, head_dim: int, block_size: int,
               dtype: torch.dtype) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """One layer's K and V shapes for the C++ attention. bfloat16: K [.., head_dim / 2, block_size, 2] and V
    [.., block_size / 2, head_dim, 2] (dimension pairs of a key, key pairs of a dimension), the last two
    dimensions merged."""
    if dtype == torch.bfloat16:
        if block_size % 2:
            raise ValueError(f"a bfloat16 KV cache stores keys in pairs: --block-size {block_size} must be even")
        return (kv_heads, blocks, head_dim // 2, 2 * block_size), (kv_heads, blocks, block_size // 2, 2 * head_dim)
    return (kv_heads, blocks, head_dim, block_size), (kv_heads, blocks, block_size, head_dim)


def to_cpu_layout(k: torch.Tensor, v: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """K [kv_heads, blocks, D, BS] and V [kv_heads, blocks, BS, D] as a `dtype` cache in cpu_shapes' layout."""
    k, v = k.to(dtype), v.to(dtype)
    if dtype != torch.bfloat16:
        return k.contiguous(), v.contiguous()
    h, n, d, bs = k.shape
    cpu_shapes(h, n, d, bs, dtype)  # an odd block size: refused there
    return (k.view(h, n, d // 2, 2, bs).transpose(3, 4).reshape(h, n, d // 2, 2 * bs),
            v.view(h, n, bs // 2, 2, d).transpose(3, 4).reshape(h, n, bs // 2, 2 * d))


class KVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device, triton: bool = False) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.dtype, self.device, self.triton = dtype, device, triton
        self.scratch_block = num_blocks
        blocks = num_blocks + 1
        self._block_dim = 0 if triton else 1
        if triton:
            shape_k = shape_v = (blocks, num_kv_heads, block_size, head_dim)
        else:
            shape_k, shape_v = cpu_shapes(num_kv_heads, blocks, head_dim, block_size, dtype)
        # uninitialised: pages are only touched (and counted in RSS) once a block is written. On a CPU in 2 MiB
        # pages (hugepages.py): a decode reads each sequence's blocks scattered over the pool, and in 4 KiB pages
        # every block (4 KiB of K, 4 KiB of V in fp32) cost a TLB miss: attention over 32 sequences' caches
        # ran 1.2x slower (README, KV cache precision)
        if torch.device(device).type == "cpu":
            from services.worker.engine.layers import hugepages

            tensors = hugepages.split([(shape_k, dtype), (shape_v, dtype)] * num_layers)
            self.k, self.v = tensors[0::2], tensors[1::2]
            # the arena is fresh anonymous memory, which the OS hands out zeroed: its blocks need no clearing
            # (60 index_fill_ a fresh block, 0.2-0.4 ms, were 2 a step at batch 32 while a new worker fills its pool)
            self.born_zero = True
        else:
            self.k = [torch.empty(shape_k, dtype=dtype, device=device) for _ in range(num_layers)]
            self.v = [torch.empty(shape_v, dtype=dtype, device=device) for _ in range(num_layers)]
            self.born_zero = False
        self.zero_blocks([0, self.scratch_block])  # block 0 pads decode batches of the PyTorch path

    @property
    def scratch_slot(self) -> int:
        return self.scratch_block * self.block_size

    def zero_blocks(self, block_ids: list[int]) -> None:
        """Clear never-used blocks once: masked attention still multiplies their values by 0, and NaN * 0 = NaN."""
        if not block_ids or self.born_zero:
            return
        idx = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        for t in (*self.k, *self.v):
            t.index_fill_(self._block_dim, idx, 0.0)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks (source, destination) in every layer: copy-on-write of forked samples' blocks."""
        src = torch.tensor([a for a, _ in pairs], dtype=torch.long, device=self.device)
        dst = torch.tensor([b for _, b in pairs], dtype=torch.long, device=self.device)
        for t in (*self.k, *self.v):
            t.index_copy_(self._block_dim, dst, t.index_select(self._block_dim, src))

    @staticmethod
    def bytes_per_block(num_layers: int, num_kv_heads: int, head_dim: int, block_size: int,
                        dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * block_size * torch.finfo(dtype).bits // 8

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [T, kv_heads, head_dim] into their slots (the PyTorch path; the kernels have their own)."""
        blocks, offsets = slots // self.block_size, slots % self.block_size
        if self.triton:
            self.k[layer][blocks, :, offsets] = k.to(self.dtype)
            self.v[layer][blocks, :, offsets] = v.to(self.dtype)
            return
        self.k[layer][:, blocks, :, offsets] = k.to(self.dtype)
        self.v[layer][:, blocks, offsets] = v.transpose(0, 1).to(self.dtype)

    def gather(self, layer: int, block_ids: torch.Tensor, which: str) -> torch.Tensor:
        """K or V of the listed blocks as [kv_heads, len(block_ids) * block_size, head_dim] (a copy)."""
        if self.triton:
            blocks = (self.k if which == "k" else self.v)[layer].index_select(0, block_ids).transpose(0, 1)
        elif which == "k":
            blocks = self.k[layer].index_select(1, block_ids).transpose(2, 3)
        else:
            blocks = self.v[layer].index_select(1, block_ids)
        return blocks.reshape(self.num_kv_heads, -1, self.head_dim)
