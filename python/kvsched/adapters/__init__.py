"""Adapters that put kvsched's scheduling core inside existing serving engines.

``kvsched.adapters.vllm.Scheduler`` is a drop-in ``scheduler_cls`` for vLLM's v1 engine. Each adapter
imports its engine lazily: importing this package never requires the engine to be installed.
"""
