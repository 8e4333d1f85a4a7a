#!/usr/bin/env python3
"""An independent client of Arbor's gRPC service, in Python with grpcio.

It starts its own cluster on 127.0.0.1 (two `arbor worker` processes with --auth-token-file and
--metrics-listen, and an `arbor serve` coordinator over them with --workers-token-file,
--auth-token-file holding two client tokens and --metrics-listen), then checks, asserting each:

  a. Score: a step past 2048 tokens (and a path past 16384, a call past 65536) is refused at
     once naming the field and the limit; a 2,000-token step is answered while the worker's
     resident memory grows by a bounded amount; the worker keeps serving afterwards.
  b. Auth: calls without a valid token get UNAUTHENTICATED, health stays open; client B cannot
     read (GetTree) or cancel client A's search (NOT_FOUND) while A can.
  c. Metrics: GET /metrics on both servers is Prometheus text whose arbor_ counters match the
     calls and searches made.
  d. SIGSTOP: a worker stopped mid-search is detected (HTTP/2 keepalive) and the search completes
     with its answer; after SIGCONT the worker rejoins the pool.
  e. SIGTERM: the coordinator drains: health NOT_SERVING (liveness stays SERVING), a new search
     gets UNAVAILABLE, the running search completes with its answer, the process exits 0.
     Then SIGTERM on the idle workers: each exits 0.

Each check is printed as it passes; the first failure is printed with the servers' last log
lines and the script exits 1. Every process it started is killed on exit.

Needs: python3 with grpcio, grpcio-tools and grpcio-health-checking
(`python3 -m pip install grpcio grpcio-tools grpcio-health-checking`).

Usage: python3 clients/python/walkthrough.py --arbor target/release/arbor
"""

import argparse
import atexit
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

try:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_tools import protoc
except ImportError as e:  # pragma: no cover - reported to the caller
    sys.stderr.write(
        f"missing Python package ({e}); "
        "`python3 -m pip install grpcio grpcio-tools grpcio-health-checking`\n"
    )
    sys.exit(3)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
QUESTION = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips "
    "in May. How many clips did Natalia sell altogether in April and May?"
)
WORKER_TOKEN = "walkthrough-w0rker-t0ken"
TOKEN_A = "walkthrough-alice"
TOKEN_B = "walkthrough-bob"
# The old defect kept a vocabulary row of logits per scored token (151,936 x 4 B, ~600 kB):
# 2,000 tokens would grow the worker by ~1.2 GB. Computed 32 tokens at a time, the growth is the
# sequence's KV cache (~24 kB/token) plus one chunk of logits; measured well under 100 MB.
SCORE_TOKENS = 2000
SCORE_GROWTH_MAX_MB = 300
# HTTP/2 keepalive on the coordinator's worker channels pings every 2 s and gives 3 s to answer:
# a stopped worker's calls fail ~5 s after the stop (measured 4.9 s).
DETECT_MAX_S = 15

T0 = time.monotonic()


class CheckFailed(Exception):
    pass


def log(msg):
    print(f"[{time.monotonic() - T0:6.1f}s] {msg}", flush=True)


def ok(msg):
    log(f"ok    {msg}")


def check(cond, msg):
    if not cond:
        raise CheckFailed(msg)


def code_of(e):
    return e.code() if isinstance(e, grpc.RpcError) else None


def describe(e):
    if isinstance(e, grpc.RpcError):
        return f"{e.code().name}: {e.details()}"
    return repr(e)


# ------------------------------------------------------------------------------------------
# Processes
# ------------------------------------------------------------------------------------------

PROCESSES = []


