"""Real brokers for the bridge tests and the bridge benchmark (use /usr/bin/python3).

Each broker runs on free loopback ports with its data in a temporary directory of the caller; it is
started as a child of the test, in its own process group, and killed by that group's id (SIGKILL)
at the end, so nothing survives a failed test. `kill()` is a crash (SIGKILL, data on disk kept),
`start()` again brings the same broker back on the same ports with the same data.

  Mosquitto    mosquitto (persistence on, autosave after every change)
  Redis        redis-server (appendonly, appendfsync always: an XADD reply is on disk)
  Nats         nats-server, optionally -js (JetStream file store)
  Rabbit       rabbitmq-server with its own node name, ports, mnesia and log dirs, and its own epmd
  KafkaMock    tests/support/kafka_mock: librdkafka's mock cluster (no Kafka broker is packaged); it
               also writes records, reads a group's committed offsets, takes its broker down and up
"""
import json
import os
import pwd
import signal
import socket
import subprocess
import uuid

from evmesh_testlib import BUILD, free_port, read_line, wait_for

KAFKA_MOCK = os.path.join(BUILD, "tests", "evmesh_kafka_mock")
NATS_TOOL = os.path.join(BUILD, "tests", "evmesh_nats_tool")


def port_open(port, host="127.0.0.1"):
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class Broker:
    """A server process in its own process group; subclasses set self.argv/self.env/self.port."""

    name = "broker"
    start_timeout = 15.0

    def __init__(self, tmp):
        self.dir = os.path.join(tmp, self.name)
        os.makedirs(self.dir, exist_ok=True)
        self.proc = None
        self.log_path = os.path.join(self.dir, "server.log")
        self.env = None
        self.starts = 0

    def argv(self):
        raise NotImplementedError

    def ready(self):
        return port_open(self.port)

    def start(self):
        assert self.proc is None or self.proc.poll() is not None
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(self.argv(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=self.dir, env=self.env, start_new_session=True)
        self.starts += 1
        if not wait_for(lambda: self.proc.poll() is None and self.ready(), timeout=self.start_timeout, step=0.05):
            self.stop()
            raise AssertionError(f"{self.name} did not start:\n{self.log()[-3000:]}")
        return self

    def kill(self):
        """SIGKILL the whole process group (a crash); waits until it is gone."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        wait_for(lambda: not port_open(self.port), timeout=5)

    def stop(self):
        self.kill()

    def log(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""


class Redis(Broker):
    name = "redis"

    def __init__(self, tmp):
        super().__init__(tmp)
        self.port = free_port()

    def argv(self):
        return ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", self.dir,
                "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no",
                "--protected-mode", "no", "--logfile", ""]

    def client(self):
        import redis
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=10)

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}"


class Mosquitto(Broker):
    name = "mosquitto"

    def __init__(self, tmp):
        super().__init__(tmp)
        self.port = free_port()
        self.conf = os.path.join(self.dir, "mosquitto.conf")
        with open(self.conf, "w") as f:
            f.write(f"listener {self.port} 127.0.0.1\n"
                    "allow_anonymous true\n"
                    # run as whoever started it: as root, mosquitto would switch to the user
                    # "mosquitto", which cannot write the test's persistence directory
                    f"user {pwd.getpwuid(os.getuid()).pw_name}\n"
                    "persistence true\n"
                    f"persistence_location {self.dir}/\n"
                    # save after every change: the closest mosquitto gets to "acknowledged = on disk";
                    # it still writes the file after the PUBACK, so a SIGKILL can lose the last few
                    "autosave_on_changes true\n"
                    "autosave_interval 1\n"
                    "max_queued_messages 0\n"
                    "max_inflight_messages 100\n"
                    "log_dest stdout\n"
                    "log_type error\nlog_type warning\n")

    def argv(self):
        return ["mosquitto", "-c", self.conf]

    @property
    def url(self):
        return f"mqtt://127.0.0.1:{self.port}"


class Nats(Broker):
    name = "nats"

    def __init__(self, tmp, jetstream=False):
        super().__init__(tmp)
        self.port = free_port()
        self.jetstream = jetstream

    def argv(self):
        a = ["nats-server", "-a", "127.0.0.1", "-p", str(self.port)]
        if self.jetstream:
            a += ["-js", "-sd", os.path.join(self.dir, "js")]
        return a

    @property
    def url(self):
        return f"nats://127.0.0.1:{self.port}"


class Rabbit(Broker):
    """rabbitmq-server as a child: its own node name, AMQP/distribution/epmd ports, mnesia, logs,
    enabled-plugins file and Erlang cookie (HOME), so it never touches a system RabbitMQ."""
    name = "rabbit"
    start_timeout = 90.0

    def __init__(self, tmp):
        super().__init__(tmp)
        self.port = free_port()
        self.epmd_port = free_port()
        self.node = f"evmesh{os.getpid()}x{self.port}@localhost"
        home = os.path.join(self.dir, "home")
        os.makedirs(home, exist_ok=True)
        plugins = os.path.join(self.dir, "enabled_plugins")
        with open(plugins, "w") as f:
            f.write("[].\n")
        self.env = {**os.environ, "HOME": home, "ERL_EPMD_PORT": str(self.epmd_port),
                    "ERL_EPMD_ADDRESS": "127.0.0.1",
                    "RABBITMQ_NODENAME": self.node, "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
                    "RABBITMQ_NODE_PORT": str(self.port), "RABBITMQ_DIST_PORT": str(free_port()),
                    "RABBITMQ_MNESIA_BASE": os.path.join(self.dir, "mnesia"),
                    "RABBITMQ_LOG_BASE": os.path.join(self.dir, "log"),
                    "RABBITMQ_ENABLED_PLUGINS_FILE": plugins,
                    "RABBITMQ_CONFIG_FILE": os.path.join(self.dir, "rabbitmq"),
                    "RABBITMQ_PID_FILE": os.path.join(self.dir, "rabbit.pid")}
        self.epmd = None

    def argv(self):
        return ["/usr/lib/rabbitmq/bin/rabbitmq-server"]

    def start(self):
        # our own epmd (not -daemon), so it is our child and dies with the test
        if self.epmd is None or self.epmd.poll() is not None:
            self.epmd = subprocess.Popen(["epmd", "-port", str(self.epmd_port), "-address", "127.0.0.1"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         start_new_session=True, env=self.env)
        return super().start()

    def stop(self):
        self.kill()
        if self.epmd is not None and self.epmd.poll() is None:
            self.epmd.kill()
            self.epmd.wait(timeout=5)

    @property
    def url(self):
        return f"amqp://guest:guest@127.0.0.1:{self.port}"

    def channel(self):
        import pika
        conn = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", self.port, connection_attempts=3,
                                                                 retry_delay=1))
        return conn, conn.channel()


class KafkaMock(Broker):
    """librdkafka's mock cluster (tests/support/kafka_mock.cpp); prints its bootstrap servers."""
    name = "kafka"

    def __init__(self, tmp, topics=(), control=False):
        super().__init__(tmp)
        self.topics = list(topics)
        self.control = control
        self.bootstrap = None
        self.port = None

    def start(self):
        argv = [KAFKA_MOCK, "serve"] + [a for t in self.topics for a in ("--topic", t)]
        if self.control:
            argv += ["--control", "1"]
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, start_new_session=True,
                                         stdin=subprocess.PIPE if self.control else subprocess.DEVNULL)
        line = read_line(self.proc, 15).decode()
        if not line.startswith("BOOTSTRAP "):
            self.stop()
            raise AssertionError(f"kafka mock did not start: {line!r}\n{self.log()}")
        self.bootstrap = line.split()[1]
        self.port = int(self.bootstrap.split(",")[0].rsplit(":", 1)[1])
        return self

    def kill(self):
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)
        self.proc.stdout.close()
        if self.proc.stdin is not None:
            self.proc.stdin.close()

    def broker_set(self, state):
        """"down": the broker closes its connections and refuses new ones; "up": back (needs control=True)."""
        self.proc.stdin.write(f"{state}\n".encode())
        self.proc.stdin.flush()
        line = read_line(self.proc, 10).decode().strip()
        if line != f"OK {state}":
            raise AssertionError(f"kafka mock: {line!r}")

    def consume(self, topic, count, timeout=30.0):
        """Every message of `topic` (all partitions, from the start) as dicts: key, value, headers."""
        p = subprocess.run([KAFKA_MOCK, "consume", "--bootstrap", self.bootstrap, "--topic", topic,
                            "--count", str(count), "--timeout-ms", str(int(timeout * 1000))],
                           capture_output=True, text=True, timeout=timeout + 30)
        if p.returncode != 0:
            raise AssertionError(f"kafka consume failed: {p.stderr}")
        return [json.loads(line) for line in p.stdout.splitlines() if line.strip()]

    def produce(self, topic, records, timeout=60.0):
        """Writes records (dicts: value, optional key, headers, partition) with an idempotent producer;
        returns (partition, offset) of each, in order."""
        lines = "".join(json.dumps(r) + "\n" for r in records)
        p = subprocess.run([KAFKA_MOCK, "produce-lines", "--bootstrap", self.bootstrap, "--topic", topic],
                           input=lines, capture_output=True, text=True, timeout=timeout)
        if p.returncode != 0:
            raise AssertionError(f"kafka produce failed: {p.stderr}")
        out = [json.loads(line) for line in p.stdout.splitlines() if line.strip()]
        return [(o["partition"], o["offset"]) for o in out]

    def committed(self, topic, group):
        """The group's committed offset and the end offset of each partition of `topic`:
        ({partition: offset}, {partition: end})."""
        p = subprocess.run([KAFKA_MOCK, "committed", "--bootstrap", self.bootstrap, "--topic", topic, "--group", group],
                           capture_output=True, text=True, timeout=60)
        if p.returncode != 0:
            raise AssertionError(f"kafka committed failed: {p.stderr}")
        j = json.loads(p.stdout)
        return ({int(k): v for k, v in j["committed"].items()}, {int(k): v for k, v in j["end"].items()})


