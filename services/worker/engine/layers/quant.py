"""Quantized weight formats, packed for the CPU kernels, with a PyTorch reference dequantiser.

Every format is codes (4 or 8 bits) in groups of G input columns with one float16 scale per group
and output row, plus a float16 min (asymmetric formats) or a 16-entry code book (NF4):

| format | bits | group | weight value                  | source                                  |
|--------|------|-------|-------------------------------|-----------------------------------------|
| q4_1   | 4    | 32    | scale * code + min            | GGUF blocks as stored, or quantised here |
| q8_0   | 8    | 32    | scale * code (code signed)    | GGUF blocks as stored, or quantised here |
| int4   | 4    | 32*   | scale * code + min            | any float checkpoint (round to nearest)  |
| int8   | 8    | K     | scale * code (per out channel)| any float checkpoint                     |
| nf4    | 4    | 64    | scale * NF4[code]             | any float checkpoint (bitsandbytes' book)|

*int4/64, int4/128, int8/32, ...: another group size (a multiple of 2 dividing the input width).

Packing (the kernels' layout): output rows in panels of 16; inside a panel, for each input column
(8-bit) or pair of columns (4-bit, low nibble = even column), the codes of the 16 rows side by side.
Rows are padded to a multiple of 16 with zero scales.

The "quad" layout (same bytes, reordered at load for the integer units, csrc/q8_gemm.cpp): inside a
panel, per 4 input columns (8-bit) or 8 (4-bit: columns k..k+3 in the low nibbles, k+4..k+7 in the high),
the 16 rows side by side, each row's 4 codes in one 32-bit lane: an AMX B tile / VPDPBUSD operand.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

PANEL = 16
QUANTIZED = ("int8", "int4", "nf4")  # what `--quantization` quantises a float checkpoint to (models/weights.py)
FORMATS = ("q4_1", "q8_0", *QUANTIZED)  # every packed format: GGUF's blocks (q8_0 also holds 8-bit embeddings)
# bitsandbytes' NF4 code book (quantiles of N(0, 1) scaled to [-1, 1])
NF4 = (-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
       -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
       0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0)


@dataclass(slots=True, eq=False)
class PackedWeight:
    fmt: str
    out_features: int
    in_features: int
    bits: int
    group: int
    codes: torch.Tensor  # uint8 [panels, in_features * bits / 8 * 16]
    scales: torch.Tensor  # float16 [panels, in_features / group, 16]
    mins: torch.Tensor | None = None  # float16, same shape (asymmetric formats)
    table: torch.Tensor | None = None  # float32 [16] (nf4)
    copies: dict = field(default_factory=dict, repr=False)  # device -> this weight there (a tied head moves once)
    layout: str = "panel"  # or "quad" (see the top of the file)

    @property
    def panels(self) -> int:
        return self.codes.shape[0]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.scales, self.mins, self.table)
                   if t is not None)

    def dequantize(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """float32 [out_features, in_features], or only `rows` (an embedding lookup): the kernels' reference."""
        if rows is None:
            rows = torch.arange(self.out_features, device=self.codes.device)
        panel, lane = rows // PANEL, rows % PANEL
        p, k = self.panels, self.in_features
        if self.layout == "quad":  # [panel, columns / 4 or / 8, row, 4]
            b = self.codes.view(p, k // (4 if self.bits == 8 else 8), PANEL, 4)[panel, :, lane]
            if self.bits == 8:
                c = b.reshape(len(rows), k).view(torch.int8).float()
            else:
                b = b.to(torch.int32)
                c = torch.stack((b & 15, b >> 4), dim=-2).reshape(len(rows), k).float()
        elif self.bits == 8:
            c = self.codes.view(torch.int8).view(p, k, PANEL)[panel, :, lane].float()
        else:
            b = self.codes.view(p, k // 2, PANEL)[panel, :, lane].to(torch.int32)
            c = torch.stack((b & 15, b >> 4), dim=-1).reshape(len(rows), k)
            c = self.table[c] if self.table is not None else c.float()
        w = c.view(len(rows), -1, self.group) * self.scales[panel, :, lane].float()[..., None]
        if self.mins is not None:
            w = w + self.mins[panel, :, lane].float()[..., None]
        return w.reshape(len(rows), k)

    def to(self, device: torch.device) -> PackedWeight:
        """The same weight with its tensors on `device` (their dtypes kept), in the panel layout; one copy
        per device, so the embedding and a tied LM head still share theirs."""
        device = torch.device(device)
        if device == self.codes.device:
            return self
        if str(device) not in self.copies:
            def move(t: torch.Tensor | None) -> torch.Tensor | None:
                return None if t is None else t.to(device)

            self.copies[str(device)] = PackedWeight(self.fmt, self.out_features, self.in_features, self.bits,
                                                    self.group, move(self.panel_codes()), move(self.scales),
                                                    move(self.mins), move(self.table))
        return self.copies[str(device)]

    def panel_codes(self) -> torch.Tensor:
        """The codes in the panel layout, whatever this weight's layout is."""
        if self.layout == "panel":
            return self.codes
        p, k = self.panels, self.in_features
        q = self.codes.view(p, -1, PANEL, 4).transpose(2, 3)  # [p, k / 8 or / 4, 4 columns, 16 rows]
        if self.bits == 8:
            return q.reshape(p, -1).contiguous()
        c = torch.stack((q & 15, q >> 4), dim=2).reshape(p, k, PANEL)  # columns in order
        return (c[:, 0::2] | (c[:, 1::2] << 4)).reshape(p, -1).contiguous()

    def use_quads(self) -> PackedWeight:
        """Reorder the codes into the quad layout, in place (every module sharing this weight sees it)."""
        if self.layout == "quad":
            return self
        p, k = self.panels, self.in_features
        if self.bits == 8:
            q = self.codes.view(p, k // 4, 4, PANEL)
        else:
            b = self.codes.view(p, k // 2, PANEL)
            c = torch.stack((b & 15, b >> 4), dim=2).reshape(p, k // 8, 2, 4, PANEL)  # columns k..k+3, k+4..k+7
            q = c[:, :, 0] | (c[:, :, 1] << 4)
        self.codes, self.layout = q.transpose(2, 3).reshape(p, -1).contiguous(), "quad"
        return self

    def use_panels(self) -> PackedWeight:
        """Back to the panel layout (the fp32 kernel's), in place."""
        self.codes, self.layout = self.panel_codes(), "panel"
        return self

    def unpack(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """The inverse of `pack`: codes [N, K] uint8, scales (and mins) [N, K / group] float16."""
        n, p, k = self.out_features, self.panels, self.in_features
        c = self.panel_codes().numpy().reshape(p, -1, PANEL)
        if self.bits == 4:
            c = np.stack((c & np.uint8(15), c >> np.uint8(4)), axis=2).reshape(p, k, PANEL)
        codes = np.ascontiguousarray(c.transpose(0, 2, 1).reshape(p * PANEL, k)[:n])

        def rows(t: torch.Tensor | None) -> np.ndarray | None:
            return None if t is None else np.ascontiguousarray(t.numpy().transpose(0, 2, 1).reshape(p * PANEL, -1)[:n])

        return codes, rows(self.scales), rows(self.mins)


def pack(fmt: str, codes: np.ndarray | torch.Tensor, scales: np.ndarray | torch.Tensor,
         mins: np.ndarray | torch.Tensor | None, bits: int, group: int) -> PackedWeight:
    """codes [N, K] uint8 (4-bit: 0..15; 8-bit: int8 viewed as uint8), scales / mins [N, K / group] float16;
    numpy arrays or tensors (packed on the tensors' device)."""
    codes, scales = torch.as_tensor(codes), torch.as_tensor(scales)
    mins = None if mins is None else torch.as_tensor(mins)
    n, k = codes.shape
    panels = -(-n // PANEL)
    pad = panels * PANEL - n

    def padded(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, t.new_zeros((pad, t.shape[1]))]) if pad else t

    c = padded(codes).reshape(panels, PANEL, k).transpose(1, 2)  # [panels, K, 16]
    if bits == 4:
        c = c[:, 0::2] | (c[:, 1::2] << 4)
    c = c.contiguous().reshape(panels, -1)

    def panel(t: torch.Tensor) -> torch.Tensor:
        return padded(t).reshape(panels, PANEL, -1).transpose(1, 2).contiguous()

    table = torch.tensor(NF4, dtype=torch.float32, device=codes.device) if fmt == "nf4" else None
    return PackedWeight(fmt, n, k, bits, group, c, panel(scales), None if mins is None else panel(mins), table)


DEFAULT_GROUP = {"q4_1": 32, "q8_0": 32, "int4": 32, "int8": 0, "nf4": 64}  # int8: 0 = one group per row


def split_format(spec: str) -> tuple[str, int]:
    """'int4' -> ('int4', 32); 'int4/128' -> ('int4', 128): a format and its group size (0 = per output row)."""
    fmt, _, group = spec.partition("/")
    if fmt not in FORMATS or (group and not group.isdigit()):
        raise ValueError(f"unknown weight format {spec!r}: supported are {', '.join(FORMATS)} (int4/64: a group size)")
    return fmt, int(group) if group else DEFAULT_GROUP[fmt]


def check_shape(fmt: str, k: int, group: int) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r}: supported are {', '.join(FORMATS)}")
    if group < 2 or k % group:
        raise ValueError(f"{fmt}: in_features {k} is not a multiple of the group size {group}")


def quantize(weight: torch.Tensor, fmt: str) -> PackedWeight:
    """Quantize a float [N, K] weight to `fmt` (optionally with its group size: int4/128), rounding to nearest
    as llama.cpp and bitsandbytes do; float32 math on the weight's device (a GPU quantizes a 1.5B model in
    seconds), packed there."""
    n, k = weight.shape
    fmt, group = split_format(fmt)
    group = group or k
    check_shape(fmt, k, group)
    w = weight.detach().float().reshape(n, k // group, group)

    def inverse(d: torch.Tensor) -> torch.Tensor:
        d = d.float()
        return torch.where(d != 0, 1.0 / torch.where(d != 0, d, 1.0), 0.0)

    if fmt in ("q4_1", "int4"):
        lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
        d, m = ((hi - lo) / 15).half(), lo.half()
        q = torch.trunc((w - m.float()) * inverse(d) + 0.5).clamp_(0, 15).to(torch.uint8)
        return pack(fmt, q.reshape(n, k), d[..., 0], m[..., 0], 4, group)
    if fmt in ("q8_0", "int8"):
        d = (w.abs().amax(-1, keepdim=True) / 127).half()
        q = torch.round(w * inverse(d)).clamp_(-127, 127).to(torch.int8).view(torch.uint8)
        return pack(fmt, q.reshape(n, k), d[..., 0], None, 8, group)
    d = w.abs().amax(-1, keepdim=True).half()  # nf4: absmax per group
    book = torch.tensor(NF4, dtype=torch.float32, device=w.device)  # sorted: the nearest entry lies between midpoints
    q = torch.searchsorted((book[1:] + book[:-1]) / 2, (w * inverse(d)).contiguous()).to(torch.uint8)
    return pack(fmt, q.reshape(n, k), d[..., 0], None, 4, group)


GGUF_FORMATS = {"Q4_1": "q4_1", "Q8_0": "q8_0"}


def from_gguf(type_name: str, raw: np.ndarray, n: int, k: int) -> PackedWeight:
    """A GGUF tensor's blocks as stored (raw: uint8 [n, row bytes]) -> the same values, packed."""
    if type_name not in GGUF_FORMATS:
        raise ValueError(f"GGUF tensor type {type_name} is not supported: tokenmill reads "
                         f"{', '.join(GGUF_FORMATS)} blocks (and F32 / F16 tensors)")
    check_shape(GGUF_FORMATS[type_name], k, 32)
    blocks = raw.reshape(n, k // 32, -1)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    if type_name == "Q8_0":
        return pack("q8_0", blocks[..., 2:34].reshape(n, k), d, None, 8, 32)
    m = blocks[..., 2:4].copy().view(np.float16)[..., 0]
    qs = blocks[..., 4:20]  # byte j: weight j (low nibble) and weight j + 16 (high nibble)
    q = np.concatenate([qs & np.uint8(15), qs >> np.uint8(4)], axis=-1)
    return pack("q4_1", q.reshape(n, k), d, m, 4, 32)
