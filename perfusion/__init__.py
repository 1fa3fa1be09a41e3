"""sd-webui-perfusion engine: Perfusion (key-locked, gated rank-1 cross-attention editing) in pure torch.

Nothing here imports the WebUI; the WebUI glue lives in scripts/ and perfusion/webui/.
"""

from .concept import Concept, ConceptError, load_concept, save_concept, validate
from .covariance import (
    Covariance,
    CovarianceError,
    build_covariance,
    cached_covariance,
    concept_gate,
    load_covariance,
    save_covariance,
)
from .edit import edited_output, gate, gate_direction, projection_coefficients, similarity
from .hooks import Activation, Activations, ConceptMismatch, Editor, Hooks, KeyContexts, attach, find_cross_attention
from .tokens import concept_rows, word_rows

__all__ = [
    "Activation",
    "Activations",
    "Concept",
    "ConceptError",
    "ConceptMismatch",
    "Covariance",
    "CovarianceError",
    "Editor",
    "Hooks",
    "KeyContexts",
    "attach",
    "build_covariance",
    "cached_covariance",
    "concept_gate",
    "concept_rows",
    "edited_output",
    "find_cross_attention",
    "gate",
    "gate_direction",
    "load_concept",
    "load_covariance",
    "projection_coefficients",
    "save_concept",
    "save_covariance",
    "similarity",
    "validate",
    "word_rows",
]
