"""``chat_template`` rows with images: text, image references, masked labels.

For each row:

1. image parts are taken out of the messages (their references kept in
   order) and every message's text is what plait-formats' ``chat_template``
   masks, so ``roles_to_train``, ``train_on_eos``, ``train_on_inputs`` ...
   mean the same here;
2. the template renders the conversation with one placeholder per image
   (``<|vision_start|><|image_pad|><|vision_end|>``, ``<image>``, ...), and
   that text is tokenized and masked turn by turn (:class:`ChatFormat`);
3. the processor, given the text and the images, expands each placeholder to
   the image's tokens (their number depends on the image's size). Each token
   of step 2 is found again in order in the expanded ids; tokens the expansion
   inserted are image tokens, and they and every image-marker token are
   masked (-100). Trained tokens must all be found, or the row is bad.

What is kept per row: the expanded ``input_ids``, ``labels`` and, as
``extras``, the rendered text and the image references (no pixels: the
collator makes them per micro-batch from the same text and images).
"""

from __future__ import annotations

import os

from plait.errors import BadRowError
from plait_formats.chat import ChatFormat, encode_with_offsets
from plait_formats.common import IGNORE, batch_size

from plait_vision.images import ImageError, describe, is_image_part, open_image, part_reference, reference

#: key under a message's ``extra`` that holds its content parts for the template
PARTS = "_content_parts"


class VisionChatFormat(ChatFormat):
    """plait-formats' chat format, with content parts kept for the template."""

    def __init__(self, cfg, dataset_cfg, tokenizer, processor):
        super().__init__(cfg, dataset_cfg, tokenizer)
        self.cfg, self.processor = cfg, processor
        path = dataset_cfg.path
        self.base_dir = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))

    def split_images(self, index: int, raw, column_images) -> tuple[list, list[dict]]:
        """``raw`` messages with their content parts set aside (text joined
        for masking, parts under ``extra`` for the template), and the image
        references in the order the template places them."""
        if not isinstance(raw, list):
            return raw, []
        pending = [self._column_ref(index, value) for value in _as_list(column_images)]
        messages, refs = [], []
        for number, message in enumerate(raw):
            if not isinstance(message, dict):
                messages.append(message)
                continue
            key = self.content_key or ("content" if message.get("content") is not None or
                                       message.get("value") is None else "value")
            content = message.get(key)
            if isinstance(content, list):
                parts, text = [], []
                for part in content:
                    if is_image_part(part):
                        try:
                            ref = part_reference(part, self.base_dir)
                        except ImageError as exc:
                            raise BadRowError(index, f"message {number}: {exc}") from None
                        if ref is None:
                            if not pending:
                                raise BadRowError(index, f"message {number} has an image part without path, "
                                                         f"image or base64, and the row's images column has no "
                                                         f"image left for it")
                            ref = pending.pop(0)
                        refs.append(ref)
                        parts.append({"type": "image"})
                    elif isinstance(part, dict) and part.get("type", "text") == "text":
                        value = part.get("text", part.get("value")) or ""
                        parts.append({"type": "text", "text": value})
                        text.append(value)
                    else:
                        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                        raise BadRowError(index, f"message {number} has a content part of type {kind!r}; "
                                                 f"text and image parts are accepted")
                message = {**message, key: "".join(text), PARTS: parts}
            messages.append(message)
        if pending:
            # images from the column with no placeholder go first in the first user message
            first_user = next((m for m in messages if isinstance(m, dict) and
                               self.roles.get(m.get(self.role_key or ("role" if m.get("role") else "from")))
                               == "user"), None)
            if first_user is None:
                raise BadRowError(index, f"the row has {len(pending)} image(s) in its images column but no user "
                                         f"message to place them in")
            key = self.content_key or ("content" if first_user.get("content") is not None else "value")
            parts = first_user.get(PARTS) or [{"type": "text", "text": first_user.get(key) or ""}]
            first_user[PARTS] = [{"type": "image"} for _ in pending] + parts
            refs = pending + refs
        return messages, refs

    def _column_ref(self, index: int, value) -> dict:
        try:
            return reference(value, self.base_dir)
        except ImageError as exc:
            raise BadRowError(index, f"images column: {exc}") from None

    def template_messages(self, messages: list[dict]) -> list[dict]:
        """The messages with their content parts (images in place) for the
        template; masking still reads the joined text."""
        plain = []
        for message in messages:
            extra = dict(message.get("extra", {}))
            parts = extra.pop(PARTS, None)
            plain.append({"role": message["role"], "content": parts if parts is not None else message["content"],
                          **extra})
        return plain

    def load_images(self, index: int, refs: list[dict]) -> list:
        images = []
        for number, ref in enumerate(refs):
            try:
                images.append(open_image(ref, self.cfg.image_size, self.cfg.image_resize_algorithm))
            except ImageError as exc:
                raise BadRowError(index, f"image {number + 1} of the row: {exc}") from None
        return images


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def expand_labels(ids: list[int], labels: list[int], expanded: list[int], image_ids: set[int]) -> list[int]:
    """Labels for ``expanded`` (the processor's ids): the tokens of ``ids``
    found again in order keep their label, inserted tokens and image tokens
    are masked. Raises ``ValueError`` when some token of ``ids`` is not found."""
    out, i = [], 0
    for token in expanded:
        if i < len(ids) and token == ids[i]:
            out.append(IGNORE if token in image_ids else labels[i])
            i += 1
        else:
            out.append(IGNORE)
    if i != len(ids):
        raise ValueError(f"the processor's ids do not contain the text's tokens in order (token {i} of {len(ids)} "
                         f"not found)")
    return out


