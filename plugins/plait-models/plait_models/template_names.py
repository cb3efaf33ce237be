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
* ``phi_35``: :data:`~._common.PHI35`, Phi-3's tags without the BOS; an
  empty system message leaves no turn.
* ``qwen_25``: :data:`~._common.QWEN25`, chatml that always opens with a
  system turn (Qwen's default prompt when the conversation has none), with
  Qwen2.5's tool format: the tools listed in the system turn, calls as
  ``<tool_call>`` JSON, results as ``<tool_response>`` blocks in user turns.
* ``qwen3``: :data:`~._common.QWEN3`, Qwen 3's chatml with the same tool
  format and its reasoning: answers after the last user query show a
  ``<think>`` block (the final one always), earlier answers drop theirs.
  plait-formats passes ``real_last_index`` so each prefix of a conversation
  renders as the start of the whole, which turn masking needs.
  ``qwen3_5`` is the same text: Axolotl's ``qwen3_5`` differs from its
  ``qwen3`` only for list-of-parts content (images, videos), which text
  conversations do not have.
* ``mistral_v1``: :data:`~._common.MISTRAL_V1`, ``' [INST] ' + user + ' [/INST]'``
  and ``' ' + answer + '</s>'``, strictly alternating, no system role;
  ``mistral_v3_tekken``: :data:`~._common.MISTRAL_V3_TEKKEN`, the same
  without the spaces.
* ``alpaca``: :data:`~._common.ALPACA`, ``### Instruction:`` / ``### Response:``
  blocks a blank line apart, an optional first system message as plain text,
  EOS after each answer.
* ``deepseek_v2``: :data:`~._common.DEEPSEEK_V2`, ``<｜User｜>`` / ``<｜Assistant｜>``
  tags, a system message as its text and a blank line, EOS after each answer;
  ``deepseek_v3``: :data:`~._common.DEEPSEEK_V3`, the same tags with every
  system message joined after BOS, ``<｜end▁of▁sentence｜>`` after each answer
  and an answer's reasoning up to its last ``</think>`` dropped. Text
  conversations only: a tool result or an assistant turn with ``tool_calls``
  is refused (Axolotl's rendering of those is not reproduced). A system
  message after the first turn is hoisted, as in Axolotl, and plait-formats
  then refuses that row for masking, since its prefixes render differently.
* ``falcon_h1``: :data:`~._common.FALCON_H1`, chatml after BOS with every
  non-system message a turn under its own role; conversations with tool
  definitions are refused (Axolotl's tool preamble is not reproduced).
* ``llama4``: :data:`~._common.LLAMA4`, ``<|header_start|>role<|header_end|>``,
  a blank line, the text and ``<|eot|>``, the first system message stripped of
  surrounding whitespace; text messages only (tools, tool results, tool calls
  and image content are refused).

Each was compared with Axolotl's template of the same name over text
conversations (with and without a system message, several turns, empty
contents, reasoning) and every prefix, with and without the generation prompt.

Where Axolotl's template drops a message it does not know (``phi_35``,
``alpaca``, ``deepseek_v2``; a system message after the first in ``alpaca``
and ``falcon_h1``) ours refuses the row with the role named.

The rest of Axolotl's names (``cohere``, ``aya``, ``command_a`` and its
tool-use/RAG variants, ``exaone``, ``exaone4``, ``gemma3n``, ``gemma4``,
``gemma4_unified``, ``jamba``, ``metharme``, ``nemotron_h``,
``llama3_2_vision``, ``mistral_v2v3``, ``mistral_v7_tekken``, ``pixtral``)
come from :mod:`~.families._more_templates`, written from each family's
published format rather than compared with Axolotl's text: Axolotl's
``mistral_v2v3`` renders with its source indentation in transformers' jinja
environment and drops the system message unless the conversation ends with
a user turn, and its ``mistral_v7_tekken`` defaults to a system prompt
holding today's date; our ``mistral_v2v3`` puts the system text where
Mistral does (before the last user message) and our ``mistral_v7_tekken``
has no dated default. plait-vision gives
``qwen2_vl`` and ``llava``.

(Not called ``chat_templates``: importing a submodule of that name would
replace the package's ``chat_templates`` hookimpl with the module.)
"""

from __future__ import annotations

from plait_models.families._more_templates import MORE_CHAT_TEMPLATES
from plait_models.families._common import (ALPACA, DEEPSEEK_V2, DEEPSEEK_V3, FALCON_H1, GEMMA, LLAMA4, MISTRAL_V1,
                                          MISTRAL_V3_TEKKEN, PHI3, PHI35, QWEN3, QWEN25)

#: Axolotl name -> our jinja template
CHAT_TEMPLATES = {
    "gemma": GEMMA,
    "gemma3": GEMMA,
    "phi_3": PHI3,
    "phi_35": PHI35,
    "qwen_25": QWEN25,
    "qwen3": QWEN3,
    "qwen3_5": QWEN3,
    "mistral_v1": MISTRAL_V1,
    "mistral_v3_tekken": MISTRAL_V3_TEKKEN,
    "alpaca": ALPACA,
    "deepseek_v2": DEEPSEEK_V2,
    "deepseek_v3": DEEPSEEK_V3,
    "falcon_h1": FALCON_H1,
    "llama4": LLAMA4,
    **MORE_CHAT_TEMPLATES,
}
