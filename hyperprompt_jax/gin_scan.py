"""Reads gin files as text, without importing their configurables, to find what is
left `%gin.REQUIRED`.

`cli.preflight` uses it so that a command reports every missing setting at once, in
well under a second, before TensorFlow / JAX are imported (a real gin parse imports
every module the files name). It understands the subset of gin this project's files
use; anything else raises `Unreadable` and the check is left to gin itself.
"""

from __future__ import annotations

import ast
import dataclasses
import io
import os
import re
import tokenize
from typing import Iterable, Sequence


class Unreadable(Exception):
    """The gin text is beyond this reader; the real gin parser will judge it."""


@dataclasses.dataclass
class _Value:
    tokens: list[tokenize.TokenInfo]
    text: str
    origin: str
    name: str = ""


class GinScan:
    """Reads gin files as text (no imports) to find settings left `%gin.REQUIRED`.

    It follows `include`s, `import x as y` aliases, macros (`NAME = value`), bindings
    (`[scope/]a.b.param = value`, `a.b:` blocks) and references (`@scope/a.b()`,
    `%NAME`), the subset of gin the project's files use. Anything else raises
    `Unreadable` and the check is skipped (gin reports real errors later).
    """

    def __init__(self, search_paths: Sequence[str]):
        self.search_paths = list(search_paths)
        self.aliases: dict[str, str] = {}
        self.macros: dict[str, _Value] = {}
        self.bindings: dict[tuple[str, str, str], _Value] = {}
        self._reading: list[str] = []

    # -- reading --------------------------------------------------------------------
    def _find(self, name: str) -> str:
        if os.path.isabs(name):
            return name
        for p in self.search_paths:
            if os.path.exists(os.path.join(p, name)):
                return os.path.join(p, name)
        raise Unreadable(name)

    def read_file(self, name: str) -> None:
        path = self._find(name)
        if path in self._reading or len(self._reading) > 20:
            raise Unreadable(path)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError:
            raise Unreadable(path) from None
        self._reading.append(path)
        try:
            self.read_text(text, origin=name)
        finally:
            self._reading.pop()

    def read_text(self, text: str, origin: str) -> None:
        block = None
        for indented, tokens in _statements(text):
            if not indented:
                block = None
            words = [t.string for t in tokens]
            if indented:
                if block is None or "=" not in words:
                    raise Unreadable(origin)
                eq = words.index("=")
                self._bind(block, "".join(words[:eq]), tokens[eq + 1 :], text, origin)
            elif words[0] in ("import", "from"):
                self._import(words)
            elif words[0] == "include" and len(tokens) == 2 and tokens[1].type == tokenize.STRING:
                self.read_file(ast.literal_eval(tokens[1].string))
            elif words[-1] == ":" and "=" not in words:
                block = "".join(words[:-1])
            elif "=" in words:
                eq = words.index("=")
                target = "".join(words[:eq])
                scope, _, selector = target.rpartition("/")
                if "." not in selector:
                    self.macros[selector] = _value(tokens[eq + 1 :], text, origin)
                else:
                    selector, _, param = target.rpartition(".")
                    self._bind(selector, param, tokens[eq + 1 :], text, origin)
            else:
                raise Unreadable(origin)

    def _import(self, words: list[str]) -> None:
        text = " ".join(words).replace(" . ", ".")
        match = re.fullmatch(r"import ([\w.]+)(?: as (\w+))?", text)
        if match:
            module, alias = match.groups()
            self.aliases[alias or module.split(".")[0]] = module if alias else module.split(".")[0]
            return
        match = re.fullmatch(r"from ([\w.]+) import (\w+)(?: as (\w+))?", text)
        if match:
            module, name, alias = match.groups()
            if module != "__gin__":
                self.aliases[alias or name] = f"{module}.{name}"
            return
        raise Unreadable(text)

    def _bind(self, selector: str, param: str, tokens, text: str, origin: str) -> None:
        scope, _, name = selector.rpartition("/")
        value = _value(tokens, text, origin)
        value.name = f"{selector}.{param}"  # as written, for messages
        self.bindings[(scope, self._canonical(name), param)] = value

    def _canonical(self, name: str) -> str:
        head, _, rest = name.partition(".")
        if head in self.aliases:
            return self.aliases[head] + ("." + rest if rest else "")
        return name

    # -- queries --------------------------------------------------------------------
    def literal(self, macro: str):
        """The Python value of a macro bound to a literal (else None)."""
        value = self.macros.get(macro)
        if value is None:
            return None
        try:
            return ast.literal_eval(value.text)
        except (ValueError, SyntaxError):
            return None

    def unset(self, roots: Iterable[str]) -> tuple[list[str], list[str]]:
        """Settings still `%gin.REQUIRED`, and macros used from `roots` but never defined.

        gin itself rejects every `%gin.REQUIRED` left anywhere in the configuration
        (when it is finalized, one at a time), so all of them are reported; undefined
        macros only matter where the entry point uses them.

        Returns:
          `(missing, undefined)`: macro names (or `selector.param` of required
          parameters) in the order defined, and undefined macros in the order found.
        """
        required = [("%", "gin.REQUIRED")]
        missing = [n for n, v in self.macros.items() if list(_references(v.tokens)) == required]
        missing += [
            v.name for v in self.bindings.values() if list(_references(v.tokens)) == required
        ]
        undefined, seen = [], set()

        def visit(value: _Value) -> None:
            for kind, ref in _references(value.tokens):
                if kind == "%":
                    if ref == "gin.REQUIRED":
                        continue
                    if ref not in self.macros:
                        if ref not in undefined:
                            undefined.append(ref)
                    elif ("%", ref) not in seen:
                        seen.add(("%", ref))
                        visit(self.macros[ref])
                else:
                    scope, _, name = ref.rpartition("/")
                    configurable(scope, self._canonical(name))

        def configurable(scope: str, name: str) -> None:
            if ("@", scope, name) in seen:
                return
            seen.add(("@", scope, name))
            for (s, selector, _), value in self.bindings.items():
                if selector == name and s in ("", scope):
                    visit(value)

        for root in roots:
            if root.startswith("%"):
                visit(_Value(list(_tokens(root)), root, "root"))
            else:
                configurable("", root)
        return missing, undefined


