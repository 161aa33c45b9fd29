"""A tiny random chat model with a real tokenizer, for tests that need text (structured output).

The tokenizer is a byte-level BPE trained here, in a fraction of a second, on a few lines of JSON and
prose: the 256 byte tokens (so any text can be written), about sixty merges, and ChatML's special tokens
with a ChatML chat template. The model is ``conftest.build_tiny_llama`` with a matching vocabulary.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from conftest import build_tiny_llama

VOCAB_SIZE = 320
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CORPUS = [
    '{"say": "Hello there, traveller!", "mood": "happy", "action": {"type": "give", "item": "bread"}}',
    '{"name": "sell", "arguments": {"item": "sword", "price": 12}}',
    "<tool_call>\n{\"name\": \"buy\", \"arguments\": {\"item\": \"shield\"}}\n</tool_call>",
    "1. e4 e5 2. Nf3 Nc6 3. Bb5 a6 4. Ba4 Nf6 5. O-O Be7",
    "- apples\n- bread\n- cheese\n",
    "x = (a + b) * 12\ny = x / 3\n",
    "The blacksmith of the village answers: true, false, null, 3.14, -7, [1, 2, 3].",
]


def build_chat_tokenizer(folder: Path, chat_template: str = CHATML) -> PreTrainedTokenizerFast:
    """Train and save the tokenizer (``tokenizer.json`` and its config) into ``folder``."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(CORPUS * 4, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", bos_token=None,
                                 unk_token=None, pad_token="<|endoftext|>")
    hf.chat_template = chat_template
    hf.save_pretrained(folder)
    return hf


def build_chat_model(folder: Path, chat_template: str = CHATML, seed: int = 0, **overrides) -> Path:
    """A tiny random Llama and its tokenizer in ``folder``; returns the folder."""
    tokenizer = build_chat_tokenizer(folder, chat_template)
    build_tiny_llama(folder, seed=seed, vocab_size=max(VOCAB_SIZE, len(tokenizer)),
                     eos_token_id=tokenizer.eos_token_id, **overrides)
    return folder
