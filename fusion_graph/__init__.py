"""fusion-graph: Best-of-N and Fusion-of-N (inference-time scaling) for any LangGraph step.

Wrap a chat model, any Runnable or a LangGraph node so that one call becomes N parallel
candidates, optionally critiqued, then fused into one answer by a fusor model (FusioN,
arXiv 2510.00931) or selected by a judge, a reward function or a vote (BoN). The two
halves are public too: :class:`Fuse` and :class:`Select` decide among candidates you
already have.
"""

import logging
from importlib.metadata import PackageNotFoundError, version

from fusion_graph.errors import DecisionError, FusionGraphError, NotEnoughCandidatesError
from fusion_graph.graph import create_fusion_graph
from fusion_graph.nodes.decide import Selector
from fusion_graph.nodes.fuse import Fuse
from fusion_graph.nodes.judges import LLMJudge, PairwiseJudge
from fusion_graph.nodes.select import MajorityVote, Select
from fusion_graph.prompts import PromptTemplate
from fusion_graph.state import FusionState
from fusion_graph.types import Candidate, Decision, ErrorInfo, FusionResult, TokenUsage
from fusion_graph.wrap import FusionRunnable, best_of_n, fusion_of_n

# Warnings (e.g. a fusor that failed and a fallback that answered) go to the
# "fusion_graph" logger; configure logging to see them where you want them.
logging.getLogger("fusion_graph").addHandler(logging.NullHandler())

try:
    __version__ = version("fusion-graph")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "Candidate",
    "Decision",
    "DecisionError",
    "ErrorInfo",
    "Fuse",
    "FusionGraphError",
    "FusionResult",
    "FusionRunnable",
    "FusionState",
    "LLMJudge",
    "MajorityVote",
    "NotEnoughCandidatesError",
    "PairwiseJudge",
    "PromptTemplate",
    "Select",
    "Selector",
    "TokenUsage",
    "best_of_n",
    "create_fusion_graph",
    "fusion_of_n",
]
