"""CEL conditions on MCP requests: the ``when`` of a rule and the ``cost`` of a quota.

A condition is a CEL expression (cel-spec, doc/langdef.md) over:

    args    map     the tool's or prompt's arguments (tools and prompts only)
    user    message sub, email, groups (list of strings), idp
    client  string  the OAuth client_id
    route   string  the route name
    tool    string  the tool or prompt name (tools and prompts only)
    uri     string  the resource URI (resources only)
    now     timestamp

Everything that can be known before a request is checked when the condition is compiled, so a typo is
a configuration error and never a silent deny-all: syntax, unknown variables, unknown members of
``user``, operators applied to the wrong types, and a result that is statically not a bool (or, for a
cost, not a number). ``check_schema`` then types ``args`` against one tool's JSON Schema
``inputSchema`` with CEL's own type checker. What only a request can tell (a missing argument, a value
of the wrong type, a non-bool result through ``args``) is a ``ConditionEvaluationError`` with a short
reason; the caller denies.

Library: ``cel-expr-python``, the CEL team's binding of cel-cpp (Apache-2.0), chosen by measurement
(CPython 3.11, x86_64; ``args.amount <= 1000 && args.currency == 'EUR'``; p50; evaluation includes
passing a fresh activation):

    library                            evaluate  compile  checker  syntax errors
    cel-expr-python 0.1.3              3.3 µs    27 µs    yes      line:column + expected tokens
    common-expression-language 0.10.0  17 µs     11 µs    no       line:column + expected tokens
    cel-python 0.5.0 (celpy)           168 µs    120 µs   no       a caret, no message

Only cel-expr-python has a type checker, so only it reports an undeclared variable, an unknown field
or a mistyped comparison before a request arrives; that is what ``check --upstreams`` needs. The
others accept ``amount <= 1000`` and fail on every call. celpy is also over the 50 µs budget per call.
cel-expr-python ships manylinux_2_28 wheels for x86_64 and aarch64, CPython 3.11-3.13; the cost is
size (about 50 MB installed).

How ``args`` is typed: JSON Schema is turned into protobuf descriptors (a message per object with
``properties``; ``integer`` int, ``number`` double, ``string``, ``boolean``, ``array`` a repeated field
of its ``items``; a nullable scalar becomes a wrapper type, which CEL treats as "that type or null";
anything else, e.g. unions, ``anyOf`` or ``$ref``, is ``dyn``), and the condition is compiled against
them. A property that is not an identifier cannot be a message field and is not declared, so
``args['first-name']`` is reported as index access on a typed object. Unknown properties are reported
even when ``additionalProperties`` allows them: the checker cannot type what the schema does not
describe, and a typo must not pass as an unknown extra argument. Not checked: whether an argument is
``required`` (an optional one used without ``has()`` is an evaluation error when absent), ``enum``
values, ``format``, and whatever is ``dyn``. JSON has one number type: a ``number`` argument sent as
``5`` arrives as an int, which compares with doubles but does not do arithmetic with them, so write
``double(args.amount) * 1.1``.

Two environments per kind: a *checking* one (``user`` and typed ``args`` as messages, plus the
int/double comparison overloads that the CEL runtime supports but cel-cpp's checker only declares
behind an option the binding does not expose) and a *runtime* one where the same source is parsed
without checking and evaluated against plain dicts, because message-typed variables would require
building protobuf messages on every request.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache, cached_property, lru_cache
from typing import Any

from cel_expr_python import cel
from google.protobuf import descriptor_pb2, descriptor_pool, struct_pb2, wrappers_pb2

KINDS = ("tools", "resources", "prompts")
# A condition is a line of configuration, not a program.
MAX_SOURCE_CHARS = 4096
# Bounds on what an upstream's inputSchema may cost to declare; deeper objects are typed dyn.
MAX_SCHEMA_DEPTH = 16
MAX_SCHEMA_PROPERTIES = 1000
# Reasons end up in logs and audit lines: short, and without argument values where the message is known.
MAX_REASON_CHARS = 200
# How many compile problems one ConditionError names before summarising.
MAX_PROBLEMS_SHOWN = 3

_T = cel.Type
_F = descriptor_pb2.FieldDescriptorProto
_USER_MESSAGE = "mcp_gateway.conditions.User"
_USER_MEMBERS = ("email", "groups", "idp", "sub")
_ARGS_PACKAGE = "mcp_gateway.arguments"
_VARIABLES: Mapping[str, tuple[str, ...]] = {
    "tools": ("args", "client", "now", "route", "tool", "user"),
    "prompts": ("args", "client", "now", "route", "tool", "user"),
    "resources": ("client", "now", "route", "uri", "user"),
}
_PLAIN_TYPES: Mapping[str, cel.Type] = {
    "args": _T.Map(_T.STRING, _T.DYN),
    "user": _T.Map(_T.STRING, _T.DYN),
    "client": _T.STRING,
    "route": _T.STRING,
    "tool": _T.STRING,
    "uri": _T.STRING,
    "now": _T.TIMESTAMP,
}
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PROBLEM = re.compile(r"ERROR: <input>:(\d+):(\d+): (.*)")
_STATUS_PREFIX = re.compile(r"^[A-Z_]+: ")
_UNDECLARED = re.compile(r"undeclared reference to '([^']*)'")
_UNDEFINED_FIELD = re.compile(r"undefined field '([^']*)' not found in struct '([^']*)'")
_STRUCT_NAME = re.compile(
    r"\b(?:mcp_gateway\.arguments\.M\d+|mcp_gateway\.conditions\.User|google\.protobuf\.(?:Timestamp|Duration))\b"
)
_WELL_KNOWN = {"google.protobuf.Timestamp": "timestamp", "google.protobuf.Duration": "duration"}
_KEY_NOT_FOUND = re.compile(r'Key not found in map : "(.*)"')
_NO_OVERLOAD = re.compile(r"No matching overloads found : ([^(]*)(\(.*)")
_NO_MATCHING_OVERLOAD = re.compile(r"found no matching overload for '([^']*)' applied to '(.*)'")


class ConditionError(ValueError):
    """A condition that cannot be used: one line, without the file and key path (the caller adds them)."""


class ConditionEvaluationError(Exception):
    """A condition that could not be decided for this request; ``reason`` says why, for audit and logs."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class ConditionUser:
    """The principal as conditions see it. ``email`` is absent from ``user`` when None, so ``has(user.email)``
    tells whether the IdP asserted one."""

    sub: str
    idp: str
    groups: tuple[str, ...] = ()
    email: str | None = None


