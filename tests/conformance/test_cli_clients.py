"""Mosquitto's own command-line clients (mosquitto_pub, _sub, _rr) as third-party clients."""

import json
import queue
import subprocess
import threading

from harness import TIMEOUT, publish_props


class Cli:
    """A mosquitto_sub / mosquitto_rr process whose output lines arrive on a queue."""

    def __init__(self, *args):
        self.proc = subprocess.Popen(["stdbuf", "-oL", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.lines = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def line_containing(self, text):
        while True:
            line = self.lines.get(timeout=TIMEOUT)
            assert line is not None, f"exited with {self.proc.wait()} before {text!r}"
            if text in line:
                return line

    def finish(self):
        assert self.proc.wait(timeout=TIMEOUT) == 0

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def sub(broker, version):
    """A subscribed `mosquitto_sub -C 1` printing its message as JSON."""
    s = Cli("mosquitto_sub", "-p", str(broker.port), "-V", version, "-t", "cli/#",
            "-q", "1", "-C", "1", "-F", "%j", "-d")
    s.line_containing("received SUBACK")
    return s


def test_command_line_pub_v5_properties_reach_command_line_sub_v5_and_v311(broker):
    subs = {v: sub(broker, v) for v in ("mqttv5", "mqttv311")}
    try:
        d = ["-D", "publish"]
        subprocess.run(["mosquitto_pub", "-p", str(broker.port), "-V", "mqttv5", "-q", "1",
                        "-t", "cli/t", "-m", "hi",
                        *d, "user-property", "k", "v", *d, "content-type", "text/plain",
                        *d, "correlation-data", "abc", *d, "response-topic", "cli/resp",
                        *d, "payload-format-indicator", "1",
                        *d, "message-expiry-interval", "60"],
                       check=True, timeout=TIMEOUT)
        got = {v: json.loads(s.line_containing('"topic"')) for v, s in subs.items()}
        for s in subs.values():
            s.finish()
    finally:
        for s in subs.values():
            s.stop()
    assert [(m["topic"], m["payload"]) for m in got.values()] == [("cli/t", "hi")] * 2
    props = dict(got["mqttv5"].get("properties", {}))
    expiry = props.pop("message-expiry-interval", None)
    assert props == {"user-properties": {"k": "v"}, "content-type": "text/plain",
                     "correlation-data": "abc", "response-topic": "cli/resp",
                     "payload-format-indicator": 1}
    assert expiry is not None and 55 <= expiry <= 60
    assert not got["mqttv311"].get("properties")


def test_command_line_rr_request_gets_its_response(broker):
    responder = broker.client("cli-responder")
    responder.subscribe("cli/request", 1)
    rr = Cli("mosquitto_rr", "-p", str(broker.port), "-t", "cli/request", "-e", "cli/response",
             "-m", "ping", "-q", "1", "-W", "10")
    try:
        request = responder.get()
        assert (request.payload, request.prop("ResponseTopic")) == (b"ping", "cli/response")
        props = publish_props()
        if request.prop("CorrelationData") is not None:
            props.CorrelationData = request.prop("CorrelationData")
        responder.publish(request.prop("ResponseTopic"), "pong", qos=1, properties=props)
        assert rr.line_containing("pong") == "pong"
        rr.finish()
    finally:
        rr.stop()
