#!/usr/bin/env python3
"""A flight-controller stand-in for the flight gate tests, built on pymavlink (not on our code).

It sends what an ArduPilot flight controller streams to its companion computer, over UDP to the
agent's `udpin` port, 10 times a second: HEARTBEAT (armed flag in base_mode, system_status),
EXTENDED_SYS_STATE (landed_state), BATTERY_STATUS and SYS_STATUS (remaining %), and once a second
AUTOPILOT_VERSION. It reads back what the agent sends: the arming lock (NAMED_VALUE_INT FN_ARMLK),
STATUSTEXT and the answers to PX4's arm-authorisation request.

Scripted on stdin, one command a line; each is acknowledged with `ok <command>` on stdout once the
next burst carrying it has been sent:
    arm | disarm | takeoff (armed, in the air) | land (on the ground, still armed)
    battery N | charging | discharging (BATTERY_STATUS charge_state) | silence (send nothing:
    a lost link) | resume | quit
    version X.Y.Z   report this flight-controller firmware in AUTOPILOT_VERSION
    authorize       as PX4 does before arming: MAV_CMD_ARM_AUTHORIZATION_REQUEST to its own system
                    (COM_ARM_AUTH_ID = MAV_SYS_ID), every component; prints
                    `ack RESULT PROGRESS RESULT_PARAM2` (or `ack none` after 5 s) and the
                    STATUSTEXTs that came with it as `text ...`, then `ok authorize`
    armlock         prints `armlock N`: the last FN_ARMLK value the agent sent (-1: none yet)
    gpstime UNIX    from now on send SYSTEM_TIME with this GPS time (unix seconds, advancing),
                    as an autopilot does once GPS gave it the time; before, it sends 0 (no fix)

Usage: fc_standin.py udpout:127.0.0.1:PORT [--armed] [--in-air] [--battery N] [--sysid N]
                     [--mavlink1] [--no-landed-state] [--charging] [--px4]
    --charging          BATTERY_STATUS charge_state CHARGING (a MAVLink 2 extension field; the
                        default is OK: discharging normally, as in flight)
    --px4               say MAV_AUTOPILOT_PX4 in HEARTBEAT
    --sysid N           send as MAVLink system N (default 1): a second vehicle or a ground station
    --mavlink1          speak MAVLink 1, as older flight controllers and telemetry radios do
    --no-landed-state   never send EXTENDED_SYS_STATE, as ArduPilot does until asked for it
"""

import os
import sys
import threading
import time

# pymavlink picks the wire version from the environment when it is imported.
if "--mavlink1" in sys.argv:
    os.environ.pop("MAVLINK20", None)
else:
    os.environ.setdefault("MAVLINK20", "1")
from pymavlink import mavutil  # noqa: E402

mav_ = mavutil.mavlink


class Vehicle:
    def __init__(self, armed, in_air, battery, landed_state, charging=False):
        self.landed_state = landed_state
        self.charging = charging
        self.armed = armed
        self.landed = mav_.MAV_LANDED_STATE_IN_AIR if in_air else mav_.MAV_LANDED_STATE_ON_GROUND
        self.battery = battery
        self.silent = False
        self.lock = threading.Lock()
        self.acks = []
        self.autopilot = mav_.MAV_AUTOPILOT_ARDUPILOTMEGA
        # ArduCopter 4.5.7, FIRMWARE_VERSION_TYPE_OFFICIAL (255) in the low byte.
        self.version = (4, 5, 7)
        self.armlock = -1
        self.texts = []
        self.auth_acks = []
        # (gps unix seconds, local monotonic time it was set at); None: no GPS time yet.
        self.gps = None


def charge_state(conn, v):
    # An extension field: MAVLink 1 frames (and pymavlink's v1.0 dialect) have none.
    if not conn.mavlink20():
        return {}
    state = mav_.MAV_BATTERY_CHARGE_STATE_CHARGING if v.charging else mav_.MAV_BATTERY_CHARGE_STATE_OK
    return {"time_remaining": 0, "charge_state": state}


def send_burst(conn, v, tick):
    with v.lock:
        if v.silent:
            acks, v.acks = v.acks, []
            return acks
        base = mav_.MAV_MODE_FLAG_CUSTOM_MODE_ENABLED | mav_.MAV_MODE_FLAG_STABILIZE_ENABLED
        if v.armed:
            base |= mav_.MAV_MODE_FLAG_SAFETY_ARMED
        status = mav_.MAV_STATE_ACTIVE if v.armed else mav_.MAV_STATE_STANDBY
        conn.mav.heartbeat_send(mav_.MAV_TYPE_QUADROTOR, v.autopilot, base, 5, status)
        if v.landed_state:
            conn.mav.extended_sys_state_send(mav_.MAV_VTOL_STATE_UNDEFINED, v.landed)
        conn.mav.battery_status_send(
            0, mav_.MAV_BATTERY_FUNCTION_ALL, mav_.MAV_BATTERY_TYPE_LIPO, 2500,
            [15800] + [65535] * 9, 1200, -1, -1, v.battery,
            **charge_state(conn, v),
        )
        conn.mav.sys_status_send(0, 0, 0, 500, 15800, 1200, v.battery, 0, 0, 0, 0, 0, 0)
        boot_ms = int(time.monotonic() * 1000) & 0xFFFFFFFF
        if v.gps is None:
            conn.mav.system_time_send(0, boot_ms)
        else:
            unix, at = v.gps
            conn.mav.system_time_send(int((unix + time.monotonic() - at) * 1_000_000), boot_ms)
        if tick % 10 == 0:
            major, minor, patch = v.version
            conn.mav.autopilot_version_send(
                0, (major << 24) | (minor << 16) | (patch << 8) | 255, 0, 0, 0,
                [0] * 8, [0] * 8, [0] * 8, 0x1209, 0x5741, 0,
            )
        acks, v.acks = v.acks, []
        return acks


