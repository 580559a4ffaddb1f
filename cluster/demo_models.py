"""The demo's two backbones: SmolLM2-135M-Instruct as a Hugging Face folder, and a perturbed copy of it.

The paper compares a base model with its RLVR-tuned child. No such pair ships on the package index, so the demo
makes a stand-in child: the same weights with seeded Gaussian noise on every weight matrix, ``scale`` times each
matrix's own standard deviation (the token embeddings are left alone, as RLVR barely moves them). At 0.15 this
keeps the global geometry (linear CKA about 0.9 over the CoT traces) and reorganises the local one (k-NN overlap
about 0.5 in the last layers): RLVR's profile in the paper, made in seconds and reproducible from the seed.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

__all__ = ["DEMO_MODEL", "materialize_backbone", "perturbed_copy"]

DEMO_MODEL = "packaged:smollm2-135m-instruct"
_DONE = ".hrsa-materialized"  # written last into a saved folder: a torn save is redone


def materialize_backbone(out: Path, console: Console) -> Path:
    """SmolLM2 as a Hugging Face folder (float32, dequantised from its GGUF), written once."""
    import contextlib
    import io

    folder = out / "models" / "smollm2-135m-instruct"
    if (folder / _DONE).exists():
        return folder
    from hrsa.extract.models import load_model, parse_model_spec

    console.print(f"[bold]setup[/] saving {DEMO_MODEL} (GGUF, dequantised: ~30 s) as a Hugging Face folder: {folder}")
    # transformers draws a tqdm bar while dequantising, one carriage-returned line per tensor in a log; the line
    # above says what happens.
    with contextlib.redirect_stderr(io.StringIO()):
        loaded = load_model(parse_model_spec(DEMO_MODEL, dtype="float32"), device="cpu")
    loaded.model.save_pretrained(folder)
    loaded.tokenizer.save_pretrained(folder)
    (folder / _DONE).write_text(DEMO_MODEL + "\n")  # last: a torn save is redone
    return folder


def perturbed_copy(backbone: Path, folder: Path, *, scale: float, seed: int, console: Console) -> Path:
    """``backbone``'s folder with ``W + scale * std(W) * N(0, 1)`` on each weight matrix but the token embeddings.

    Args:
        backbone: a Hugging Face folder with one ``model.safetensors``.
        folder: where the copy goes (written once per scale and seed; a torn copy is redone).
        scale: the noise's share of each matrix's standard deviation.
        seed: seeds the noise, so the copy is the same on every machine.
    """
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    stamp = f"perturbed {backbone.name} scale={scale} seed={seed}\n"
    if (folder / _DONE).exists() and (folder / _DONE).read_text() == stamp:
        return folder
    console.print(f"[bold]setup[/] a perturbed copy of SmolLM2 (the stand-in for an RLVR-tuned child: noise "
                  f"{scale:g} x each weight matrix's std, seed {seed}): {folder}")
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(backbone, folder, ignore=shutil.ignore_patterns(_DONE, "model.safetensors"))
    weights = load_file(backbone / "model.safetensors")
    generator = torch.Generator().manual_seed(seed)
    for name in sorted(weights):  # sorted: the same draws for the same matrix on every machine
        w = weights[name]
        if w.ndim == 2 and "embed" not in name:
            noise = torch.randn(w.shape, generator=generator, dtype=torch.float32)  # (out, in)
            weights[name] = (w.float() + scale * w.float().std() * noise).to(w.dtype).contiguous()
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / _DONE).write_text(stamp)
    return folder
