"""Fusion-of-N as a subgraph inside an existing workflow: retrieve -> fusion -> format,
with a checkpointer and live progress streamed from the fusion step. Then the recipe for a
parent graph whose state has other keys than ``messages``.

    python examples/existing_workflow.py
    python examples/existing_workflow.py --base-url http://127.0.0.1:8000/v1 --model NAME
"""

from __future__ import annotations

from typing import Any, TypedDict

from _common import chat_model, parser
from langchain_core.messages import HumanMessage, SystemMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, MessagesState, StateGraph

from fusion_graph import Candidate, create_fusion_graph

DOCS = "Our store opens at 9:00 and closes at 18:00, Monday to Saturday."


def retrieve(state: MessagesState) -> dict[str, Any]:
    return {"messages": [SystemMessage(f"Answer from these notes: {DOCS}")]}


def format_answer(state: MessagesState) -> dict[str, Any]:
    return {"messages": [HumanMessage(f"(answered by fusion) {state['messages'][-1].text}")]}


class TicketState(TypedDict, total=False):
    """A parent state without ``messages``: map in and out in a node of your own."""

    question: str
    answer: str
    candidates: list[Candidate]


def main(argv: list[str] | None = None) -> None:
    args = parser(__doc__ or "").parse_args(argv)
    llm = chat_model(args, max_tokens=96)
    fusion = create_fusion_graph(llm, n=args.n, strategy="fusion", fusor=llm).compile()

    # 1. Shared `messages`: add the compiled subgraph as a node.
    builder = StateGraph(MessagesState)
    builder.add_node("retrieve", retrieve)
    builder.add_node("fusion", fusion)
    builder.add_node("format", format_answer)
    builder.add_edge(START, "retrieve")
    builder.add_edge("retrieve", "fusion")
    builder.add_edge("fusion", "format")
    builder.add_edge("format", END)
    app = builder.compile(checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "demo"}}
    question = {"messages": [HumanMessage("When does the store open on Saturday?")]}
    for _namespace, mode, event in app.stream(
        question, config, stream_mode=["custom", "updates"], subgraphs=True
    ):
        if mode == "custom" and event["event"] == "candidate_finished":
            print(
                f"  candidate {event['index']}: {'ok' if event['ok'] else 'failed'} "
                f"in {event['latency_s']:.2f} s"
            )
        elif mode == "custom" and event["event"] == "decision":
            print(f"  decision: fused={event['fused']} by {event['method']}")
    final = app.get_state(config).values["messages"][-1]
    print(final.text)

    # 2. Different keys: a node maps the parent's state to the subgraph's and back.
    def answer_ticket(state: TicketState) -> TicketState:
        out = fusion.invoke({"messages": [HumanMessage(state["question"])]})
        return {"answer": out["messages"][-1].text, "candidates": out["candidates"]}

    tickets = StateGraph(TicketState)
    tickets.add_node("answer_ticket", answer_ticket)
    tickets.add_edge(START, "answer_ticket")
    tickets.add_edge("answer_ticket", END)
    result = tickets.compile().invoke({"question": "Is the store open on Sunday?"})
    print(f"ticket answer ({len(result['candidates'])} candidates): {result['answer']}")


if __name__ == "__main__":
    main()