def _tokens(text: str) -> Iterable[tokenize.TokenInfo]:
    try:
        yield from tokenize.generate_tokens(io.StringIO(text).readline)
    except (tokenize.TokenError, IndentationError, SyntaxError):
        raise Unreadable(text[:40]) from None


def _statements(text: str) -> Iterable[tuple[bool, list[tokenize.TokenInfo]]]:
    """Logical lines of gin text as `(indented, tokens)` (comments dropped)."""
    depth, line = 0, []
    skip = (tokenize.COMMENT, tokenize.NL, tokenize.ENCODING)
    for tok in _tokens(text):
        if tok.type == tokenize.INDENT:
            depth += 1
        elif tok.type == tokenize.DEDENT:
            depth -= 1
        elif tok.type in (tokenize.NEWLINE, tokenize.ENDMARKER):
            if line:
                yield depth > 0, line
            line = []
        elif tok.type not in skip:
            line.append(tok)


def _value(tokens: list[tokenize.TokenInfo], text: str, origin: str) -> _Value:
    if not tokens:
        raise Unreadable(origin)
    lines = text.splitlines()
    (r0, c0), (r1, c1) = tokens[0].start, tokens[-1].end
    if r0 == r1:
        source = lines[r0 - 1][c0:c1]
    else:
        source = "\n".join([lines[r0 - 1][c0:], *lines[r0 : r1 - 1], lines[r1 - 1][:c1]])
    return _Value(tokens, source, origin)


def _references(tokens: Sequence[tokenize.TokenInfo]) -> Iterable[tuple[str, str]]:
    """`('%', 'NAME')` and `('@', 'scope/a.b')` references in a value's tokens."""
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if tok.type == tokenize.OP and tok.string in ("%", "@"):
            j, parts = i + 1, []
            while j < len(tokens) and (
                tokens[j].type == tokenize.NAME or tokens[j].string in (".", "/")
            ):
                parts.append(tokens[j].string)
                j += 1
            if parts:
                yield tok.string, "".join(parts)
            i = j
        else:
            i += 1
