"""Text <-> token ids: a thin wrapper over a Hugging Face tokenizer, plus streaming detokenization.

The wrapper pins down the few choices the engine relies on (special tokens skipped on decode, no
"clean-up" of spaces, chat prompts ending with the assistant header) so callers need not know
`transformers`' keyword arguments.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, cast

from jinja2 import TemplateError
from transformers import AutoTokenizer, BatchEncoding, PreTrainedTokenizerBase, PreTrainedTokenizerFast

# Any of these in a folder means it carries a tokenizer that `AutoTokenizer` can load.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")

# SentencePiece marks a word-initial space with this character inside token strings.
SENTENCEPIECE_SPACE = "\u2581"

REPLACEMENT_CHAR = "\ufffd"


class Tokenizer:
    """Encode prompts, render chat templates and decode generated ids for one model."""

    def __init__(self, hf_tokenizer: PreTrainedTokenizerBase) -> None:
        self.hf = hf_tokenizer
        self.vocab_size: int = len(hf_tokenizer)
        eos = hf_tokenizer.eos_token_id
        self.eos_token_ids: frozenset[int] = frozenset() if eos is None else frozenset([eos])

    @classmethod
    def from_folder(cls, folder: str | os.PathLike[str], gguf_file: str | None = None) -> Tokenizer | None:
        """Load the tokenizer of a model folder, or of ``gguf_file`` inside it.

        Returns ``None`` for a folder without tokenizer files, so that weights-only checkpoints still load.
        Never touches the network. A GGUF file's tokenizer is built by the fast tokenizer class itself:
        ``AutoTokenizer`` would first read the file as a model config, which transformers refuses for
        architectures it cannot run (``smollm3``, ``mistral3``), although the vocabulary is the same kind.
        """
        folder = Path(folder)
        if gguf_file is not None:
            return cls(PreTrainedTokenizerFast.from_pretrained(str(folder), gguf_file=gguf_file, local_files_only=True))
        if not any((folder / name).is_file() for name in TOKENIZER_FILES):
            return None
        return cls(AutoTokenizer.from_pretrained(str(folder), local_files_only=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``, with the special tokens (e.g. BOS) the model's tokenizer adds unless told not to."""
        return cast("list[int]", self.hf(text, add_special_tokens=add_special_tokens)["input_ids"])

    def apply_chat_template(self, messages: list[dict[str, str]], tools: list[dict[str, Any]] | None = None,
                            thinking: bool = False) -> list[int]:
        """Token ids of a chat prompt that ends where the assistant's reply begins.

        ``tools`` (function descriptions) are handed to templates that list them. ``thinking`` is handed to
        the template as ``enable_thinking``, the switch of Qwen3's and SmolLM3's templates: off (the default,
        what a game wants: an answer now) they open the reply with an empty think block; on, the model
        reasons first. Templates without the switch ignore it.
        """
        if not getattr(self.hf, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template; send a plain prompt instead")
        _check_messages(messages)
        try:
            out = cast(
                BatchEncoding,
                self.hf.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True,
                                            return_dict=True, enable_thinking=thinking),
            )
        except TemplateError as exc:  # e.g. "roles must alternate user/assistant"
            raise ValueError(f"chat template rejected the messages: {exc}") from exc
        return cast("list[int]", out["input_ids"])

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` without special tokens.

        Space clean-up (" ," -> ",") is off: it would change what the model wrote and break the equality
        between streamed pieces and the whole text.
        """
        return cast(str, self.hf.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))

    def token_text(self, token_id: int) -> str:
        """Text of one token, special tokens included, for showing alternatives to a sampled token.

        SentencePiece decoders drop the leading space of a sequence's first token; it is put back so
        that " the" and "the" stay distinguishable.
        """
        text = cast(str, self.hf.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False))
        piece = self.hf.convert_ids_to_tokens(token_id)  # None for ids past the tokenizer's vocabulary
        if isinstance(piece, str) and piece.startswith(SENTENCEPIECE_SPACE) and not text.startswith(" "):
            text = " " + text
        return text


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise ValueError(f"message {i} must be a dict, got {type(msg).__name__}")
        for key in ("role", "content"):
            if not isinstance(msg.get(key), str):
                raise ValueError(f"message {i} needs a string {key!r}, got {msg.get(key)!r}")


class IncrementalDetokenizer:
    """Turns a stream of generated token ids into a stream of text pieces.

    One token can end in the middle of a multi-byte UTF-8 character (byte-level BPE and SentencePiece
    byte fallback both do this), and a token's leading space depends on what precedes it. So each push
    decodes a short window of recent tokens with and without the tokens not yet shown and emits the
    difference; a window whose text ends in U+FFFD is an incomplete character and is held back until a
    later token completes it. The window restarts after every emitted piece, so a push costs the same
    at token 10 as at token 10,000.

    Without ``prompt_ids`` the pieces add up to ``tokenizer.decode(generated ids)``. With them, the last
    few prompt tokens serve as left context, so a SentencePiece model's first word keeps the leading
    space that decoding the generated ids on their own would strip.
    """

    # Prompt tokens kept as left context for the first generated tokens (leading spaces, open bytes).
    PROMPT_CONTEXT = 5

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None) -> None:
        self.tokenizer = tokenizer
        self._window: list[int] = list(prompt_ids or [])[-self.PROMPT_CONTEXT :]
        self._read = len(self._window)  # text of _window[:_read] is already emitted (or is context)
        self._pieces: list[str] = []

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text it completes ("" while a character is incomplete)."""
        self._window.append(token_id)
        new = self.tokenizer.decode(self._window)
        if new.endswith(REPLACEMENT_CHAR):
            return ""
        return self._emit(new)

    def flush(self) -> str:
        """Release held-back text at the end of a sequence (an unfinished character becomes U+FFFD)."""
        if self._read == len(self._window):
            return ""
        return self._emit(self.tokenizer.decode(self._window))

    @property
    def text(self) -> str:
        """All text emitted so far (the concatenation of every non-empty piece)."""
        return "".join(self._pieces)

    def _emit(self, window_text: str) -> str:
        piece = window_text[len(self.tokenizer.decode(self._window[: self._read])) :]
        if piece:
            self._pieces.append(piece)
            # The tokens of this piece are all the left context the next token needs.
            del self._window[: self._read]
        # After an empty piece (a skipped special token) the window keeps its older tokens, so the next
        # token's leading space is still decoded as following real text, not as a sequence start.
        self._read = len(self._window)
        return piece
