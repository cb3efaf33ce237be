"""``chat_template``: conversations rendered by a jinja chat template.

Rows hold a list of messages (``messages`` by default; ``field_messages``
names another column, and a ShareGPT ``conversations`` column is found on its
own). Each message's keys are mapped with ``message_property_mappings``
(``{role: from, content: value}``; ShareGPT's ``from``/``value`` are also
recognised unmapped) and its role through ``roles`` (``{user: [human],
assistant: [gpt]}``, added to the defaults below).

How the mask is found. The whole conversation is rendered once and tokenized
once with character offsets (``token_offsets``: for byte-level tokenizers read
from the ids, a checked shortcut). The conversation prefix up to and including
message *k* is rendered too; its length is where message *k* ends in the full
text, so message *k* owns the characters between the end of message *k-1* and
its own end. (Rendering each prefix is the exact way; where a conversation's
shape -- its roles in order and its tools -- has been seen before,
``chat_boundaries`` reads the same ends off the one whole rendering.) Inside
that span the message's content is located, and:

* tokens overlapping the content are trained when the role is in
  ``roles_to_train`` (default ``["assistant"]``) or the message says
  ``training: true``; ``training: false`` masks it whatever its role;
* special tokens after the content inside the span (``<|im_end|>``,
  ``<|eot_id|>``, the EOS) are the turn's end markers: trained by
  ``train_on_eot`` (markers that are not the EOS) and ``train_on_eos`` (the
  EOS), each ``turn`` (default: markers of trained turns), ``all``, ``last``
  (the last trained turn only) or ``none``;
* an assistant's reasoning (``reasoning_content``, or the key ``field_thinking``
  names; ``split_thinking`` moves a leading ``<think>...</think>`` out of the
  content) reaches the template under ``template_thinking_key`` and is
  trained with the answer: a trained message's span runs from its reasoning
  to the end of its content, as Axolotl trains it;
* content given as parts with ``train`` (or ``weight``) flags, or with
  ``message_field_training_detail`` character ranges, trains only the tokens
  wholly inside a trained part (a token straddling a boundary is masked);
* a trained message with no text but other keys (``tool_calls``: every key
  besides role, content and the training flag reaches the template) is trained
  from the end of the generation prompt (rendered for the messages before it)
  to its end marker;
* everything else (role headers, system and user text) is masked, unless
  ``train_on_inputs``, which trains every token.

A token belongs to a message when its first character lies in the message's
span, and counts as content when it overlaps the content: in ``"Bot: the"``
the token ``" the"`` carries the template's space and is trained, because the
model has to produce it.

A template whose rendering of a prefix is not a prefix of the full rendering
cannot be masked this way; such a row is reported as bad. So is a row the
template refuses (``raise_exception``, e.g. for a role it has no markup for,
or an undefined value): the error names the row, and ``skip_bad_rows`` skips it.
"""

from __future__ import annotations

import json

from itertools import chain

import numpy as np
from jinja2 import TemplateError
from plait.errors import BadRowError, ConfigError

from plait_formats.chat_boundaries import SENTINEL, boundary_cache, shape_of
from plait_formats.collector import collector_paused
from plait_formats.common import IGNORE, batch_size, train_on_inputs
from plait_formats.token_offsets import TokenBatch, encode_with_spans

#: canonical role -> names accepted in data; ``roles:`` in the dataset config adds to these
DEFAULT_ROLES = {
    "system": ["system"],
    "user": ["user", "human"],
    "assistant": ["assistant", "gpt", "model"],
    "tool": ["tool", "function", "ipython", "observation"],
}


def resolve_template(cfg, dataset_cfg, tokenizer) -> str:
    """The dataset's own template when it names one (any name a plugin's
    ``chat_templates`` gives, a fallback name, or jinja), else the tokenizer's
    (``load_tokenizer`` already applied the run's ``chat_template``)."""
    from plait.chat_templates import lookup_chat_template

    if dataset_cfg.chat_template_jinja:
        return dataset_cfg.chat_template_jinja
    name = dataset_cfg.chat_template
    if name == "jinja" and getattr(cfg, "chat_template_jinja", None):
        return cfg.chat_template_jinja  # Axolotl's "jinja": the run's chat_template_jinja text
    if name and name != "tokenizer_default":
        return lookup_chat_template(getattr(cfg, "plugin_manager", None), name, tokenizer,
                                    key=f"config key 'chat_template' of dataset {dataset_cfg.path!r}")
    if not tokenizer.chat_template:
        raise ConfigError(f"dataset {dataset_cfg.path!r} has type chat_template but the tokenizer has no chat "
                          f"template; set chat_template (chatml, llama3, ...) or chat_template_jinja")
    return tokenizer.chat_template


