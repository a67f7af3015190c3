"""A checkpoint's tokenizer as transformers applies it: chapter 6 of reading a checkpoint.

``HFTokenizer``: ``tokenizer.json`` through the ``tokenizers`` library, with the settings of
``tokenizer_config.json`` that transformers honours; the chat template rendered as
transformers renders it; ``stop_ids``: the ids that end generation.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jaxattn.lm.hf.config import LoadError, read_hf_config

# ------------------------------------------------------------------ 6. the tokenizer

NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _token_text(value):
    """A special token as ``tokenizer_config.json`` writes it: a string or ``{"content": ...}``."""
    return value.get("content") if isinstance(value, dict) else value


class HFTokenizer:
    """A checkpoint's tokenizer as ``transformers`` applies it, with the interface of jaxattn's
    byte tokenizer: ``encode(text) -> int32 [N]``, ``decode(ids) -> str``, ``label(id)``,
    ``vocab_size``, ``stop_ids``.

    The rule is "the same ids as ``AutoTokenizer.from_pretrained(folder)(text)``": the
    ``tokenizer.json`` pipeline with its post-processor (the BOS/EOS template), whatever
    ``tokenizer_config.json``'s ``add_bos_token``/``add_eos_token`` say: transformers 5 (5.24 and
    5.25 checked) applies neither flag when it loads a folder (transformers 4's fast Llama
    tokenizer rebuilt the template from them; the checkpoints it saved carry a template and
    flags that agree, so their ids are the same either way); ``decode`` skips special tokens by default and cleans up spaces
    only where transformers would (``clean_up_tokenization_spaces``, not for BPE models).
    ``apply_chat_template`` renders the checkpoint's chat template as transformers renders it.
    ``stop_ids``: the tokens that end a sequence (``generation_config.json``'s ``eos_token_id``,
    else ``config.json``'s; an int or a list).
    """

    def __init__(self, tokenizer, config: dict | None = None, *, chat_template: str | None = None,
                 stop_ids: tuple[int, ...] = (), pad_id: int | None = None):
        self.tokenizer = tokenizer
        config = config or {}
        self.special_tokens = {name: _token_text(config[name]) for name in NAMED_SPECIAL_TOKENS
                               if _token_text(config.get(name)) is not None}
        missing = [token for token in self.special_tokens.values() if tokenizer.token_to_id(token) is None]
        if missing:  # transformers adds named special tokens the vocabulary lacks
            tokenizer.add_special_tokens(missing)
        self.clean_up_spaces = bool(config.get("clean_up_tokenization_spaces", False)) and \
            json.loads(tokenizer.to_str())["model"]["type"] != "BPE"
        self.chat_template = chat_template
        self.stop_ids = tuple(stop_ids)
        self.pad_id = pad_id

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @property
    def special_ids(self) -> tuple[int, ...]:
        """The ids of the special tokens (BOS, EOS, chat markers ...), which text never holds."""
        return tuple(sorted(i for i, token in self.tokenizer.get_added_tokens_decoder().items() if token.special))

    def encode(self, text: str, *, add_special_tokens: bool = True) -> np.ndarray:
        """``text`` -> int32 ``[N]`` ids, with the checkpoint's special tokens (BOS ...) unless
        ``add_special_tokens=False`` (a rendered chat already holds them)."""
        return np.asarray(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids, np.int32)

    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        text = self.tokenizer.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=skip_special_tokens)
        if self.clean_up_spaces:
            for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                                  (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(before, after)
        return text

    def label(self, token: int) -> str:
        """How one token reads on its own (spaces shown as ␣)."""
        text = self.tokenizer.decode([int(token)], skip_special_tokens=False)
        return (text or self.tokenizer.id_to_token(int(token)) or "?").replace(" ", "␣").replace("\n", "\\n")

    def apply_chat_template(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        """The conversation as the model was trained to read it: the checkpoint's Jinja chat
        template, rendered as transformers renders it (a sandbox, ``trim_blocks``,
        ``lstrip_blocks``, ``raise_exception``, ``strftime_now``, the special tokens as variables)."""
        if self.chat_template is None:
            raise LoadError("this checkpoint has no chat template (no chat_template.jinja, and none in "
                            "tokenizer_config.json): it is not an instruct model; use --prompt instead of --chat")
        return render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    **self.special_tokens)

    def encode_chat(self, messages: list[dict], *, add_generation_prompt: bool = True) -> np.ndarray:
        """The rendered conversation's ids; it already holds its special tokens, so none are added (no double BOS)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt),
                           add_special_tokens=False)


def render_chat_template(template: str, messages: list[dict], *, add_generation_prompt: bool = True, **variables) -> str:
    """Renders a Hugging Face chat template: Jinja in an immutable sandbox with ``trim_blocks``
    and ``lstrip_blocks``, loop controls, a ``tojson`` that keeps non-ASCII text, and the
    globals chat templates call (``raise_exception``, ``strftime_now``)."""
    import datetime

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda format: datetime.datetime.now().strftime(format)
    try:
        return environment.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                                        **variables)
    except jinja2.exceptions.TemplateError as error:
        raise LoadError(f"the chat template could not be rendered: {error}") from error


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, json.JSONDecodeError) as error:
        raise LoadError(f"{str(path)!r} is unreadable: {error}") from error


def _chat_template(folder: Path, config: dict) -> str | None:
    """``chat_template.jinja`` (what transformers saves now), else ``chat_template.json``, else
    ``tokenizer_config.json``'s ``chat_template`` (a string, or named templates: "default")."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    template = read_json(folder / "chat_template.json").get("chat_template") or config.get("chat_template")
    if isinstance(template, list):
        named = {entry.get("name"): entry.get("template") for entry in template}
        template = named.get("default")
    return template


def stop_ids(folder: Path, hf: dict) -> tuple[tuple[int, ...], int | None]:
    """``(eos ids, pad id)`` for generation, as transformers reads them: ``generation_config.json``
    when the folder has one (its ``eos_token_id`` may be null: then nothing stops early), else
    ``config.json`` (of the text model of a multimodal checkpoint too)."""
    path = Path(folder) / "generation_config.json"
    sources = (read_json(path),) if path.is_file() else (hf, hf.get("text_config") or {})
    eos = next((source["eos_token_id"] for source in sources if source.get("eos_token_id") is not None), None)
    pad = next((source["pad_token_id"] for source in sources if source.get("pad_token_id") is not None), None)
    eos = () if eos is None else tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
    return tuple(int(i) for i in eos), pad if pad is None else int(pad)


def load_tokenizer(folder: Path, hf: dict | None = None):
    """The folder's ``HFTokenizer`` (``tokenizer.json`` and, when present, ``tokenizer_config.json``,
    the chat template, the stop tokens), or ``None`` without a ``tokenizer.json``."""
    folder = Path(folder)
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        backend = Tokenizer.from_file(str(path))
    except Exception as error:
        raise LoadError(f"{str(path)!r} is not a readable tokenizer: {error}") from error
    config = read_json(folder / "tokenizer_config.json")
    eos, pad = stop_ids(folder, hf if hf is not None else read_hf_config(folder))
    return HFTokenizer(backend, config, chat_template=_chat_template(folder, config), stop_ids=eos, pad_id=pad)
