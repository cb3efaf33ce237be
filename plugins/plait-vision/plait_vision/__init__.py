"""plait-vision: fine-tune vision-language models on chat data with images.

Modules, one job each:

``config``     the keys (``processor_type``, ``image_size``, ...) and their cross-key rules
``processor``  loading the model's processor (and an image-only one where videos cannot load)
``images``     image references in messages, opening and resizing them, bad-image errors
``tokenize``   rendering conversations with image placeholders, expanding them, masking labels
``collate``    images -> pixel tensors for a micro-batch, next to the prepared token ids
``model``      loading ``AutoModelForImageTextToText``, freezing the vision tower, LoRA scope
``plugin``     the hookimpls
"""

__version__ = "0.1.0"