def text_and_ranges(index: int, number: int, content) -> tuple[str, list | None]:
    """A message's text and, when its parts carry ``train`` / ``weight``
    flags (Axolotl's per-part training), ``[(begin, end, train)]`` character
    ranges of the text (end exclusive); ``None`` when no part says."""
    if isinstance(content, str):
        return content, None
    text = text_of(index, number, content)
    if not isinstance(content, list) or not any(isinstance(p, dict) and ("train" in p or "weight" in p)
                                                for p in content):
        return text, None
    ranges, offset = [], 0
    for part in content:
        piece = part.get("text", part.get("value")) if isinstance(part, dict) else part
        train = True
        if isinstance(part, dict) and part.get("train") is not None:
            train = bool(part["train"])
        elif isinstance(part, dict) and part.get("weight") is not None:
            train = part["weight"] not in (0, 0.0)
        ranges.append((offset, offset + len(piece), train))
        offset += len(piece)
    return text, ranges


def detail_ranges(index: int, number: int, detail) -> list:
    """``message_field_training_detail`` ([{begin_offset, end_offset, train}],
    end inclusive as in Axolotl) as ``[(begin, end, train)]``, end exclusive."""
    try:
        return [(int(d["begin_offset"]), int(d["end_offset"]) + 1, bool(d["train"])) for d in detail]
    except (KeyError, TypeError, ValueError):
        raise BadRowError(index, f"message {number}: the training detail must be a list of "
                                 f"{{begin_offset, end_offset, train}}, got {detail!r}") from None


def split_reasoning(content: str) -> tuple[str, str | None]:
    """``("answer", "reasoning")`` for content that opens with a
    ``<think>...</think>`` block; ``(content, None)`` otherwise."""
    stripped = content.lstrip()
    if not stripped.startswith("<think>") or "</think>" not in stripped:
        return content, None
    reasoning, _, answer = stripped[len("<think>"):].partition("</think>")
    return answer.lstrip("\n"), reasoning.strip("\n")


def text_of(index: int, number: int, content) -> str:
    """A message's text: a string as it is, or a list of content parts (the
    OpenAI / LLaMA-Factory shape ``[{"type": "text", "text" | "value": ...}]``)
    joined; a part that is not text (an image) is a bad row, since a text
    model cannot be trained on it."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise BadRowError(index, f"message {number} content is a {type(content).__name__}, expected text or a "
                                 f"list of text parts")
    texts = []
    for part in content:
        text = part.get("text", part.get("value")) if isinstance(part, dict) else part
        kind = part.get("type", "text") if isinstance(part, dict) else "text"
        if kind != "text" or not isinstance(text, str):
            raise BadRowError(index, f"message {number} has a content part of type {kind!r}; only text parts "
                                     f"({{'type': 'text', 'text': ...}}) can be trained on")
        texts.append(text)
    return "".join(texts)


def role_lookup(dataset_cfg) -> dict[str, str]:
    """Name in the data -> canonical role."""
    roles = {canonical: list(names) for canonical, names in DEFAULT_ROLES.items()}
    for canonical, names in (dataset_cfg.roles or {}).items():
        roles[canonical] = list(dict.fromkeys([canonical, *names]))
    lookup = {}
    for canonical, names in roles.items():
        for name in names:
            lookup[name] = canonical
    return lookup


def compile_template(template: str):
    """The template compiled in transformers' own jinja environment (sandbox,
    filters, globals), so rendering matches ``apply_chat_template`` without its
    per-call overhead; ``None`` when that private helper is not there, and
    rendering falls back to ``apply_chat_template``."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:
        return None
    return _compile_jinja_template(template)


