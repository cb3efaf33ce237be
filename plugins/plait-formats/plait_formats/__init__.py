"""Dataset formats for Plait, with Axolotl's type names and prompt text.

The entry point loads :mod:`plait_formats.plugin`, which registers each
format through the ``dataset_formats`` hook (core's ``tokenize`` dispatches to
it) and imports the format module on first use (``plait --help`` must stay
light). Each format's dataset-entry keys are in :mod:`plait_formats.entries`.

==================  =====================================================
type                module
==================  =====================================================
alpaca, alpaca_*    :mod:`plait_formats.alpaca` (also alpaca:<style>,
                    gpteacher, oasst, orcamini, context_qa, metharme)
chat_template       :mod:`plait_formats.chat`
llama2_chat         :mod:`plait_formats.llama2_chat` (chat_template with
                    Llama 2 chat's layout)
pygmalion           :mod:`plait_formats.pygmalion`
completion          :mod:`plait_formats.text`
pretraining         :mod:`plait_formats.text`
input_output        :mod:`plait_formats.segments`
user_defined        :mod:`plait_formats.user_defined`
pretokenized        :mod:`plait_formats.pretokenized` (also rows with
                    ``input_ids`` and no ``type``)
==================  =====================================================
"""

__version__ = "0.2.0"
