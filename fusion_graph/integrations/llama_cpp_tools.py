"""Tool calling for the embedded llama.cpp model, by grammar-constrained JSON.

SmolLM2's chat template has no tool-call format, so :meth:`ChatLocalModel.bind_tools
<fusion_graph.integrations.llama_cpp.ChatLocalModel.bind_tools>` describes the tools in a
system message and constrains the reply with llama.cpp's JSON-schema grammar to either
``{"tool": NAME, "arguments": {...}}`` (one call, arguments valid for that tool's schema)
or ``{"answer": TEXT}``. Every reply therefore parses; whether the call is the *right* one
is up to the model: SmolLM2-135M picks plausible tools but often wrong arguments (measured
in tests/integration/test_agents_real.py and the README), so use a real model for agents.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from operator import itemgetter
from typing import TYPE_CHECKING, Any

from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.output_parsers import JsonOutputParser, PydanticOutputParser
from langchain_core.runnables import RunnableMap, RunnablePassthrough
from langchain_core.utils.function_calling import convert_to_json_schema, convert_to_openai_tool
from pydantic import BaseModel

from fusion_graph.integrations.chat_template import to_chat
from fusion_graph.integrations.llama_cpp_loader import LoadedModel
from fusion_graph.integrations.llama_cpp_sampling import (
    SamplingOptions,
    chat_completion,
    fresh_seed,
)
from fusion_graph.integrations.usage import token_usage

if TYPE_CHECKING:
    from langchain_core.language_models import BaseChatModel
    from langchain_core.runnables import Runnable


def tool_specs(tools: Sequence[Any]) -> list[dict[str, Any]]:
    """OpenAI-format function specs of LangChain tools, functions, schemas or dicts."""
    return [convert_to_openai_tool(t)["function"] for t in tools]


def forced_tool(tool_choice: Any, specs: Sequence[dict[str, Any]]) -> str | bool:
    """The tool the reply must call (a name), True for any tool, False for free choice."""
    names = [s["name"] for s in specs]
    if tool_choice in (None, "auto", "none", False):
        return False
    if tool_choice in ("any", "required", True):
        return True
    name = tool_choice
    if isinstance(tool_choice, dict):
        name = tool_choice.get("function", {}).get("name") or tool_choice.get("name")
    if name not in names:
        msg = f"tool_choice={tool_choice!r} names no bound tool; the tools are {names}"
        raise ValueError(msg)
    return str(name)


def reply_schema(specs: Sequence[dict[str, Any]], forced: str | bool) -> dict[str, Any]:
    """The JSON schema of a reply: one tool call, or (unless a call is forced) an answer."""
    calls = [
        {
            "type": "object",
            "properties": {
                "tool": {"type": "string", "enum": [s["name"]]},
                "arguments": s.get("parameters") or {"type": "object"},
            },
            "required": ["tool", "arguments"],
        }
        for s in specs
        if forced in (True, False) or s["name"] == forced
    ]
    answer = {
        "type": "object",
        "properties": {"answer": {"type": "string"}},
        "required": ["answer"],
    }
    options = calls if forced else [*calls, answer]
    return options[0] if len(options) == 1 else {"anyOf": options}


def tools_prompt(specs: Sequence[dict[str, Any]], forced: str | bool) -> str:
    """The system message that tells the model about its tools."""
    lines = [
        "You can call these tools. Reply with JSON only.",
        'To call a tool: {"tool": "<name>", "arguments": {...}}.',
    ]
    if not forced:
        lines.append('To answer without a tool (e.g. once you have its result): {"answer": "..."}')
    for spec in specs:
        params = json.dumps(spec.get("parameters", {}).get("properties", {}))
        lines.append(f"- {spec['name']}: {spec.get('description', '')} arguments: {params}")
    return "\n".join(lines)


def as_plain_messages(messages: Sequence[BaseMessage]) -> list[BaseMessage]:
    """Tool calls and tool results as text, for a chat template without tool roles."""
    plain: list[BaseMessage] = []
    for message in messages:
        if isinstance(message, AIMessage) and message.tool_calls:
            call = message.tool_calls[0]
            text = json.dumps({"tool": call["name"], "arguments": call["args"]})
            plain.append(AIMessage(content=text))
        elif isinstance(message, ToolMessage):
            plain.append(HumanMessage(content=f"Result of {message.name}: {message.text}"))
        else:
            plain.append(message)
    return plain


def parse_reply(text: str) -> AIMessage:
    """The AIMessage of a constrained reply (a tool call, or the answer as text)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError:  # cut short by max_tokens: keep the text
        return AIMessage(content=text)
    if isinstance(data, dict) and isinstance(data.get("tool"), str):
        args = data.get("arguments")
        call = {
            "name": data["tool"],
            "args": args if isinstance(args, dict) else {},
            "id": f"call_{uuid.uuid4().hex[:12]}",
            "type": "tool_call",
        }
        return AIMessage(content="", tool_calls=[call])
    if isinstance(data, dict) and "answer" in data:
        return AIMessage(content=str(data["answer"]))
    return AIMessage(content=text)


