"""The worker's tokenizer: text <-> token ids, special tokens, chat template.

`Tokenizer` wraps a byte-level BPE `tokenizers.Tokenizer` and the metadata a serving engine needs
(BOS/EOS ids, special ids, chat template). Build it with a factory:

- `Tokenizer.from_gguf(reader)`: from an already open `gguf.GGUFReader` (the model loader reuses
  the same reader for weights, because opening one costs seconds);
- `Tokenizer.from_gguf_file(path)`: opens the reader itself;
- `Tokenizer.from_hf_dir(path)`: from a Hugging Face folder (tokenizer.json + config files).

Only byte-level tokenizers are accepted, because `token_bytes` (and so the incremental
detokenizer) relies on each token mapping to a fixed byte string.
"""

from __future__ import annotations

import functools
import json
import logging
import operator
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import gguf
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders

from services.worker.tokenizer import chat_template
from services.worker.tokenizer.gguf_vocab import build_backend, read_gguf_metadata

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's byte -> printable-character table used by byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


def _as_index(token_id: object) -> int | None:
    # Accept numpy/torch integer scalars (engines sample into tensors) but not floats or str.
    try:
        return operator.index(token_id)
    except TypeError:
        return None


def _piece_to_bytes(piece: str) -> bytes:
    # Mirrors tokenizers' ByteLevel decoder: a token maps through the byte table only if every
    # character is in it; otherwise (added tokens such as "<|日|>") its UTF-8 text is used whole.
    table = _unicode_to_byte()
    try:
        return bytes(table[ch] for ch in piece)
    except KeyError:
        return piece.encode("utf-8")