class ChatFormat:
    """Settings of one ``chat_template`` dataset, resolved once per batch."""

    def __init__(self, cfg, dataset_cfg, tokenizer):
        self.tokenizer = tokenizer
        self.template = resolve_template(cfg, dataset_cfg, tokenizer)
        self.roles = role_lookup(dataset_cfg)
        mappings = dict(dataset_cfg.message_property_mappings or {})
        self.role_key = mappings.get("role") or dataset_cfg.message_field_role
        self.content_key = mappings.get("content") or dataset_cfg.message_field_content
        self.training_key = dataset_cfg.message_field_training or "training"
        self.detail_key = getattr(dataset_cfg, "message_field_training_detail", None)
        self.thinking_key = getattr(dataset_cfg, "field_thinking", None) or "reasoning_content"
        self.template_thinking_key = getattr(dataset_cfg, "template_thinking_key", None) or "reasoning_content"
        self.split_thinking = bool(getattr(dataset_cfg, "split_thinking", None))
        # a message's keys read above; the others reach the template as they are
        self.read_keys = {self.role_key, self.content_key, self.training_key, self.detail_key, self.thinking_key,
                          "role", "content", "from", "value"}
        self.roles_to_train = set(dataset_cfg.roles_to_train or ["assistant"])
        self.train_on_eos = dataset_cfg.train_on_eos or "turn"
        self.train_on_eot = dataset_cfg.train_on_eot or dataset_cfg.train_on_eos or "turn"
        self.drop_system = bool(dataset_cfg.drop_system_message)
        self.train_all = train_on_inputs(cfg, dataset_cfg)
        self.messages_key = dataset_cfg.field_messages
        self.tools_key = dataset_cfg.field_tools or "tools"
        # markers that may close a turn: special tokens other than BOS and pad. Llama 3's
        # <|eot_id|> is a special added token but not in all_special_ids, hence both sources.
        skip = {tokenizer.bos_token_id, tokenizer.pad_token_id} - {tokenizer.eos_token_id}
        special = set(tokenizer.all_special_ids)
        special |= {i for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special}
        self.marker_ids = special - skip
        self.eos_id = tokenizer.eos_token_id
        if getattr(cfg, "eot_tokens", None):
            # Axolotl's eot_tokens: exactly these close a turn (with the EOS), not every special token
            self.marker_ids = end_of_turn_ids(cfg.eot_tokens, tokenizer) | ({self.eos_id} - {None})
        self.compiled = compile_template(self.template)
        # the template's globals (raise_exception, range, ...) first, then bos_token, eos_token, ... as
        # transformers passes them; merged once so each render's context takes the dict as it is
        # instead of copying the globals' ChainMap (most of a small render's time)
        self.template_vars = dict(self.compiled.globals) if self.compiled is not None else {}
        self.template_vars.update(tokenizer.special_tokens_map)
        # Axolotl's chat_template_kwargs (enable_thinking: false, ...) reach the template as variables
        self.template_vars.update(getattr(cfg, "chat_template_kwargs", None) or {})
        # skeletons of conversation shapes, kept across batches: they depend on the template and the
        # variables given to it besides the messages (its globals come with the template)
        self.boundaries = boundary_cache(self.template, {**tokenizer.special_tokens_map,
                                                         **(getattr(cfg, "chat_template_kwargs", None) or {})})
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError("type chat_template needs a fast tokenizer (character offsets); "
                              "set tokenizer_use_fast: true")

    # ---------------------------------------------------------- messages

    def messages_column(self, batch) -> list:
        key = self.messages_key
        if key is None:
            key = "messages" if "messages" in batch or "conversations" not in batch else "conversations"
        if key not in batch:
            raise BadRowError(0, f"missing field {key!r} with the conversation; the rows have {sorted(batch)} "
                                 f"(set field_messages)")
        return batch[key]

    def normalise(self, index: int, raw) -> list[dict]:
        """Raw messages of row ``index`` -> ``[{role, content, train}]``."""
        if not raw:
            raise BadRowError(index, "empty conversation")
        messages = []
        for number, message in enumerate(raw):
            if not isinstance(message, dict):
                raise BadRowError(index, f"message {number} is a {type(message).__name__}, expected an object")
            role_key = self.role_key or ("role" if message.get("role") is not None else "from")
            content_key = self.content_key or ("content" if message.get("content") is not None or
                                               message.get("value") is None else "value")
            name = message.get(role_key)
            if name not in self.roles:
                raise BadRowError(index, f"message {number} has unknown role {name!r} (key {role_key!r}); "
                                         f"known: {sorted(self.roles)} (map others with roles:)")
            role = self.roles[name]
            if role == "system" and self.drop_system:
                continue
            content, ranges = text_and_ranges(index, number, message.get(content_key))
            if self.detail_key and message.get(self.detail_key) is not None:
                ranges = detail_ranges(index, number, message[self.detail_key])
            flag = message.get(self.training_key)
            train = (role in self.roles_to_train) if flag is None else bool(flag)
            reasoning = message.get(self.thinking_key)
            if reasoning is None and self.split_thinking and role == "assistant":
                content, reasoning = split_reasoning(content)
                ranges = None  # offsets into the unsplit content no longer apply
            # other keys (tool_calls, name, tool_call_id, ...) go to the template as they are
            extra = {} if message.keys() <= self.read_keys else {
                k: v for k, v in message.items() if k not in self.read_keys and v is not None}
            if reasoning is not None:
                extra[self.template_thinking_key] = reasoning
            messages.append({"role": role, "content": content, "train": train, "extra": extra,
                             "reasoning": reasoning if isinstance(reasoning, str) else None, "ranges": ranges})
        if not messages:
            raise BadRowError(index, "empty conversation (every message was dropped)")
        return messages

    def tools(self, batch, index):
        column = batch.get(self.tools_key)
        value = column[index] if column is not None else None
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise BadRowError(index, f"field {self.tools_key!r} is not valid JSON: {exc}") from None
        return value or None

    # --------------------------------------------------------- rendering

    def template_messages(self, messages: list[dict]) -> list[dict]:
        """Messages as the template sees them: role, content and the other
        keys the data gave (tool_calls, reasoning under the template's key, ...)."""
        return [{"role": m["role"], "content": m["content"], **m.get("extra", {})} for m in messages]

    def render(self, messages, tools, add_generation_prompt: bool = False, *, index: int = 0,
               last_index: int | None = None, plain: list[dict] | None = None) -> str:
        """The template's text for ``messages``; a template that refuses
        them (``raise_exception``, an undefined value) makes row ``index``
        a bad row.

        ``last_index``: the index of the whole conversation's last message,
        given to the template as ``real_last_index`` (the variable Axolotl's
        templates read) when ``messages`` is a prefix of it. Qwen 3 renders the
        last answer differently from earlier ones; told where the real end is,
        a prefix renders as the start of the whole. ``plain``: the messages
        as the template sees them, when the caller already built them."""
        if plain is None:
            plain = self.template_messages(messages)
        extra = {} if last_index is None else {"real_last_index": last_index}
        try:
            if self.compiled is not None:
                variables = {**self.template_vars, "messages": plain, "tools": tools, "documents": None,
                             "add_generation_prompt": add_generation_prompt, **extra}
                # the variables already hold the globals: a context without them skips copying jinja's
                # ChainMap of globals on every render (a third of a short render's time)
                context = self.compiled.environment.context_class(self.compiled.environment, variables,
                                                                   self.compiled.name, self.compiled.blocks)
                return self.compiled.environment.concat(self.compiled.root_render_func(context))
            return self.tokenizer.apply_chat_template(plain, tools=tools, chat_template=self.template,
                                                      tokenize=False, add_generation_prompt=add_generation_prompt,
                                                      **extra)
        except TemplateError as exc:
            roles = ", ".join(dict.fromkeys(m["role"] for m in messages))
            raise BadRowError(index, f"the chat template refused this conversation (roles: {roles}): "
                                     f"{type(exc).__name__}: {exc}") from None

    def render_with_ends(self, index: int, messages: list[dict], tools) -> tuple[str, list[int], dict]:
        """The whole conversation's text, where each message ends in it (the
        length of the rendering of the messages up to and including it), and
        for trained assistant messages without text content (tool calls only)
        where their body starts: after the generation prompt.

        The ends come from one render where the conversation's shape allows
        (``chat_boundaries``), else from rendering every prefix."""
        last = len(messages) - 1
        plain = self.template_messages(messages)
        full = self.render(messages, tools, index=index, last_index=last, plain=plain)

        def exact() -> list[int]:
            return self.prefix_ends(index, messages, tools, plain, full)

        def sentinel_rendering() -> tuple[str, list[int]]:
            stand_ins = [{**message, "content": SENTINEL.format(k)} for k, message in enumerate(plain)]
            text = self.render(messages, tools, index=index, last_index=last, plain=stand_ins)
            return text, self.prefix_ends(index, messages, tools, stand_ins, text)

        ends = self.boundaries.ends(shape_of(messages, tools), full, [m["content"] for m in messages], exact,
                                    sentinel_rendering)
        bodies = {}
        for k, message in enumerate(messages):
            if message["extra"] and message["train"] and not message["content"].strip():
                start = ends[k - 1] if k else 0
                prompt = self.render(messages[:k], tools, add_generation_prompt=True, index=index, last_index=last,
                                     plain=plain[:k])
                if full.startswith(prompt) and start <= len(prompt) <= ends[k]:
                    bodies[k] = len(prompt)
        return full, ends, bodies

    def prefix_ends(self, index: int, messages: list[dict], tools, plain: list[dict], full: str) -> list[int]:
        """Where each message ends in ``full`` (the rendering of ``plain``),
        the exact way: the length of the rendering of the messages up to and
        including it, each checked to be a prefix of ``full``."""
        last = len(messages) - 1
        ends = []
        for k in range(1, len(messages)):
            prefix = self.render(messages[:k], tools, index=index, last_index=last, plain=plain[:k])
            if not full.startswith(prefix):
                raise BadRowError(index, f"the chat template renders the first {k} messages differently from the "
                                         f"start of the whole conversation, so turns cannot be masked")
            ends.append(len(prefix))
        ends.append(len(full))
        return ends

    def labels(self, index: int, messages: list[dict], full: str, ends: list[int], bodies: dict, ids,
               offsets) -> list[int]:
        """Labels for the tokens ``ids`` of ``full`` (``offsets``: their character spans)."""
        if self.train_all:
            return list(ids)
        spans = self.spans(index, messages, full, ends, bodies, ids, offsets)
        return self.label_rows([(messages, spans, ids, offsets)])[0]

    def spans(self, index: int, messages: list[dict], full: str, ends: list[int], bodies: dict, ids,
              offsets) -> list[tuple[int, int, int, int]]:
        """``(start, content start, content end, end)`` in ``full`` of each
        message; a message with trained parts also gets its ``absolute``
        character ranges."""
        spans, start = [], 0
        for k, (message, end) in enumerate(zip(messages, ends)):
            content = message["content"].strip()
            found = full.find(content, start, end) if content else -1
            if content and found < 0 and message["train"]:
                raise BadRowError(index, f"the chat template does not render the content of message "
                                         f"{k + 1} ({message['role']}) verbatim, so it cannot be masked")
            # an untrained message a template folds into a later turn (Gemma's and Mistral's system
            # message goes into the first user turn) labels nothing: an empty span is exact
            c_start, c_end = (found, found + len(content)) if found >= 0 else (start, start)
            reasoning = message.get("reasoning")
            reasoning = reasoning.strip() if reasoning and message["train"] else None
            if reasoning:
                # the reasoning the template renders before the answer is trained with it
                at = full.find(reasoning, start, found if found >= 0 else end)
                if at >= 0:
                    c_start = at
                    c_end = max(c_end, at + len(reasoning))
            if message.get("ranges") and found >= 0:
                # per-part training: absolute character ranges a token must lie wholly inside
                lead = len(message["content"]) - len(message["content"].lstrip())
                message["absolute"] = [(found - lead + b, found - lead + e) for b, e, keep in message["ranges"]
                                       if keep]
            if k in bodies:
                # a tool-call message: its body runs from the generation prompt to its first marker
                c_start = bodies[len(spans)]
                markers = [a for (a, _), t in zip(offsets, ids) if c_start <= a < end and t in self.marker_ids]
                c_end = markers[0] if markers else end
            spans.append((start, c_start, c_end, end))
            start = end
        return spans

    def label_rows(self, rows: list[tuple[list[dict], list[tuple], list[int], list]]) -> list[list[int]]:
        """Labels of many rows ``(messages, spans, ids, offsets)`` at once (see :meth:`label_batch`)."""
        tokens = TokenBatch.from_lists([row[2] for row in rows], [row[3] for row in rows])
        return self.label_batch([row[0] for row in rows], [row[1] for row in rows], tokens)

    @staticmethod
    def last_trained(conversations: list[list[dict]], row_messages) -> np.ndarray:
        """Each row's last trained message, as an index on the batch's message axis (-1: none)."""
        last = np.full(len(conversations), -1)
        for r, messages in enumerate(conversations):
            trained = [k for k, m in enumerate(messages) if m["train"]]
            if trained:
                last[r] = row_messages[r] + trained[-1]
        return last

    def label_batch(self, conversations: list[list[dict]], span_rows: list[list[tuple]],
                    tokens: TokenBatch) -> list[list[int]]:
        """Labels of many rows: each row's messages, their spans and its tokens.

        The rows are laid one after another on a single character axis and
        their messages on a single index axis, so each rule below is one array
        operation over every token of the batch rather than a Python loop:

        * a token belongs to the message whose span holds its first character
          (a running maximum, so a token never moves back to an earlier
          message, and never past its row's last message);
        * it is trained when its message is trained and it overlaps the
          content (wholly inside a trained part, where parts say);
        * an end marker after the content is trained as ``train_on_eos`` /
          ``train_on_eot`` say (``all``, ``turn``: of trained messages,
          ``last``: of the row's last trained message, ``none``)."""
        lengths = tokens.lengths
        ids = tokens.flat_ids
        messages_per_row = [len(spans) for spans in span_rows]
        # each row's characters start after the previous row's last span end
        row_chars = np.cumsum([0] + [spans[-1][3] + 1 for spans in span_rows[:-1]])
        row_messages = np.cumsum([0] + messages_per_row[:-1])
        flat_spans = chain.from_iterable(chain.from_iterable(span_rows))
        spans = np.fromiter(flat_spans, dtype=np.int64, count=4 * sum(messages_per_row)).reshape(-1, 4)
        spans += np.repeat(row_chars, messages_per_row)[:, None]
        messages = [message for row in conversations for message in row]
        train_of_message = np.array([m["train"] for m in messages], dtype=bool)

        # per token, from per-row values: repeating them is one pass, cheaper than indexing by a row array
        shift = np.repeat(row_chars, lengths)
        t_start = tokens.starts + shift
        t_end = tokens.ends + shift
        row_last = np.repeat(row_messages + np.array(messages_per_row) - 1, lengths)
        owner, ascending = spans_before(spans[:, 3], t_start)
        owner = np.minimum(owner, row_last, out=owner)
        if not ascending and len(owner):
            # with the starts ascending the counts already are (and so is row_last): nothing to carry
            owner = np.maximum.accumulate(owner)
        c_start, c_end = spans[owner, 1], spans[owner, 2]
        train = train_of_message[owner]

        in_content = train & (t_end > c_start) & (t_start < c_end)
        labelled = in_content.copy()
        for k in [k for k, message in enumerate(messages) if "absolute" in message]:
            allowed = messages[k]["absolute"]
            mine = np.flatnonzero(in_content & (owner == k))
            base = shift[mine]
            inside = np.zeros(len(mine), dtype=bool)
            for begin, end in allowed:
                inside |= (t_start[mine] - base >= begin) & (t_end[mine] - base <= end)
            labelled[mine] = inside

        # markers: tokens after their message's content (a few a message) whose id is a marker's
        after = np.flatnonzero(~in_content & (t_start >= c_end))
        after = after[np.isin(ids[after], list(self.marker_ids))]
        if not len(after):
            return labels_from_mask(tokens.ids, labelled, lengths)
        marker_ids = ids[after]
        is_eos = marker_ids == (self.eos_id if self.eos_id is not None else -1)
        for mode, which in ((self.train_on_eos, is_eos), (self.train_on_eot, ~is_eos)):
            if mode == "all":
                labelled[after[which]] = True
            elif mode == "turn":
                labelled[after[which & train[after]]] = True
            elif mode == "last":
                token_row = np.searchsorted(np.cumsum(lengths), after, side="right")
                last = self.last_trained(conversations, row_messages)[token_row]
                labelled[after[which & (owner[after] == last)]] = True
        return labels_from_mask(tokens.ids, labelled, lengths)


