-- flightnode arming interlock for ArduPilot.
--
-- The flightnode agent on the companion computer sends, over MAVLink, a NAMED_VALUE_INT named
-- FN_ARMLK once a second (and at once when it changes): 0 while the vehicle may arm, else why
-- it must not (1 installing, 2 switching, 3 trial, 4 rolling back, 5 autopilot mismatch). This
-- script turns that into ArduPilot's auxiliary arming authorisation, so an arm attempt is refused
-- with "Arm: flightnode: ..." and the ground station shows "PreArm: flightnode: ...".
--
-- Fails closed: an agent that held a lock and then goes silent (killed, crashed, link lost during
-- an install) keeps the lock, with "agent lost" added. Fails open: an agent never heard since
-- the autopilot booted, or whose last word was 0, does not keep the vehicle on the ground (no
-- install is known to run, and a drone without a working companion must still be flyable).
-- After an autopilot reboot the lock is open until the agent's next message (within a second).
--
-- Install: copy to the autopilot's scripts/ directory (APM/scripts on the SD card) and set
-- SCR_ENABLE 1; reboot. Bypassed by ARMING_CHECK 0 and by a forced arm: both skip the auxiliary
-- authorisation.

local NAMED_VALUE_INT = 252
local LOCK_NAME = "FN_ARMLK"
-- The agent sends every second: five missed messages mean it is gone.
local SILENT_MS = 5000
local PERIOD_MS = 200
-- Short: the ground station gets "PreArm: " .. reason in a 50-byte STATUSTEXT, and a lost agent
-- adds ", agent lost"; the agent's own STATUSTEXT and status say more.
local REASONS = {
  [1] = "writing firmware",
  [2] = "switching firmware",
  [3] = "firmware on trial",
  [4] = "rolling back",
  [5] = "wrong autopilot fw",
}

local auth_id = nil
local code = 0
local heard_ms = nil
local last_state = nil

mavlink:init(1, 10)
mavlink:register_rx_msgid(NAMED_VALUE_INT)

-- The FN_ARMLK value of a received message (the C mavlink_message_t as a string), or nil.
local function lock_value(msg)
  -- Firmware since MAVLink 2.1 passes a 299-byte structure with a 4-byte sysid.
  local payload = (#msg >= 299) and 16 or 13
  local len = string.byte(msg, 4)
  local msgid = string.unpack("<I3", msg, payload - 3)
  if msgid ~= NAMED_VALUE_INT or len < 9 then
    return nil
  end
  -- MAVLink 2 drops trailing zero bytes: pad before reading the fixed layout.
  local body = string.sub(msg, payload, payload + len - 1) .. string.rep("\0", 18)
  local _, value, name = string.unpack("<I4i4c10", body)
  name = string.gsub(name, "%z", "")
  if name ~= LOCK_NAME then
    return nil
  end
  return value
end

local function update()
  if not auth_id then
    auth_id = arming:get_aux_auth_id()
    if not auth_id then
      gcs:send_text(3, "flightnode: no auxiliary arming slot free; interlock inactive")
      return update, 5000
    end
  end
  while true do
    local msg = mavlink:receive_chan()
    if not msg then
      break
    end
    local value = lock_value(msg)
    if value then
      code = value
      heard_ms = millis():toint()
    end
  end
  local why = nil
  if heard_ms and code ~= 0 then
    why = "flightnode: " .. (REASONS[code] or ("lock " .. code))
    if millis():toint() - heard_ms > SILENT_MS then
      why = why .. ", agent lost"
    end
  end
  if why then
    arming:set_aux_auth_failed(auth_id, why)
  else
    arming:set_aux_auth_passed(auth_id)
  end
  if why ~= last_state then
    gcs:send_text(6, why or "flightnode: arming allowed")
    last_state = why
  end
  return update, PERIOD_MS
end

return update()
