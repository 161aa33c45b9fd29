"""``gllm serve --replicas N``: Ray, the engine replicas on Ray Serve, and the ZeroMQ front end before them.

Without ``--ray-address`` a local Ray instance is started for this process (no dashboard, a small object
store: replies are small) and ended with it. With one, the process joins that cluster (``ray start
--head`` on one machine, ``ray start --address=...`` on the others) and only removes its own Serve
application at the end. Each replica asks Ray for ``--threads`` CPUs (default: this machine's cores shared
among the replicas) and, on ``--device cuda``, one GPU.

Ray Serve lets a replica take ``max_ongoing_requests`` calls at once (5 by default), which would cap a
batching engine if each generation were a call. Here generations are opened by short calls and answered
through one reply stream per replica (``relay``); the front end keeps at most ``REQUESTS_PER_SLOT`` times
the batch size open per replica (a running batch and one more waiting in the engine's queue), and
``max_ongoing_requests`` is that plus ``CONTROL_CALLS``, so that no call ever waits in Serve's router.

SIGTERM or SIGINT while the replicas start (which can take minutes) stops the start-up: the calls that
wait on Ray run on a thread of their own, so that the main thread, where Python runs signal handlers,
is never stuck in one. The clean-up (removing the Serve application, ending a Ray instance of its own) is
given ``CLEANUP_TIMEOUT_S`` and then left, so that a Ray cluster that vanished meanwhile cannot hold the
process; a second signal during the clean-up exits at once.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import zmq

from gllm.runtime.access import CurveServer
from gllm.runtime.limits import ServerLimits

log = logging.getLogger(__name__)

APP_NAME = "gllm"
REQUESTS_PER_SLOT = 2  # requests the front end keeps open per replica, per batch slot
CONTROL_CALLS = 16
LOCAL_OBJECT_STORE_BYTES = 256 << 20
HEALTH_CHECK_PERIOD_S = 2.0
READY_TIMEOUT_S = 600.0  # a replica loading a large model from a slow disk
CLEANUP_TIMEOUT_S = 30.0
SIGNAL_CHECK_S = 0.2
T = TypeVar("T")


class StartupInterrupted(Exception):
    """SIGTERM or SIGINT came before the front end was serving."""


class Signals:
    """What SIGTERM and SIGINT do in each phase: stop the start-up, stop the front end, or end the process."""

    def __init__(self):
        self.on_signal: Callable[[], None] = self._interrupt_startup

    def install(self) -> None:  # again after ray.init, which puts in handlers of its own
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.on_signal())

    def _interrupt_startup(self) -> None:
        self.on_signal = self._exit_now
        raise StartupInterrupted

    @staticmethod
    def _exit_now() -> None:
        log.warning("a second signal during the clean-up: exiting now")
        os._exit(1)


def waiting(call: Callable[[], T]) -> T:
    """``call()`` on a thread of its own, waited for in short naps that let signal handlers run."""
    result: list = []

    def run() -> None:
        try:
            result.append((True, call()))
        except BaseException as exc:  # handed to the caller
            result.append((False, exc))

    thread = threading.Thread(target=run, name="gllm-cluster-start", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(SIGNAL_CHECK_S)
    ok, value = result[0]
    if not ok:
        raise value
    return value


def serve_cluster(args: argparse.Namespace, limits: ServerLimits, curve: CurveServer | None) -> int:
    if args.ray_address is not None:
        # Ray 2.60 starts clusters (``ray start --head``) with token authentication, which a driver uses only
        # when told to before Ray is imported; the token is the one ``ray start`` wrote (~/.ray/auth_token),
        # or RAY_AUTH_TOKEN.
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    try:
        import ray
        from ray import serve
    except ImportError:
        raise ValueError("--replicas needs Ray Serve: pip install 'gllm[cluster]'") from None
    from ray.serve.config import RequestRouterConfig

    from gllm.cluster.frontend import FrontEnd
    from gllm.cluster.ray_router import PinnedRequestRouter
    from gllm.cluster.relay import Relay
    from gllm.cluster.replica import EngineReplica, ReplicaConfig
    from gllm.cluster.router import Router

    threads = args.threads or max(1, (os.cpu_count() or 1) // args.replicas)
    try:
        front = FrontEnd(args.bind, limits, curve)  # bind first: a port in use fails before Ray starts
    except zmq.ZMQError as exc:
        log.error("cannot bind %s: %s", args.bind, exc)
        return 1
    signals = Signals()
    signals.install()
    own_ray = args.ray_address is None
    relay, ran = None, False
    try:
        if own_ray:
            ray.init(num_cpus=max(os.cpu_count() or 1, args.replicas * threads), include_dashboard=False,
                     object_store_memory=LOCAL_OBJECT_STORE_BYTES, log_to_driver=True)
        else:
            ray.init(address=args.ray_address, log_to_driver=True)
        signals.install()
        serve.start(proxy_location="Disabled")
        config = ReplicaConfig(str(args.model), args.device, args.dtype, args.quantize, threads, args.max_batch_size,
                               args.max_seq_len, args.kv_blocks, args.kv_memory, args.max_pinned_memory, limits,
                               tuple(args.adapter))
        capacity = REQUESTS_PER_SLOT * args.max_batch_size
        app = EngineReplica.options(
            num_replicas=args.replicas,
            max_ongoing_requests=capacity + CONTROL_CALLS,
            ray_actor_options={"num_cpus": threads, "num_gpus": 1 if args.device.startswith("cuda") else 0},
            request_router_config=RequestRouterConfig(request_router_class=PinnedRequestRouter,
                                                      request_routing_stats_period_s=1.0),
            health_check_period_s=HEALTH_CHECK_PERIOD_S,
        ).bind(config)
        log.info("starting %d replica(s) of %s, %d thread(s) each", args.replicas, args.model, threads)
        handle = waiting(lambda: serve.run(app, name=APP_NAME, route_prefix=None))
        router = Router(capacity, max_imbalance=max(1, args.max_batch_size // 2), policy=args.routing)
        relay = Relay(handle, router, front.deliver)
        front.attach(relay, waiting(lambda: relay.describe(READY_TIMEOUT_S)))
        gc.collect()
        gc.freeze()  # as gllm serve does: start-up objects (Ray's included) out of every full collection
        signals.on_signal = front.stop
        ran = True
        front.run()
    except StartupInterrupted:
        log.info("stopped while the replicas were starting")
    finally:
        signals.on_signal = signals._exit_now
        if not ran:
            front.close()
        if relay is not None:
            relay.stop()

        def clean_up() -> None:
            try:
                if ray.is_initialized():
                    serve.delete(APP_NAME)
                    if own_ray:
                        serve.shutdown()
            except Exception as exc:  # Ray gone, or Serve never started: nothing more to remove
                log.warning("cleaning up Ray Serve: %s", exc)
            finally:
                if own_ray:
                    ray.shutdown()

        cleaner = threading.Thread(target=clean_up, name="gllm-cluster-cleanup", daemon=True)
        cleaner.start()
        deadline = time.monotonic() + CLEANUP_TIMEOUT_S
        while cleaner.is_alive() and time.monotonic() < deadline:
            cleaner.join(SIGNAL_CHECK_S)
        if cleaner.is_alive():  # Ray's own exit hooks would wait for it again: leave now
            log.warning("Ray did not answer the clean-up within %g s (is it gone?): leaving it", CLEANUP_TIMEOUT_S)
            logging.shutdown()
            os._exit(0)
    return 0