def labels_from_mask(ids: list[list[int]], labelled: np.ndarray, lengths: list[int]) -> list[list[int]]:
    """Each row's labels: its ids where ``labelled`` (flat over the rows) is
    set, ``IGNORE`` elsewhere.

    Trained tokens come in a few runs a row (an answer and its end marker), so
    each row starts as all ``IGNORE`` and gets its runs copied from its ids:
    half the time of turning one label array into Python ints and cutting it."""
    cuts = np.cumsum([0] + lengths)
    row_start = np.zeros(len(labelled) + 1, dtype=bool)
    row_start[cuts] = True  # runs are cut at row boundaries
    before = np.concatenate([[False], labelled[:-1]])
    after = np.concatenate([labelled[1:], [False]])
    starts = np.flatnonzero(labelled & ~(before & ~row_start[:-1])).tolist()
    stops = (np.flatnonzero(labelled & ~(after & ~row_start[1:])) + 1).tolist()
    rows = (np.searchsorted(cuts, starts, side="right") - 1).tolist()
    labels = [[IGNORE] * n for n in lengths]
    cuts = cuts.tolist()
    for row, start, stop in zip(rows, starts, stops):
        first, last = start - cuts[row], stop - cuts[row]
        labels[row][first:last] = ids[row][first:last]
    return labels