@dataclass(frozen=True, kw_only=True)
class ConditionInput:
    """One request's variables; the activation is built once and shared by every condition evaluated on it."""

    args: Mapping[str, Any] = field(default_factory=dict)
    user: ConditionUser
    client: str
    route: str
    tool: str = ""
    uri: str = ""
    now: datetime = field(default_factory=lambda: datetime.now(UTC))

    @cached_property
    def activation(self) -> dict[str, Any]:
        user: dict[str, Any] = {"sub": self.user.sub, "idp": self.user.idp, "groups": list(self.user.groups)}
        if self.user.email is not None:
            user["email"] = self.user.email
        return {
            "args": self.args,
            "user": user,
            "client": self.client,
            "route": self.route,
            "tool": self.tool,
            "uri": self.uri,
            "now": self.now,
        }


def _is_bool(t: cel.Type) -> bool:
    return t == _T.BOOL or t == _T.DYN


def _is_number(t: cel.Type) -> bool:
    return t == _T.INT or t == _T.DOUBLE or t == _T.UINT or t == _T.DYN


def compile_condition(source: str, *, kind: str) -> Condition:
    """Compile a ``when`` condition for rules of ``kind``; raises ConditionError naming every problem found."""
    return Condition(source, kind, _check_source(source, kind, _is_bool, "a bool"))


def compile_cost(source: str, *, kind: str = "tools") -> CostExpression:
    """Compile a quota ``cost`` expression (a non-negative number); raises ConditionError."""
    return CostExpression(source, kind, _check_source(source, kind, _is_number, "a number"))


