"""Where each message of a rendered conversation ends, with one render per row.

The exact way to find message *k*'s end (``ChatFormat.prefix_ends``) renders
the conversation's first *k + 1* messages and takes the length: one render per
message, each as long as the prefix it renders, so a conversation of *n*
messages costs about *n* / 2 whole renders besides its own.

Most templates lay out a turn the same way whatever its text says. For those,
the text between the contents -- role headers, end markers, the system
prompt's frame -- depends only on the conversation's *shape*: its roles in
order and its tools. A :class:`Skeleton` is the exact method run once on a
conversation of that shape whose contents are unique sentinel strings: the
literal text between the sentinels, and in which literal (and where in it)
each message ends. A real row of that shape then needs only its own render:
walking the skeleton's literals through that text, with each content in
between, places every end; and the walk succeeds only when the rendering is
exactly literals and contents, so a row the template renders differently (a
branch on the content, e.g. Qwen 3 splitting ``</think>`` out of an answer)
falls back to the exact method.

What the walk cannot see is a template whose *prefix* renders depend on the
content while the whole rendering does not. So a shape is trusted only after
one real row of it gave the exact method's ends, and rows a template is likely
to branch on -- messages with keys besides role and content (tool calls,
reasoning), empty contents -- always take the exact method.
"""

from __future__ import annotations

import json
from itertools import accumulate
from dataclasses import dataclass
from functools import cached_property

#: a message's content in a skeleton's rendering; ``{}`` is the message's index (the closing
#: brackets keep message 1's sentinel from being the start of message 10's)
SENTINEL = "[[plait-message-{}]]"

#: distinct shapes remembered per template and settings; past this the memory starts over
MAX_SHAPES = 4096


@dataclass(frozen=True)
class Skeleton:
    """One conversation shape as a template renders it.

    ``literals``: the text before the first content, between each two
    contents and after the last (one more than there are messages);
    ``end_places``: for each message, ``(literal, offset)`` -- its end lies
    ``offset`` characters into that literal."""

    literals: tuple[str, ...]
    end_places: tuple[tuple[int, int], ...]

    @classmethod
    def from_rendering(cls, text: str, ends: list[int], count: int) -> Skeleton | None:
        """The skeleton of ``text``, a rendering whose ``count`` message
        contents were ``SENTINEL``\\ s, with ``ends`` from the exact method;
        ``None`` when a sentinel is missing, repeated or out of order (the
        template changed or copied a content), or an end falls inside one."""
        literals, bounds, at = [], [], 0
        for index in range(count):
            sentinel = SENTINEL.format(index)
            found = text.find(sentinel, at)
            if found < 0 or text.count(sentinel) != 1:
                return None
            literals.append(text[at:found])
            bounds.append((at, found))
            at = found + len(sentinel)
        literals.append(text[at:])
        bounds.append((at, len(text)))
        places = []
        for end in ends:
            literal = next((j for j, (begin, stop) in enumerate(bounds) if begin <= end <= stop), None)
            if literal is None:
                return None
            places.append((literal, end - bounds[literal][0]))
        return cls(tuple(literals), tuple(places))

    def ends_in(self, full: str, contents: list[str]) -> list[int] | None:
        """Each message's end in ``full``, a row's rendering, when ``full``
        is exactly the literals with ``contents`` between them; ``None``
        otherwise (or when it could be read two ways).

        A template may trim a content (Llama 3's ``| trim``), so each content
        stands either as it is or stripped. All as they are or all stripped
        is one string comparison; a template that trims some roles only is
        walked content by content."""
        for texts in (contents, [text.strip() for text in contents]):
            # a reading of the whole text: no other reading has the same length, so it is the only one
            if self.pattern % tuple(texts) == full:
                return self.place_ends(texts)
        return self.walk(full, contents)

    @cached_property
    def pattern(self) -> str:
        """The literals with a ``%s`` for each content (``%`` escaped): one C-level format per row."""
        return "%s".join(literal.replace("%", "%%") for literal in self.literals)

    def walk(self, full: str, contents: list[str]) -> list[int] | None:
        """:meth:`ends_in` one content at a time: exactly one of a content as
        it is and stripped must be followed by the next literal."""
        texts, at = [], 0
        literals = self.literals
        for index, literal in enumerate(literals):
            if not full.startswith(literal, at):
                return None
            at += len(literal)
            if index == len(contents):
                break
            following = literals[index + 1]
            fits = [text for text in {contents[index], contents[index].strip()}
                    if full.startswith(text, at) and full.startswith(following, at + len(text))]
            if len(fits) != 1:
                return None
            texts.append(fits[0])
            at += len(fits[0])
        return self.place_ends(texts) if at == len(full) else None

    def place_ends(self, texts: list[str]) -> list[int]:
        """The ends in the rendering that is the literals with ``texts`` between them."""
        # message k's end: the literals before its literal, the texts before it, its offset in the literal
        before = list(accumulate(map(len, texts), initial=0))
        return [before[literal] + offset for literal, offset in self.end_offsets]

    @cached_property
    def end_offsets(self) -> tuple[tuple[int, int], ...]:
        """``end_places`` with each offset counted from the rendering's start, all texts left out."""
        starts = list(accumulate(map(len, self.literals), initial=0))
        return tuple((literal, starts[literal] + offset) for literal, offset in self.end_places)


