--[[
gpufleet placement inside sbatch (Slurm's cli_filter/lua plugin). Install as cli_filter.lua
next to slurm.conf and set `CliFilterPlugins=cli_filter/lua` there (docs/placement.md).

sbatch calls slurm_cli_pre_submit once per job component, after it has merged the command
line, SBATCH_* variables and #SBATCH lines: the options table is Slurm's own parse. This
script only acts for sbatch jobs submitted through `gpufleet sbatch` (GPUFLEET_PLACE=1 or
GPUFLEET_CKPT_DIR in the environment), or for every sbatch when ALWAYS is true. It hands the
options to gpufleet-sbatch-filter, which asks the controller and prints `option=value` lines;
any failure there prints nothing and the job is submitted exactly as given.
--]]

local ALWAYS = false                               -- site switch: place plain sbatch too
local HELPER = "/usr/local/bin/gpufleet-sbatch-filter"   -- absent: plain sbatch, silently
-- what runs HELPER; "": HELPER itself. The Ansible role sets HELPER to sbatch_filter.py and
-- this to "<venv>/bin/python -I -S" (no site, no console script: what `gpufleet sbatch`
-- hands us in GPUFLEET_FILTER), so a plain `sbatch` under ALWAYS starts as fast
local RUN_WITH = ""
local pinned = {}                                  -- component offset -> node list we set
local release_after = 10                           -- seconds; the helper says (client.toml)

local function quote(s)
  return "'" .. string.gsub(s, "'", "'\\''") .. "'"
end

local function helper()
  local cmd = os.getenv("GPUFLEET_FILTER")
  if cmd ~= nil then return cmd end
  local f = io.open(HELPER, "r")   -- not installed here: plain sbatch, without a word
  if f == nil then return nil end
  f:close()
  if RUN_WITH ~= "" then return RUN_WITH .. " " .. quote(HELPER) end
  return HELPER
end

local function wanted(options)
  -- sbatch only: "ignore-pbs" reads set/unset in sbatch and nothing in salloc/srun
  local pbs = options["ignore-pbs"]
  if pbs ~= "set" and pbs ~= "unset" then return false end
  if os.getenv("GPUFLEET_CKPT_DIR") then return true end
  local place = os.getenv("GPUFLEET_PLACE")
  if place == "0" then return false end
  return ALWAYS or place == "1"
end

-- a `:` on sbatch's own command line: a hetjob (component 0 cannot tell otherwise)
local function hetjob_cmdline()
  local f = io.open("/proc/self/cmdline", "rb")
  if f == nil then return true end
  local s = f:read("*a")
  f:close()
  for arg in string.gmatch(s, "([^%z]*)%z") do
    if arg == ":" then return true end
  end
  return false
end

function slurm_cli_setup_defaults(options, early)
  return slurm.SUCCESS
end

local function place(options, offset)
  if not wanted(options) then return end
  local cmd = helper()
  if cmd == nil then return end
  local json = slurm.json_cli_options(options)
  if json == nil then return end
  -- the helper's stdout: option=value lines; its messages go to sbatch's stderr
  local het = ""
  if hetjob_cmdline() then het = " het" end
  local p = io.popen(cmd .. " place " .. offset .. " " .. quote(json) .. het, "r")
  if p == nil then return end
  for line in p:lines() do
    local key, value = string.match(line, "^([%w-]+)=(.*)$")
    if key == "gpufleet-release-after" then
      release_after = tonumber(value) or release_after
    elseif key ~= nil then
      options[key] = value
      if key == "nodelist" then pinned[offset] = value end
    end
  end
  p:close()
end

function slurm_cli_pre_submit(options, offset)
  pcall(place, options, offset)    -- whatever happens here, the job is submitted
  return slurm.SUCCESS
end

function slurm_cli_post_submit(offset, jobid, stepid)
  local nodes = pinned[offset]
  local cmd = helper()
  if nodes == nil or cmd == nil then return slurm.SUCCESS end
  local job = tostring(jobid)
  if offset > 0 then job = job .. "+" .. offset end
  -- un-pin a job still pending after the deadline, in the background (sbatch returns now)
  -- the helper starts only after the deadline: nothing runs beside sbatch now
  local later = "sleep " .. math.floor(release_after) .. "; exec " .. cmd .. " release "
                .. job .. " " .. quote(nodes)
  os.execute("setsid -f sh -c " .. quote(later) .. " </dev/null >/dev/null 2>&1")
  return slurm.SUCCESS
end