class Tokenizer:
    """Byte-level BPE tokenizer plus special-token and chat-template metadata. Immutable."""

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        bos_token_id: int | None,
        eos_token_ids: Iterable[int],
        add_bos_token: bool = False,
        chat_template: str | None = None,
        template_eos_token_id: int | None = None,
    ) -> None:
        """Prefer the factories. `template_eos_token_id` picks which EOS the template's
        `eos_token` variable names (default: the smallest of `eos_token_ids`)."""
        if not isinstance(backend.decoder, decoders.ByteLevel):
            raise ValueError(
                f"only byte-level BPE tokenizers are supported, got decoder "
                f"{type(backend.decoder).__name__}"
            )
        self._backend = backend
        self._vocab_size = backend.get_vocab_size(with_added_tokens=True)
        eos = frozenset(eos_token_ids)
        for name, ids in (("bos_token_id", [bos_token_id]), ("eos_token_ids", eos)):
            for token_id in ids:
                if token_id is not None and self._piece_or_none(token_id) is None:
                    raise ValueError(f"{name} {token_id} is not in the vocabulary")
        if add_bos_token and bos_token_id is None:
            raise ValueError("add_bos_token is set but the tokenizer has no BOS token")
        self._bos_token_id = bos_token_id
        self._eos_token_ids = eos
        self._add_bos_token = add_bos_token
        self._chat_template = chat_template
        if template_eos_token_id is None and eos:
            template_eos_token_id = min(eos)
        self._template_eos_token_id = template_eos_token_id
        # Built eagerly (about 60 ms for 49k tokens) so the first streamed request pays
        # nothing; ids with no token map to b"".
        pieces = (backend.id_to_token(i) for i in range(self._vocab_size))
        self._byte_table = tuple(b"" if p is None else _piece_to_bytes(p) for p in pieces)
        self._special_token_ids = frozenset(
            token_id for token_id, added in backend.get_added_tokens_decoder().items()
            if added.special
        )

    # ----- factories -------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, reader: gguf.GGUFReader) -> Tokenizer:
        """Build from the `tokenizer.*` metadata of an open GGUF reader (not closed here)."""
        meta = read_gguf_metadata(reader)
        eos = [i for i in (meta.eos_token_id, meta.eot_token_id, meta.eom_token_id)
               if i is not None]
        return cls(
            build_backend(meta),
            bos_token_id=meta.bos_token_id,
            eos_token_ids=eos,
            add_bos_token=meta.add_bos_token,
            chat_template=meta.chat_template,
            template_eos_token_id=meta.eos_token_id,
        )

    @classmethod
    def from_gguf_file(cls, path: str | Path) -> Tokenizer:
        """Open `path` with `gguf.GGUFReader` and build from it (seconds; prefer `from_gguf`)."""
        return cls.from_gguf(gguf.GGUFReader(path))

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """Build from a Hugging Face tokenizer folder.

        Reads tokenizer.json (required); tokenizer_config.json for bos_token, eos_token,
        add_bos_token and chat_template; the template from chat_template.jinja or
        chat_template.json when present (they take precedence, as in transformers); and
        generation_config.json's eos_token_id (int or list), which adds stop ids.
        When add_bos_token is not configured, it is inferred from tokenizer.json's
        post-processor (whether it prepends the BOS token).
        """
        folder = Path(path)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise FileNotFoundError(f"{tokenizer_file} not found")
        backend = BackendTokenizer.from_file(str(tokenizer_file))
        config = _read_json(folder / "tokenizer_config.json")
        generation = _read_json(folder / "generation_config.json")

        bos_id = _token_id(backend, config.get("bos_token"), "bos_token")
        eos_id = _token_id(backend, config.get("eos_token"), "eos_token")
        eos_ids = {eos_id} if eos_id is not None else set()
        extra = generation.get("eos_token_id")
        eos_ids.update([extra] if isinstance(extra, int) else (extra or []))

        add_bos = config.get("add_bos_token")
        if add_bos is None:
            probe = backend.encode("a", add_special_tokens=True).ids
            add_bos = bos_id is not None and probe[:1] == [bos_id]
        return cls(
            backend,
            bos_token_id=bos_id,
            eos_token_ids=eos_ids,
            add_bos_token=bool(add_bos),
            chat_template=_hf_chat_template(folder, config),
            template_eos_token_id=eos_id,
        )

    # ----- properties ------------------------------------------------------------------------

    @property
    def backend(self) -> BackendTokenizer:
        """The wrapped `tokenizers.Tokenizer` (e.g. to `save()` it as tokenizer.json)."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self._vocab_size

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def eos_token_ids(self) -> frozenset[int]:
        """Every id that ends generation (EOS, plus EOT/EOM or generation_config extras)."""
        return self._eos_token_ids

    @property
    def add_bos_token(self) -> bool:
        """Whether `encode` prepends BOS."""
        return self._add_bos_token

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Ids of special (control) tokens: the ones `skip_special_tokens` drops."""
        return self._special_token_ids

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    # ----- text <-> ids ----------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. Special-token text such as "<|im_start|>" becomes its one id.

        With `add_special_tokens` and a model whose metadata sets add_bos_token, BOS is
        prepended once: not again when the text already starts with it (chat templates that
        render `bos_token` themselves would otherwise get a double BOS).
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be str, got {type(text).__name__}")
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self._add_bos_token and ids[:1] != [self._bos_token_id]:
            ids.insert(0, self._bos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; invalid UTF-8 (e.g. a cut-off emoji) decodes to U+FFFD."""
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_piece(self, token_id: int) -> str:
        """The raw vocabulary string of `token_id` (byte-level encoded, e.g. "Ġthe")."""
        piece = self._piece_or_none(token_id)
        if piece is None:
            raise ValueError(f"token id {token_id} is not in the vocabulary")
        return piece

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes `token_id` contributes to decoded text (for incremental detokenizing)."""
        table = self._byte_table
        index = _as_index(token_id)
        if index is None or not 0 <= index < len(table):
            raise ValueError(f"token id {token_id!r} is not in the vocabulary")
        return table[index]

    def _piece_or_none(self, token_id: int) -> str | None:
        index = _as_index(token_id)
        if index is None or index < 0:
            return None
        return self._backend.id_to_token(index)

    # ----- chat ------------------------------------------------------------------------------

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """Render `messages` ([{"role", "content"}, ...]) into prompt text with the model's
        template. Raises ValueError when the model has none or the messages are invalid."""
        if self._chat_template is None:
            raise ValueError("this model has no chat template; send a raw prompt instead")
        bos = self._bos_token_id
        eos = self._template_eos_token_id
        return chat_template.render(
            self._chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=None if bos is None else self.id_to_piece(bos),
            eos_token=None if eos is None else self.id_to_piece(eos),
        )


# ----- Hugging Face folder helpers ------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as f:
        return json.load(f)


def _token_id(backend: BackendTokenizer, token: Any, name: str) -> int | None:
    """Id of a tokenizer_config special token, given as a string or {"content": ...}."""
    if isinstance(token, Mapping):
        token = token.get("content")
    if token is None:
        return None
    token_id = backend.token_to_id(token)
    if token_id is None:
        raise ValueError(f"{name} {token!r} from tokenizer_config.json is not in the vocabulary")
    return token_id


def _hf_chat_template(folder: Path, config: Mapping[str, Any]) -> str | None:
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = _read_json(folder / "chat_template.json").get("chat_template")
    if template is None:
        template = config.get("chat_template")
    if isinstance(template, list):
        # Named templates ([{"name", "template"}]): serving uses "default".
        named = {entry["name"]: entry["template"] for entry in template}
        template = named.get("default")
    return template