class _Expression:
    """What conditions and costs share: the parsed program, the checks against a tool's inputSchema."""

    _result_ok: Callable[[cel.Type], bool]
    _result_name: str

    def __init__(self, source: str, kind: str, program: cel.Expression) -> None:
        self.source = source
        self.kind = kind
        self._program = program

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r}, kind={self.kind!r})"

    @cached_property
    def argument_names(self) -> frozenset[str]:
        """The names used as ``args.NAME`` (also inside ``has()``); ``args['NAME']`` is not counted."""
        if "args" not in _VARIABLES[self.kind]:
            return frozenset()
        env = _schema_env("{}")  # args with no properties: every args.NAME is reported, with its name
        assert not isinstance(env, str)  # only a schema over MAX_SCHEMA_PROPERTIES gives a string
        try:
            env.env.compile(self.source)
        except RuntimeError as exc:
            root = f"{_ARGS_PACKAGE}.M0"
            return frozenset(
                match[1]
                for _line, _column, message in _problems(str(exc))
                if (match := _UNDEFINED_FIELD.search(message)) and match[2] == root
            )
        return frozenset()

    def check_schema(self, input_schema: Mapping[str, Any]) -> list[str]:
        """Problems of this expression against a tool's JSON Schema ``inputSchema``, one string each; [] if none."""
        if "args" not in _VARIABLES[self.kind]:
            return []
        try:
            key = json.dumps(input_schema, sort_keys=True, separators=(",", ":"))
        except (TypeError, ValueError, RecursionError):
            return ["inputSchema is not JSON"]
        env = _schema_env(key)
        if isinstance(env, str):
            return [env]
        try:
            checked = env.env.compile(self.source)
        except RuntimeError as exc:
            return [_describe(problem, self.source, self.kind, env.paths) for problem in _problems(str(exc))]
        result = checked.return_type()
        if not type(self)._result_ok(result):
            return [f"the result is {_type_name(result, env.paths)}, not {self._result_name}"]
        return []

    def _run(self, data: ConditionInput) -> Any:
        try:
            value = self._program.eval(data=data.activation)
        except (RuntimeError, TypeError, ValueError) as exc:
            # The binding raises (rather than returning an error value) when a variable cannot be converted.
            raise ConditionEvaluationError(_reason(str(exc), self, data)) from None
        result = value.value()
        # An error value comes back as its message; only a str result needs the (slower) type test.
        if isinstance(result, str) and value.type() == _T.ERROR:
            raise ConditionEvaluationError(_reason(result, self, data))
        return result


class Condition(_Expression):
    """A compiled ``when``: ``evaluate`` is True or False, or raises ConditionEvaluationError."""

    _result_ok = staticmethod(_is_bool)
    _result_name = "a bool"

    def evaluate(self, data: ConditionInput) -> bool:
        result = self._run(data)
        if result is True or result is False:
            return result
        raise ConditionEvaluationError(f"the condition gave {type(result).__name__}, not bool")


class CostExpression(_Expression):
    """A compiled quota ``cost``: ``evaluate`` is a finite number >= 0, or raises ConditionEvaluationError."""

    _result_ok = staticmethod(_is_number)
    _result_name = "a number"

    def evaluate(self, data: ConditionInput) -> float:
        result = self._run(data)
        if isinstance(result, bool) or not isinstance(result, int | float):
            raise ConditionEvaluationError(f"the cost is {type(result).__name__}, not a number")
        if not math.isfinite(result) or result < 0:
            raise ConditionEvaluationError("the cost is not a finite number >= 0")
        return float(result)


# -- compiling -------------------------------------------------------------------------------------


