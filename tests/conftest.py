import os
import sys

# Make the flat top-level modules (clustering.py, evaluate.py, ...) importable from tests/.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
