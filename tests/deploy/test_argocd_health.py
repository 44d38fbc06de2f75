"""The Argo CD health check (docs/argocd/health.lua) judges recorded FineTuneJobs the way a GitOps user expects:
Succeeded is Healthy, Failed or Stalled is Degraded, everything on the way is Progressing.

It runs in Debian's Lua interpreters (`apt-get install lua5.4 lua5.1`): Argo CD evaluates health checks with
gopher-lua, a Lua 5.1, so the script is run under 5.1 when it is installed as well as under 5.4. The recorded
objects are handed to Lua as table literals written by this test (no JSON library in plain Lua), and the script
runs in an environment holding only what Argo CD's sandbox offers.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from typing import Any

import pytest
import yaml

from kubetune.api.v1alpha1.status import FineTuneJobStatus
from tests.conftest import ROOT

HEALTH_LUA = ROOT / "docs" / "argocd" / "health.lua"
STATES = yaml.safe_load((ROOT / "tests" / "deploy" / "data" / "finetunejob-states.yaml").read_text())
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
    """A Python value from YAML as a Lua expression."""
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


@functools.cache
def judged_by(interpreter: str) -> list[tuple[str, str]]:
    """(status, message) the health check returns for each recorded state, in order."""
    binary = shutil.which(interpreter)
    if binary is None:
        pytest.skip(f"{interpreter} is not installed (apt-get install -y {interpreter})")
    cases = "{\n" + ",\n".join(lua_literal(state["object"]) for state in STATES) + "\n}"
    program = f"HEALTH_LUA = {lua_literal(str(HEALTH_LUA))}\nCASES = {cases}\n{HARNESS}"
    result = subprocess.run([binary, "-"], input=program, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    lines = [line.split("\t", 2) for line in result.stdout.splitlines()]
    assert [int(index) for index, _, _ in lines] == list(range(1, len(STATES) + 1)), result.stdout
    return [(status, message) for _, status, message in lines]


def test_recorded_states_are_statuses_the_api_accepts() -> None:
    for state in STATES:
        status = state["object"].get("status")
        if status is not None:
            FineTuneJobStatus.model_validate(status)


def test_every_health_the_check_can_return_is_covered() -> None:
    assert {state["health"] for state in STATES} == {"Healthy", "Progressing", "Degraded", "Suspended"}


@pytest.mark.parametrize("interpreter", INTERPRETERS)
@pytest.mark.parametrize("index", range(len(STATES)), ids=[state["story"] for state in STATES])
def test_health_of_a_recorded_finetunejob(interpreter: str, index: int) -> None:
    state = STATES[index]
    status, message = judged_by(interpreter)[index]
    assert status == state["health"], f"{state['story']}: {status} ({message})"
    assert message and message != "nil"
    assert state.get("message", "") in message
