"""Layer-name patterns of an SDNQ config, matched in time linear in the name.

The format's rules (``docs/format-spec.md`` §5.3) turn a pattern containing ``*`` into a Python regular
expression (``.*`` → a literal dot then anything, any other ``*`` → anything, every other character passed
through, so ``[0-9]``, ``(a|b)``, ``+`` keep their regex meaning) and match it at the start of the name. Python's
``re`` backtracks: ``(.+)+X*`` against a 24-character name takes a second and four times longer for every two
more characters, and a config is input from a downloaded repository. So a pattern is matched here instead:

* it is first compiled with :func:`re.compile` (never run), so a pattern the reference would refuse (``mlp[*``)
  is refused here too, with an error naming the config field;
* the usual patterns (literals, ``.`` and ``*`` only) are matched by finding their ``*``-separated segments left
  to right (each segment a fixed-length, quantifier-free regex), which is exact for such patterns;
* any other pattern is compiled into a Thompson NFA and simulated, with the state sets cached as a lazy DFA:
  time ``O(len(name) · len(pattern))`` at worst, whatever the pattern. Backreferences, lookarounds and inline
  flags cannot be matched that way and are refused with a clear error (no sdnq config uses them).

A :class:`PatternSet` indexes a whole list once (exact names and components in a dict, root prefixes by length),
so thousands of patterns cost dictionary lookups per layer, not thousands of regex runs.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Sequence

MAX_NFA_STATES = 20_000
"""A pattern whose automaton needs more states (e.g. ``a{5000}``) is refused as too complex."""
MAX_NESTING = 100
"""Parentheses nested deeper than this are refused (Python's own parser would hit its recursion limit)."""

_REGEX_CHARS = frozenset("[](){}|?+^$\\")
"""Characters that make a ``*`` pattern a real regex rather than a glob (``.`` and ``*`` are glob-compatible)."""


class PatternError(ValueError):
    """A pattern is not a valid regular expression, or uses a construct that cannot be matched in linear time."""


def reference_regex(pattern: str) -> str:
    """The regular expression the format makes of a ``*`` pattern (§5.3): ``.*`` → ``\\..*``, ``*`` → ``.*``."""
    return pattern.replace(".*", "\0").replace("*", ".*").replace("\0", "\\..*")


# --------------------------------------------------------------------------------------------------------------------
# glob-like patterns: literals, "." (any character but a newline) and "*"
# --------------------------------------------------------------------------------------------------------------------


class _GlobMatcher:
    """``re.match(reference_regex(p), name)`` for a pattern made of literals, ``.`` and ``*`` only.

    The regex is ``S0 .* S1 .* ... Sk`` with fixed-length segments ``Si``; it matches iff ``S0`` matches at 0 and
    each later segment occurs after the previous one (taking the leftmost occurrence each time never loses a
    match). Segments hold no quantifier, so each search is ``O(len(name) · len(segment))``."""

    def __init__(self, pattern: str) -> None:
        segments: list[list[str]] = [[]]
        i = 0
        while i < len(pattern):
            if pattern.startswith(".*", i):
                segments[-1].append(re.escape("."))
                segments.append([])
                i += 2
            elif pattern[i] == "*":
                segments.append([])
                i += 1
            else:
                segments[-1].append("." if pattern[i] == "." else re.escape(pattern[i]))
                i += 1
        self._first = re.compile("".join(segments[0]))
        self._rest = [re.compile("".join(seg)) for seg in segments[1:] if seg]
        self._regex = reference_regex(pattern)
        self._nfa: _NFAMatcher | None = None

    def match(self, name: str) -> bool:
        if "\n" in name:  # "." and ".*" stop at a newline: the general matcher handles that (never in real names)
            if self._nfa is None:
                self._nfa = _NFAMatcher(self._regex)
            return self._nfa.match(name)
        head = self._first.match(name)
        if head is None:
            return False
        pos = head.end()
        for segment in self._rest:
            found = segment.search(name, pos)
            if found is None:
                return False
            pos = found.end()
        return True


# --------------------------------------------------------------------------------------------------------------------
# any other pattern: parse (Python's regex syntax) -> Thompson NFA -> simulation with a lazy DFA cache
# --------------------------------------------------------------------------------------------------------------------

# AST nodes: ("char", pred) | ("cat", [nodes]) | ("alt", [nodes]) | ("rep", node, min, max|None) | ("bol",)
# | ("eol",) | ("eos",). A pred is ("lit", c) | ("any",) | ("set", negated, chars, ranges, classes).

def _is_digit(c: str) -> bool:
    return c.isdecimal()


def _is_word(c: str) -> bool:
    return c.isalnum() or c == "_"


def _is_space(c: str) -> bool:
    return c.isspace()


_CLASS_ESCAPES = {"d": _is_digit, "w": _is_word, "s": _is_space}
_CHAR_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "f": "\f", "v": "\v", "a": "\a"}


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.depth = 0

    def fail(self, what: str) -> PatternError:
        return PatternError(f"{what}; diffusers-sdnq matches names in linear time and "
                            "supports literals, '.', '*', '+', '?', '{m,n}', '[...]', '(...)', '|', '^' and '$'")

    def peek(self) -> str | None:
        return self.text[self.pos] if self.pos < len(self.text) else None

    def parse(self) -> tuple:
        node = self.alternation()
        if self.pos != len(self.text):
            raise self.fail("unbalanced ')'")
        return node

    def alternation(self) -> tuple:
        branches = [self.concatenation()]
        while self.peek() == "|":
            self.pos += 1
            branches.append(self.concatenation())
        return branches[0] if len(branches) == 1 else ("alt", branches)

    def concatenation(self) -> tuple:
        items = []
        while self.peek() not in (None, "|", ")"):
            items.append(self.repetition())
        return ("cat", items)

    def repetition(self) -> tuple:
        atom = self.atom()
        while True:
            c = self.peek()
            if c in ("*", "+", "?"):
                self.pos += 1
                low, high = {"*": (0, None), "+": (1, None), "?": (0, 1)}[c]
            elif c == "{" and (bounds := self._braces()) is not None:
                low, high = bounds
            else:
                return atom
            if self.peek() == "?":  # lazy: same set of matching names
                self.pos += 1
            elif self.peek() == "+":
                raise self.fail("possessive quantifiers ('*+', '++', '?+') are not supported")
            if atom[0] in ("bol", "eol", "eos"):
                raise self.fail("a repeated anchor is not supported")
            atom = ("rep", atom, low, high)

    def _braces(self) -> tuple[int, int | None] | None:
        m = re.compile(r"\{(\d*)(,?)(\d*)\}").match(self.text, self.pos)
        if m is None or (not m.group(1) and not m.group(2)):
            return None  # Python reads such a "{" as a literal character
        low = int(m.group(1) or 0)
        high = None if m.group(2) and not m.group(3) else int(m.group(3) or low)
        if max(low, high or 0) > 1000:
            raise self.fail("a repeat count above 1000 is not supported")
        self.pos = m.end()
        return low, high

    def atom(self) -> tuple:
        c = self.text[self.pos]
        self.pos += 1
        if c == ".":
            return ("char", ("any",))
        if c == "^":
            return ("bol",)
        if c == "$":
            return ("eol",)
        if c == "[":
            return ("char", self._set())
        if c == "(":
            return self._group()
        if c == "\\":
            return self._escape(in_set=False)
        return ("char", ("lit", c))

    def _group(self) -> tuple:
        if self.text.startswith("?", self.pos):
            if self.text.startswith("?:", self.pos):
                self.pos += 2
            elif self.text.startswith("?P<", self.pos) and ">" in self.text[self.pos:]:
                self.pos = self.text.index(">", self.pos) + 1
            elif self.text.startswith("?#", self.pos):
                end = self.text.find(")", self.pos)
                if end < 0:
                    raise self.fail("unterminated comment")
                self.pos = end + 1
                return ("cat", [])
            else:
                raise self.fail("lookarounds, backreferences, conditionals and inline flags are not supported")
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise self.fail(f"parentheses nested deeper than {MAX_NESTING}")
        node = self.alternation()
        self.depth -= 1
        if self.peek() != ")":
            raise self.fail("missing ')'")
        self.pos += 1
        return node

    def _escape(self, in_set: bool) -> tuple:
        if self.pos >= len(self.text):
            raise self.fail("a trailing backslash")
        c = self.text[self.pos]
        self.pos += 1
        if c.lower() in _CLASS_ESCAPES:
            return ("char", ("set", c.isupper(), frozenset(), (), (_CLASS_ESCAPES[c.lower()],)))
        if c in _CHAR_ESCAPES:
            return ("char", ("lit", _CHAR_ESCAPES[c]))
        if c == "x" and re.fullmatch(r"[0-9a-fA-F]{2}", self.text[self.pos:self.pos + 2]):
            self.pos += 2
            return ("char", ("lit", chr(int(self.text[self.pos - 2:self.pos], 16))))
        if not in_set and c == "A":
            return ("bol",)
        if not in_set and c == "Z":
            return ("eos",)
        if c.isalnum() or c == "_":
            raise self.fail(f"the escape '\\{c}' is not supported")
        return ("char", ("lit", c))

    def _set(self) -> tuple:
        negated = self.peek() == "^"
        if negated:
            self.pos += 1
        chars: set[str] = set()
        ranges: list[tuple[str, str]] = []
        classes: list = []
        first = True
        while True:
            c = self.peek()
            if c is None:
                raise self.fail("unterminated character set")
            if c == "]" and not first:
                self.pos += 1
                break
            first = False
            if c == "\\":
                self.pos += 1
                kind = self._escape(in_set=True)[1]
                if kind[0] == "set":
                    classes.append(kind if kind[1] else kind[4][0])
                    continue
                low = kind[1]
            else:
                self.pos += 1
                low = c
            if self.peek() == "-" and self.pos + 1 < len(self.text) and self.text[self.pos + 1] != "]":
                self.pos += 1
                high = self.text[self.pos]
                self.pos += 1
                if high == "\\":
                    kind = self._escape(in_set=True)[1]
                    if kind[0] != "lit":
                        raise self.fail("a class escape cannot end a range")
                    high = kind[1]
                ranges.append((low, high))
            else:
                chars.add(low)
        return ("set", negated, frozenset(chars), tuple(ranges), tuple(classes))


