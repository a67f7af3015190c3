"""Opening a model by name: whatever a ``jaxattn`` command is given as ``--model``.

A jaxattn run folder (it holds ``run.json``), a Hugging Face folder (``config.json``) or a
hub id, each with its tokenizer, and optionally with its weights stored in fewer bytes.
"""

from __future__ import annotations

from pathlib import Path


def load_any(name, *, dtype: str = "float32", quantize: str | None = None, kernel: str | None = None):
    """``(model, tokenizer, description)`` for a jaxattn run folder (it holds ``run.json``),
    a Hugging Face folder (``config.json``) or a hub id. ``dtype``: a Hugging Face model's
    parameters and computation ("auto": the checkpoint's own, ``checkpoint_dtype``); a run folder's model (trained in float32) gets its weights
    stored in that dtype (``convert_weights``). ``quantize="int8"``: int8 weights, one scale per
    output channel (``jaxattn.lm.quantize``), whatever ``dtype`` says of the weights. ``kernel``: the
    attention kernels to serve it with (``Kernels.named``; ``None`` keeps the config's, "auto")."""
    from jaxattn.lm.checkpoint import RUN_FILE, RunFolder
    from jaxattn.lm.quantize import convert_weights

    if quantize not in (None, "int8"):
        raise ValueError(f"quantize must be 'int8' or None, got {quantize!r}")
    if dtype == "auto":
        dtype = checkpoint_dtype(name)
    weights = quantize or "float32"  # how the matrices are stored (a Hugging Face dtype is the loader's)
    path = Path(name).expanduser()
    if (path / RUN_FILE).is_file():
        from jaxattn.lm.tokenizer import ByteTokenizer

        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"a run folder's weights can be stored as float32 or bfloat16, not {dtype!r}")
        model, tokenizer, description = RunFolder(path).load_model(), ByteTokenizer(), f"jaxattn run {path}"
        weights = quantize or dtype
    else:
        from jaxattn.lm.hf import LoadError, load_hf_model

        model, tokenizer = load_hf_model(name, dtype=dtype)
        if tokenizer is None:
            raise LoadError(f"{str(name)!r} has no tokenizer.json: jaxattn cannot turn text into this model's tokens")
        description = f"Hugging Face {model.config.width}-wide, {model.config.layers}-layer model {name}"
    if weights != "float32":
        model = convert_weights(model, weights)
        description += f", {weights} weights"
    if kernel is not None:
        model.use_kernels(kernel)
        description += f", {kernel} kernels"
    return model, tokenizer, description


def generation_defaults(name) -> dict:
    """The sampling a checkpoint's ``generation_config.json`` asks for, as transformers reads it,
    in jaxattn's names: with ``do_sample`` true its ``temperature``, ``top_k``, ``top_p``; without
    (transformers' default) greedy, ``temperature`` 0; and its ``max_new_tokens`` if set. ``{}``
    for a jaxattn run folder or a folder without the file."""
    import json

    path = Path(name).expanduser() / "generation_config.json"
    if not path.is_file():
        return {}
    config = json.loads(path.read_text())
    sampling = ("temperature", "top_k", "top_p") if config.get("do_sample") is True else ()
    defaults = {key: config[key] for key in (*sampling, "max_new_tokens") if config.get(key) is not None}
    if config.get("do_sample") is not True:
        defaults["temperature"] = 0.0
    if defaults.get("top_k") == 0:  # transformers' "no top-k"
        del defaults["top_k"]
    return defaults


def checkpoint_dtype(name) -> str:
    """The dtype a checkpoint was saved in (``config.json``'s ``torch_dtype``, or ``dtype`` as
    transformers 5 writes it): "float32", "bfloat16" or "float16"; "float32" for a jaxattn run
    folder, a folder that does not say, or a dtype jaxattn does not compute in."""
    import json

    path = Path(name).expanduser() / "config.json"
    if not path.is_file():
        return "float32"
    config = json.loads(path.read_text())
    saved = str(config.get("torch_dtype") or config.get("dtype") or "float32").removeprefix("torch.")
    return saved if saved in ("float32", "bfloat16", "float16") else "float32"
