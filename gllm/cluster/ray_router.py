"""Ray Serve's side of routing: a request router that sends each call where the front end chose.

The front end decides (``gllm.cluster.router``); Ray Serve's handle delivers. Each call names its replica
in the ``route`` keyword, and ``PinnedRequestRouter`` picks that one among the running replicas. If it is
no longer there (it died between the choice and the call), any running replica takes the call, and the
front end learns where it landed from the reply stream.

Serve builds the router inside the front end's deployment handle, in the front end's process, so it also
publishes what it knows of the replicas on ``gllm.cluster.board``: which are running (Serve's controller
checks their health and replaces those that die) and the statistics each replica reports. Serve ships
this module by value, so it holds no state and imports the board when it runs.
"""

from __future__ import annotations

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica


class PinnedRequestRouter(RequestRouter):
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        route = pending_request.kwargs.get("route") if pending_request is not None else None
        pinned = [r for r in candidate_replicas if r.replica_id.unique_id == route]
        return [pinned or candidate_replicas]

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        from gllm.cluster.board import BOARD

        super().update_replicas(replicas)
        BOARD.publish({r.replica_id.unique_id: dict(r.routing_stats or {}) for r in replicas})

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        from gllm.cluster.board import BOARD

        super().on_replica_actor_died(replica_id)
        BOARD.remove(replica_id.unique_id)
