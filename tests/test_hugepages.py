"""Weights in huge pages (layers/hugepages.py): same values, tied weights stay tied, and the
memory is advised for transparent huge pages where the kernel offers them."""

import torch
from engine_support import thp_eligible
from torch import nn

from services.worker.engine.layers import hugepages
from services.worker.engine.layers.linear import Embedding, Linear
from services.worker.engine.layers.quant import quantize


def test_move_weights_keeps_values_and_ties_and_asks_for_huge_pages():
    torch.manual_seed(0)
    table = quantize(torch.randn(96, 64), "q8_0")
    model = nn.Module()
    model.embed, model.head = Embedding(table), Linear(table, weight_stationary=True)  # tied, as SmolLM2's
    model.proj = Linear(quantize(torch.randn(48, 64), "q4_1"), bias=torch.randn(48))
    model.norm = nn.Parameter(torch.randn(64), requires_grad=False)
    x, ids = torch.randn(3, 64), torch.tensor([0, 5, 95])
    before = (model.proj(x), model.head(x), model.embed(ids), model.norm.clone())
    old = model.proj.packed.codes.data_ptr()

    moved = hugepages.move_weights(model)

    assert moved >= table.nbytes + model.proj.packed.nbytes
    assert model.proj.packed.codes.data_ptr() != old
    assert model.embed.packed.codes.data_ptr() == model.head.packed.codes.data_ptr()  # still one table
    ptrs = [model.norm.data_ptr(), model.proj.kernel_bias.data_ptr(), model.proj.packed.scales.data_ptr()]
    assert all(p % hugepages.ALIGN == 0 for p in ptrs)
    after = (model.proj(x), model.head(x), model.embed(ids), model.norm)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_arena_is_aligned_and_advised_for_huge_pages():
    big, small = hugepages.split([((3 << 20,), torch.uint8), ((5,), torch.float32)])
    assert big.data_ptr() % hugepages.HUGE_PAGE == 0 and small.data_ptr() == big.data_ptr() + (3 << 20)
    if hugepages.thp_mode() in ("always", "madvise"):  # elsewhere the kernel gives no huge pages to anyone
        assert thp_eligible(big.data_ptr())


def test_cpu_kv_cache_is_advised_for_huge_pages():
    """A decode reads blocks scattered over the pool: in 4 KiB pages each block cost a TLB miss."""
    from services.worker.engine.kv_cache import KVCache

    kv = KVCache(2, 2, 64, 511, 16, torch.bfloat16, torch.device("cpu"))  # 8 MiB, untouched but 2 blocks
    assert all(t.dtype == torch.bfloat16 and t.is_contiguous() for t in (*kv.k, *kv.v))
    assert kv.k[0].shape == (2, 512, 32, 32) and kv.v[1].shape == (2, 512, 8, 128)  # bfloat16: in pairs
    assert len({t.data_ptr() for t in (*kv.k, *kv.v)}) == 4  # one arena, no two tensors overlapping
    assert kv.k[0].data_ptr() % hugepages.HUGE_PAGE == 0
    assert not kv.k[1][:, 0].any() and not kv.v[0][:, kv.scratch_block].any()  # zeroed blocks
    # every block reads zero before its first write (fresh anonymous memory): zero_blocks skips the CPU pool
    assert kv.born_zero and not any(t.any() for t in (*kv.k, *kv.v))
    if hugepages.thp_mode() in ("always", "madvise"):
        assert thp_eligible(kv.v[1].data_ptr())
