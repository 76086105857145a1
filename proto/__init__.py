"""Protocol buffer messages that cross the wire between Swarm Mesh peers, and their generated code.

Used by kernels (tensor encoding), swarm (peer RPCs) and petals_like (client RPCs).
"""