def _pred_matches(pred: tuple, c: str) -> bool:
    kind = pred[0]
    if kind == "lit":
        return c == pred[1]
    if kind == "any":
        return c != "\n"
    _, negated, chars, ranges, classes = pred
    hit = c in chars or any(lo <= c <= hi for lo, hi in ranges) or any(
        _pred_matches(cls, c) if isinstance(cls, tuple) else cls(c) for cls in classes)
    return hit != negated


_CHAR, _SPLIT, _BOL, _EOL, _EOS, _MATCH = range(6)


class _NFAMatcher:
    """``re.match(regex, name) is not None``, by simulating a Thompson NFA (all paths in step, no backtracking)."""

    def __init__(self, regex: str) -> None:
        self.kind: list[int] = []
        self.arg: list = []
        self.out: list[list[int]] = []
        match = self._state(_MATCH, None, [])
        tree = _Parser(regex).parse()
        self.start = self._build(tree, match)
        self.match_state = match
        self._cache: dict[tuple[frozenset[int], str], frozenset[int]] = {}
        self._start_cache: dict[bool, frozenset[int]] = {}

    def _state(self, kind: int, arg, out: list[int]) -> int:
        if len(self.kind) >= MAX_NFA_STATES:
            raise PatternError(f"the pattern needs more than {MAX_NFA_STATES} automaton states; simplify it")
        self.kind.append(kind)
        self.arg.append(arg)
        self.out.append(out)
        return len(self.kind) - 1

    def _build(self, node: tuple, nxt: int) -> int:
        """The start state of ``node`` followed by state ``nxt`` (built back to front)."""
        tag = node[0]
        if tag == "char":
            return self._state(_CHAR, node[1], [nxt])
        if tag == "cat":
            for item in reversed(node[1]):
                nxt = self._build(item, nxt)
            return nxt
        if tag == "alt":
            return self._state(_SPLIT, None, [self._build(branch, nxt) for branch in node[1]])
        if tag in ("bol", "eol", "eos"):
            return self._state({"bol": _BOL, "eol": _EOL, "eos": _EOS}[tag], None, [nxt])
        _, body, low, high = node
        if high is None:  # body{low,}: low copies, then a loop
            loop = self._state(_SPLIT, None, [])
            self.out[loop][:] = [self._build(body, loop), nxt]
            cur = loop
        else:
            cur = nxt
            for _ in range(high - low):  # optional copies, nested: (body(body)?)?
                cur = self._state(_SPLIT, None, [self._build(body, cur), nxt])
        for _ in range(low):
            cur = self._build(body, cur)
        return cur

    def _closure(self, states: Iterable[int], pos: int, name: str) -> frozenset[int]:
        """Every state reachable from ``states`` without reading a character, at position ``pos`` of ``name``."""
        seen: set[int] = set()
        stack = list(states)
        end = len(name)
        while stack:
            s = stack.pop()
            if s in seen:
                continue
            seen.add(s)
            kind = self.kind[s]
            if kind == _SPLIT:
                stack.extend(self.out[s])
            elif (kind == _BOL and pos == 0) or (kind == _EOS and pos == end) or (
                    kind == _EOL and (pos == end or (pos == end - 1 and name[-1] == "\n"))):
                stack.append(self.out[s][0])
        return frozenset(seen)

    def _step(self, states: frozenset[int], c: str) -> list[int]:
        return [self.out[s][0] for s in states if self.kind[s] == _CHAR and _pred_matches(self.arg[s], c)]

    def match(self, name: str) -> bool:
        end = len(name)
        current = self._closure((self.start,), 0, name) if end <= 1 else self._start_cache.get(True)
        if current is None:  # position 0 of a name of 2+ characters: the same closure for every such name
            current = self._start_cache[True] = self._closure((self.start,), 0, name)
        for pos, c in enumerate(name, 1):
            if self.match_state in current:
                return True
            if pos < end - 1:  # "$" cannot hold here: the transition depends on (states, c) only
                key = (current, c)
                nxt = self._cache.get(key)
                if nxt is None:
                    if len(self._cache) > 4096:
                        self._cache.clear()
                    nxt = self._cache[key] = self._closure(self._step(current, c), pos, name)
                current = nxt
            else:
                current = self._closure(self._step(current, c), pos, name)
            if not current:
                return False
        return self.match_state in current


