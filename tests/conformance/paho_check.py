"""Conformance check of edgehose's MQTT front door with Eclipse paho-mqtt (Python).

For MQTT 3.1.1 and 5: connect, subscribe to sensors/#, publish QoS 0 and QoS 1 telemetry,
wait for the PUBACK of the QoS 1 message, receive both on the subscription. Prints one JSON
object with what happened and exits non-zero on any failure.

Usage: python paho_check.py PORT
"""

import json
import sys
import threading
import time

import paho.mqtt.client as mqtt


def check(port: int, protocol: int, name: str) -> dict:
    received = []
    subscribed = threading.Event()
    got_all = threading.Event()

    def on_subscribe(client, userdata, mid, reason_codes, properties):
        subscribed.set()

    def on_message(client, userdata, msg):
        received.append((msg.topic, msg.payload.decode(), msg.qos))
        if len(received) >= 2:
            got_all.set()

    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"paho-sub-{name}", protocol=protocol)
    sub.on_subscribe = on_subscribe
    sub.on_message = on_message
    sub.connect("127.0.0.1", port, keepalive=30)
    sub.loop_start()
    sub.subscribe("sensors/#", qos=1)
    if not subscribed.wait(10):
        raise RuntimeError(f"{name}: no SUBACK")

    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"paho-pub-{name}", protocol=protocol)
    pub.connect("127.0.0.1", port, keepalive=30)
    pub.loop_start()
    for qos in (0, 1):
        body = json.dumps({"device": f"paho-{name}", "seq": qos})
        info = pub.publish(f"sensors/paho-{name}/telemetry", body, qos=qos)
        info.wait_for_publish(timeout=10)
        if not info.is_published():
            raise RuntimeError(f"{name}: QoS {qos} publish not acknowledged")
    if not got_all.wait(10):
        raise RuntimeError(f"{name}: subscriber got {received}")
    pub.disconnect()
    pub.loop_stop()
    sub.disconnect()
    sub.loop_stop()
    return {"protocol": name, "received": received}


def main() -> int:
    port = int(sys.argv[1])
    results = []
    for protocol, name in ((mqtt.MQTTv311, "v311"), (mqtt.MQTTv5, "v5")):
        results.append(check(port, protocol, name))
        time.sleep(0.1)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