class NatsClient:
    """A minimal NATS protocol client (https://docs.nats.io/reference/reference-protocols/nats-protocol)
    on a raw socket: subscribe, request/reply (for the JetStream API), message headers."""

    def __init__(self, port, timeout=10.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # request/reply: no Nagle delay
        self.buf = b""
        self.sid = 0
        self._line()  # INFO
        self.sock.sendall(b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"no_responders":true}\r\nPING\r\n')
        while self._line() != b"PONG":
            pass

    def _fill(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError("nats closed the connection")
        self.buf += chunk

    def _line(self):
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _take(self, n):
        while len(self.buf) < n + 2:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n + 2:]
        return data

    def subscribe(self, subject):
        self.sid += 1
        self.sock.sendall(f"SUB {subject} {self.sid}\r\n".encode())
        return self.sid

    def flush(self):
        self.sock.sendall(b"PING\r\n")
        while True:
            m = self.next()
            if m is None:
                return

    def next(self):
        """The next message as dict(subject, headers, data), or None for a PONG."""
        while True:
            line = self._line()
            if line == b"PING":
                self.sock.sendall(b"PONG\r\n")
                continue
            if line == b"PONG":
                return None
            parts = line.split()
            if parts[0] == b"MSG":
                n = int(parts[-1])
                return {"subject": parts[1].decode(), "headers": {}, "data": self._take(n)}
            if parts[0] == b"HMSG":
                hlen, total = int(parts[-2]), int(parts[-1])
                raw = self._take(total)
                return {"subject": parts[1].decode(), "headers": parse_nats_headers(raw[:hlen]), "data": raw[hlen:]}
            if parts[0] in (b"+OK",):
                continue
            if parts[0] == b"-ERR":
                raise AssertionError(line)

    def request(self, subject, payload=b""):
        if not hasattr(self, "inbox"):
            self.inbox = f"_INBOX.{uuid.uuid4().hex}"
            self.subscribe(self.inbox)
        self.sock.sendall(f"PUB {subject} {self.inbox} {len(payload)}\r\n".encode() + payload + b"\r\n")
        msg = self.next()
        while msg is None:
            msg = self.next()
        return json.loads(msg["data"]) if msg["data"] else msg

    def close(self):
        self.sock.close()


def parse_nats_headers(raw):
    lines = raw.decode().split("\r\n")
    out = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            out[k.strip()] = v.strip()
    return out


def stop_all(brokers):
    for b in brokers:
        try:
            b.stop()
        except Exception as e:  # keep stopping the others
            print(f"stopping {b.name}: {e}")
