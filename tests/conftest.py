import os

# The Triton interpreter must be chosen before triton is first imported (no GPU on CI).
os.environ.setdefault("TRITON_INTERPRET", "1")
