"""The tool registry: what the model may call, argument validation, timeouts.

One ``ToolRegistry`` is built per process (``build_registry``, held by the
runtime as ``Runtime.tools``). ``call`` never raises: an unknown tool, arguments that
do not match the tool's JSON schema, a tool that fails or one that runs past
its timeout all come back as a ``ToolResult`` the model can read.
"""

from __future__ import annotations

import contextvars
import copy
import logging
import math
import threading
from dataclasses import dataclass, field, replace
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from shared.models import ToolCallStatus
from shared.tools.base import Tool, ToolContext, ToolError, ToolResult
from shared.tools.file_read import FILE_READ_TOOL
from shared.tools.search import SEARCH_TOOL

log = logging.getLogger(__name__)

__all__ = ["Tool", "ToolContext", "ToolError", "ToolRegistry", "ToolResult", "build_registry"]


class ArgumentError(ValueError):
    pass


_TYPE_NAMES = {
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "a boolean",
    "object": "an object",
    "array": "an array",
    "null": "null",
}


def validate_arguments(schema: dict[str, Any], value: Any, path: str = "arguments") -> Any:
    """Check ``value`` against the subset of JSON Schema our tools use; return it with defaults filled.

    Supported: ``type`` (string, integer, number, boolean, object, array, null, or a list of them),
    ``properties``, ``required``, ``additionalProperties`` (false), ``default``, ``enum``,
    ``minimum``/``maximum``, ``minLength``/``maxLength``, ``items``.
    An integral float (``5.0``) is accepted as an integer; ``true`` is never a number.

    :raises ArgumentError: with a message naming the offending field.
    """
    expected = schema.get("type")
    if expected is not None:
        types = expected if isinstance(expected, list) else [expected]
        for candidate in types:
            ok, coerced = _matches_type(candidate, value)
            if ok:
                value = coerced
                break
        else:
            names = " or ".join(_TYPE_NAMES.get(t, t) for t in types)
            raise ArgumentError(f"{path} must be {names}, got {_describe(value)}")

    if "enum" in schema and value not in schema["enum"]:
        raise ArgumentError(f"{path} must be one of {schema['enum']!r}")
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            raise ArgumentError(f"{path} must be at least {schema['minLength']} characters")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            raise ArgumentError(f"{path} must be at most {schema['maxLength']} characters")
    if isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            raise ArgumentError(f"{path} must be >= {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            raise ArgumentError(f"{path} must be <= {schema['maximum']}")
    if isinstance(value, dict):
        value = _validate_object(schema, value, path)
    if isinstance(value, list) and "items" in schema:
        value = [validate_arguments(schema["items"], item, f"{path}[{i}]") for i, item in enumerate(value)]
    return value


def _validate_object(schema: dict[str, Any], value: dict[str, Any], path: str) -> dict[str, Any]:
    properties: dict[str, Any] = schema.get("properties", {})
    if schema.get("additionalProperties") is False:
        unknown = sorted(set(value) - set(properties))
        if unknown:
            allowed = ", ".join(sorted(properties)) or "none"
            raise ArgumentError(f"unknown argument(s) {', '.join(unknown)} (allowed: {allowed})")
    for name in schema.get("required", []):
        if name not in value:
            raise ArgumentError(f"missing required argument {name!r}")
    cleaned: dict[str, Any] = {}
    for name, item in value.items():
        sub = properties.get(name)
        cleaned[name] = validate_arguments(sub, item, name) if sub is not None else item
    for name, sub in properties.items():
        if name not in cleaned and "default" in sub:
            cleaned[name] = copy.deepcopy(sub["default"])
    return cleaned


def _matches_type(expected: str, value: Any) -> tuple[bool, Any]:
    if expected == "string":
        return isinstance(value, str), value
    if expected == "boolean":
        return isinstance(value, bool), value
    if expected == "null":
        return value is None, value
    if expected == "object":
        return isinstance(value, dict), value
    if expected == "array":
        return isinstance(value, list), value
    if isinstance(value, bool):
        return False, value
    if expected == "integer":
        if isinstance(value, int):
            return True, value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return True, int(value)
        return False, value
    if expected == "number":
        return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value)), value
    return False, value


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


@dataclass
class ToolRegistry:
    tools: dict[str, Tool] = field(default_factory=dict)

    _schemas: list[dict[str, Any]] | None = field(default=None, init=False, repr=False)

    def register(self, tool: Tool) -> None:
        if tool.name in self.tools:
            raise ValueError(f"tool {tool.name!r} is already registered")
        self.tools[tool.name] = tool
        self._schemas = None

    def names(self) -> list[str]:
        return list(self.tools)

    def schemas(self) -> list[dict[str, Any]]:
        """The tools in OpenAI function-tool format, built once (every hold sizing and every
        model call of a turn asks for them): shared, so callers must not mutate them."""
        if self._schemas is None:
            self._schemas = [tool.schema() for tool in self.tools.values()]
        return self._schemas

    def call(self, name: str, arguments: Any, ctx: ToolContext, timeout: float) -> ToolResult:
        """Validate ``arguments`` and run the tool within ``timeout`` seconds. Never raises.

        The tool runs in its own thread on its own database session (bound to the
        caller's engine), so a tool abandoned at its timeout can never touch the
        caller's session afterwards; on Postgres its statements are also cancelled
        by ``statement_timeout`` shortly after. Tools see committed data only.
        """
        tool = self.tools.get(name)
        if tool is None:
            known = ", ".join(self.tools) or "none"
            return ToolResult(ToolCallStatus.ERROR, f"unknown tool {name!r} (available: {known})")
        try:
            validated = validate_arguments(tool.parameters, arguments)
        except ArgumentError as exc:
            return ToolResult(ToolCallStatus.ERROR, f"invalid arguments for {name}: {exc}")

        outcome: list[ToolResult] = []
        # The caller's context (request and turn ids) goes along, for the tool's log lines.
        thread = threading.Thread(
            target=contextvars.copy_context().run,
            args=(self._run, tool, validated, ctx, timeout, outcome),
            name=f"tool-{name}",
            daemon=True,
        )
        thread.start()
        thread.join(timeout)
        if thread.is_alive() or not outcome:
            log.warning("tool %s timed out after %.1fs", name, timeout)
            return ToolResult(ToolCallStatus.TIMEOUT, f"{name} did not finish within {timeout:g} seconds")
        return outcome[0]

    @staticmethod
    def _run(tool: Tool, arguments: dict, ctx: ToolContext, timeout: float, outcome: list) -> None:
        session = Session(bind=ctx.session.get_bind(), expire_on_commit=False)
        try:
            if session.get_bind().dialect.name == "postgresql":
                milliseconds = max(int(timeout * 1000), 1)
                session.execute(text(f"SET LOCAL statement_timeout = {milliseconds}"))
            result = tool.handler(replace(ctx, session=session), **arguments)
            session.rollback()  # tools only read
            outcome.append(result)
        except ToolError as exc:
            outcome.append(ToolResult(ToolCallStatus.ERROR, str(exc)))
        except Exception:
            log.exception("tool %s failed", tool.name)
            outcome.append(
                ToolResult(ToolCallStatus.ERROR, f"{tool.name} failed unexpectedly; try again or rephrase")
            )
        finally:
            session.close()


def build_registry(settings=None) -> ToolRegistry:
    """The registry every process uses: ``search`` and ``file_read``."""
    registry = ToolRegistry()
    registry.register(SEARCH_TOOL)
    registry.register(FILE_READ_TOOL)
    return registry
