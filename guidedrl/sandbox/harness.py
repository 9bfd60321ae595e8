"""The code that runs inside the jail (standard library only, any Python >= 3.8):

    python -I -S -B /box/harness.py /box/job.json REPORT_FD

`job["mode"]`:
- "program": run `code` as `__main__` (stdin: the test's input, if any), then the `setup`
  statements, then evaluate each expression of `leaves` in the program's namespace and report its
  value encoded as plain data. Once the program runs, everything in this process is the
  program's: the parent takes these reports as the program's claims about the values of the
  leaves, never as a verdict. The process never sees what the values are compared with.
- "judge": only the tests' own code runs here: the `setup` statements, then each case's
  expression with its leaves bound to the decoded values (plain data: no code of the program can
  run). Reports True or False per case.

Reports are JSON objects, one a line, on REPORT_FD. Start-up time is most of a case's cost:
this file imports only what every run needs (no `typing`; `traceback` only to print one).
"""

from __future__ import annotations

import builtins
import json
import os
import sys

REPORT_FD = -1
SOURCES: dict[str, str] = {}  # file name -> source, for tracebacks


def encode(value: object) -> object:
    """`value` as JSON data: None, bool, int, float, str and list as themselves; tuple, dict, set,
    frozenset, bytes, complex, range, Fraction, Decimal, deque tagged as a one-key object
    ({"tuple": [...]}); an iterator (a generator, map, ...) drained into {"iter": [...]}.
    Subclasses become their base type. TypeError for anything else."""
    if value is None or isinstance(value, bool):
        return value
    for base in (int, float, str):
        if isinstance(value, base):
            return base(value)
    if isinstance(value, list):
        return [encode(x) for x in value]
    if isinstance(value, tuple):
        return {"tuple": [encode(x) for x in value]}
    if isinstance(value, dict):
        return {"dict": [[encode(k), encode(x)] for k, x in value.items()]}
    if isinstance(value, (set, frozenset)):
        return {"frozenset" if isinstance(value, frozenset) else "set": [encode(x) for x in value]}
    if isinstance(value, (bytes, bytearray)):
        return {"bytes": bytes(value).hex()}
    if isinstance(value, complex):
        return {"complex": [value.real, value.imag]}
    if isinstance(value, range):
        return {"range": [value.start, value.stop, value.step]}
    kind = f"{type(value).__module__}.{type(value).__qualname__}"
    if kind == "fractions.Fraction":
        return {"fraction": [value.numerator, value.denominator]}
    if kind == "decimal.Decimal":
        return {"decimal": str(value)}
    if kind == "collections.deque":
        return {"deque": [encode(x) for x in value]}
    if hasattr(type(value), "__next__") and hasattr(type(value), "__iter__"):
        return {"iter": [encode(x) for x in value]}
    raise TypeError(f"a {type(value).__name__} is not plain data")


def decode(data: object) -> object:
    """The inverse of `encode`, building only plain built-in values (ValueError on anything else)."""
    if data is None or type(data) in (bool, int, float, str):
        return data
    if isinstance(data, list):
        return [decode(x) for x in data]
    if not isinstance(data, dict) or len(data) != 1:
        raise ValueError("not an encoded value")
    (tag, x), = data.items()
    items = [decode(i) for i in x] if tag in ("tuple", "set", "frozenset", "deque", "iter") else None
    simple = {
        "tuple": lambda: tuple(items), "set": lambda: set(items), "frozenset": lambda: frozenset(items),
        "iter": lambda: iter(items), "deque": lambda: __import__("collections").deque(items),
        "dict": lambda: {decode(k): decode(v) for k, v in x},
        "bytes": lambda: bytes.fromhex(x),
        "complex": lambda: complex(*_typed(x, float)),
        "range": lambda: range(*_typed(x, int)),
        "fraction": lambda: __import__("fractions").Fraction(*_typed(x, int)),
        "decimal": lambda: __import__("decimal").Decimal(_typed([x], str)[0]),
    }
    if tag not in simple:
        raise ValueError(f"unknown tag {tag!r}")
    return simple[tag]()


def _typed(values: object, kind: type) -> list:
    """`values`, checked to be a short list of `kind` (int also passes for float)."""
    kinds = (int, float) if kind is float else (kind,)
    if not isinstance(values, list) or len(values) > 3 or not all(type(v) in kinds for v in values):
        raise ValueError("malformed encoded value")
    return values


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:1000]


