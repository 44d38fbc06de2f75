-- Argo CD health check for kubetune.io/FineTuneJob.
-- Install under the argocd-cm key `resource.customizations.health.kubetune.io_FineTuneJob` (docs/gitops.md).
-- Written for Argo CD's Lua 5.1 (gopher-lua) and tested with Lua 5.1 and 5.4.
--
--   Healthy      the job Succeeded (its adapter is published)
--   Degraded     the job Failed, or the operator reports Stalled=True (a spec only it can judge invalid)
--   Suspended    spec.runPolicy.suspend is set and the operator has suspended the job
--   Progressing  anything else: not yet seen by the operator, status of an older generation, Pending, Running
local hs = {}

local function condition(status, type_)
  if status == nil or status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == type_ then
      return c
    end
  end
  return nil
end

local function is_true(c)
  return c ~= nil and c.status == "True"
end

local function describe(c, fallback)
  if c ~= nil and c.message ~= nil and c.message ~= "" then
    if c.reason ~= nil and c.reason ~= "" then
      return c.reason .. ": " .. c.message
    end
    return c.message
  end
  if c ~= nil and c.reason ~= nil and c.reason ~= "" then
    return c.reason
  end
  return fallback
end

local status = obj.status
if status == nil or status.phase == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubetune operator to pick up the job"
  return hs
end

-- A terminal failure stays a failure whatever the generation: a failed run is not retried by a spec change.
local failed = condition(status, "Failed")
if is_true(failed) or status.phase == "Failed" then
  hs.status = "Degraded"
  hs.message = describe(failed, status.message or "The fine-tuning job failed")
  return hs
end

local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and status.observedGeneration ~= nil and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local stalled = condition(status, "Stalled")
if is_true(stalled) then
  hs.status = "Degraded"
  hs.message = describe(stalled, "The operator cannot make progress with this job")
  return hs
end

local succeeded = condition(status, "Succeeded")
if is_true(succeeded) or status.phase == "Succeeded" then
  hs.status = "Healthy"
  if status.adapter ~= nil and status.adapter.uri ~= nil then
    hs.message = "Adapter published to " .. status.adapter.uri
  else
    hs.message = describe(succeeded, "The fine-tuning job succeeded")
  end
  return hs
end

if status.phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = status.message or "The job is suspended (spec.runPolicy.suspend)"
  return hs
end

hs.status = "Progressing"
local progress = status.progress
if status.phase == "Running" and progress ~= nil and progress.step ~= nil and progress.totalSteps ~= nil then
  hs.message = "Training: step " .. string.format("%d", progress.step) .. " of " .. string.format("%d", progress.totalSteps)
else
  hs.message = status.message or ("Phase " .. status.phase)
end
return hs
