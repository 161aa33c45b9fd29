"""Replicas of the engine on Ray Serve behind one ZeroMQ endpoint: ``gllm serve --replicas N``.

``launch`` starts it all; ``frontend`` is the endpoint the clients talk to (the runtime's ``Endpoint``),
``relay`` its calls to the replicas (routing, streaming, failover), ``router`` and ``prefix`` the routing
rules, ``ray_router`` Ray Serve's side of them, ``replica`` the deployment and ``host`` the engine inside
it (the runtime's ``EngineService`` on a thread). Only this package imports Ray; see ``docs/cluster.md``.
"""