def _error(e: BaseException, phase: str) -> dict:
    return {"error": type(e).__name__, "errno": getattr(e, "errno", None), "phase": phase, "detail": _describe(e)}


def report(record: dict) -> None:
    """One record, one line, on the report fd."""
    data = (json.dumps(record) + "\n").encode()
    while data:
        data = data[os.write(REPORT_FD, data):]


def program(job: dict) -> None:
    """Run the program, the setup, and report the leaves' values; then exit."""
    source = job["code"]
    SOURCES.update({"<solution>": source, "<tests>": "\n".join(job["setup"] + job["leaves"])})
    try:
        code = compile(source, "<solution>", "exec")
    except (SyntaxError, ValueError) as e:
        report(_error(e, "compile"))
        _print_traceback(e)
        os._exit(1)
    main = type(sys)("__main__")  # the program's own __main__ module, not this one
    main.__builtins__ = builtins  # type: ignore[attr-defined]
    sys.modules["__main__"], sys.argv = main, ["solution.py"]
    ns = main.__dict__
    for phase, run in (("program", lambda: exec(code, ns)),
                       ("setup", lambda: [exec(compile(s, "<tests>", "exec"), ns) for s in job["setup"]])):
        try:
            run()
        except SystemExit as e:
            if phase != "program" or job["leaves"] or e.code not in (None, 0):
                report({"error": "SystemExit", "phase": phase, "detail": f"exited ({e.code!r}) before the tests ran"})
                os._exit(1)
        except BaseException as e:  # noqa: BLE001 - anything the program raises is a result
            report(_error(e, phase))
            _print_traceback(e)
            _flush()
            os._exit(1)
    for i, leaf in enumerate(job["leaves"]):
        try:
            value = eval(compile(leaf, "<tests>", "eval"), ns)
        except BaseException as e:  # noqa: BLE001
            report({"leaf": i, "raised": _describe(e)})
            continue
        try:  # draining an iterator runs the program's code: anything may come out of it
            report({"leaf": i, "value": json.dumps(encode(value))})
        except BaseException as e:  # noqa: BLE001
            report({"leaf": i, "unencodable": _describe(e)[:300]})
    _flush()
    report({"done": True})
    os._exit(0)  # the program's threads and atexit handlers have no say any more


def judge(job: dict) -> None:
    """Evaluate each case's expression on the decoded values (trusted code only)."""
    glb: dict = {"__builtins__": builtins, "__name__": "__tests__"}
    try:
        for stmt in job["setup"]:
            exec(compile(stmt, "<tests>", "exec"), glb)
    except BaseException as e:  # noqa: BLE001
        report({"setup_error": _describe(e)})
        return
    for i, case in enumerate(job["cases"]):
        try:
            values = {name: decode(json.loads(text)) for name, text in case["values"].items()}
            report({"case": i, "ok": bool(eval(compile(case["expr"], "<tests>", "eval"), {**glb, **values}))})
        except BaseException as e:  # noqa: BLE001 - a failed evaluation fails the case
            report({"case": i, "ok": False, "error": _describe(e)})


def _print_traceback(e: BaseException) -> None:
    """The traceback from the program's (or the tests') first frame on: this file's say nothing."""
    import linecache  # noqa: PLC0415 - only when there is a traceback to print: start-up time
    import traceback  # noqa: PLC0415

    for name, text in SOURCES.items():
        linecache.cache[name] = (len(text), None, text.splitlines(True), name)
    tb = e.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename not in SOURCES:
        tb = tb.tb_next
    try:
        traceback.print_exception(type(e), e, tb, file=sys.__stderr__)
    except Exception:  # noqa: BLE001 - stderr may be closed
        pass


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - the program may have closed or replaced them
            pass


def main() -> None:
    global REPORT_FD
    with open(sys.argv[1], "rb") as f:
        job = json.loads(f.read())
    REPORT_FD = int(sys.argv[2])
    if hasattr(sys, "set_int_max_str_digits"):
        sys.set_int_max_str_digits(0)  # big integers are plain data too
    (judge if job["mode"] == "judge" else program)(job)


if __name__ == "__main__":
    main()