def _check_source(source: str, kind: str, result_ok: Callable[[cel.Type], bool], result_name: str) -> cel.Expression:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    if not isinstance(source, str) or not source.strip():
        raise ConditionError("must be a non-empty CEL expression")
    if len(source) > MAX_SOURCE_CHARS:
        raise ConditionError(f"longer than {MAX_SOURCE_CHARS} characters")
    try:
        checked = _checking_env(kind).compile(source)
    except RuntimeError as exc:
        problems = [_describe(problem, source, kind, {}) for problem in _problems(str(exc))]
        shown = "; ".join(problems[:MAX_PROBLEMS_SHOWN])
        more = len(problems) - MAX_PROBLEMS_SHOWN
        raise ConditionError(shown + (f" (and {more} more)" if more > 0 else "")) from None
    result = checked.return_type()
    if not result_ok(result):
        raise ConditionError(f"the result is {_type_name(result, {})}, not {result_name}")
    # Checked above; the runtime environment declares plain maps, and cel-cpp's runtime dispatches on the
    # values themselves, so parsing is all that is left to do.
    return _runtime_env(kind).compile(source, disable_check=True)


@cache
def _runtime_env(kind: str) -> cel.Env:
    return cel.NewEnv(variables={name: _PLAIN_TYPES[name] for name in _VARIABLES[kind]})


@cache
def _checking_env(kind: str) -> cel.Env:
    variables = {name: _PLAIN_TYPES[name] for name in _VARIABLES[kind]}
    variables["user"] = _T(_USER_MESSAGE)
    return _new_checking_env(_pool(_user_file()), variables)


def _user_file() -> descriptor_pb2.FileDescriptorProto:
    file = descriptor_pb2.FileDescriptorProto(name="mcp_gateway/user.proto", package="mcp_gateway.conditions")
    file.syntax = "proto2"
    user = file.message_type.add(name="User")
    for number, name in enumerate(_USER_MEMBERS, 1):
        label = _F.LABEL_REPEATED if name == "groups" else _F.LABEL_OPTIONAL
        user.field.add(name=name, json_name=name, number=number, type=_F.TYPE_STRING, label=label)
    return file


def _pool(*files: descriptor_pb2.FileDescriptorProto) -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(struct_pb2.DESCRIPTOR.serialized_pb)
    pool.AddSerializedFile(wrappers_pb2.DESCRIPTOR.serialized_pb)
    for file in files:
        pool.Add(file)
    return pool


# CEL compares int with double at run time (cel-spec "Numeric values": comparisons across numeric types),
# and an argument typed "number" is compared with integer literals all the time.
_CROSS_NUMERIC = cel.CelExtension(
    "mcp_gateway_cross_numeric",
    [
        cel.FunctionDecl(
            operator,
            [
                cel.Overload(id=f"{name}_double_int64", return_type=_T.BOOL, parameters=[_T.DOUBLE, _T.INT]),
                cel.Overload(id=f"{name}_int64_double", return_type=_T.BOOL, parameters=[_T.INT, _T.DOUBLE]),
            ],
        )
        for operator, name in (
            ("_<_", "less"),
            ("_<=_", "less_equals"),
            ("_>_", "greater"),
            ("_>=_", "greater_equals"),
            ("_==_", "equals"),
            ("_!=_", "not_equals"),
        )
    ]
    + [
        cel.FunctionDecl(
            "@in",
            [
                cel.Overload(id="in_double_list_int64", return_type=_T.BOOL, parameters=[_T.DOUBLE, _T.List(_T.INT)]),
                cel.Overload(id="in_int64_list_double", return_type=_T.BOOL, parameters=[_T.INT, _T.List(_T.DOUBLE)]),
            ],
        )
    ],
)


def _new_checking_env(pool: descriptor_pool.DescriptorPool, variables: Mapping[str, cel.Type]) -> cel.Env:
    return cel.NewEnv(pool, variables=dict(variables), extensions=[_CROSS_NUMERIC])


# -- typing args from a JSON Schema ----------------------------------------------------------------

_SCALARS: Mapping[str, tuple[int, str]] = {
    # JSON Schema type -> (protobuf field type, wrapper message for the nullable form)
    "integer": (_F.TYPE_INT64, ".google.protobuf.Int64Value"),
    "number": (_F.TYPE_DOUBLE, ".google.protobuf.DoubleValue"),
    "string": (_F.TYPE_STRING, ".google.protobuf.StringValue"),
    "boolean": (_F.TYPE_BOOL, ".google.protobuf.BoolValue"),
}
_DYN = (False, _F.TYPE_MESSAGE, ".google.protobuf.Value")


