import os
import sys

# Idle OpenMP threads that spin make small torch ops 5-10x slower on a loaded 2-core machine;
# set before torch is first imported (see bench/bench_clustering.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Make the flat top-level modules (clustering.py, evaluate.py, ...) importable from tests/.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
