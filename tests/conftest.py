import os
import sys

# Make tests/helpers.py importable as `helpers` and the repo root importable without installation.
sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
