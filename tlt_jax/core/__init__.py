"""The bottom layer: errors, strict JSON, pytree paths, shape arithmetic and named random streams.

Nothing here imports another module of the package.
"""
