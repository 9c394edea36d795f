"""A service that answers calls through the hub, for the call tests:
`python3 rpc_service.py NAME KIND PORT LOG` where KIND is `v5` (paho, MQTT 5,
response topic + correlation data), `v311` (paho, MQTT 3.1.1, the id in the
topic, the status in the reply topic) or `poll` (HTTP long-poll on
GET /jobs/NAME, POST /jobs/ID). Prints "ready" once it takes requests and
appends every request's body to LOG (one line each).

What it answers, by the request body:
  slow        -> nothing (the call times out)
  die         -> exits at once, without answering
  die:NAME    -> exits if it is NAME, else answers as below
  status:N    -> status N, body "status N"
  anything    -> 200, JSON {"name", "body", "content_type"}
"""

import json
import os
import sys
import threading
import urllib.request

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

NAME, KIND, PORT, LOG = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
PREFIX = "homicro"


def handle(body, content_type):
    """(status, content type, body) or None for no answer."""
    with open(LOG, "a") as f:
        f.write(body.decode(errors="replace") + "\n")
    text = body.decode(errors="replace")
    if text == "slow":
        return None
    if text == "die" or text == f"die:{NAME}":
        os._exit(1)
    if text.startswith("status:"):
        n = int(text.split(":", 1)[1])
        return n, "text/plain", f"status {n}".encode()
    out = {"name": NAME, "body": text, "content_type": content_type}
    return 200, "application/json", json.dumps(out).encode()


def serve_mqtt(version):
    ready = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"svc-{NAME}", protocol=version)

    def on_message(c, u, m):
        p = getattr(m, "properties", None)
        ct = getattr(p, "ContentType", None) if p else None
        answer = handle(m.payload, ct)
        if answer is None:
            return
        status, ctype, body = answer
        if version == mqtt.MQTTv5:
            rp = Properties(PacketTypes.PUBLISH)
            rp.CorrelationData = p.CorrelationData
            rp.ContentType = ctype
            rp.UserProperty = [("status", str(status))]
            c.publish(p.ResponseTopic, body, qos=1, properties=rp)
        else:
            call_id = m.topic.rsplit("/", 1)[1]
            c.publish(f"{PREFIX}/reply/{call_id}/{status}", body, qos=1)

    c.on_message = on_message
    c.on_subscribe = lambda *a: ready.set()
    c.connect("127.0.0.1", PORT)
    c.subscribe(f"{PREFIX}/rpc/{NAME}/+", 1)
    c.loop_start()
    ready.wait(10)
    print("ready", flush=True)
    threading.Event().wait()


def serve_poll():
    base = f"http://127.0.0.1:{PORT}"
    first = True
    while True:
        url = f"{base}/jobs/{NAME}?wait=2s"
        if first:
            # The first poll says "ready" once the hub knows it (a short one).
            urllib.request.urlopen(f"{base}/jobs/{NAME}?wait=10ms", timeout=10).read()
            print("ready", flush=True)
            first = False
        r = urllib.request.urlopen(url, timeout=30)
        if r.status == 204:
            continue
        call_id = r.headers["x-homicro-call"]
        answer = handle(r.read(), r.headers.get("content-type"))
        if answer is None:
            continue
        status, ctype, body = answer
        req = urllib.request.Request(f"{base}/jobs/{call_id}", data=body, method="POST",
                                     headers={"content-type": ctype,
                                              "x-homicro-status": str(status)})
        try:
            urllib.request.urlopen(req, timeout=10).read()
        except urllib.error.HTTPError as e:
            print("answer refused", e.code, flush=True)


if KIND == "v5":
    serve_mqtt(mqtt.MQTTv5)
elif KIND == "v311":
    serve_mqtt(mqtt.MQTTv311)
else:
    serve_poll()