def spans_before(span_ends: np.ndarray, starts: np.ndarray) -> tuple[np.ndarray, bool]:
    """For each token start, how many spans end at or before it (the index
    of the message whose span holds it), ``span_ends`` ascending; and
    whether ``starts`` ascend (then so do the counts).

    Token starts are usually ascending too; then each span end is placed
    among the tokens (one binary search per span, not per token) and the
    counts are summed up, instead of a binary search per token."""
    if len(starts) > 1 and np.all(starts[1:] >= starts[:-1]):
        first_after = np.searchsorted(starts, span_ends, side="left")  # first token starting at or after it
        return np.cumsum(np.bincount(first_after, minlength=len(starts) + 1))[:len(starts)], True
    return np.searchsorted(span_ends, starts, side="right"), len(starts) <= 1


def end_of_turn_ids(tokens, tokenizer) -> set[int]:
    """The ids of ``eot_tokens``; each must be one token of the vocabulary."""
    ids = set()
    for token in tokens:
        encoded = tokenizer.encode(token, add_special_tokens=False)
        if len(encoded) != 1:
            raise ConfigError(f"config key 'eot_tokens': {token!r} is {len(encoded)} tokens for this tokenizer, not "
                              f"one; add it under tokens: (or special_tokens:) so it becomes a single token")
        ids.add(encoded[0])
    return ids


