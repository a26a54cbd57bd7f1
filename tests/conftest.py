import os
import sys

# tests/naive.py is a helper module, imported by name from the tests.
sys.path.insert(0, os.path.dirname(__file__))
