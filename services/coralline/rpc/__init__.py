"""gRPC shells around the core: codecs, the drafter and verifier servers, the remote drafter.

Servicers hold no algorithm: they validate, convert messages to the core's dataclasses
(codec.py) and call the engine or a drafter. Generated code lives in coralline._proto
(`make protos`); `pb()` imports it with a clear error when it was not generated.
"""
