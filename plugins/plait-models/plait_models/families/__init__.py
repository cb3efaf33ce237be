"""One module per family; :data:`FAMILIES` lists them in lookup order.

Adding a family: write ``<name>.py`` with a ``FAMILY = ModelFamily(...)`` and
append it below (see the package README).
"""

from . import gemma2, gemma3, llama, mistral, mixtral, phi3, qwen2, qwen2_moe, qwen3, qwen3_moe

FAMILIES = tuple(
    module.FAMILY
    for module in (llama, mistral, mixtral, qwen2, qwen3, qwen2_moe, qwen3_moe, gemma2, gemma3, phi3)
)
