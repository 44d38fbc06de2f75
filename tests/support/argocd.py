"""Runs the Argo CD health check (docs/argocd/health.lua) in Debian's Lua interpreters on FineTuneJob objects.

Argo CD evaluates health checks with gopher-lua, a Lua 5.1, so the script runs under 5.1 as it does once
installed, and under 5.4. The objects are handed to Lua as table literals (plain Lua has no JSON library),
and the script runs in an environment holding only what Argo CD's sandbox offers.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

import pytest

from tests.conftest import ROOT

HEALTH_LUA = ROOT / "docs" / "argocd" / "health.lua"
INTERPRETERS = ("lua5.4", "lua5.1")

HARNESS = """
local source = assert(io.open(HEALTH_LUA, "r")):read("*a")
local function health(obj)
  local env = {obj = obj, ipairs = ipairs, pairs = pairs, tostring = tostring, tonumber = tonumber,
               type = type, string = string, table = table, math = math}
  local fn
  if setfenv then
    fn = assert(loadstring(source, "health.lua"))
    setfenv(fn, env)
  else
    fn = assert(load(source, "health.lua", "t", env))
  end
  return fn()
end
for index, obj in ipairs(CASES) do
  local hs = health(obj)
  print(index .. "\\t" .. tostring(hs.status) .. "\\t" .. tostring(hs.message))
end
"""


def lua_literal(value: Any) -> str:
    """A Python value from YAML or JSON as a Lua expression."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "nil"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
        return f'"{escaped}"'
    if isinstance(value, list):
        return "{" + ", ".join(lua_literal(item) for item in value) + "}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"[{lua_literal(str(k))}] = {lua_literal(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no Lua literal for {value!r}")


def argocd_health(interpreter: str, objects: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """(health status, message) the health check returns for each object, in order."""
    binary = shutil.which(interpreter)
    if binary is None:
        pytest.skip(f"{interpreter} is not installed (make system-deps, or apt-get install -y {interpreter})")
    cases = "{\n" + ",\n".join(lua_literal(dict(obj)) for obj in objects) + "\n}"
    program = f"HEALTH_LUA = {lua_literal(str(HEALTH_LUA))}\nCASES = {cases}\n{HARNESS}"
    result = subprocess.run([binary, "-"], input=program, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    lines = [line.split("\t", 2) for line in result.stdout.splitlines()]
    assert [int(index) for index, _, _ in lines] == list(range(1, len(objects) + 1)), result.stdout
    return [(status, message) for _, status, message in lines]
