"""Render a model's jinja2 chat template the way `transformers.apply_chat_template` does.

The environment matches transformers': a sandboxed, immutable jinja2 environment (templates come
from model files, which are untrusted input) with `trim_blocks`/`lstrip_blocks`, the
`loopcontrols` extension, a `raise_exception` global, `strftime_now`, and a `tojson` that does not
HTML-escape. Each distinct template source is compiled once and cached.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, NoReturn

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

logger = logging.getLogger(__name__)


class ChatTemplateError(ValueError):
    """The messages were rejected, either by validation here or by the template itself."""


def _raise_exception(message: str) -> NoReturn:
    # Templates call this to reject conversations (e.g. "roles must alternate").
    raise ChatTemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # jinja2's built-in tojson HTML-escapes <, >, & and '; transformers overrides it with plain
    # json.dumps so that tool schemas reach the model verbatim. We do the same to render alike.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                      separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=1)
def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """Compile `source` once; later calls with the same text return the cached template."""
    try:
        return _environment().from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template does not compile: {exc}") from exc


def validate_messages(messages: Sequence[Mapping[str, Any]]) -> None:
    """Check that `messages` is a non-empty list of {"role": str, "content": str, ...} dicts.

    Extra keys are allowed and passed to the template untouched.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise ChatTemplateError("messages must contain at least one message")
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(
                f"messages[{index}] must be a dict, got {type(message).__name__}"
            )
        for key in ("role", "content"):
            if key not in message:
                raise ChatTemplateError(f"messages[{index}] has no {key!r}")
            if not isinstance(message[key], str):
                raise ChatTemplateError(
                    f"messages[{index}][{key!r}] must be a string, "
                    f"got {type(message[key]).__name__}"
                )
        if not message["role"]:
            raise ChatTemplateError(f"messages[{index}]['role'] is empty")


def render(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    add_generation_prompt: bool = True,
    bos_token: str | None = None,
    eos_token: str | None = None,
) -> str:
    """Render `messages` with the chat template `template` and return the prompt text.

    `bos_token`/`eos_token` are the special tokens' text, exposed to the template as variables;
    None becomes "" (jinja would otherwise print "None"). Raises ChatTemplateError for invalid
    messages, a template that does not compile, or a template that rejects the conversation.
    """
    validate_messages(messages)
    compiled = compile_template(template)
    try:
        return compiled.render(
            messages=[dict(message) for message in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token or "",
            eos_token=eos_token or "",
        )
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"chat template failed to render: {exc}") from exc
