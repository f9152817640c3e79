"""TokenSpeed engine: scheduler binding, SPMD modeling, models, executor, server.

The engine reaches kernels only through ``tokenspeed_kernels``.
"""