class Server:
    """An `arbor` process whose stderr lines are kept; it is listening once started."""

    def __init__(self, name, arbor, args, threads):
        self.name = name
        env = dict(os.environ)
        env["RAYON_NUM_THREADS"] = str(threads)
        env.pop("ARBOR_TOKEN", None)
        self.proc = subprocess.Popen(
            [arbor] + args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
        PROCESSES.append(self)
        self.pid = self.proc.pid
        self.lines = []
        self.addr = None
        self.metrics = None
        self.stopped = False
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for raw in self.proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            with self._cond:
                self.lines.append(line)
                m = re.match(r"arbor (?:worker|coordinator) listening on (\S+)", line)
                if m:
                    self.addr = m.group(1)
                m = re.match(r"arbor metrics listening on http://(\S+)/metrics", line)
                if m:
                    self.metrics = m.group(1)
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def wait_listening(self, timeout):
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.addr is None or self.metrics is None:
                if self.proc.poll() is not None:
                    raise CheckFailed(f"{self.name} exited ({self.proc.returncode}) before listening")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CheckFailed(f"{self.name} did not say it was listening within {timeout} s")
                self._cond.wait(min(left, 0.5))
        return self

    def signal(self, sig):
        os.kill(self.pid, sig)

    def wait_exit(self, timeout):
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def tail(self, n=25):
        with self._cond:
            return self.lines[-n:]

    def kill(self):
        if self.proc.poll() is None:
            try:
                os.kill(self.pid, signal.SIGCONT)
                self.proc.kill()
                self.proc.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                pass


def kill_all():
    for p in reversed(PROCESSES):
        p.kill()


def on_signal(signum, _frame):
    kill_all()
    sys.stderr.write(f"walkthrough: killed by signal {signum}; its servers were killed\n")
    os._exit(128 + signum)


def rss_kb(pid, field="VmRSS"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise CheckFailed(f"no {field} in /proc/{pid}/status")


# ------------------------------------------------------------------------------------------
# gRPC
# ------------------------------------------------------------------------------------------


def generate_stubs(proto_root, out):
    """Compiles arbor.proto with grpc_tools into `out` and imports it."""
    os.makedirs(out, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        # The well-known types (google/protobuf/*.proto) that grpc_tools ships.
        f"-I{os.path.join(os.path.dirname(protoc.__file__), '_proto')}",
        f"--python_out={out}",
        f"--grpc_python_out={out}",
        os.path.join(proto_root, "arbor", "v1", "arbor.proto"),
    ]
    rc = protoc.main(args)
    check(rc == 0, f"protoc failed ({rc}) on {proto_root}/arbor/v1/arbor.proto")
    sys.path.insert(0, out)
    from arbor.v1 import arbor_pb2, arbor_pb2_grpc  # noqa: E402

    return arbor_pb2, arbor_pb2_grpc


def bearer(token):
    return [("authorization", f"Bearer {token}")] if token is not None else []


def health(addr, service, timeout=3.0):
    """The serving status name of `service` at `addr`, asked without a token."""
    with grpc.insecure_channel(addr) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=timeout
        )
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def wait_health(addr, service, want, timeout):
    t = time.monotonic()
    last = None
    while time.monotonic() - t < timeout:
        try:
            last = health(addr, service)
        except grpc.RpcError as e:
            last = describe(e)
        if last == want:
            return time.monotonic() - t
        time.sleep(0.05)
    raise CheckFailed(f"health `{service}` at {addr} is {last}, not {want}, after {timeout} s")


def scrape(server):
    """Its metrics over HTTP: {(name, labels): value} and the raw text."""
    url = f"http://{server.metrics}/metrics"
    with urllib.request.urlopen(url, timeout=10) as r:
        check(r.status == 200, f"GET {url}: {r.status}")
        ctype = r.headers.get("Content-Type", "")
        body = r.read().decode()
    return Metrics(body, ctype)


class Metrics:
    def __init__(self, text, ctype=""):
        self.text = text
        self.ctype = ctype
        self.samples = []
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            series, _, value = line.rpartition(" ")
            name, _, labels = series.partition("{")
            self.samples.append((name, labels.rstrip("}"), float(value)))

    def sum(self, name, *labels):
        """The sum of the samples named `name` whose labels include each of `labels`."""
        return sum(
            v for n, l, v in self.samples if n == name and all(want in l for want in labels)
        )

    def has(self, name):
        return any(n == name for n, _, _ in self.samples)


# ------------------------------------------------------------------------------------------
# The walkthrough
# ------------------------------------------------------------------------------------------


class Walkthrough:
    def __init__(self, args, pb, pb_grpc, tmp):
        self.args = args
        self.pb = pb
        self.pb_grpc = pb_grpc
        self.tmp = tmp
        self.figures = {}
        self.worker_channels = {}
        # Calls this script made on worker 0 directly (they show in its counters).
        self.direct_expand_ok = 0
        self.direct_expand_tokens = 0
        self.direct_score = {}
        # Searches the coordinator finished, and their generated tokens.
        self.searches = 0
        self.search_tokens = 0

    # -- helpers ---------------------------------------------------------------------------

    def worker_stub(self, w):
        if w.addr not in self.worker_channels:
            self.worker_channels[w.addr] = grpc.insecure_channel(w.addr)
        return self.pb_grpc.WorkerStub(self.worker_channels[w.addr])

    def search_stub(self):
        return self.pb_grpc.SearchStub(self.channel)

    def request(self, rid, strategy, budget, seed, n=4, question=QUESTION, step=48):
        pb = self.pb
        return pb.SearchRequest(
            request_id=rid,
            question=question,
            strategy=strategy,
            n=n,
            budget=pb.Budget(generated_tokens=budget),
            sampling=pb.SamplingOptions(temperature=0.7, max_step_tokens=step),
            seed=seed,
        )

    def score_request(self, n_tokens, steps=1, paths=1):
        pb = self.pb
        step = pb.StepTokens(token_ids=[100 + i % 5000 for i in range(n_tokens)])
        path = pb.ScorePath(prompt_tokens=[9707, 11, 1879], steps=[step] * steps)
        return pb.ScoreRequest(paths=[path] * paths)

    def expand_request(self):
        pb = self.pb
        return pb.ExpandRequest(
            nodes=[pb.ExpandNode(prefix_tokens=[9707, 11, 1879], k=1, temperature=0.5, max_tokens=4)]
        )

    def direct_expand(self, w):
        r = self.worker_stub(w).Expand(
            self.expand_request(), metadata=bearer(WORKER_TOKEN), timeout=60
        )
        self.direct_expand_ok += 1
        self.direct_expand_tokens += sum(len(s.token_ids) for s in r.nodes[0].samples)
        return r

    def count_score(self, code):
        self.direct_score[code] = self.direct_score.get(code, 0) + 1

    def finished(self, result):
        self.searches += 1
        self.search_tokens += result.costs.generated_tokens

    def stream(self, req, token, on_first=None):
        """Runs SearchStream in a thread; returns a dict filled as it goes."""
        out = {"events": 0, "result": None, "error": None, "first": threading.Event(), "done_at": None}

        def run():
            try:
                for ev in self.search_stub().SearchStream(req, metadata=bearer(token), timeout=600):
                    out["events"] += 1
                    out["first"].set()
                    if ev.WhichOneof("event") == "result":
                        out["result"] = ev.result
            except grpc.RpcError as e:
                out["error"] = e
            finally:
                out["done_at"] = time.monotonic()
                out["first"].set()

        out["thread"] = threading.Thread(target=run, daemon=True)
        out["thread"].start()
        return out

    def join(self, s, timeout, what):
        s["thread"].join(timeout)
        check(not s["thread"].is_alive(), f"{what}: no result within {timeout} s")
        check(s["error"] is None, f"{what} failed: {describe(s['error'])}")
        check(s["result"] is not None, f"{what}: the stream ended without a result")
        return s["result"]

    # -- the cluster -----------------------------------------------------------------------

    def start(self):
        a = self.args
        tokens = os.path.join(self.tmp, "worker-tokens")
        with open(tokens, "w") as f:
            f.write(f"# the coordinator's token\n{WORKER_TOKEN}\n")
        coordinator_token = os.path.join(self.tmp, "coordinator-token")
        with open(coordinator_token, "w") as f:
            f.write(f"{WORKER_TOKEN}\n")
        clients = os.path.join(self.tmp, "client-tokens")
        with open(clients, "w") as f:
            f.write(f"{TOKEN_A}\n\n# client B\n{TOKEN_B}\n")
        common = ["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"]
        t = time.monotonic()
        self.workers = [
            Server(f"worker {i}", a.arbor, ["worker"] + common + ["--auth-token-file", tokens], a.threads)
            for i in range(2)
        ]
        for w in self.workers:
            w.wait_listening(a.start_timeout)
        ok(f"two workers listening ({self.workers[0].addr}, {self.workers[1].addr}; "
           f"metrics {self.workers[0].metrics}, {self.workers[1].metrics}) after {time.monotonic() - t:.1f} s")
        self.coord = Server(
            "coordinator",
            a.arbor,
            ["serve"] + common + [
                "--workers", ",".join(w.addr for w in self.workers),
                "--workers-token-file", coordinator_token,
                "--auth-token-file", clients,
                "--health-interval-ms", "300",
                "--drain-timeout", "120s",
            ],
            a.threads,
        ).wait_listening(a.start_timeout)
        self.channel = grpc.insecure_channel(self.coord.addr)
        ok(f"coordinator listening on {self.coord.addr} (metrics {self.coord.metrics})")

    # -- a. Score --------------------------------------------------------------------------

    def check_score(self):
        w = self.workers[0]
        stub = self.worker_stub(w)
        auth = bearer(WORKER_TOKEN)

        def refused(req, code, prefix, limit, what):
            t = time.monotonic()
            try:
                stub.Score(req, metadata=auth, timeout=30)
            except grpc.RpcError as e:
                took = time.monotonic() - t
                self.count_score(e.code().name)
                check(e.code() == code, f"{what}: {describe(e)}, wanted {code.name}")
                check(e.details().startswith(prefix) and limit in e.details(),
                      f"{what}: the message should name `{prefix}` and {limit}: {e.details()!r}")
                check(took < 2.0, f"{what}: refused after {took:.2f} s, not at once")
                ok(f"a. {what}: {code.name} in {took * 1000:.0f} ms: {e.details()!r}")
                return
            raise CheckFailed(f"{what}: answered, not refused")

        refused(self.score_request(6000), grpc.StatusCode.INVALID_ARGUMENT,
                "paths[0].steps[0].token_ids", "2048", "Score of a 6,000-token step")
        refused(self.score_request(2000, steps=9), grpc.StatusCode.INVALID_ARGUMENT,
                "paths[0]", "16384", "Score of a path of 9 x 2,000 tokens")
        refused(self.score_request(2000, paths=40), grpc.StatusCode.RESOURCE_EXHAUSTED,
                "", "65536", "Score of 40 paths of 2,000 tokens")

        # Warm up (engine buffers, pages of the weights), then measure from a settled size.
        self.direct_expand(w)
        stub.Score(self.score_request(64), metadata=auth, timeout=120)
        self.count_score("OK")
        time.sleep(0.3)
        before = rss_kb(w.pid)
        hwm_reset = True
        try:
            with open(f"/proc/{w.pid}/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
        except OSError:
            hwm_reset = False
        peak = [before]
        done = threading.Event()

        def sample():
            while not done.is_set():
                try:
                    peak[0] = max(peak[0], rss_kb(w.pid))
                except (OSError, CheckFailed):
                    return
                done.wait(0.01)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t = time.monotonic()
        try:
            resp = stub.Score(self.score_request(SCORE_TOKENS), metadata=auth, timeout=300)
        except grpc.RpcError as e:
            raise CheckFailed(f"the {SCORE_TOKENS}-token Score failed: {describe(e)}")
        finally:
            done.set()
            sampler.join()
        took = time.monotonic() - t
        self.count_score("OK")
        if hwm_reset:
            peak[0] = max(peak[0], rss_kb(w.pid, "VmHWM"))
        after = rss_kb(w.pid)
        check(len(resp.paths) == 1 and len(resp.paths[0].scores) == 1,
              f"one score for one step: {resp}")
        s = resp.paths[0].scores[0]
        check(0.0 <= s <= 1.0, f"the score {s} is in [0, 1]")
        check(resp.paths[0].tokens_computed >= SCORE_TOKENS,
              f"tokens_computed {resp.paths[0].tokens_computed} covers the step")
        grown = (peak[0] - before) / 1024
        self.figures["score_seconds"] = round(took, 2)
        self.figures["score_rss_before_mb"] = round(before / 1024)
        self.figures["score_rss_growth_mb"] = round(grown, 1)
        check(grown < SCORE_GROWTH_MAX_MB,
              f"the worker's resident memory grew {grown:.0f} MB scoring {SCORE_TOKENS} tokens "
              f"(bound {SCORE_GROWTH_MAX_MB} MB; a logits row per token would be ~1200 MB)")
        ok(f"a. Score of a {SCORE_TOKENS}-token step answered in {took:.1f} s (score {s:.3f}, "
           f"{resp.paths[0].tokens_computed} tokens computed); resident memory {before / 1024:.0f} MB, "
           f"peak +{grown:.1f} MB (bound {SCORE_GROWTH_MAX_MB} MB; {'VmHWM and ' if hwm_reset else ''}"
           f"VmRSS sampled every 10 ms), after +{(after - before) / 1024:.1f} MB")

        for service in ["", "arbor.v1.Worker"]:
            st = health(w.addr, service)
            check(st == "SERVING", f"worker health `{service}` after the Score: {st}")
        r = self.direct_expand(w)
        check(len(r.nodes) == 1 and len(r.nodes[0].samples) == 1, f"an Expand after the Score: {r}")
        ok("a. the worker keeps serving: health SERVING, an Expand answered")

    # -- b. Auth ---------------------------------------------------------------------------

    def check_auth(self):
        pb = self.pb
        S = pb.Strategy
        w = self.workers[0]
        try:
            self.worker_stub(w).ModelInfo(pb.ModelInfoRequest(), timeout=10)
            raise CheckFailed("the worker answered ModelInfo without a token")
        except grpc.RpcError as e:
            check(e.code() == grpc.StatusCode.UNAUTHENTICATED, f"worker without a token: {describe(e)}")
        ok("b. the worker refuses a call without a token: UNAUTHENTICATED")

        took = wait_health(self.coord.addr, "arbor.v1.Search", "SERVING", 60)
        for service in ["", "liveness"]:
            st = health(self.coord.addr, service)
            check(st == "SERVING", f"coordinator health `{service}`: {st}")
        ok(f"b. coordinator health open without a token: `arbor.v1.Search`, `` and `liveness` "
           f"SERVING (ready {took:.1f} s after listening)")

        small = self.request("", S.STRATEGY_BEST_OF_N, 16, 1, n=1, question="What is 2 + 3?")
        for token in [None, "mallory", TOKEN_A + " "]:
            try:
                self.search_stub().Search(small, metadata=bearer(token), timeout=60)
                raise CheckFailed(f"a search with token {token!r} was let in")
            except grpc.RpcError as e:
                check(e.code() == grpc.StatusCode.UNAUTHENTICATED, f"token {token!r}: {describe(e)}")
        ok("b. a search without a token, with an unknown one, or with a stray space: UNAUTHENTICATED")

        # The worker kept serving after the long Score: a short search (through either worker).
        t = time.monotonic()
        r = self.search_stub().Search(small, metadata=bearer(TOKEN_A), timeout=120)
        self.finished(r)
        check(r.costs.generated_tokens > 0, f"the short search generated nothing: {r}")
        check(len(r.request_id) == 32 and all(c in "0123456789abcdef" for c in r.request_id),
              f"a server-made request id is 32 hex digits: {r.request_id!r}")
        ok(f"b. client A's short search: {r.termination}, {r.costs.generated_tokens} tokens in "
           f"{time.monotonic() - t:.1f} s, server-made id {r.request_id}")

        rid = "walkthrough-a-1"
        s = self.stream(self.request(rid, S.STRATEGY_BEST_OF_N, 160, 3, question="What is 12 + 30?"), TOKEN_A)
        s["first"].wait(120)
        check(s["error"] is None and s["events"] > 0,
              f"A's search did not start: {describe(s['error']) if s['error'] else 'no event'}")
        bob = bearer(TOKEN_B)
        tree_req = pb.GetTreeRequest(request_id=rid, format=pb.TREE_FORMAT_JSON)
        for name, call in [
            ("GetTree", lambda: self.search_stub().GetTree(tree_req, metadata=bob, timeout=30)),
            ("Cancel", lambda: self.search_stub().Cancel(pb.CancelRequest(request_id=rid), metadata=bob, timeout=30)),
        ]:
            try:
                call()
                raise CheckFailed(f"client B's {name} of A's search {rid} was answered")
            except grpc.RpcError as e:
                check(e.code() == grpc.StatusCode.NOT_FOUND, f"B's {name} of A's search: {describe(e)}")
        running_now = s["result"] is None
        tree = self.search_stub().GetTree(tree_req, metadata=bearer(TOKEN_A), timeout=30)
        parsed = json.loads(tree.tree)
        check(parsed and "12 + 30" in tree.tree, f"A's tree holds A's question: {tree.tree[:300]!r}")
        ok(f"b. client B's GetTree and Cancel of A's search: NOT_FOUND; A's GetTree: a JSON tree of "
           f"{len(tree.tree)} bytes (running: {tree.running}; the search "
           f"{'was still running' if running_now else 'had finished'} when B asked)")
        result = self.join(s, 180, "A's search")
        self.finished(result)
        check(result.request_id == rid, f"A's result names {result.request_id!r}")
        check(result.termination != "cancelled", "B's Cancel cancelled A's search")
        check(result.costs.generated_tokens > 0, f"A's search generated nothing: {result}")
        done = self.search_stub().GetTree(tree_req, metadata=bearer(TOKEN_A), timeout=30)
        check(not done.running, "A's finished search still shows running")
        try:
            self.search_stub().GetTree(tree_req, metadata=bob, timeout=30)
            raise CheckFailed("B read A's finished tree")
        except grpc.RpcError as e:
            check(e.code() == grpc.StatusCode.NOT_FOUND, f"B's GetTree of A's finished search: {describe(e)}")
        ok(f"b. A's search finished untouched ({result.termination}, answer {result.answer!r}); "
           f"its kept tree is A's alone")

    # -- c. Metrics ------------------------------------------------------------------------

    def check_metrics(self):
        c = scrape(self.coord)
        check(c.ctype.startswith("text/plain"), f"coordinator /metrics Content-Type {c.ctype!r}")
        check("# TYPE arbor_search_duration_seconds histogram" in c.text, "a histogram's TYPE line")
        names = sorted({n for n, _, _ in c.samples})
        check(names and all(n.startswith("arbor_") for n in names), f"coordinator metric names: {names}")
        finished = c.sum("arbor_searches_finished_total")
        check(finished == self.searches,
              f"arbor_searches_finished_total {finished}, searches finished {self.searches}")
        tokens = c.sum("arbor_generation_tokens_total")
        check(tokens == self.search_tokens,
              f"arbor_generation_tokens_total {tokens}, the searches reported {self.search_tokens}")
        check(c.sum("arbor_search_duration_seconds_count") == self.searches, "search durations counted")
        check(c.sum("arbor_searches_running") == 0, "no search running")
        check(c.sum("arbor_pool_workers", 'state="healthy"') == 2, "two healthy workers")
        pool_ok = c.sum("arbor_pool_calls_total", 'method="expand"', 'code="OK"')
        check(pool_ok > 0, "the coordinator counted its Expand calls")
        ok(f"c. coordinator /metrics: {len(names)} arbor_ metrics; searches finished {finished:.0f}, "
           f"tokens {tokens:.0f} (as the searches reported), Expand calls OK {pool_ok:.0f}, 2 workers healthy")

        ws = [scrape(w) for w in self.workers]
        for i, m in enumerate(ws):
            names = sorted({n for n, _, _ in m.samples})
            check(names and all(n.startswith("arbor_") for n in names), f"worker {i} metric names: {names}")
            check(m.has("arbor_worker_forward_passes_total"), f"worker {i}: forward passes")
        expand_ok = sum(m.sum("arbor_worker_requests_total", 'method="expand"', 'code="OK"') for m in ws)
        check(expand_ok == pool_ok + self.direct_expand_ok,
              f"workers' Expand OK {expand_ok}: the coordinator's {pool_ok} + this script's {self.direct_expand_ok}")
        gen = sum(m.sum("arbor_worker_generation_tokens_total") for m in ws)
        check(gen == tokens + self.direct_expand_tokens,
              f"workers' generated tokens {gen}: the searches' {tokens} + this script's {self.direct_expand_tokens}")
        for code, n in sorted(self.direct_score.items()):
            got = ws[0].sum("arbor_worker_requests_total", 'method="score"', f'code="{code}"')
            check(got == n, f"worker 0 arbor_worker_requests_total{{method=\"score\",code=\"{code}\"}} {got}, sent {n}")
        check(ws[0].sum("arbor_worker_forward_passes_total") > 0, "worker 0 ran passes")
        ok(f"c. workers' /metrics: Expand calls OK {expand_ok:.0f} (the coordinator's + this script's), "
           f"generated tokens {gen:.0f}, worker 0's Score calls by code {self.direct_score}")

        try:
            urllib.request.urlopen(f"http://{self.coord.metrics}/", timeout=10)
            raise CheckFailed("GET / on the metrics port answered 200")
        except urllib.error.HTTPError as e:
            check(e.code == 404, f"GET / on the metrics port: {e.code}")
        ok("c. another path on the metrics port: 404")

    # -- d. SIGSTOP ------------------------------------------------------------------------

    def check_sigstop(self):
        pb = self.pb
        # The same search on the healthy pool first: the same seed gives the same search, and a
        # call re-sent elsewhere keeps its seeds, so the search over a stopped worker must end
        # with this result.
        t = time.monotonic()
        healthy = self.search_stub().Search(
            self.request("walkthrough-healthy", pb.STRATEGY_BEAM, self.args.stop_budget, 9),
            metadata=bearer(TOKEN_A), timeout=300)
        self.finished(healthy)
        ok(f"d. the beam search on the healthy pool: {healthy.termination}, answer {healthy.answer!r}, "
           f"{healthy.costs.generated_tokens} tokens in {time.monotonic() - t:.1f} s")
        before = scrape(self.coord)
        s = self.stream(self.request("walkthrough-stop", pb.STRATEGY_BEAM, self.args.stop_budget, 9), TOKEN_A)
        s["first"].wait(120)
        check(s["error"] is None and s["events"] > 0, "the search to stop a worker under did not start")
        # Once under way, stop the worker with the most calls in flight.
        t = time.monotonic()
        while True:
            loads = []
            for w in self.workers:
                info = self.worker_stub(w).ModelInfo(pb.ModelInfoRequest(), metadata=bearer(WORKER_TOKEN), timeout=10)
                loads.append(info.in_flight)
            if max(loads) > 0 and time.monotonic() - t > 1.0:
                break
            check(s["result"] is None, "the search ended before a worker could be stopped; raise --stop-budget")
            check(time.monotonic() - t < 60, "no worker call in flight")
            time.sleep(0.05)
        i = max(range(len(loads)), key=lambda j: loads[j])
        victim = self.workers[i]
        victim.signal(signal.SIGSTOP)
        victim.stopped = True
        stopped_at = time.monotonic()
        log(f"      d. worker {i} stopped (SIGSTOP) with {loads[i]} call(s) in flight (loads {loads})")
        detected = None
        unhealthy = None
        while s["thread"].is_alive() and time.monotonic() - stopped_at < self.args.stop_timeout:
            m = scrape(self.coord)
            failed = sum(v for n, l, v in m.samples if n == "arbor_pool_calls_total" and 'code="OK"' not in l) - \
                sum(v for n, l, v in before.samples if n == "arbor_pool_calls_total" and 'code="OK"' not in l)
            if detected is None and failed > 0:
                detected = time.monotonic() - stopped_at
            if unhealthy is None and m.sum("arbor_pool_workers", 'state="unhealthy"') >= 1:
                unhealthy = time.monotonic() - stopped_at
            time.sleep(0.1)
        s["thread"].join(1)
        alive = s["thread"].is_alive()
        finished_after = (s["done_at"] or time.monotonic()) - stopped_at
        victim.signal(signal.SIGCONT)
        victim.stopped = False
        check(not alive, f"the search did not finish within {self.args.stop_timeout} s of the SIGSTOP "
              f"(calls failed after {detected}, unhealthy after {unhealthy})")
        result = self.join(s, 1, "the search over the stopped worker")
        self.finished(result)
        m = scrape(self.coord)
        calls = {(l): v for n, l, v in m.samples if n == "arbor_pool_calls_total"}
        retries = m.sum("arbor_pool_retries_total") - before.sum("arbor_pool_retries_total")
        self.figures["sigstop_call_failed_s"] = detected and round(detected, 2)
        self.figures["sigstop_unhealthy_s"] = unhealthy and round(unhealthy, 2)
        self.figures["sigstop_search_done_s"] = round(finished_after, 2)
        check(result.termination != "cancelled" and result.termination != "too_many_failures",
              f"the search ended {result.termination}")
        check(result.answer != "", f"the search reached no answer ({result.termination})")
        check(detected is not None, f"no worker call failed after the SIGSTOP: {calls}")
        check(detected < DETECT_MAX_S,
              f"the stopped worker's call failed {detected:.1f} s after the stop (keepalive: "
              f"pings every 2 s, 3 s to answer; bound {DETECT_MAX_S} s)")
        check(retries > 0, f"no call was re-sent after the SIGSTOP: {calls}")
        check((result.answer, result.costs.generated_tokens) == (healthy.answer, healthy.costs.generated_tokens),
              f"the search over the stopped worker ended with {result.answer!r} after "
              f"{result.costs.generated_tokens} tokens; the healthy run with {healthy.answer!r} after "
              f"{healthy.costs.generated_tokens}")
        ok(f"d. SIGSTOP: the stopped worker's call failed {detected:.1f} s after the stop "
           f"(marked unhealthy after {unhealthy if unhealthy is None else round(unhealthy, 1)} s), "
           f"{retries:.0f} call(s) re-sent; the search finished {finished_after:.1f} s after the stop: "
           f"{result.termination}, answer {result.answer!r}, {result.costs.generated_tokens} tokens, "
           f"as the healthy run")
        took = None
        t = time.monotonic()
        while time.monotonic() - t < 30:
            if scrape(self.coord).sum("arbor_pool_workers", 'state="healthy"') == 2:
                took = time.monotonic() - t
                break
            time.sleep(0.1)
        check(took is not None, "the worker did not rejoin the pool within 30 s of SIGCONT")
        self.figures["sigcont_rejoined_s"] = round(took, 2)
        ok(f"d. after SIGCONT the worker is healthy in the pool again within {took:.1f} s")

    # -- e. SIGTERM ------------------------------------------------------------------------

    def check_sigterm(self):
        pb = self.pb
        addr = self.coord.addr
        # Beam search keeps back what running its best beam to an answer takes, so it reaches
        # one within a small budget (best-of-n's samples may all be cut off by the budget).
        req = self.request("walkthrough-drain", pb.STRATEGY_BEAM, self.args.drain_budget, 5,
                           question="What is 12 + 30?")
        s = self.stream(req, TOKEN_A)
        s["first"].wait(120)
        check(s["error"] is None and s["events"] > 0 and s["result"] is None,
              "the search to drain did not start (or already ended)")
        self.coord.signal(signal.SIGTERM)
        term_at = time.monotonic()
        for service in ["", "arbor.v1.Search"]:
            wait_health(addr, service, "NOT_SERVING", 3)
        not_serving = time.monotonic() - term_at
        st = health(addr, "liveness")
        check(st == "SERVING", f"`liveness` during the drain: {st}")
        try:
            self.search_stub().Search(self.request("walkthrough-late", pb.STRATEGY_BEST_OF_N, 16, 1, n=1),
                                      metadata=bearer(TOKEN_A), timeout=30)
            raise CheckFailed("a new search was accepted during the drain")
        except grpc.RpcError as e:
            check(e.code() == grpc.StatusCode.UNAVAILABLE, f"a new search during the drain: {describe(e)}")
        refused_at = time.monotonic()
        check(s["done_at"] is None or s["done_at"] > refused_at,
              "the running search ended before the drain was seen; raise --drain-budget")
        ok(f"e. SIGTERM: health `` and `arbor.v1.Search` NOT_SERVING within {not_serving:.2f} s, "
           f"`liveness` SERVING; a new search: UNAVAILABLE")
        result = self.join(s, 150, "the search running through the drain")
        done = s["done_at"] - term_at
        check(result.termination.startswith("budget") or result.termination == "completed",
              f"the drained search ended {result.termination}")
        check(result.costs.generated_tokens > 0 and result.answer != "",
              f"the drained search has no answer: {result.answer!r}, {result.costs.generated_tokens} tokens")
        rc = self.coord.wait_exit(60)
        exited = time.monotonic() - term_at
        check(rc is not None, "the coordinator did not exit within 60 s of its search finishing")
        check(rc == 0, f"the coordinator exited {rc}")
        self.figures["drain_search_done_s"] = round(done, 2)
        self.figures["drain_exit_s"] = round(exited, 2)
        ok(f"e. the running search completed {done:.1f} s after the SIGTERM ({result.termination}, "
           f"answer {result.answer!r}, {result.costs.generated_tokens} tokens); the coordinator "
           f"exited 0 {exited:.1f} s after the SIGTERM")
        for i, w in enumerate(self.workers):
            w.signal(signal.SIGTERM)
        for i, w in enumerate(self.workers):
            rc = w.wait_exit(30)
            check(rc == 0, f"worker {i} after SIGTERM: exit {rc}")
        ok("e. SIGTERM on the idle workers: both exited 0")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arbor", required=True, help="the arbor binary (target/release/arbor)")
    ap.add_argument("--proto", default=os.path.join(REPO, "proto"),
                    help="the folder holding arbor/v1/arbor.proto (default: the repository's)")
    ap.add_argument("--threads", type=int, default=1, help="RAYON_NUM_THREADS of each server (default 1)")
    ap.add_argument("--start-timeout", type=float, default=180, help="seconds for a server to start")
    ap.add_argument("--stop-budget", type=int, default=240,
                    help="generated tokens of the search a worker is stopped under (default 240)")
    ap.add_argument("--stop-timeout", type=float, default=90,
                    help="seconds the search may take after the SIGSTOP (default 90)")
    ap.add_argument("--drain-budget", type=int, default=240,
                    help="generated tokens of the search running through the drain (default 240)")
    args = ap.parse_args()
    check_exe = os.path.isfile(args.arbor) and os.access(args.arbor, os.X_OK)
    if not check_exe:
        print(f"FAILED: --arbor {args.arbor} is not an executable file", flush=True)
        return 2

    atexit.register(kill_all)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    with tempfile.TemporaryDirectory(prefix="arbor-walkthrough-") as tmp:
        w = None
        try:
            pb, pb_grpc = generate_stubs(args.proto, os.path.join(tmp, "stubs"))
            ok(f"stubs generated from {args.proto}/arbor/v1/arbor.proto (grpcio {grpc.__version__})")
            w = Walkthrough(args, pb, pb_grpc, tmp)
            w.start()
            w.check_score()
            w.check_auth()
            w.check_metrics()
            w.check_sigstop()
            w.check_sigterm()
        except (CheckFailed, grpc.RpcError, OSError, ValueError) as e:
            msg = str(e) if isinstance(e, CheckFailed) else f"unexpected {type(e).__name__}: {describe(e)}"
            log(f"FAILED {msg}")
            for p in PROCESSES:
                print(f"--- last stderr lines of {p.name} (pid {p.pid}, exit {p.proc.poll()}):", flush=True)
                for line in p.tail():
                    print(f"    {line}")
            kill_all()
            return 1
        finally:
            kill_all()
        log(f"all checks passed in {time.monotonic() - T0:.1f} s; figures: {json.dumps(w.figures)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