def receive(conn, v):
    """Collects what the agent sends back."""
    while True:
        m = conn.recv_match(type=["NAMED_VALUE_INT", "STATUSTEXT", "COMMAND_ACK"], blocking=True, timeout=0.5)
        if m is None:
            continue
        with v.lock:
            if m.get_type() == "NAMED_VALUE_INT" and m.name == "FN_ARMLK":
                v.armlock = m.value
            elif m.get_type() == "STATUSTEXT":
                v.texts.append(m.text)
            elif m.get_type() == "COMMAND_ACK" and m.command == mav_.MAV_CMD_ARM_AUTHORIZATION_REQUEST:
                v.auth_acks.append(m)


def authorize(conn, v, sysid):
    with v.lock:
        v.auth_acks, v.texts = [], []
    # PX4 sends the request to COM_ARM_AUTH_ID with target component 0; param1 is the vehicle.
    conn.mav.command_long_send(sysid, 0, mav_.MAV_CMD_ARM_AUTHORIZATION_REQUEST, 0, sysid, 0, 0, 0, 0, 0, 0)
    deadline = time.monotonic() + 5
    ack = None
    while time.monotonic() < deadline and ack is None:
        time.sleep(0.05)
        with v.lock:
            ack = v.auth_acks[0] if v.auth_acks else None
    # The reason comes as a STATUSTEXT next to the answer.
    time.sleep(0.3)
    with v.lock:
        texts = list(v.texts)
    if ack is None:
        print("ack none", flush=True)
    else:
        progress = getattr(ack, "progress", 0)
        param2 = getattr(ack, "result_param2", 0)
        print(f"ack {ack.result} {progress} {param2}", flush=True)
    for t in texts:
        print(f"text {t}", flush=True)


def commands(v, conn, sysid):
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        cmd = words[0]
        if cmd == "authorize":
            authorize(conn, v, sysid)
            print(f"ok {line.strip()}", flush=True)
            continue
        if cmd == "armlock":
            with v.lock:
                value = v.armlock
            print(f"armlock {value}", flush=True)
            print(f"ok {line.strip()}", flush=True)
            continue
        with v.lock:
            if cmd == "arm":
                v.armed = True
            elif cmd == "disarm":
                v.armed = False
            elif cmd == "takeoff":
                v.armed = True
                v.landed = mav_.MAV_LANDED_STATE_IN_AIR
            elif cmd == "land":
                v.landed = mav_.MAV_LANDED_STATE_ON_GROUND
            elif cmd == "battery" and len(words) == 2:
                v.battery = int(words[1])
            elif cmd == "charging":
                v.charging = True
            elif cmd == "discharging":
                v.charging = False
            elif cmd == "silence":
                v.silent = True
            elif cmd == "resume":
                v.silent = False
            elif cmd == "gpstime" and len(words) == 2:
                v.gps = (float(words[1]), time.monotonic())
            elif cmd == "version" and len(words) == 2:
                v.version = tuple(int(x) for x in words[1].split("."))
            elif cmd == "quit":
                os._exit(0)
            else:
                print(f"error unknown command {line.strip()!r}", flush=True)
                continue
            v.acks.append(line.strip())
    # stdin closed: the test is gone.
    os._exit(0)


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    args = sys.argv[2:]
    v = Vehicle(
        armed="--armed" in args or "--in-air" in args,
        in_air="--in-air" in args,
        battery=int(args[args.index("--battery") + 1]) if "--battery" in args else 87,
        landed_state="--no-landed-state" not in args,
        charging="--charging" in args,
    )
    sysid = int(args[args.index("--sysid") + 1]) if "--sysid" in args else 1
    conn = mavutil.mavlink_connection(
        sys.argv[1], source_system=sysid, source_component=1, dialect="ardupilotmega"
    )
    if "--mavlink1" in args and conn.mavlink20():
        sys.exit("fc_standin: pymavlink still speaks MAVLink 2")
    if "--px4" in args:
        v.autopilot = mav_.MAV_AUTOPILOT_PX4
    threading.Thread(target=commands, args=(v, conn, sysid), daemon=True).start()
    threading.Thread(target=receive, args=(conn, v), daemon=True).start()
    print("ready", flush=True)
    tick = 0
    while True:
        for ack in send_burst(conn, v, tick):
            print(f"ok {ack}", flush=True)
        tick += 1
        time.sleep(0.1)


if __name__ == "__main__":
    main()
