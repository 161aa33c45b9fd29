"""Tool calls: how a model writes them, the grammar that keeps them valid, and reading them back.

A request offers ``tools`` (``{name, description, parameters}``, ``parameters`` a JSON Schema of the
arguments object) and a ``tool_choice``: ``"auto"`` (answer in text or call tools), ``"required"`` (call
at least one), a tool's name (call that one), or ``"none"`` (the tools are ignored).

Each model family writes calls its own way, and a model calls tools best in the form it was trained
on, so the form follows the chat template:

* templates that write ``<tool_call>`` (Qwen 2.5 and 3, Hermes, SmolLM3): the tools go to the template
  and each call is ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``;
* Llama 3.1 to 3.3 templates (``{"name": function name, "parameters": ...}``): the tools go to the
  template and a call is the reply's whole text, ``{"name": ..., "parameters": {...}}``;
* any other template (the default model's ChatML among them): the same ``<tool_call>`` form, and a
  system paragraph written here lists the tools and shows the form. This is the documented form for
  models without one of their own.

The grammar allows one call per reply (a small model asked for "one or more" tends to repeat itself
until its length limit): under ``"auto"``, either plain text that never writes the call marker, or a
call (in the ``<tool_call>`` form, after some lead-in text if the model wants). The call's name is one of
the tools and its arguments follow that tool's schema, so every call parses and validates by
construction; the reply ends with the call.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from llguidance import LLMatcher

from gllm.constrain.gbnf import lark_string, regex_literal
from gllm.constrain.grammars import JSON_STYLE

TOOL_CHOICES = ("auto", "required", "none")
_TOOL_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


def check_tools(tools: Any, tool_choice: Any) -> None:
    """Raise ``ValueError`` naming what is wrong with ``tools`` or ``tool_choice`` (their shapes only)."""
    if tools is None:
        if tool_choice is not None:
            raise ValueError("tool_choice needs tools")
        return
    if not isinstance(tools, list) or not tools:
        raise ValueError("tools must be a non-empty list of {name, description, parameters} maps")
    names = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise ValueError(f"tools[{i}] must be a map with name, description, parameters")
        extra = set(tool) - {"name", "description", "parameters"}
        if extra:
            raise ValueError(f"tools[{i}] has unknown field(s) {', '.join(sorted(map(str, extra)))}")
        name = tool.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
            raise ValueError(f"tools[{i}].name must be 1-64 letters, digits, _ . - (not starting with a digit), "
                             f"got {name!r}")
        if not isinstance(tool.get("description", ""), str):
            raise ValueError(f"tools[{i}].description must be a string")
        if not isinstance(tool.get("parameters", {}), dict):
            raise ValueError(f"tools[{i}].parameters must be a JSON Schema object")
        names.append(name)
    if len(set(names)) != len(names):
        raise ValueError("tool names must be unique")
    if tool_choice is not None and tool_choice not in TOOL_CHOICES and tool_choice not in names:
        raise ValueError(f"tool_choice must be auto, required, none or a tool's name (got {tool_choice!r})")


def _arguments_schema(tool: dict[str, Any]) -> dict[str, Any]:
    schema = tool.get("parameters") or {}
    return schema if schema else {"type": "object"}


@dataclass(frozen=True)
class ToolCallFormat:
    """How one family writes a call: ``begin`` + ``{"name": ..., <arguments_key>: {...}}`` + ``end``."""

    name: str
    begin: str
    end: str
    arguments_key: str
    native: bool  # the chat template lists the tools itself

    def grammar(self, tools: list[dict[str, Any]], tool_choice: str) -> str:
        """The grammar (llguidance's form, from Lark) of a reply under ``tool_choice`` (not ``"none"``)."""
        offered = [t for t in tools if tool_choice in ("auto", "required") or t["name"] == tool_choice]
        calls = [{"type": "object", "additionalProperties": False, "required": ["name", self.arguments_key],
                  "properties": {"name": {"const": t["name"]}, self.arguments_key: _arguments_schema(t)}}
                 for t in offered]
        lines = ["%llguidance {}", f"body: %json {json.dumps({'anyOf': calls, 'x-guidance': JSON_STYLE})}"]
        begin, end = (lark_string(s) if s else "" for s in (self.begin, self.end))
        reply = f"body {end}"
        if tool_choice != "auto":
            lines.append(f"start: {begin} {reply}")
        elif self.begin:  # text that never writes the marker, or text leading into the first call
            lines += [f"TEXT: /(.|\\n)*/ & ~/(.|\\n)*{regex_literal(self.begin.strip())}(.|\\n)*/",
                      f"lead[lazy]: /(.|\\n)*{regex_literal(self.begin)}/",
                      f"start: TEXT | lead {reply}"]
        else:  # the call is the whole reply: text must not start like one
            lines += ["TEXT: /[^{](.|\\n)*/", f"start: TEXT | {reply}"]
        return LLMatcher.grammar_from_lark("\n".join(lines) + "\n")

    def parse(self, text: str) -> list[ToolCall]:
        """The complete calls in a reply (one cut short by a length limit is left out)."""
        if self.begin:
            pattern = re.escape(self.begin.strip()) + r"\s*(.*?)\s*" + re.escape(self.end.strip())
            bodies = [m.group(1) for m in re.finditer(pattern, text, re.DOTALL)]
        else:
            bodies = [text.strip()] if text.lstrip().startswith("{") else []
        calls = []
        for body in bodies:
            try:
                value = json.loads(body)
            except ValueError:
                continue
            if isinstance(value, dict) and isinstance(value.get("name"), str) and isinstance(
                    value.get(self.arguments_key), dict):
                calls.append(ToolCall(value["name"], value[self.arguments_key]))
        return calls

    def messages(self, messages: list[dict[str, str]], tools: list[dict[str, Any]],
                 tool_choice: str) -> list[dict[str, str]]:
        """The chat with the tools described in its system message, for a template that cannot list them."""
        listing = "\n".join(json.dumps({"name": t["name"], "description": t.get("description", ""),
                                        "parameters": _arguments_schema(t)}) for t in tools)
        example = f'{self.begin}{{"name": "<tool name>", "{self.arguments_key}": {{<arguments>}}}}{self.end}'
        rule = {"auto": "If no tool fits, answer in plain text instead.",
                "required": "Always answer with a tool call."}.get(tool_choice, f"Call the tool {tool_choice}.")
        note = f"You can call these tools:\n{listing}\nTo call a tool, write:\n{example}\n{rule}"
        if messages and messages[0].get("role") == "system":
            return [{"role": "system", "content": f"{messages[0]['content']}\n\n{note}"}, *messages[1:]]
        return [{"role": "system", "content": note}, *messages]


HERMES = ToolCallFormat("hermes", "<tool_call>\n", "\n</tool_call>", "arguments", native=True)
LLAMA3 = ToolCallFormat("llama3", "", "", "parameters", native=True)
DOCUMENTED = ToolCallFormat("gllm", "<tool_call>\n", "\n</tool_call>", "arguments", native=False)


def tool_call_format(chat_template: str | None) -> ToolCallFormat:
    """The form the chat template's model family writes calls in (``DOCUMENTED`` when it has none)."""
    template = chat_template or ""
    if "tools" in template and "<tool_call>" in template:
        return HERMES
    llama3 = '"parameters": dictionary of argument name' in template or "<|python_tag|>" in template
    if "tools" in template and llama3:
        return LLAMA3
    return DOCUMENTED


def template_tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tools as chat templates expect them (the OpenAI function form)."""
    return [{"type": "function", "function": {"name": t["name"], "description": t.get("description", ""),
                                              "parameters": _arguments_schema(t)}} for t in tools]
