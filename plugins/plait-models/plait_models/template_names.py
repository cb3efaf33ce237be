"""Family chat templates under the names Axolotl configs use for them.

Contributed through the ``chat_templates`` hook, so ``chat_template: gemma``
(or ``tokenizer_default_fallback_gemma``) in an Axolotl config selects the
same text here. A name is listed only where our template renders what
Axolotl's template of that name renders for text conversations; core already
gives ``chatml`` and ``llama3``, which match :data:`~._common.CHATML` and
:data:`~._common.LLAMA3`.

* ``gemma``, ``gemma3``: :data:`~._common.GEMMA` (``<start_of_turn>`` /
  ``model`` / ``<end_of_turn>``, BOS first). Where Axolotl's ``gemma``
  refuses a system message, ours prepends it to the next user turn, as
  ``gemma3`` does.
* ``phi_3``: :data:`~._common.PHI3` (``<|user|>`` ... ``<|end|>``, BOS
  first); the same text for a conversation that ends with the assistant.

Left out on purpose, because the text differs: ``mistral_v1``,
``mistral_v2v3`` and the ``*_tekken`` variants (their spacing around
``[INST]``/``[/INST]`` and the answer is not :data:`~._common.MISTRAL`'s),
``qwen_25`` (adds a default system prompt), ``qwen3`` (adds a ``<think>``
block to the last answer) and ``phi_35`` (no BOS).

(Not called ``chat_templates``: importing a submodule of that name would
replace the package's ``chat_templates`` hookimpl with the module.)
"""

from __future__ import annotations

from plait_models.families._common import GEMMA, PHI3

#: Axolotl name -> our jinja template
CHAT_TEMPLATES = {
    "gemma": GEMMA,
    "gemma3": GEMMA,
    "phi_3": PHI3,
}
