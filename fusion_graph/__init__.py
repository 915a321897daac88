"""fusion-graph: Best-of-N and Fusion-of-N (inference-time scaling) for any LangGraph step.

Wrap a chat model, any Runnable or a LangGraph node so that one call becomes N parallel
candidates, optionally critiqued, then fused into one answer by a fusor model (FusioN,
arXiv 2510.00931) or selected by a judge, a reward function or a vote (BoN).
"""

from fusion_graph.errors import (
    DecisionError,
    FusionGraphError,
    NotEnoughCandidatesError,
    SelectorOutputError,
)
from fusion_graph.graph import create_fusion_graph
from fusion_graph.nodes.select import (
    LLMJudge,
    MajorityVote,
    PairwiseJudge,
    RewardFunction,
    Selection,
    SelectionContext,
    Selector,
)
from fusion_graph.prompts import PromptTemplate
from fusion_graph.state import Candidate, Critique, Decision, FusionState, TokenUsage
from fusion_graph.wrap import FusionNode, FusionResult, FusionRunnable, best_of_n, fusion_of_n

__all__ = [
    "Candidate",
    "Critique",
    "Decision",
    "DecisionError",
    "FusionGraphError",
    "FusionNode",
    "FusionResult",
    "FusionRunnable",
    "FusionState",
    "LLMJudge",
    "MajorityVote",
    "NotEnoughCandidatesError",
    "PairwiseJudge",
    "PromptTemplate",
    "RewardFunction",
    "Selection",
    "SelectionContext",
    "Selector",
    "SelectorOutputError",
    "TokenUsage",
    "best_of_n",
    "create_fusion_graph",
    "fusion_of_n",
]