@dataclass(frozen=True)
class _SchemaEnv:
    env: cel.Env
    paths: Mapping[str, str]  # message full name -> "args" / "args.address"


class _SchemaTooLarge(Exception):
    pass


class _ArgumentTypes:
    """Protobuf descriptors for one inputSchema: message M0 is ``args``, M1... its nested objects.

    proto2, because proto3 refuses fields whose JSON names collide (``foo_bar`` and ``fooBar``), which JSON
    Schema allows. Every message is top level so that no message name can clash with a property name.
    """

    def __init__(self, schema: Any) -> None:
        self.file = descriptor_pb2.FileDescriptorProto(name="mcp_gateway/arguments.proto", package=_ARGS_PACKAGE)
        self.file.syntax = "proto2"
        self.file.dependency.extend(["google/protobuf/struct.proto", "google/protobuf/wrappers.proto"])
        self.paths: dict[str, str] = {}
        self.properties = 0
        self._message(schema, "args", 0)

    def _message(self, schema: Mapping[str, Any], path: str, depth: int) -> str:
        name = f"M{len(self.file.message_type)}"
        message = self.file.message_type.add(name=name)
        full_name = f"{_ARGS_PACKAGE}.{name}"
        self.paths[full_name] = path
        properties = schema.get("properties") if isinstance(schema, Mapping) else None
        if not isinstance(properties, Mapping):
            return full_name
        for prop, prop_schema in properties.items():
            if not isinstance(prop, str) or not _IDENTIFIER.fullmatch(prop):
                continue
            self.properties += 1
            if self.properties > MAX_SCHEMA_PROPERTIES:
                raise _SchemaTooLarge
            repeated, field_type, type_name = self._type(prop_schema, f"{path}.{prop}", depth + 1)
            label = _F.LABEL_REPEATED if repeated else _F.LABEL_OPTIONAL
            added = message.field.add(name=prop, json_name=prop, number=len(message.field) + 1, label=label)
            added.type = field_type
            if type_name:
                added.type_name = type_name
        return full_name

    def _type(self, schema: Any, path: str, depth: int) -> tuple[bool, int, str]:
        """(repeated, protobuf type, message type name) for one property's schema."""
        if not isinstance(schema, Mapping) or depth > MAX_SCHEMA_DEPTH:
            return _DYN
        declared = schema.get("type")
        names = [declared] if isinstance(declared, str) else declared if isinstance(declared, list) else []
        nullable = "null" in names
        names = [name for name in names if name != "null"]
        if len(names) != 1:
            return _DYN
        name = names[0]
        if name in _SCALARS:
            field_type, wrapper = _SCALARS[name]
            return (False, _F.TYPE_MESSAGE, wrapper) if nullable else (False, field_type, "")
        if name == "object":
            if isinstance(schema.get("properties"), Mapping):
                return False, _F.TYPE_MESSAGE, "." + self._message(schema, path, depth)
            return False, _F.TYPE_MESSAGE, ".google.protobuf.Struct"
        if name == "array" and not nullable:
            items = schema.get("items")
            if not isinstance(items, Mapping):
                return True, _F.TYPE_MESSAGE, ".google.protobuf.Value"
            repeated, field_type, type_name = self._type(items, f"{path}[]", depth + 1)
            if repeated:
                return True, _F.TYPE_MESSAGE, ".google.protobuf.ListValue"
            return True, field_type, type_name
        return _DYN


@lru_cache(maxsize=256)
def _schema_env(schema_json: str) -> _SchemaEnv | str:
    """The checking environment for one inputSchema (cached: a tools/list repeats the same schemas)."""
    try:
        types = _ArgumentTypes(json.loads(schema_json))
    except _SchemaTooLarge:
        return f"inputSchema has more than {MAX_SCHEMA_PROPERTIES} properties; not type-checked"
    pool = _pool(_user_file(), types.file)
    variables = {name: _PLAIN_TYPES[name] for name in _VARIABLES["tools"]}
    variables["user"] = _T(_USER_MESSAGE)
    variables["args"] = _T(f"{_ARGS_PACKAGE}.M0")
    return _SchemaEnv(_new_checking_env(pool, variables), types.paths)


