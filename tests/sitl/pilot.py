#!/usr/bin/env python3
"""A ground-station pilot for the flight-gate tests against ArduPilot SITL, built on pymavlink.

It flies the simulated copter through a second MAVLink port of the autopilot, the way an operator
would; the agent under test only watches its own port. It asks for no streams: whatever the agent
learns beyond HEARTBEAT, it learns because it asked.

Scripted on stdin, one command a line; each is answered with `ok <command>` on stdout once done,
or `error <why>`:
    takeoff ALT   GUIDED, arm (retried while the autopilot refuses, e.g. "Need Position Estimate"
                  until its EKF uses GPS), take off to ALT metres; done once the copter is armed
                  and the takeoff was accepted
    land          LAND; done once the autopilot disarmed itself after touchdown
    refused TEXT  GUIDED, then try to arm (again while the autopilot refuses for other reasons)
                  until it refuses with a STATUSTEXT holding TEXT; an error if it arms instead
                  (it is disarmed again)
    quit

Usage: pilot.py tcp:127.0.0.1:PORT
"""

import os
import sys
import time

os.environ.setdefault("MAVLINK20", "1")
from pymavlink import mavutil  # noqa: E402

mav_ = mavutil.mavlink
COPTER_GUIDED = 4
# Sim seconds run faster than wall seconds at a speedup, but a loaded machine may not keep it.
ARM_TIMEOUT = 120
LAND_TIMEOUT = 180


def command(conn, cmd, *params, timeout=10):
    """Sends COMMAND_LONG to the autopilot and returns the result of its COMMAND_ACK (None: none)."""
    params = list(params) + [0] * (7 - len(params))
    conn.mav.command_long_send(conn.target_system, conn.target_component, cmd, 0, *params)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ack = conn.recv_match(type="COMMAND_ACK", blocking=True, timeout=1)
        if ack is not None and ack.command == cmd:
            return ack.result
    return None


def armed(conn, timeout=1):
    hb = conn.recv_match(type="HEARTBEAT", blocking=True, timeout=timeout)
    if hb is None or hb.get_srcComponent() != 1:
        return None
    return bool(hb.base_mode & mav_.MAV_MODE_FLAG_SAFETY_ARMED)


def takeoff(conn, alt):
    result = command(conn, mav_.MAV_CMD_DO_SET_MODE, mav_.MAV_MODE_FLAG_CUSTOM_MODE_ENABLED, COPTER_GUIDED)
    if result != mav_.MAV_RESULT_ACCEPTED:
        return f"GUIDED refused: {result}"
    deadline = time.monotonic() + ARM_TIMEOUT
    while True:
        result = command(conn, mav_.MAV_CMD_COMPONENT_ARM_DISARM, 1)
        if result == mav_.MAV_RESULT_ACCEPTED:
            break
        if time.monotonic() > deadline:
            return f"arming refused for {ARM_TIMEOUT} s: {result}"
        time.sleep(0.5)
    result = command(conn, mav_.MAV_CMD_NAV_TAKEOFF, 0, 0, 0, 0, 0, 0, alt)
    if result != mav_.MAV_RESULT_ACCEPTED:
        return f"takeoff refused: {result}"
    return None


def refused(conn, text):
    command(conn, mav_.MAV_CMD_DO_SET_MODE, mav_.MAV_MODE_FLAG_CUSTOM_MODE_ENABLED, COPTER_GUIDED)
    deadline = time.monotonic() + ARM_TIMEOUT
    texts = []
    while time.monotonic() < deadline:
        conn.mav.command_long_send(
            conn.target_system, conn.target_component, mav_.MAV_CMD_COMPONENT_ARM_DISARM, 0, 1, 0, 0, 0, 0, 0, 0
        )
        texts, result, end = [], None, time.monotonic() + 5
        while time.monotonic() < end:
            m = conn.recv_match(type=["COMMAND_ACK", "STATUSTEXT"], blocking=True, timeout=0.5)
            if m is None:
                if result is not None:
                    break
                continue
            if m.get_type() == "STATUSTEXT":
                texts.append(m.text)
            elif m.command == mav_.MAV_CMD_COMPONENT_ARM_DISARM:
                result = m.result
        if result == mav_.MAV_RESULT_ACCEPTED:
            command(conn, mav_.MAV_CMD_COMPONENT_ARM_DISARM, 0, 21196)
            return f"armed although {text!r} was expected; it said {texts}"
        if any(text in t for t in texts):
            return None
        time.sleep(0.5)
    return f"never refused with {text!r} within {ARM_TIMEOUT} s; last said {texts}"


def land(conn):
    result = command(conn, mav_.MAV_CMD_NAV_LAND)
    if result != mav_.MAV_RESULT_ACCEPTED:
        return f"land refused: {result}"
    deadline = time.monotonic() + LAND_TIMEOUT
    while time.monotonic() < deadline:
        if armed(conn) is False:
            return None
    return f"still armed {LAND_TIMEOUT} s after LAND"


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    conn = mavutil.mavlink_connection(sys.argv[1], source_system=255, source_component=190)
    if conn.wait_heartbeat(timeout=30) is None:
        sys.exit(f"pilot: no HEARTBEAT on {sys.argv[1]}")
    print("ready", flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "takeoff" and len(words) == 2:
            error = takeoff(conn, float(words[1]))
        elif words[0] == "land":
            error = land(conn)
        elif words[0] == "refused" and len(words) > 1:
            error = refused(conn, line.strip().split(" ", 1)[1])
        elif words[0] == "quit":
            break
        else:
            error = f"unknown command {line.strip()!r}"
        print(f"error {error}" if error else f"ok {line.strip()}", flush=True)


if __name__ == "__main__":
    main()
