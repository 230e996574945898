"""Names for what softprompt gets from transformers, which ships no type information.

``Model`` is a transformers causal LM (a ``torch.nn.Module`` with ``.config``,
``.get_input_embeddings()``, ``.lm_head`` and the rest); ``Tokenizer`` is its tokenizer.
Both are ``Any`` to the type checker: attribute access on them is not checked, where
``torch.nn.Module`` would wrongly type every attribute as a tensor or a submodule.
"""

from __future__ import annotations

from typing import Any

Model = Any
Tokenizer = Any