# -- messages --------------------------------------------------------------------------------------


def _problems(text: str) -> list[tuple[int, int, str]]:
    """(line, column, message) of each error in a cel-cpp status, without the ones that only follow
    from an earlier one (an operand of type *error*)."""
    found = [(int(m[1]), int(m[2]), m[3].removesuffix(" [INVALID_ARGUMENT]")) for m in _PROBLEM.finditer(text)]
    if not found:
        return [(0, 0, _STATUS_PREFIX.sub("", text.splitlines()[0] if text else "invalid expression"))]
    return [problem for problem in found if "'*error*'" not in problem[2]]


def _describe(problem: tuple[int, int, str], source: str, kind: str, paths: Mapping[str, str]) -> str:
    line, column, message = problem
    if match := _UNDECLARED.search(message):
        what = "function" if _char_at(source, line, column) == "(" else "variable"
        # cel-cpp names the whole qualified name (``foo.bar``) when the first part is not declared.
        message = f"unknown {what} '{match[1].split('.')[0]}'"
        if what == "variable":
            message += f" (variables for {kind}: {', '.join(_VARIABLES[kind])})"
    elif match := _UNDEFINED_FIELD.search(message):
        member, struct = match[1], match[2]
        if struct == _USER_MESSAGE:
            message = f"user has no member '{member}' (members: {', '.join(_USER_MEMBERS)})"
        elif paths.get(struct) == "args":
            message = f"the {kind.removesuffix('s')} has no argument '{member}'"
        else:
            message = f"{paths.get(struct, struct)} has no property '{member}'"
    elif match := _NO_MATCHING_OVERLOAD.search(message):
        operands = _STRUCT_NAME.sub(lambda m: _struct_name(m[0], paths), match[2])
        if match[1] == "_[_]" and operands.startswith("(args"):
            message = "args[...] cannot be type-checked against the inputSchema; write args.NAME"
        else:
            message = f"{_operator(match[1])} cannot be applied to {operands}"
    else:
        message = _STRUCT_NAME.sub(lambda m: _struct_name(m[0], paths), message)
    if line == 0:
        return message
    where = f"column {column}" if "\n" not in source else f"line {line}, column {column}"
    return f"{where}: {message}"


def _operator(function: str) -> str:
    """How CEL source writes a function or operator: ``_<=_`` is ``'<='``, ``@in`` is ``'in'``."""
    if function == "_[_]":
        return "'[]'"
    if function == "@in":
        return "'in'"
    return f"'{function.strip('_')}'"


def _char_at(source: str, line: int, column: int) -> str:
    lines = source.split("\n")
    if 1 <= line <= len(lines) and 1 <= column <= len(lines[line - 1]):
        return lines[line - 1][column - 1]
    return ""


def _struct_name(full_name: str, paths: Mapping[str, str]) -> str:
    if full_name == _USER_MESSAGE:
        return "user"
    return _WELL_KNOWN.get(full_name) or paths.get(full_name, full_name)


def _type_name(t: cel.Type, paths: Mapping[str, str]) -> str:
    name = t.name()
    return _struct_name(name, paths) if t.is_message() else name.lower()


def _reason(message: str, expression: _Expression, data: ConditionInput) -> str:
    """A short reason for an evaluation error; argument values never appear in it."""
    message = _STATUS_PREFIX.sub("", message)
    if match := _KEY_NOT_FOUND.search(message):
        key = match[1]
        if key in expression.argument_names and key not in data.args:
            return f"no argument '{key}'"[:MAX_REASON_CHARS]
        return f"no key '{key}'"[:MAX_REASON_CHARS]
    if match := _NO_OVERLOAD.search(message):
        return f"wrong type: {_operator(match[1])} cannot be applied to {match[2]}"[:MAX_REASON_CHARS]
    if "out of range" in message:
        return "a number is out of CEL's 64-bit range"
    if "Unexpected value type" in message or "Non-CEL value type" in message:
        return "a request value has a type CEL cannot represent"
    return message[:MAX_REASON_CHARS]
