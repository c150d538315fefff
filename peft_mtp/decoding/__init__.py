"""Self-speculative decoding with MTP heads: the heads draft, the model verifies, the output is unchanged.

`PeftModel.generate` on a model with active MTP heads speculates by default (see `generate.py` for
what it covers). Options are `generate` keyword arguments (`SpeculationOptions`); statistics come
back as `output.mtp_stats` with `return_dict_in_generate=True`. `reference_generate` is the same
algorithm in a short loop without caches, which the tests compare the optimised loop against.
`prompt_lookup` drafts copies of earlier text, verified beside the heads' drafts (`mtp_lookup`);
`NgramCorpus` drafts how a corpus most often went on (`mtp_lookup_corpus`).
"""

from .corpus import NgramCorpus
from .generate import generate_with_heads
from .lookup import prompt_lookup
from .loop import MTPGenerateOutput, SpeculativeDecoder, speculative_generate
from .options import SpeculationOptions
from .reference import reference_generate
from .stats import SpeculationStats
from .tree import DraftTree, chain_paths, default_chain_tree_paths, default_tree_paths

__all__ = [
    "DraftTree",
    "MTPGenerateOutput",
    "NgramCorpus",
    "SpeculationOptions",
    "SpeculationStats",
    "SpeculativeDecoder",
    "chain_paths",
    "default_chain_tree_paths",
    "default_tree_paths",
    "generate_with_heads",
    "prompt_lookup",
    "reference_generate",
    "speculative_generate",
]