def expanded_ids(processor, text: str, images: list) -> list[int]:
    """The processor's ids for ``text`` with ``images`` (placeholders expanded)."""
    encoded = processor(text=[text], images=[images] if images else None, add_special_tokens=False)
    ids = encoded["input_ids"][0]
    return ids.tolist() if hasattr(ids, "tolist") else list(ids)


def tokenize(cfg, dataset_cfg, tokenizer, batch, processor) -> dict:
    from plait_vision.processor import image_token_ids

    fmt = VisionChatFormat(cfg, dataset_cfg, tokenizer, processor)
    conversations = fmt.messages_column(batch)
    column = batch.get("images", batch.get("image"))
    image_ids = image_token_ids(processor)
    rendered = []
    for index in range(batch_size(batch)):
        raw, refs = fmt.split_images(index, conversations[index], column[index] if column is not None else None)
        messages = fmt.normalise(index, raw)
        full, ends, bodies = fmt.render_with_ends(index, messages, fmt.tools(batch, index))
        rendered.append((refs, messages, full, ends, bodies))
    # the batch's texts in one call of the Rust tokenizer (plait-formats' path for text chats); the images
    # are opened row by row below, so a batch never holds more than one row's pixels
    text_ids, text_offsets = encode_with_offsets(tokenizer, [row[2] for row in rendered])
    out = {"input_ids": [], "labels": [], "extras": []}
    for index, (refs, messages, full, ends, bodies) in enumerate(rendered):
        images = fmt.load_images(index, refs)
        labels = fmt.labels(index, messages, full, ends, bodies, text_ids[index], text_offsets[index])
        try:
            ids = expanded_ids(processor, full, images)
            expanded_labels = expand_labels(text_ids[index], labels, ids, image_ids)
        except (ValueError, IndexError) as exc:
            sources = ", ".join(describe(r) for r in refs) or "none"
            raise BadRowError(index, f"the processor could not place the row's {len(images)} image(s) ({sources}) "
                                     f"in the rendered conversation: {' '.join(str(exc).split())[:300]}") from None
        check_truncation(cfg, index, ids, image_ids)
        out["input_ids"].append(ids)
        out["labels"].append(expanded_labels)
        out["extras"].append({"text": full, "images": refs})
    return out


def check_truncation(cfg, index: int, ids: list[int], image_ids: set[int]) -> None:
    """Truncating a row must not cut through an image: the model needs all of
    an image's tokens (one per feature) or none."""
    limit = cfg.sequence_len
    if len(ids) > limit and cfg.excess_length_strategy == "truncate" and any(t in image_ids for t in ids[limit:]):
        raise BadRowError(index, f"the row is {len(ids)} tokens with its images and sequence_len {limit} would cut "
                                 f"an image's tokens; raise sequence_len, lower image_size, or use "
                                 f"excess_length_strategy: drop")
