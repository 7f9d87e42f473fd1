"""veRL (verl 0.9) rollout backend: select it with ``actor_rollout_ref.rollout.name=rollout``.

verl 0.9 plugs an external engine in at three points, all filled here without editing verl:

1. ``RolloutReplicaRegistry.register(name, loader)``: the replica class verl's ``LLMServerManager``
   builds per replica (``replica.RolloutServerReplica``). Its ``launch_servers`` starts one server
   actor (``server.RolloutServer``) per replica, which runs ``rollout serve`` on the replica's node
   and device and answers verl's server-mode calls: ``generate`` -> ``TokenOutput`` (token ids,
   per-token log-probs, ``stop_reason``), ``wake_up`` / ``sleep``, KV cache release / resume /
   clear, ``abort_all_requests`` / ``resume_generation``, ``set_global_steps``.
2. ``_ROLLOUT_REGISTRY[(name, "async")]``: the worker-side ``BaseRollout`` that verl's trainer
   workers (hybrid) and ``CheckpointEngineWorker`` (standalone / colocated) create
   (``adapter.ServerAdapter``): memory resume / release and ``update_weights``.
3. ``verl.plugins`` entry point (``import verl`` loads it): imports this package, which registers
   both entries (``registration.register``) in every process, Ray workers included.
   ``VERL_USE_EXTERNAL_MODULES=integrations.verl`` does the same where the project is not installed.

Weights: verl 0.9 hands every backend a generator of ``(name, tensor)`` pairs through
``BaseRollout.update_weights`` -- from the trainer's model engine in hybrid mode (checkpoint engine
backend "naive"), or from a checkpoint engine (NCCL, NIXL, ...) on the rollout side otherwise. The
adapter loads them into the server with ``weight_sync`` (CUDA IPC for GPU tensors, shared memory
for CPU ones), tagged with verl's step as the weight version. Delta checkpoint engines and LoRA
adapters (unmerged) are refused.

Limits: one rank per replica (tensor / pipeline / data parallel sizes 1); text only; no routed
experts; the server binds loopback.
"""

from integrations.verl.registration import BACKEND_NAME, register

__all__ = ["BACKEND_NAME", "register"]

register()