def tokenize(cfg, dataset_cfg, tokenizer, batch) -> dict:
    with collector_paused():
        return tokenize_batch(cfg, dataset_cfg, tokenizer, batch)


def tokenize_batch(cfg, dataset_cfg, tokenizer, batch) -> dict:
    fmt = ChatFormat(cfg, dataset_cfg, tokenizer)
    conversations = fmt.messages_column(batch)
    rows = []
    for index in range(batch_size(batch)):
        messages = fmt.normalise(index, conversations[index])
        rows.append((messages, *fmt.render_with_ends(index, messages, fmt.tools(batch, index))))
    tokens = encode_with_spans(tokenizer, [full for _, full, _, _ in rows])
    if fmt.train_all:
        return {"input_ids": tokens.ids, "labels": [list(row) for row in tokens.ids]}
    # a row's token spans are only read for its tool-call messages (bodies); the labels take them as arrays
    spans = [fmt.spans(index, messages, full, ends, bodies, tokens.ids[index],
                       tokens.row_offsets(index) if bodies else ())
             for index, (messages, full, ends, bodies) in enumerate(rows)]
    labels = fmt.label_batch([messages for messages, *_ in rows], spans, tokens)
    return {"input_ids": tokens.ids, "labels": labels}


def encode_with_offsets(tokenizer, texts: list[str]) -> tuple[list[list[int]], list[list[tuple]]]:
    """Token ids and ``(start, end)`` character offsets of ``texts`` per row,
    without special tokens, in one call (``token_offsets.encode_with_spans``;
    plait-vision tokenizes its rendered chats with it)."""
    tokens = encode_with_spans(tokenizer, texts)
    return tokens.ids, tokens.offsets()
