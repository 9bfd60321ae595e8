"""Test cases of a program, split so that the program never sees what its results are compared with.

Assert tests (a string, or a list of strings, of Python): each top-level `assert` is a case; every
other top-level statement is setup (imports, constants, helpers). In a case's expression the
*leaves* are the smallest parts that need the program: a call of a name the tests do not define
(`add(2, 3)`), with what follows it (`Solution().solve(x)[0]`), or a whole comprehension or lambda
that contains one. `assert abs(area(2) - 12.57) < 0.01` has the single leaf `area(2)`.

The program's process runs the program, the setup statements the leaves need, and the leaves,
and reports their values as plain data; the judge's process runs only the tests' code on those
values (`harness.py`). A program can therefore claim any values for its leaves, which is what
returning them would do, but it never sees the rest of the assertion (`== 5`, `< 0.01`), and
nothing it prints or forges is a verdict.

Setup statements that use a name the tests do not define (`expected = solve(3)`) run only in the
program's process, and the names they bind are the program's. An `assert` nested inside another
statement is refused (DataError): it could be neither a case nor setup.

I/O tests are a list of {"input": str, "output": str}: the program reads the input on stdin; its
stdout must equal the output up to trailing whitespace on each line and trailing blank lines.
"""

from __future__ import annotations

import ast
import builtins
from dataclasses import dataclass
from typing import Any

from guidedrl.core.errors import DataError

LEAF = "_guidedrl_leaf_"  # names of the leaves in the judge's expression
NO_CONSTANT = object()  # AssertCase.expected when the judge decides


@dataclass(frozen=True)
class AssertCase:
    """One top-level `assert`, split for the two processes."""

    source: str
    """The assert as written (for messages)."""
    expr: str
    """The judge's expression: the assert's, each leaf replaced by the name LEAF + index."""
    leaves: tuple[str, ...]
    """The expressions the program's process evaluates."""
    setup: tuple[str, ...]
    """The setup statements the program's process runs before the leaves (only those they need)."""
    expected: Any = NO_CONSTANT
    """For `leaf == constant` (either side), the constant: the parent compares it with the value
    itself, without a judge's process."""


@dataclass(frozen=True)
class IOCase:
    """One stdin/stdout test."""

    input: str
    output: str


@dataclass(frozen=True)
class TestSet:
    """All the cases of one sample."""

    asserts: tuple[AssertCase, ...] = ()
    judge_setup: tuple[str, ...] = ()
    """The setup statements the judge runs (those that need nothing of the program)."""
    io: tuple[IOCase, ...] = ()
    __test__ = False  # not a pytest class

    @property
    def cases(self) -> int:
        return len(self.asserts) + len(self.io)


# ----------------------------------------------------------------------------- names


def _bound(node: ast.AST) -> set[str]:
    """Names that `node` binds (assignment targets, imports, defs, loop and `with` targets)."""
    out: set[str] = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Name) and isinstance(n.ctx, (ast.Store, ast.Del)):
            out.add(n.id)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(n.name)
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            out |= {(a.asname or a.name).split(".")[0] for a in n.names}
        elif isinstance(n, ast.arg):
            out.add(n.arg)
        elif isinstance(n, ast.ExceptHandler) and n.name:
            out.add(n.name)
    return out


def _free(node: ast.AST) -> set[str]:
    """Names that `node` reads and does not bind itself (a superset of its free names: a name
    bound in one branch and read in another counts as bound)."""
    loads = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return loads - _bound(node)


SCOPES = (ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp, ast.Lambda)


# ----------------------------------------------------------------------------- leaves


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}


def _leaves(expr: ast.expr, known: set[str]) -> list[ast.expr]:
    """The outermost leaves of `expr`: from each name the tests do not know, up through the calls,
    attributes and subscripts it heads, then out to any comprehension or lambda it depends on."""
    parents = _parents(expr)
    found: list[ast.expr] = []
    for n in ast.walk(expr):
        if not (isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)) or n.id in known:
            continue
        if any(isinstance(s, SCOPES) and n.id in _bound(s) for s in _ancestors(n, parents)):
            continue  # a comprehension's or lambda's own variable
        node: ast.AST = n
        while node in parents and _heads(node, parents[node]):
            node = parents[node]
        found.append(_close(node, parents))  # type: ignore[arg-type]
    outer = [a for a in found if not any(a is not b and a in set(ast.walk(b)) for b in found)]
    return list({id(a): a for a in outer}.values())


