"""The GBNF converter: llama.cpp's grammars compile; escapes, tokens and errors; the languages it accepts.

Strings are checked against the converted grammar with llguidance's matcher over a byte-level tokenizer
(every text tokenizes), so these tests run without a model.
"""

from __future__ import annotations

from pathlib import Path

import llguidance
import pytest

from gllm.constrain import GbnfError, gbnf_to_lark
from gllm.constrain.gbnf_lexing import Lexing, regular_rules
from gllm.constrain.gbnf_syntax import parse_gbnf

GRAMMARS = Path(__file__).parent / "grammars"


@pytest.fixture(scope="module")
def lltok(tmp_path_factory):
    from tiny_chat import build_chat_tokenizer

    hf = build_chat_tokenizer(tmp_path_factory.mktemp("tok"))
    return hf, llguidance.hf.from_tokenizer(hf, eos_token=hf.eos_token_id)


def accepts(lltok, gbnf: str, text: str) -> bool:
    hf, tok = lltok
    grammar = llguidance.LLMatcher.grammar_from_lark(gbnf_to_lark(gbnf, vocab_size=len(hf)))
    matcher = llguidance.LLMatcher(tok, grammar, log_level=0)
    assert not matcher.is_error(), matcher.get_error()
    ids = hf(text, add_special_tokens=False)["input_ids"]
    return matcher.consume_tokens(ids) and matcher.is_accepting()


@pytest.mark.parametrize("name", ["json", "chess", "list", "arithmetic"])
def test_llama_cpp_grammars_convert(lltok, name):
    hf, tok = lltok
    lark = gbnf_to_lark((GRAMMARS / f"{name}.gbnf").read_text(), vocab_size=len(hf))
    assert llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_lark(lark), tok) == ""


@pytest.mark.parametrize("name, good, bad", [
    ("json", ['{"a": [1, 2.5e3, "x\\n"], "b": {"c": null}}', '{}'], ['[1]', '{"a" 1}', '{"a": 01x}']),
    ("chess", ["1. e4 e5\n2. Nf3 Nc6\n", "1. O-O exd5+\n12. Qxh7# a8=Q\n"], ["1. e4\n", "1. e9 e5\n2. a1 a2\n"]),
    ("list", ["- bread\n- two apples\n"], ["bread\n", "- \n"]),
    ("arithmetic", ["x = 2\n", "a+(b *3) = c_1\ny=4\n"], ["= 2\n", "x = \n"]),
])
def test_llama_cpp_grammars_accept_their_language(lltok, name, good, bad):
    gbnf = (GRAMMARS / f"{name}.gbnf").read_text()
    for text in good:
        assert accepts(lltok, gbnf, text), text
    for text in bad:
        assert not accepts(lltok, gbnf, text), text


def test_regular_rules_become_terminals_where_greedy_lexing_is_safe():
    rules = parse_gbnf((GRAMMARS / "json.gbnf").read_text())
    assert regular_rules(rules) == Lexing(rules).terminal_rules == {"string", "number", "ws"}
    lark = gbnf_to_lark((GRAMMARS / "json.gbnf").read_text())
    assert "\nSTRING: " in lark and "\nobject: " in lark and "\nstart: object" in lark
    # arithmetic.gbnf ends a line with `num ::= [0-9]+ ws` (ws takes newlines) then "\n": one greedy
    # lexeme would take the newline, so num and ws stay rules (see test_..._accept_their_language).
    rules = parse_gbnf((GRAMMARS / "arithmetic.gbnf").read_text())
    assert regular_rules(rules) == {"ident", "num", "ws"} and Lexing(rules).terminal_rules == set()


def test_escapes(lltok):
    assert accepts(lltok, 'root ::= "\\u00e9\\x41" [\\U0001F600-\\U0001F64F]+ "\\t"', "éA\U0001F600\U0001F60E\t")
    assert accepts(lltok, 'root ::= [^"\\\\\\x7F\\x00-\\x1F\\U0010FFFF]+', "plain text é")
    assert not accepts(lltok, 'root ::= [^"\\\\\\x7F\\x00-\\x1F\\U0010FFFF]+', 'a"b')
    assert accepts(lltok, 'root ::= "a" . "c"', "a\U0001F600c")
    assert accepts(lltok, 'root ::= [a-c]{2,3} "x"{0,1} ("y" | "z")*', "abczyz")


def test_token_references(lltok):
    hf, _ = lltok
    eos = hf.eos_token_id
    assert "<[7]>" in gbnf_to_lark('root ::= "a" <[7]>')
    assert "<|im_end|>" in gbnf_to_lark('root ::= "a" <|im_end|>')
    negated = gbnf_to_lark("root ::= !<[7]>", vocab_size=20)
    assert "<[0-6,8-19]>" in negated
    assert f"<[0-{eos - 1},{eos + 1}-{len(hf) - 1}]>" in gbnf_to_lark(
        "root ::= !<|im_end|>", lambda text: hf.convert_tokens_to_ids(text), len(hf))


def test_names_that_clash_stay_apart():
    lark = gbnf_to_lark('root ::= start-x start_x start\nstart-x ::= "a"\nstart_x ::= "b"\nstart ::= "c" root | "d"')
    assert "\nSTART_X: " in lark and "\nSTART_X_2: " in lark and "start_2: " in lark


@pytest.mark.parametrize("text, message", [
    ('root ::= "a', "unterminated literal"),
    ("root ::= [a-", "unterminated character class"),
    ("root ::= missing", "undefined rule"),
    ('foo ::= "a"', "no 'root' rule"),
    ('root ::= "a"\nroot ::= "b"', "defined twice"),
    ('root ::= "\\q"', "unknown escape"),
    ('root ::= "\\U0000D800"', "not a Unicode character"),
    ('root ::= "a"{3,1}', "maximum below its minimum"),
    ("root ::= [z-a]", "runs backwards"),
    ("root ::= !<|nope|>", "no token"),
    ("root ::= <[7]", "expected a token"),
    ("root ::= )", "unexpected character"),
])
def test_errors_say_what_and_where(text, message):
    with pytest.raises(GbnfError, match=message):
        gbnf_to_lark(text, vocab_size=10)
