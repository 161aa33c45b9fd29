"""Structured output: JSON Schema, GBNF and Lark grammars, regular expressions, choices and tool calls.

Built on llguidance. The engine asks a ``GrammarCompiler`` for a request's grammar, gives each of its
sequences a ``Constraint`` (a matcher that follows its tokens), and before each model step starts the
masks of the rows that will sample (``MaskBuilder``); the sampler applies them as a ``TokenBitmask``.
"""

from gllm.constrain.gbnf import GbnfError, gbnf_to_lark
from gllm.constrain.grammars import OutputConstraint
from gllm.constrain.masks import MaskBuilder, PendingMasks
from gllm.constrain.matcher import CompiledGrammar, Constraint, GrammarCompiler, GrammarLimitError, GrammarLimits
from gllm.constrain.tools import ToolCall, ToolCallFormat, check_tools, template_tools, tool_call_format

__all__ = [
    "CompiledGrammar",
    "Constraint",
    "GbnfError",
    "GrammarCompiler",
    "GrammarLimitError",
    "GrammarLimits",
    "MaskBuilder",
    "OutputConstraint",
    "PendingMasks",
    "ToolCall",
    "ToolCallFormat",
    "check_tools",
    "gbnf_to_lark",
    "template_tools",
    "tool_call_format",
]