def _close(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> ast.AST:
    """`node`, widened to the comprehension or lambda whose variables it uses, and from a lambda
    (a function: not plain data) to the expression that calls or takes it."""
    while True:
        scope = next((s for s in _ancestors(node, parents) if isinstance(s, SCOPES) and _free(node) & _bound(s)), None)
        if scope is not None:
            node = scope
        elif isinstance(node, ast.Lambda) and node in parents:
            node = parents[node]
        else:
            return node


def _ancestors(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> list[ast.AST]:
    out = []
    while node in parents:
        node = parents[node]
        out.append(node)
    return out


def _heads(node: ast.AST, parent: ast.AST) -> bool:
    """Whether `node` is what `parent` calls, or the object it takes an attribute or item of."""
    return (isinstance(parent, ast.Call) and parent.func is node) or (
        isinstance(parent, (ast.Attribute, ast.Subscript)) and parent.value is node)


class _Replace(ast.NodeTransformer):
    def __init__(self, leaves: list[ast.expr]) -> None:
        self.names = {id(leaf): f"{LEAF}{i}" for i, leaf in enumerate(leaves)}

    def visit(self, node: ast.AST) -> ast.AST:
        if id(node) in self.names:
            return ast.Name(id=self.names[id(node)], ctx=ast.Load())
        return super().visit(node)


# ----------------------------------------------------------------------------- parse


def parse_asserts(text: str, where: str, program_names: frozenset[str] = frozenset()
                  ) -> tuple[tuple[AssertCase, ...], tuple[str, ...]]:
    """(cases, the judge's setup statements) of assert tests; DataError naming `where` if malformed.
    `program_names` (`top_level_names(code)`): builtins the program redefines are the program's."""
    try:
        tree = ast.parse(text, "<tests>")
    except SyntaxError as e:
        raise DataError(f"{where}: the tests are not valid Python (line {e.lineno}: {e.msg})") from None
    known = set(dir(builtins)) - program_names
    judge_setup: list[str] = []
    earlier: list[tuple[ast.stmt, bool]] = []  # (statement, needs the program)
    cases = []
    for stmt in tree.body:
        if isinstance(stmt, ast.Assert):
            leaves = _leaves(stmt.test, known)
            source, leaf_sources = ast.unparse(stmt), tuple(ast.unparse(leaf) for leaf in leaves)
            setup = _needed(earlier, set().union(*(_free(leaf) for leaf in leaves)))
            expected = _constant(stmt.test, leaves)
            expr = _Replace(leaves).visit(stmt.test)  # in place: the tree is ours and used up
            cases.append(AssertCase(source, ast.unparse(expr), leaf_sources, setup, expected))
            continue
        nested = next((n for n in ast.walk(stmt) if isinstance(n, ast.Assert)), None)
        if nested is not None:
            raise DataError(f"{where}: line {nested.lineno}: an `assert` inside another statement; "
                            "each test case must be a top-level `assert`")
        program = bool(_free(stmt) - known)
        earlier.append((stmt, program))
        if program:
            known -= _bound(stmt)  # from here on these names hold the program's values
        else:
            known |= _bound(stmt)
            judge_setup.append(ast.unparse(stmt))
    if not cases:
        raise DataError(f"{where}: the tests have no top-level `assert`")
    return tuple(cases), tuple(judge_setup)


def _constant(test: ast.expr, leaves: list[ast.expr]) -> Any:
    """The constant of `leaf == constant` or `constant == leaf`, else NO_CONSTANT."""
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)
            and len(leaves) == 1):
        return NO_CONSTANT
    sides = [test.left, test.comparators[0]]
    if leaves[0] not in sides:
        return NO_CONSTANT
    try:
        return ast.literal_eval(sides[1 - sides.index(leaves[0])])
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return NO_CONSTANT


def _needed(earlier: list[tuple[ast.stmt, bool]], names: set[str]) -> tuple[str, ...]:
    """The earlier statements that bind `names`, and those they need in turn, in order."""
    out = []
    for stmt, _ in reversed(earlier):
        if _bound(stmt) & names:
            out.append(ast.unparse(stmt))
            names = (names - _bound(stmt)) | _free(stmt)
    return tuple(reversed(out))


def top_level_names(code: str) -> frozenset[str]:
    """Names the program binds at its top level (not inside functions or classes), as far as its
    source shows; empty if it does not parse. Used only to tell which builtin names it redefines:
    a call of a builtin the program does not visibly redefine is the builtin's (the judge's)."""
    try:
        tree = ast.parse(code)
    except Exception:  # noqa: BLE001 - SyntaxError, or a parser limit: the program's run will say
        return frozenset()
    out: set[str] = set()
    todo: list[ast.AST] = list(tree.body)
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif not isinstance(node, (ast.Lambda, *SCOPES)):
            if isinstance(node, (ast.Import, ast.ImportFrom)) or (
                    isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)):
                out |= _bound(node)
            todo.extend(ast.iter_child_nodes(node))
    return frozenset(out)


def parse_io(data: Any, where: str) -> tuple[IOCase, ...]:
    """I/O tests: a list of {"input": str, "output": str}; DataError naming `where` otherwise."""
    if not isinstance(data, list) or not data or not all(
            isinstance(c, dict) and set(c) == {"input", "output"} and all(isinstance(v, str) for v in c.values())
            for c in data):
        raise DataError(f"{where}: must be a non-empty list of {{\"input\": str, \"output\": str}}")
    return tuple(IOCase(c["input"], c["output"]) for c in data)


def same_output(actual: str, expected: str) -> bool:
    """Whether two outputs agree up to trailing whitespace on each line and trailing blank lines."""
    def norm(s: str) -> list[str]:
        return [line.rstrip() for line in s.rstrip().splitlines()]
    return norm(actual) == norm(expected)