def tool_reply(
    entry: LoadedModel,
    messages: list[BaseMessage],
    opts: SamplingOptions,
    tools: dict[str, Any],
    *,
    model_name: str,
) -> AIMessage:
    """One reply of the loaded model to ``messages`` with ``tools`` bound: a grammar keeps it
    to one valid tool call or a text answer."""
    specs = tools["tools"]
    forced = forced_tool(tools.get("tool_choice"), specs)
    plain = as_plain_messages(messages)
    intro = tools_prompt(specs, forced)
    if plain and isinstance(plain[0], SystemMessage):
        plain = [SystemMessage(content=f"{plain[0].text}\n\n{intro}"), *plain[1:]]
    else:
        plain = [SystemMessage(content=intro), *plain]
    chat = to_chat(plain, reader="the local model")
    seed = opts.seed if opts.seed is not None else fresh_seed()
    schema = {"type": "json_object", "schema": reply_schema(specs, forced)}
    with entry.lock:
        n_prompt, result = chat_completion(entry, chat, opts, seed, response_format=schema)
    choice = result["choices"][0]
    message = parse_reply(choice["message"].get("content") or "")
    n_output = int(result.get("usage", {}).get("completion_tokens", 0))
    message.usage_metadata = token_usage(n_prompt, n_output)
    message.response_metadata = {
        "model_name": model_name,
        "finish_reason": choice.get("finish_reason"),
        "seed": seed,
    }
    return message


# --- structured output: any JSON schema ------------------------------------------------------


def json_grammar(response_format: Any) -> str:
    """The llama.cpp grammar (GBNF) of an OpenAI-style ``response_format``:
    ``{"type": "json_schema", "json_schema": {"schema": ...}}``, ``{"type": "json_object"}``
    (any object, or ``"schema"``'s) or a pydantic model class."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    schema: Any = None
    if isinstance(response_format, type) and issubclass(response_format, BaseModel):
        schema = response_format.model_json_schema()
    elif isinstance(response_format, dict):
        kind = response_format.get("type")
        if kind == "json_schema":
            schema = (response_format.get("json_schema") or {}).get("schema")
        elif kind == "json_object":
            schema = response_format.get("schema") or {"type": "object"}
    if not isinstance(schema, dict):
        msg = (
            "response_format must be {'type': 'json_schema', 'json_schema': {'schema': {...}}}, "
            f"{{'type': 'json_object'}} or a pydantic model class, not {response_format!r}"
        )
        raise ValueError(msg)
    return str(json_schema_to_gbnf(json.dumps(schema)))


def structured_runnable(
    model: BaseChatModel, schema: dict[str, Any] | type, *, include_raw: bool
) -> Runnable[Any, Any]:
    """``model`` constrained to ``schema``'s JSON and parsed into it (a pydantic model's
    instance, else a dict), as LangChain's ``with_structured_output`` returns."""
    json_schema = convert_to_json_schema(schema)
    name = str(json_schema.get("title") or "reply")
    bound = model.bind(
        response_format={
            "type": "json_schema",
            "json_schema": {"name": name, "schema": json_schema},
        }
    )
    parser: Runnable[Any, Any] = (
        PydanticOutputParser(pydantic_object=schema)
        if isinstance(schema, type) and issubclass(schema, BaseModel)
        else JsonOutputParser()
    )
    if not include_raw:
        return bound | parser
    parsed = RunnablePassthrough.assign(
        parsed=itemgetter("raw") | parser, parsing_error=lambda _: None
    )
    unparsed = RunnablePassthrough.assign(parsed=lambda _: None)
    return RunnableMap(raw=bound) | parsed.with_fallbacks([unparsed], exception_key="parsing_error")