@functools.lru_cache(maxsize=65536)
def compile_wildcard(pattern: str):
    """A matcher with ``.match(name) -> bool`` equal to ``re.match(reference_regex(pattern), name) is not None``.

    Raises :class:`PatternError` when Python's ``re`` would refuse the regex, or when it uses a construct that
    cannot be matched in linear time. Compiled matchers are shared (cached by pattern): they only hold the
    pattern's automaton and a cache of its transitions."""
    regex = reference_regex(pattern)
    try:
        re.compile(regex)  # compiled, never run: the reference's own validity rules
    except (re.error, RecursionError, OverflowError) as exc:
        raise PatternError(f"not a valid pattern: {exc}") from None
    if not _REGEX_CHARS.intersection(pattern):
        return _GlobMatcher(pattern)
    return _NFAMatcher(regex)


# --------------------------------------------------------------------------------------------------------------------
# a whole list of patterns, indexed
# --------------------------------------------------------------------------------------------------------------------


class PatternSet:
    """A list of patterns, matched as the format does: the index of the first pattern (in list order) that
    matches a parameter name.

    ``module_names``: also match transformers' way of naming modules in ``modules_to_not_convert`` (a pattern
    that is the layer's module name, one of its parent modules, or a dotted suffix of it:
    ``model.layers.0.self_attn.q_proj`` or ``self_attn.q_proj`` for ``model.layers.0.self_attn.q_proj.weight``).
    The reference does not, which is why the writer records such layers by their full ``.weight`` name."""

    def __init__(self, patterns: Sequence[str] = (), *, module_names: bool = False) -> None:
        self.module_names = module_names
        self.patterns: list[str] = []
        self._exact: dict[str, int] = {}
        self._prefix: dict[str, int] = {}
        self._prefix_lengths: list[int] = []
        self._modules: dict[str, int] = {}
        self._wild: list[tuple[int, object]] = []
        self._wild_by_index: dict[int, object] = {}
        self.extend(patterns)

    def extend(self, patterns: Iterable[str]) -> None:
        """Add patterns at the end (compiled once; :class:`PatternError` names the bad one's position)."""
        lengths = set(self._prefix_lengths)
        for pattern in patterns:
            index = len(self.patterns)
            if not isinstance(pattern, str):
                raise PatternError(f"entry {index} is {pattern!r} ({type(pattern).__name__}), not a string")
            if pattern.startswith("."):
                self._prefix.setdefault(pattern[1:], index)
                lengths.add(len(pattern) - 1)
            else:
                self._exact.setdefault(pattern, index)
                if "*" in pattern:
                    try:
                        matcher = compile_wildcard(pattern)
                        self._wild.append((index, matcher))
                        self._wild_by_index[index] = matcher
                    except PatternError as exc:
                        raise PatternError(f"entry {index} {pattern!r}: {exc}") from None
                elif self.module_names and pattern:
                    self._modules.setdefault(pattern, index)
            self.patterns.append(pattern)
        self._prefix_lengths = sorted(lengths)

    def __len__(self) -> int:
        return len(self.patterns)

    def first(self, name: str, *, reference_only: bool = False) -> int | None:
        """Index of the first pattern matching ``name``, or None. ``reference_only``: the format's rules alone
        (no module-name matching)."""
        best = len(self.patterns)
        hit = self._exact.get(name)
        if hit is not None:
            best = hit
        for part in name.split("."):
            hit = self._exact.get(part)
            if hit is not None and hit < best:
                best = hit
        for length in self._prefix_lengths:
            if length > len(name):
                break
            hit = self._prefix.get(name[:length])
            if hit is not None and hit < best:
                best = hit
        if self._modules and not reference_only:
            for candidate in _module_candidates(name):
                hit = self._modules.get(candidate)
                if hit is not None and hit < best:
                    best = hit
        for index, matcher in self._wild:
            if index >= best:
                break
            if matcher.match(name):
                best = index
                break
        return best if best < len(self.patterns) else None

    def matches(self, name: str, *, reference_only: bool = False) -> bool:
        return self.first(name, reference_only=reference_only) is not None

    def unused(self, names: Iterable[str], *, exact_only: bool = False) -> list[int]:
        """Indices of the patterns that match none of ``names`` (each pattern on its own: one hidden behind an
        earlier pattern that matches the same layers is still used). ``exact_only``: consider only patterns that
        name one layer exactly (:func:`is_exact_name`); others are never reported."""
        names = list(names)
        known = set(names)  # an exact name is used when it is a name (or, for module names, a module of one)
        if self.module_names:
            for name in names:
                known.update(_module_candidates(name))
        out = []
        for index, pattern in enumerate(self.patterns):
            if is_exact_name(pattern):
                if pattern not in known:
                    out.append(index)
            elif not exact_only and not any(self._entry_matches(index, name) for name in names):
                out.append(index)
        return out

    def _entry_matches(self, index: int, name: str) -> bool:
        """Whether pattern ``index`` alone matches ``name``."""
        pattern = self.patterns[index]
        if pattern.startswith("."):
            return name.startswith(pattern[1:])
        if pattern == name or pattern in name.split("."):
            return True
        if self.module_names and "*" not in pattern and pattern in _module_candidates(name):
            return True
        matcher = self._wild_by_index.get(index)
        return matcher is not None and matcher.match(name)


def _module_candidates(name: str) -> list[str]:
    """The module name of parameter ``name``, its parent modules and its dotted suffixes (transformers' rules)."""
    module = name.rpartition(".")[0] if "." in name else name
    dots = [i for i, c in enumerate(module) if c == "."]
    return [module, *(module[:i] for i in dots), *(module[i + 1:] for i in dots)]


def is_exact_name(pattern: str) -> bool:
    """A pattern that names one layer (``blocks.0.attn.to_q`` or ``...to_q.weight``): dotted, no wildcard, not a
    root prefix. A config that lists such a name for a model without that layer was written for another model."""
    return "." in pattern.strip(".") and not pattern.startswith(".") and not _REGEX_CHARS.union("*").intersection(
        pattern)
