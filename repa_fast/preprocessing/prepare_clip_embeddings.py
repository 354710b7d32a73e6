"""Encode one prompt per class with SD's CLIP text encoder into the CLIP table.

    python -m repa_fast.preprocessing.prepare_clip_embeddings --class-names imagenet_class_index.json \
        --clip SD15_DIR --output-path clip_embeddings_1001.pt [--template "a photo of a {name}"]

``--clip`` is a local folder holding a CLIPTextModel and a CLIPTokenizer, either side by side or as
an SD pipeline's ``text_encoder/`` and ``tokenizer/`` subfolders; nothing is downloaded. The class
names come from a class-index file (``repa_fast.preprocessing.class_index``: ImageNet's index or a list
of names; underscores become spaces). Row c is ``template`` with class c's name, row num_classes is the
empty prompt "" (the null class of classifier-free guidance). Each prompt is padded to 77 tokens and
encoded as SD-1.5 encodes prompts (``last_hidden_state``, no attention mask), giving fp16
[num_classes + 1, 77, hidden], saved as .pt or .safetensors (by the output's extension). A
``<output>.json`` beside it lists the prompts and the source. An existing output is kept unless
``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from tqdm import tqdm

from repa_fast.data.cache import clip_prompts_path, load_clip_table
from repa_fast.errors import InputError, MissingFileError, run_main
from repa_fast.preprocessing.class_index import load_class_index
from repa_fast.preprocessing.image_cache import DTYPES, resolve_device


def load_text_encoder(path, device: torch.device, dtype: torch.dtype):
    """(CLIPTokenizer, CLIPTextModel in eval mode on ``device``, the folder they came from)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    root = Path(path)
    if not root.is_dir():
        raise MissingFileError(f"--clip {str(root)!r} is not a folder")
    model_dir = root / "text_encoder" if (root / "text_encoder").is_dir() else root
    tokenizer_dir = root / "tokenizer" if (root / "tokenizer").is_dir() else root
    if not (model_dir / "config.json").is_file():
        raise MissingFileError(f"--clip {str(root)!r}: no config.json in {str(model_dir)!r} (expected a "
                               f"CLIPTextModel folder or an SD folder with text_encoder/)")
    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    model = CLIPTextModel.from_pretrained(str(model_dir), local_files_only=True)
    return tokenizer, model.to(device=device, dtype=dtype).eval().requires_grad_(False), str(root.resolve())


def class_prompts(class_names: list[str], template: str) -> list[str]:
    """One prompt per class, then the empty prompt (the null class)."""
    if "{name}" not in template:
        raise InputError(f"--template {template!r} has no '{{name}}' placeholder")
    return [template.replace("{name}", name.replace("_", " ")) for name in class_names] + [""]


def encode_prompts(tokenizer, model, prompts: list[str], device: torch.device, batch_size: int = 64,
                   max_length: int = 77) -> torch.Tensor:
    """fp16 [len(prompts), max_length, hidden] on the CPU."""
    rows = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="prepare_clip_embeddings", unit="batch"):
        tokens = tokenizer(prompts[start:start + batch_size], padding="max_length", max_length=max_length,
                           truncation=True, return_tensors="pt")
        with torch.inference_mode():
            hidden = model(tokens.input_ids.to(device)).last_hidden_state
        rows.append(hidden.to(torch.float16).cpu())
    return torch.cat(rows)


def save_table(table: torch.Tensor, path: Path, info: dict) -> None:
    """Write ``path`` (.pt or .safetensors) and ``<path>.json``, each through a temporary file."""
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({"clip_embeddings": table.contiguous()}, str(tmp),
                  metadata={k: json.dumps(v) for k, v in info.items()})
    else:
        torch.save(table.contiguous(), tmp)
    os.replace(tmp, path)
    side = clip_prompts_path(path)
    side.with_name(side.name + ".tmp").write_text(json.dumps(info, indent=1), encoding="utf-8")
    os.replace(side.with_name(side.name + ".tmp"), side)


def prepare_clip_embeddings(args: argparse.Namespace) -> torch.Tensor:
    names = [name for _, name in load_class_index(args.class_names)]
    prompts = class_prompts(names, args.template)
    out = Path(args.output_path)
    if out.suffix not in (".pt", ".pth", ".safetensors"):
        raise InputError(f"--output-path {str(out)!r}: use a .pt or .safetensors file")
    if out.exists() and not args.overwrite:
        table = load_clip_table(out, num_rows=len(prompts))
        print(f"prepare_clip_embeddings: {out} exists ({list(table.shape)}), kept (--overwrite rebuilds it)")
        return table
    device = resolve_device(args.device)
    tokenizer, model, source = load_text_encoder(args.clip, device, DTYPES[args.dtype])
    table = encode_prompts(tokenizer, model, prompts, device, args.batch_size, args.max_length)
    out.parent.mkdir(parents=True, exist_ok=True)
    info = {"created_by": "repa_fast.preprocessing.prepare_clip_embeddings", "source": source,
            "class_names": str(Path(args.class_names).resolve()), "template": args.template,
            "shape": list(table.shape), "dtype": "float16", "null_row": len(prompts) - 1, "prompts": prompts}
    save_table(table, out, info)
    print(f"prepare_clip_embeddings: wrote {list(table.shape)} to {out}")
    return table


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--class-names", "--imagenet-classes", "--imagenet_classes", required=True,
                   help="class-index JSON: ImageNet's index or a list of names")
    p.add_argument("--clip", required=True, help="local folder: SD pipeline (text_encoder/, tokenizer/) or CLIP text")
    p.add_argument("--output-path", "--output_path", required=True, help=".pt or .safetensors")
    p.add_argument("--template", default="a photo of a {name}")
    p.add_argument("--max-length", type=int, default=77)
    p.add_argument("--batch-size", "--batch_size", type=int, default=64)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--overwrite", action="store_true", help="rebuild an existing output")
    return p


def main(argv: list[str] | None = None) -> None:
    run_main("repa-fast-prepare-clip", prepare_clip_embeddings, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
