"""Block hashes of a token sequence: the one definition the worker's prefix cache and the gateway's index share.

Block i of a sequence (tokens i*B .. i*B+B-1 for block size B) is identified by hash(hash of block i-1, its
tokens), so equal hashes mean equal prefixes up to and including that block. Python's hash of a tuple of ints
is not salted per process (PYTHONHASHSEED salts str and bytes only), so a gateway and a worker running the same
Python agree on every hash without sending tokens around.
"""

from __future__ import annotations

from collections.abc import Sequence

NO_HASH = -1  # the parent of a sequence's first block


def chain_hash(parent: int, token_ids: tuple[int, ...]) -> int:
    return hash((parent, token_ids))


def block_hashes(token_ids: Sequence[int], block_size: int, num_blocks: int | None = None) -> list[int]:
    """The chained hashes of token_ids' full blocks (only the first num_blocks when given)."""
    if block_size <= 0:
        return []
    n = len(token_ids) // block_size if num_blocks is None else min(num_blocks, len(token_ids) // block_size)
    hashes: list[int] = []
    parent = NO_HASH
    for i in range(n):
        parent = chain_hash(parent, tuple(token_ids[i * block_size : (i + 1) * block_size]))
        hashes.append(parent)
    return hashes


def cacheable_blocks(num_prompt_tokens: int, block_size: int) -> int:
    """Prompt blocks a worker can serve from its cache: every full block but the one holding the last token,
    which is always computed (its logits give the first output token)."""
    return (num_prompt_tokens - 1) // block_size if block_size > 0 else 0