def shape_of(messages: list[dict], tools) -> tuple | None:
    """What a skeleton is kept under: the roles in order and the tools;
    ``None`` for a conversation that always takes the exact method (a
    message with other keys the template may branch on, or with no text)."""
    if any(message["extra"] or not message["content"].strip() for message in messages):
        return None
    tools_key = None if tools is None else json.dumps(tools, sort_keys=True, default=str)
    return tuple(message["role"] for message in messages), tools_key


class _Pending:
    """A shape seen once: the skeleton is built when a second row has it,
    so data whose shapes never repeat (tools differing per row) costs
    nothing but the exact method."""


class _Refused:
    """A shape whose skeleton could not be built or disagreed with the exact method."""


PENDING, REFUSED = _Pending(), _Refused()


@dataclass
class _Unverified:
    """A skeleton built but not yet compared with a real row's exact ends
    (the row it was built on could not be walked: its contents were read two ways)."""

    skeleton: Skeleton


class BoundaryCache:
    """Skeletons of one template with one set of settings, by shape."""

    def __init__(self):
        self.shapes: dict = {}

    def ends(self, shape, full: str, contents: list[str], exact, sentinel_rendering) -> list[int]:
        """Each message's end in ``full``.

        ``exact()``: the ends by rendering every prefix (may raise the row's
        ``BadRowError``); ``sentinel_rendering()``: ``(text, ends)`` of the
        same shape with sentinel contents, by the exact method (may raise
        ``BadRowError`` too: then the shape is refused, and the real row's
        own exact method says what is wrong with it)."""
        state = self.shapes.get(shape, None) if shape is not None else REFUSED
        if isinstance(state, Skeleton):
            found = state.ends_in(full, contents)
            return found if found is not None else exact()
        if state is REFUSED:
            return exact()
        if state is None:
            self.remember(shape, PENDING)
            return exact()
        ends = exact()
        skeleton = state.skeleton if isinstance(state, _Unverified) else self.build(len(contents), sentinel_rendering)
        if skeleton is None:
            self.remember(shape, REFUSED)
            return ends
        found = skeleton.ends_in(full, contents)
        if found is None:
            self.remember(shape, _Unverified(skeleton))
        else:
            self.remember(shape, skeleton if found == ends else REFUSED)
        return ends

    @staticmethod
    def build(count: int, sentinel_rendering) -> Skeleton | None:
        from plait.errors import BadRowError

        try:
            text, ends = sentinel_rendering()
        except BadRowError:
            return None
        return Skeleton.from_rendering(text, ends, count)

    def remember(self, shape, state) -> None:
        if len(self.shapes) >= MAX_SHAPES and shape not in self.shapes:
            self.shapes.clear()
        self.shapes[shape] = state


_CACHES: dict = {}


def boundary_cache(template: str, settings: dict) -> BoundaryCache:
    """The process's cache for ``template`` rendered with ``settings`` (the
    variables besides the messages: special tokens, chat_template_kwargs),
    kept across batches so a shape's skeleton is built once per process."""
    key = (template, json.dumps(settings, sort_keys=True, default=repr))
    if key not in _CACHES:
        if len(_CACHES) >= 64:
            _CACHES.clear()
        _CACHES[key] = BoundaryCache()
    return _CACHES[key]
