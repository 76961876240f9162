"""CPU implementations of the ops: NumPy plus Numba (``parallel=True``, ``cache=True``).

One module per op, named like the op's public module. Every kernel here is race-free: each
parallel iteration writes elements no other iteration writes, so results do not depend on
thread scheduling.
"""
