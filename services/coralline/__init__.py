"""coralline: distributed, lossless speculative decoding.

A CORAL draft head proposes token trees; the target model verifies each tree in one forward pass
with Traversal Verification. This package holds the pure tensor core (tree, sampling,
verification) and, in later layers, the engine, gRPC services and the router.

Importing the package imports nothing heavy: the client SDK must work without torch.
"""

__version__ = "0.1.0"
